"""Write a folder or file all at once: build it under a temporary sibling path, then rename it into place.

A failure (an exception, a full disk) removes the temporary path, so a reader never sees a half-written artefact.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_dir(target, overwrite=False):
    """Yield a temporary folder next to ``target``; on success it becomes ``target``, on failure it is removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output {target} already exists; remove it or choose another path")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
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
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
