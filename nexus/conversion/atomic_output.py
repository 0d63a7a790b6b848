"""Write a folder or file all at once: build it under a temporary sibling path, then rename it into place.

A failure (an exception, a full disk) removes the temporary path, so a reader never sees a half-written artefact.
A process killed outright (SIGKILL, power loss) cannot clean up; its temporary path carries its pid
(``.<name>.tmp-<pid>-<random>``), and the next write of the same target removes it once that pid is gone.

Replacing an existing folder (``overwrite``) never deletes it first: the new folder is built, the old one is renamed
aside to ``.<name>.old-<pid>-<random>``, the new one renamed in, and only then the old one deleted. A kill between
the two renames leaves the old folder whole under its ``.old-`` name; the next write (or `sweep_stale_temporaries`)
renames it back. An output that is, contains or lies inside one of its ``sources`` is refused before anything is
created or deleted (`check_output_vs_sources`).
"""

import contextlib
import errno
import glob
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from .run_paths import is_within


class OutputExistsError(FileExistsError):
    pass


class OutputOverlapsSourceError(ValueError):
    """The output would replace, contain or sit inside a path the command reads; the message names both."""


def _prefix(target):
    return f".{target.name}.tmp-{os.getpid()}-"


def _old_name(target):
    return f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _lexists(path):
    return os.path.lexists(path)


def _remove(path):
    """Delete a folder tree, or a file / symlink (never following a symlink into what it points at)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _named_sources(sources):
    """[(role, path)] from a {role: path} mapping or an iterable of paths / (role, path) pairs; None is skipped."""
    items = sources.items() if isinstance(sources, dict) else sources
    out = []
    for item in items or ():
        role, path = item if isinstance(item, tuple) else ("source", item)
        if path is not None:
            out.append((role, path))
    return out


def _shown(path, resolved):
    return f"{path}" if Path(os.path.abspath(path)) == resolved else f"{path} (= {resolved})"


def check_output_vs_sources(target, sources, inside_ok=False):
    """Raise `OutputOverlapsSourceError` if ``target`` is, contains or (unless ``inside_ok``) lies inside a source.

    ``sources``: {role: path} or an iterable of paths / (role, path) pairs (role e.g. ``"teacher"``, ``"student"``;
    None entries are skipped). Both sides are resolved through symlinks first, so a symlinked output pointing at a
    source is caught. A source that does not exist cannot be harmed and is skipped. Nothing is created or deleted.
    """
    try:
        target_resolved = Path(target).resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise OSError(f"cannot write output {target}: {exc}") from None
    for role, source in _named_sources(sources):
        if not _lexists(source):
            continue
        try:
            source_resolved = Path(source).resolve()
        except (RuntimeError, OSError):
            continue  # a symlink loop holds nothing an output could harm; the source's own check names it
        out, src = _shown(target, target_resolved), _shown(source, source_resolved)
        if target_resolved == source_resolved:
            raise OutputOverlapsSourceError(f"output {out} is the source {role} {src}; choose another output")
        if is_within(source_resolved, target_resolved):
            raise OutputOverlapsSourceError(f"output {out} is a parent folder of the source {role} {src}; "
                                            "choose an output outside it")
        if not inside_ok and is_within(target_resolved, source_resolved):
            raise OutputOverlapsSourceError(f"output {out} is inside the source {role} {src}; "
                                            "choose an output outside it")


def _stale(target, kind):
    """Siblings ``.<name>.<kind>-<pid>-*`` of ``target`` whose writer (pid) is gone, oldest rename first."""
    found = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*-*"):
        pid = path.name[len(f".{target.name}.{kind}-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):  # (another sweeper may have taken it meanwhile)
            found.append((path.lstat().st_ctime, path))
    return [path for _, path in sorted(found)]


def sweep_stale_temporaries(target):
    """Clean up after writers of ``target`` that were killed (their pid no longer exists).

    Their ``.tmp-`` folders/files are removed. An ``.old-`` sibling is the previous output a killed overwrite had
    renamed aside: if ``target`` is missing (the kill came between the two renames) the newest one is renamed back to
    ``target``; otherwise it is deleted. Returns the paths removed or restored.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    done = []
    for path in reversed(_stale(target, "old")):  # newest first: the one a restore should bring back
        if not _lexists(target):
            os.rename(path, target)  # an error leaves it where it is: never delete the only copy
        else:
            _remove(path)
        done.append(path)
    for path in _stale(target, "tmp"):
        _remove(path)
        done.append(path)
    return done


def _write_failed(exc) -> bool:
    """A full disk, a quota, a file-size limit or a read-only file system: the output could not be written."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _write_error(target, exc) -> OSError:
    err = OSError(f"cannot write output {target}: {exc.strerror or exc}; nothing of it was kept")
    err.errno = exc.errno
    return err


@contextlib.contextmanager
def atomic_dir(target, overwrite=False, sources=()):
    """Yield a temporary folder next to ``target``; on success it becomes ``target``, on failure it is removed.

    ``sources`` (see `check_output_vs_sources`): paths the caller reads; a ``target`` that is, contains or lies inside
    one is refused before anything is created. With ``overwrite`` an existing ``target`` is swapped out by renames
    and deleted only once the new folder is in place.
    """
    target = Path(target)
    check_output_vs_sources(target, sources)
    parent = target.parent
    if parent.is_dir():
        try:
            sweep_stale_temporaries(target)  # may bring back an output a killed overwrite had renamed aside
        except OSError as exc:
            raise OSError(f"cannot write output {target}: {exc.strerror or exc}") from exc
    if _lexists(target) and not overwrite:
        raise OutputExistsError(f"output {target} already exists; remove it or choose another path")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=parent))
    except OSError as exc:
        raise OSError(f"cannot write output {target}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the user's usual permissions
        old = None
        if overwrite and _lexists(target):
            old = parent / _old_name(target)
            os.rename(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)  # put the previous output back
            raise
        if old is not None:
            _remove(old)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _write_failed(exc):
            raise _write_error(target, exc) from exc
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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _write_failed(exc):
            raise _write_error(target, exc) from exc
        raise
