"""One stage's peak-RAM plan, printed and checked against the RAM budget before the stage runs.

`nexus consolidate` (`nexus.stages.pipeline.MemoryWatch.before`) and the stand-alone stage commands (`nexus profile`,
`distill`, `validate`, `export`) all go through `guard_stage_ram`: it plans ``stage`` with its registered planner
(`stage_memory.STAGE_RAM_PLANS`, from headers and configs only: no model is loaded), prints one dim line (the
planned peak, its largest parts, the budget) and raises `MemoryPlanError` (a ValueError: the CLI prints it as one red
line and exits 2) when the plan is over the budget, so a refused stage has written nothing. `nexus export` has no
recipe: `guard_export_ram` plans it from the source checkpoint's headers against ``--ram-gb``, else the machine's
total RAM.
"""

from .memory_plan import GIB
from .stage_memory import RECIPE_BUDGET_HINT, check_stage_plan, machine_ram_bytes, plan_summary, ram_budget


def check_stage_ram(plan, budget, source, console=None, hint=RECIPE_BUDGET_HINT) -> dict:
    """Print ``plan``'s line on ``console`` (default a new one) and return it; raise when over ``budget`` bytes.

    ``source``: where the budget comes from; ``hint``: how to change it (both end the refusal's message).
    """
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(f"[dim]memory plan, {plan['stage']}: peak RAM {plan_summary(plan)}; budget "
                  f"{budget / 2**20:,.0f} MiB[/]")
    return check_stage_plan(plan, budget, source, hint)


def guard_stage_ram(recipe, stage, console=None, plan=None, **inputs) -> dict:
    """Plan ``stage`` of ``recipe`` from ``inputs`` (``profile=``, ``student=``: what exists now) on top of this
    process's RSS, print the plan and refuse it over the recipe's budget (`stage_memory.ram_budget`); returns it.

    ``plan``: a plan of ``stage`` made earlier (consolidate's up-front plans), checked instead of planning anew.
    """
    if plan is None:
        from .peak_rss import current_rss
        from .stage_memory import STAGE_RAM_PLANS

        plan = STAGE_RAM_PLANS[stage](recipe, current_rss() or 0, **inputs)
    budget, source = ram_budget(recipe)
    return check_stage_ram(plan, budget, source, console)


def export_ram_budget(ram_gb=None) -> tuple[int, str]:
    """(bytes, where the number comes from) of a recipe-less export's budget: ``ram_gb`` GiB, else the machine's RAM."""
    if ram_gb is not None:
        if ram_gb <= 0:
            raise ValueError(f"--ram-gb must be positive, got {ram_gb:g}")
        return int(ram_gb * GIB), f"--ram-gb {ram_gb:g} GiB"
    return machine_ram_bytes(), "the machine's total RAM"


def guard_export_ram(src, ram_gb=None, console=None) -> dict:
    """`guard_stage_ram` for `nexus export SRC OUT`: the source is checked as export checks it (so a bad one gets
    export's own error), then planned from its safetensors headers (`stage_memory.plan_checkpoint_export_ram`)."""
    from pathlib import Path

    from ..hub.nexus_checkpoint import check_nexus_checkpoint
    from .checkpoint_config import check_checkpoint_config, read_config_json
    from .peak_rss import current_rss
    from .stage_memory import plan_checkpoint_export_ram

    if (Path(src) / "config.json").is_file():
        read_config_json(Path(src) / "config.json")  # not UTF-8 / not JSON / not an object: named here
    check_nexus_checkpoint(src)
    budget, source = export_ram_budget(ram_gb)
    # every tensor the config describes, against its weights and the budget, before the model is built
    check_checkpoint_config(src, what="checkpoint", budget_bytes=budget)
    # the export loads the model: importing its code (~170 MiB with transformers' modeling code, measured) is part
    # of the runtime the plan starts from
    from .. import modeling_nexus  # noqa: F401
    return check_stage_ram(plan_checkpoint_export_ram(src, current_rss() or 0), budget, source, console,
                           hint="pass --ram-gb to change it")
