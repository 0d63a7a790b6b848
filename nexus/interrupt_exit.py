"""SIGINT / SIGTERM during a long command: say where it stopped and how to resume, exit 130 / 143.

`resumable(resume_command)` wraps a command's work. SIGTERM is turned into `Terminated` (a KeyboardInterrupt), so
SIGINT and SIGTERM both unwind the same way: the stages' temporary folders are removed on the way out (nothing
half-written), finished stages and distillation checkpoints stay. Then one line names the stage that was running
(found in the interrupted frames, so no stage has to report it) and the exact command that resumes::

    interrupted (SIGINT) during stage distill; finished stages and checkpoints are kept. Resume with:
    nexus consolidate /abs/recipe.yaml
"""

import contextlib
import shlex
import signal
import threading

import typer

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (a KeyboardInterrupt, so every cleanup that handles ^C runs)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def stage_at(tb) -> str | None:
    """The stage running where ``tb`` was raised: the innermost `nexus.stages.Stage` in its frames, else the
    innermost ``run_<stage>`` function of a NEXUS module."""
    stage, runner = None, None
    try:
        from .stages.stage import Stage
    except ImportError:  # pragma: no cover
        Stage = ()
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_globals.get("__name__", "")
        if module.startswith("nexus."):
            for name in ("self", "stage"):
                value = frame.f_locals.get(name)
                if Stage and isinstance(value, Stage):
                    stage = value.name
            code = frame.f_code.co_name
            if code.startswith("run_") and code not in ("run_consolidate", "run_demo"):
                runner = code.removeprefix("run_")
        tb = tb.tb_next
    return stage or runner


def resume_line(argv) -> str:
    """``nexus ARG ...`` with each argument shell-quoted."""
    return shlex.join(["nexus", *map(str, argv)])


@contextlib.contextmanager
def resumable(resume_argv, console=None):
    """Run the block; on SIGINT/SIGTERM print where it stopped and ``nexus <resume_argv>``, then exit 130/143."""
    previous = previous_int = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        # Ctrl-C must raise KeyboardInterrupt here even if a library or an earlier caller in this process replaced
        # Python's default handler (seen in the full test suite on a fresh install: SIGINT no longer interrupted)
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt as exc:
        which = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        stage = stage_at(exc.__traceback__)
        where = f"during stage {stage}" if stage else "before the first stage started"
        from rich.console import Console
        from rich.markup import escape

        (console or Console(stderr=True)).print(
            f"[bold yellow]interrupted ({which}) {where}[/]; finished stages and checkpoints are kept, nothing "
            f"half-written. Resume with: {escape(resume_line(resume_argv))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CODES[which]) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
