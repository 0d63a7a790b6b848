"""The `nexus` command. Each subcommand validates its arguments and calls one library function."""

import typer

from .errors import clean_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="NEXUS: many teachers, one measured student.")


@app.callback()
def main():
    """NEXUS: fold several LLM teachers into one HF-native student, measured per capability."""


@app.command("import")
def import_cmd(
    src: str = typer.Argument(..., help="teacher: an HF folder of safetensors, a .gguf file, or a CTranslate2 Whisper folder (-> HF Whisper)"),
    out: str = typer.Argument(..., help="output folder for the one-tower Nexus checkpoint"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow loading .bin/.pt pickle weights"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the teacher's remote code"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    cache_root: str = typer.Option(None, "--cache-root", help="where a .gguf is dequantised once (default ~/.cache/nexus/gguf)"),
):
    """Convert one teacher into a one-tower Nexus checkpoint (lossless)."""
    from .conversion.teacher_import import import_teacher

    with clean_errors():
        path = import_teacher(src, out, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                              overwrite=overwrite, cache_root=cache_root, on_note=lambda n: typer.echo(f"note: {n}"))
    typer.echo(f"wrote {path}")


# Other subcommands live in their own files and register here.
from .localise_command import localise  # noqa: E402
app.command("localise")(localise)
from .compress_command import compress  # noqa: E402
app.command("compress")(compress)
from .profile_command import profile  # noqa: E402
app.command("profile")(profile)
from .demo_command import demo  # noqa: E402
app.command("demo")(demo)
from .distill_command import distill  # noqa: E402
app.command("distill")(distill)
from .consolidate_command import consolidate  # noqa: E402
app.command("consolidate")(consolidate)
from .validate_command import validate  # noqa: E402
app.command("validate")(validate)
from .export_command import export  # noqa: E402
app.command("export")(export)
from .push_command import push  # noqa: E402
app.command("push")(push)
from .stages_command import stages  # noqa: E402
app.command("stages")(stages)
from .plan_command import plan  # noqa: E402
app.command("plan")(plan)
from .remove_capability_command import remove_capability  # noqa: E402
app.command("remove-capability")(remove_capability)
from .add_teacher_command import add_teacher  # noqa: E402
app.command("add-teacher")(add_teacher)
from .attach_speech_command import attach_speech  # noqa: E402
app.command("attach-speech")(attach_speech)
from .speech_student_command import speech_student  # noqa: E402
app.command("speech-student")(speech_student)


if __name__ == "__main__":
    app()
