"""`nexus export SRC OUT`: a self-contained checkpoint folder, or (--standard) one tower as a plain Llama/Gemma-3."""

import typer
from rich.console import Console

from .errors import clean_errors


def export(
    src: str = typer.Argument(..., help="a Nexus checkpoint folder (written by save_pretrained / nexus import)"),
    out: str = typer.Argument(..., help="output folder"),
    standard: bool = typer.Option(False, "--standard", help="export one tower as a standard architecture "
                                  "(Llama / Gemma-3 / Qwen2 / Qwen3) that loads without remote code"),
    pad_to_uniform: bool = typer.Option(False, "--pad-to-uniform", help="with --standard: pad irregular per-layer "
                                        "widths with zero weights (logits unchanged)"),
    gguf: bool = typer.Option(False, "--gguf", help="with --standard: also write OUT/model-<dtype>.gguf"),
    gguf_dtype: str = typer.Option("f32", "--gguf-dtype", help="GGUF matrix type: f32, f16 or q8_0"),
    tower: str = typer.Option("0", "--tower", help="with --standard: the tower to export (index, name, or a capability it serves)"),
    card: str = typer.Option(None, "--card", help="model card markdown to ship (default: the source's own, "
                             "else a minimal one)"),
    tokenizer: str = typer.Option(None, "--tokenizer", help="take the tokenizer from this folder instead of SRC"),
    verify: bool = typer.Option(False, "--verify", help="load the result in a fresh process without NEXUS and "
                                "compare logits before moving it into place"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    ram_gb: float = typer.Option(None, "--ram-gb", help="peak RAM (GiB) the export may plan for; planned over it, "
                                 "it is refused before anything is written (default: the machine's total RAM)"),
):
    """Export a checkpoint: self-contained folder (default) or a standard-architecture tower (+ GGUF)."""
    from .conversion.stage_ram_guard import guard_export_ram

    with clean_errors():
        if (gguf or pad_to_uniform) and not standard:
            raise ValueError("--gguf and --pad-to-uniform apply to --standard exports; add --standard")
        guard_export_ram(src, ram_gb, Console())
        tower_key = int(tower) if tower.lstrip("-").isdigit() else tower
        if standard:
            from .hub.standard_export import export_standard

            info = export_standard(src, out, tower=tower_key, pad_to_uniform=pad_to_uniform, overwrite=overwrite,
                                   tokenizer_src=tokenizer, gguf=gguf_dtype if gguf else None)
            if verify:
                _verify_standard(src, out, tower_key)
            typer.echo(f"wrote {info['path']} ({info['architecture']}, tower {info['tower']} {info['tower_name']!r})")
            for note in info["notes"]:
                typer.echo(f"  padded {note}")
            if "gguf" in info:
                typer.echo(f"wrote {info['gguf']['path']} ({info['gguf']['dtype']}, tokenizer {info['gguf']['tokenizer']})")
        else:
            from .hub.export import export_checkpoint

            info = export_checkpoint(src, out, card=card, tokenizer_src=tokenizer, overwrite=overwrite, verify=verify)
            typer.echo(f"wrote {info['path']} ({len(info['files'])} files)")
            if verify:
                typer.echo(f"fresh-process load: max |Δlogit| {info['max_abs_logit_diff']:.3g}")


def _verify_standard(src, out, tower):
    import torch

    from .hub.fresh_load import fresh_process_logits
    from .hub.nexus_checkpoint import load_nexus_checkpoint

    model = load_nexus_checkpoint(src)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, tower=tower).logits.float()
    logits, _ = fresh_process_logits(out, ids, trust_remote_code=False)
    typer.echo(f"fresh-process load (no remote code): max |Δlogit| {(logits - expected).abs().max().item():.3g}")
