"""Paths that come from a recipe (run names, artefact names) never write outside the run folder.

`safe_run_path(run_root, relative)` is the one gate: it refuses an absolute path, a ``..`` component, an empty name,
a NUL byte, and any path whose existing part resolves (through symlinks) outside ``run_root``. It returns the
resolved path inside the run folder, so a caller writes exactly where the check looked.

    out = safe_run_path(recipe.run_path, "export/model")        # runs/<name>/export/model
    safe_run_path(recipe.run_path, "../../etc/cron.d/x")         # RunPathError naming the value
"""

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


class RunPathError(ValueError):
    """A path from a recipe would write outside its run folder; the message names the field and the value."""


def is_within(path, root) -> bool:
    """``path`` is ``root`` or lies below it; both are compared as given (resolve them first to follow symlinks)."""
    path, root = Path(path), Path(root)
    return path == root or root in path.parents


def _where(field):
    return f"{field}: " if field else ""


def safe_run_path(run_root, relative, field=None) -> Path:
    """``run_root / relative``, resolved, or `RunPathError` if it would escape ``run_root``.

    ``field`` (e.g. ``"stages.export.out"``) is named in the error. ``run_root`` itself may be (or sit under) a
    symlink: it is resolved first, and everything below it must stay below its resolved path.
    """
    where = _where(field)
    if not isinstance(relative, (str, os.PathLike)):
        raise RunPathError(f"{where}expected a relative path, got {type(relative).__name__} {relative!r}")
    text = os.fspath(relative)
    if not text.strip():
        raise RunPathError(f"{where}empty path; give a name inside the run folder {run_root}")
    if "\x00" in text:
        raise RunPathError(f"{where}path {text!r} contains a NUL byte")
    if Path(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise RunPathError(f"{where}path {text!r} is absolute; outputs must be relative to the run folder {run_root}")
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if ".." in parts:
        raise RunPathError(f"{where}path {text!r} contains '..'; outputs must stay inside the run folder {run_root}")
    root = Path(run_root).expanduser().resolve()
    target = (root / text).resolve()  # follows every symlink that exists along the way
    if not is_within(target, root):
        raise RunPathError(f"{where}path {text!r} resolves to {target}, outside the run folder {root} "
                           "(a symlink points out of it)")
    if target == root:
        raise RunPathError(f"{where}path {text!r} is the run folder itself; name a file or folder inside it")
    return target


def recipe_sources(recipe) -> dict:
    """{role: path} a recipe's stages read from outside their own outputs (its teachers): pass it as
    ``atomic_dir(..., sources=...)`` so a stage output never replaces, holds or sits inside a teacher."""
    return {f"teacher {t.name}": t.source for t in recipe.teachers}
