"""The paths a model card shows: its usage snippet loads the exported folder, and it names no absolute local path.

The card is rendered at validation time, before anyone knows where the student will be exported, so `nexus export`
fixes it when it places the card:

- every ``from_pretrained("...")`` in the card loads ``load_path``: the Hub id when the export is given one, else the
  export folder as the user named it (an absolute one is shown relative to the working directory);
- any other absolute path (a run folder in the provenance table, say) is shown relative to the working directory
  when it lies under it, else as its last two parts (``<run>/<stage>``).

Example::

    card_with_paths(text, "out/nexus-demo")   # from_pretrained("out/nexus-demo", ...)
"""

import os
import re
from pathlib import Path

FROM_PRETRAINED = re.compile(r'(from_pretrained\(\s*)(["\'])(.*?)\2')
# an absolute POSIX path: a "/" not preceded by a word character, ":", "/" or "." (so URLs and "a/b" stay), then
# at least one path component
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.+@-]+/)*[\w.+@-]+/?")


def shown_path(path, cwd=None):
    """``path`` as a card may show it: unchanged when relative; relative to ``cwd`` when under it; else its last two
    parts."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    cwd = Path(cwd or os.getcwd())
    try:
        return path.relative_to(cwd).as_posix() or "."
    except ValueError:
        return Path(*path.parts[-2:]).as_posix() if len(path.parts) > 2 else path.name


def load_path_for(out, repo_id=None, cwd=None):
    """What the usage snippet loads: the Hub id if given, else the export folder (relative, as the user would type
    it from where they ran `nexus export`)."""
    if repo_id:
        return repo_id
    out = Path(out)
    if not out.is_absolute():
        return out.as_posix()
    return os.path.relpath(out, cwd or os.getcwd())


def card_with_paths(text, load_path, cwd=None):
    """``text`` with every ``from_pretrained`` loading ``load_path`` and no absolute local path left."""
    text = FROM_PRETRAINED.sub(lambda m: f"{m.group(1)}{m.group(2)}{load_path}{m.group(2)}", text)
    return ABSOLUTE_PATH.sub(lambda m: shown_path(m.group(0), cwd), text)


def absolute_paths_in(text):
    """The absolute local paths ``text`` still names (empty when it is fit to publish)."""
    return ABSOLUTE_PATH.findall(text)
