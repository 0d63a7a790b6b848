"""`nexus push FOLDER REPO_ID`: validate an exported folder and upload it to the Hugging Face Hub."""

import typer

from .errors import clean_errors


def push(
    folder: str = typer.Argument(..., help="an exported folder (nexus export)"),
    repo_id: str = typer.Argument(..., help="Hub repository, 'user/name'"),
    private: bool = typer.Option(False, "--private", help="create the repository as private"),
    message: str = typer.Option("Upload NEXUS export", "--message", help="commit message"),
):
    """Upload an exported folder with huggingface_hub (needs network and a write token)."""
    from .hub.push import push_folder

    with clean_errors():
        push_folder(folder, repo_id, private=private, commit_message=message)
    typer.echo(f"pushed {folder} to https://huggingface.co/{repo_id}")
