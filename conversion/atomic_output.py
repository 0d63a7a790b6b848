"""Write a folder or file all at once: build it under a temporary sibling path, then rename it into place.

A failure (an exception, a full disk) removes the temporary path, so a reader never sees a half-written artefact.
A process killed outright (SIGKILL, power loss) cannot clean up; its temporary path carries its pid
(``.<name>.tmp-<pid>-<random>``), and the next write of the same target removes it once that pid is gone.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def _prefix(target):
    return f".{target.name}.tmp-{os.getpid()}-"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temporaries(target):
    """Remove temporary siblings of ``target`` left by writers that were killed (their pid no longer exists)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in target.parent.glob(f".{target.name}.tmp-*-*"):
        pid = path.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(target, overwrite=False):
    """Yield a temporary folder next to ``target``; on success it becomes ``target``, on failure it is removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output {target} already exists; remove it or choose another path")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=parent))
    except OSError as exc:
        raise OSError(f"cannot write output {target}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the user's usual permissions
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target):
    """Yield a temporary file path next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
