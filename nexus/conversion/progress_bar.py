"""The one progress-bar layout the stages share: description, bar, done/total, elapsed (rich)."""


def stage_progress(console, enabled, transient=False):
    """A rich `Progress` on ``console``; ``enabled=False`` hides it (the tasks still count); ``transient``: the bars
    vanish when done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=transient)
