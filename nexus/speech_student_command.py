"""`nexus speech-student WHISPER CLIPS --out OUT`: a speech student (a pruned, distilled copy of Whisper's encoder and
Whisper's decoder as a tower) from a Whisper teacher and a folder of spoken clips, scored on held-out clips."""

import typer

from .errors import clean_errors


def speech_student(
    whisper: str = typer.Argument(..., help="the Whisper teacher: a CTranslate2 folder (faster-whisper) or an HF "
                                            "Whisper folder with safetensors weights"),
    clips: str = typer.Argument(..., help="a folder of .wav clips; NAME.txt beside NAME.wav is its reference "
                                          "transcript (every clip or none)"),
    out: str = typer.Option(..., "--out", help="the student folder (written all at once)"),
    budget: float = typer.Option(0.25, "--budget", help="audio encoder size as a fraction of Whisper's encoder"),
    heldout: int = typer.Option(8, "--heldout", help="the last N clips are held out and scored"),
    encoder_steps: int = typer.Option(600, "--encoder-steps", help="hidden-state distillation steps"),
    steps: int = typer.Option(300, "--steps", help="hidden-state + transcription KD steps"),
    train_tower: bool = typer.Option(False, "--train-tower", help="also train Whisper's decoder tower"),
    ram_gb: float = typer.Option(None, "--ram-gb", help="refuse a run planned above this (default: the machine's)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
):
    """Build a speech student from Whisper: prune its encoder capability-weighted, distil it, score held-out clips.
    Writes OUT with the model, its processor files and speech_student.json."""
    from rich.console import Console

    from .conversion.speech_build import SpeechBuildOptions, build_speech_student

    console = Console()
    with clean_errors():
        options = SpeechBuildOptions(budget=budget, heldout=heldout, encoder_steps=encoder_steps, steps=steps,
                                     train_tower=train_tower, ram_gb=ram_gb)
        record = build_speech_student(whisper, clips, out, options, overwrite=overwrite,
                                      progress=lambda msg: console.print(f"  {msg}", highlight=False))
    against = "Whisper's own transcripts" if record["clips"]["reference"].startswith("Whisper") else "the references"
    typer.echo(f"encoder: {record['student_encoder_params_with_projector']:,} params "
               f"({record['params_ratio_with_projector']:.3f} of Whisper's, projector included)")
    typer.echo(f"held-out word accuracy against {against} on {record['clips']['heldout']} clips: student "
               f"{record['student_word_accuracy']:.3f}, Whisper {record['whisper_word_accuracy']:.3f}; retention "
               + (f"{record['retention']:.3f} [{record['retention_ci95'][0]:.3f}, {record['retention_ci95'][1]:.3f}]"
                  if record["retention"] is not None else record["retention_note"]))
    plan, measured = record["ram_plan"]["phases_mib"], record["measured_phase_peak_mib"]
    typer.echo("peak RAM per phase, MiB (planned / measured): " + ", ".join(
        f"{name} {plan[name]:,.0f} / {measured[name]:,.0f}" for name in plan if name in measured))
    typer.echo(f"wrote {out}")
