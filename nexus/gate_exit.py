"""One way to end a command whose validation gate failed: the failing capabilities printed last, exit code 3.

`nexus validate`, `nexus consolidate` and `nexus demo` share it, so a script can tell a failed gate (3) from bad input
(2) and from success (0) whichever command it ran.
"""

import typer
from rich.console import Console

GATE_FAILED = 3


def exit_if_gate_failed(gate: dict) -> None:
    """Raise ``typer.Exit(3)`` after one stderr line naming the failing capabilities, when ``gate`` failed."""
    if not gate or not gate.get("requested") or gate.get("passed") is not False:
        return
    failed = ", ".join(gate.get("failed") or []) or gate.get("capability") or "?"
    Console(stderr=True, soft_wrap=True).print(f"[bold red]gate failed:[/] {gate.get('reason', 'below the threshold')}; capabilities "
                               f"below {gate.get('threshold')}: {failed}", highlight=False)
    raise typer.Exit(GATE_FAILED)
