"""`nexus attach-speech TEXT_STUDENT SPEECH_STUDENT --out OUT`: one checkpoint with the text student's towers and the
speech student's audio encoder and tower (its own token space); text and speech logits stay exactly the sources'."""

import typer

from .errors import clean_errors


def attach_speech(
    text: str = typer.Argument(..., help="the NEXUS text student folder (never modified)"),
    speech: str = typer.Argument(..., help="the NEXUS speech student folder (audio encoder + whisper_decoder tower)"),
    out: str = typer.Option(..., "--out", help="the new student folder (written all at once)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
):
    """Attach a speech student to a text student. Writes OUT with attach_speech.json and the speech processor in
    OUT/speech."""
    from .conversion.speech_attach import attach_speech as run

    with clean_errors():
        record = run(text, speech, out, overwrite=overwrite)
    exact = record["exactness"]
    typer.echo(f"towers: {', '.join(record['towers'])}; encoders: {', '.join(record['encoders'])}; "
               f"{record['params']['total']:,} params ({record['added_params']:,} added: zero padding and the "
               "router class)")
    typer.echo(f"max |logit diff|: text {exact['text_max_abs_logit_diff']:.3g} vs the text student, speech "
               f"{exact['speech_max_abs_logit_diff']:.3g} vs the speech student")
    subfolder = record["speech_processor"]["subfolder"]
    typer.echo(f"wrote {record['path']} (speech processor in {record['path']}/{subfolder})")
