"""The one progress-bar layout the stages share: description, bar, done/total, elapsed (rich).

On a terminal it is a live rich bar. When the output is not a terminal (a file, a pipe, CI) rich draws a bar only once,
when it stops, so a long stage looked silent until the end; there it prints plain lines instead, one when a task
starts, one every ``interval`` seconds while it advances, one when it finishes::

    profile llama: 0/48 (0%), 0 s
    profile llama: 20/48 (42%), 10 s
    profile llama: 48/48 (100%), 23 s, done
"""

import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

PLAIN_INTERVAL_SECONDS = 10.0


class PlainLineProgress(Progress):
    """A `Progress` that draws nothing live and prints plain progress lines on its console (non-terminal output)."""

    def __init__(self, *columns, console=None, interval=PLAIN_INTERVAL_SECONDS, **kwargs):
        kwargs["disable"] = True  # no live display: it would be drawn once, at the end
        super().__init__(*columns, console=console, **kwargs)
        self._plain_console, self._interval = console, interval
        self._last, self._done = {}, set()

    def _line(self, task_id, suffix=""):
        task = self._tasks[task_id]
        total = f"/{task.total:g}" if task.total is not None else ""
        pct = f" ({100 * task.completed / task.total:.0f}%)" if task.total else ""
        elapsed = task.elapsed or 0.0
        fields = "".join(f", {k} {v:,.4g}" for k, v in task.fields.items() if isinstance(v, (int, float)))
        self._plain_console.print(f"{task.description}: {task.completed:g}{total}{pct}, {elapsed:.0f} s{fields}"
                                  f"{suffix}", highlight=False, soft_wrap=True)
        self._last[task_id] = time.monotonic()

    def _report(self, task_id):
        task = self._tasks.get(task_id)
        if task is None or task_id in self._done:
            return
        if task.finished:
            self._done.add(task_id)
            self._line(task_id, ", done")
        elif time.monotonic() - self._last.get(task_id, 0.0) >= self._interval:
            self._line(task_id)

    def add_task(self, description, start=True, total=100.0, completed=0, visible=True, **fields):
        task_id = super().add_task(description, start=start, total=total, completed=completed, visible=visible,
                                   **fields)
        self._line(task_id)
        return task_id

    def update(self, task_id, **kwargs):
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id, advance=1):
        super().advance(task_id, advance)
        self._report(task_id)


def stage_progress(console, enabled, transient=False, interval=PLAIN_INTERVAL_SECONDS):
    """A rich `Progress` on ``console``; ``enabled=False`` hides it (the tasks still count); ``transient``: the bars
    vanish when done. On a console that is not a terminal: plain lines every ``interval`` seconds instead."""
    from rich.console import Console

    console = console or Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if enabled and not console.is_terminal:
        return PlainLineProgress(*columns, console=console, interval=interval)
    return Progress(*columns, console=console, disable=not enabled, transient=transient)


def progress_with_columns(*columns, enabled=True, console=None, transient=False, interval=PLAIN_INTERVAL_SECONDS):
    """A rich `Progress` with the caller's ``columns`` (e.g. a loss field), or plain lines (with the task's numeric
    fields) when ``console`` is not a terminal; ``enabled=False`` hides it."""
    from rich.console import Console

    console = console or Console()
    if enabled and not console.is_terminal:
        return PlainLineProgress(*columns, console=console, interval=interval)
    return Progress(*columns, console=console, disable=not enabled, transient=transient)
