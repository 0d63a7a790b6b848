"""Outputs never destroy their sources, and `--overwrite` swaps an output atomically (issue 15, item 4).

An output that is, contains, or is inside a source (teacher, student checkpoint, the run folder holding it) is refused
before anything is deleted. Replacing an output builds the new one, renames the old one aside, renames the new one in
and only then deletes the old one: a failure or a kill at any point leaves the old or the new output whole, and the
next write (or `sweep_stale_temporaries`) restores / cleans up what a killed writer left.
"""

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion import atomic_output
from nexus.conversion.atomic_output import OutputOverlapsSourceError, atomic_dir, sweep_stale_temporaries

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, list(map(str, args)))


def _tree(root):
    """{relative path: sha256} of every file under ``root`` (symlinks by their target), to compare byte for byte."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _refused(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.count("error:") == 1, text
    for needle in needles:
        assert needle in text, text


def _leftovers(folder, name):
    return [p.name for p in folder.iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.old-"))]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def teacher(llama_dir, tmp_path):
    """A private copy of the tiny Llama teacher (tests below try to destroy it)."""
    import shutil

    return shutil.copytree(llama_dir, tmp_path / "T")


# ---------------------------------------------------------------------------------------- outputs vs sources


def test_import_onto_its_own_teacher_is_refused_and_the_teacher_is_untouched(teacher):
    before = _tree(teacher)
    _refused(_cli("import", teacher, teacher, "--overwrite"), f"output {teacher} is the source teacher {teacher}")
    assert _tree(teacher) == before
    assert _leftovers(teacher.parent, teacher.name) == []


def test_import_into_a_folder_inside_the_teacher_is_refused(teacher):
    before = _tree(teacher)
    out = teacher / "sub"
    _refused(_cli("import", teacher, out, "--overwrite"), f"output {out} is inside the source teacher {teacher}")
    assert not out.exists() and _tree(teacher) == before


def test_import_onto_a_parent_of_the_teacher_is_refused(teacher, tmp_path):
    (tmp_path / "notes.txt").write_text("the user's other files")
    before = _tree(tmp_path)
    _refused(_cli("import", teacher, tmp_path, "--overwrite"),
             f"output {tmp_path} is a parent folder of the source teacher {teacher}")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("standard", [False, True], ids=["self-contained", "standard"])
def test_export_onto_the_run_folder_holding_the_student_is_refused(teacher, tmp_path, standard):
    run = tmp_path / "run"
    student = run / "student"
    assert _cli("import", teacher, student).exit_code == 0
    (run / "notes.txt").write_text("the user's other files")
    (run / "logs").mkdir()
    (run / "logs" / "train.log").write_text("step 1")
    before = _tree(run)
    args = ["export", student, run, "--overwrite"] + (["--standard"] if standard else [])
    _refused(_cli(*args), f"output {run} is a parent folder of the source checkpoint {student}",
             "choose an output outside it")
    assert _tree(run) == before
    assert _leftovers(tmp_path, "run") == []


def test_an_output_symlinked_to_the_source_is_refused(teacher, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(teacher, target_is_directory=True)
    before = _tree(teacher)
    _refused(_cli("import", teacher, link, "--overwrite"), f"output {link} (= {teacher.resolve()}) is the source "
             f"teacher {teacher}")
    assert link.is_symlink() and _tree(teacher) == before
    inner = tmp_path / "inner"
    inner.symlink_to(tmp_path, target_is_directory=True)  # inner/T resolves to the teacher itself
    _refused(_cli("import", teacher, inner / "T", "--overwrite"), "is the source teacher")
    assert _tree(teacher) == before


def test_gguf_output_may_not_replace_a_file_it_reads(tmp_path):
    from nexus.hub.gguf_export import export_gguf

    folder = tmp_path / "standard"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    before = _tree(folder)
    for out in (folder / "model.safetensors", folder / "config.json", folder, tmp_path):
        with pytest.raises(OutputOverlapsSourceError, match="source"):
            export_gguf(folder, out, overwrite=True)
    assert _tree(folder) == before


# ---------------------------------------------------------------------------------------- atomic replacement


def _old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old output")
    (out / "sub").mkdir()
    (out / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    return out, _tree(out)


def test_an_overwrite_failing_midway_leaves_the_old_output_whole(teacher, tmp_path, monkeypatch):
    """The writer raises (nothing renamed yet), then the rename-in fails after the old output went aside."""
    import nexus.conversion.teacher_import as ti

    out = tmp_path / "out"
    assert _cli("import", teacher, out).exit_code == 0
    old = _tree(out)

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ti.NexusForCausalLM, "save_pretrained", boom)
        _refused(_cli("import", teacher, out, "--overwrite"), "No space left on device")
    assert _tree(out) == old and _leftovers(tmp_path, "out") == []

    real_replace = os.replace

    def full_disk(src, dst):
        if os.fspath(dst) == os.fspath(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_output.os, "replace", full_disk)
    _refused(_cli("import", teacher, out, "--overwrite"), "No space left on device")
    assert _tree(out) == old and _leftovers(tmp_path, "out") == []


def test_normal_overwrite_swaps_the_output_by_renames_and_leaves_no_siblings(teacher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _cli("import", teacher, out).exit_code == 0
    (out / "stale.txt").write_text("from an earlier write")
    old = _tree(out)
    real_replace, seen = os.replace, []

    def spy(src, dst):
        if os.fspath(dst) == os.fspath(out):  # the moment the new folder goes in, the old one is whole, aside
            aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
            seen.append(len(aside) == 1 and _tree(aside[0]) == old and not out.exists())
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_output.os, "replace", spy)
    result = _cli("import", teacher, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert seen == [True]
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------------------------------- killed writers


def test_a_kill_between_the_two_renames_is_undone_by_the_next_sweep(tmp_path):
    """A real SIGKILL right when the new folder was about to be renamed in: the old output is whole, aside."""
    out, old = _old_output(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal
        from nexus.conversion import atomic_output
        real = os.replace
        def die(src, dst):
            if os.fspath(dst) == {str(out)!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        atomic_output.os.replace = die
        with atomic_output.atomic_dir({str(out)!r}, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new output")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]) == 1
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]) == 1
    sweep_stale_temporaries(out)
    assert _tree(out) == old
    assert _leftovers(tmp_path, "out") == []


def test_next_write_restores_then_refuses_or_replaces(tmp_path):
    out, old = _old_output(tmp_path)
    dead = _dead_pid()
    os.rename(out, tmp_path / f".out.old-{dead}-x")
    with pytest.raises(FileExistsError, match="already exists"):  # restored first, so a plain write is refused
        with atomic_dir(out):
            pass
    assert _tree(out) == old and _leftovers(tmp_path, "out") == []

    os.rename(out, tmp_path / f".out.old-{dead}-x")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new output")
    assert set(_tree(out)) == {"new.txt"} and _leftovers(tmp_path, "out") == []


def test_sweep_deletes_a_stale_old_copy_when_the_output_exists(tmp_path):
    """Killed after the new folder went in but before the old one was deleted: the new output stays."""
    out, _ = _old_output(tmp_path)
    new = _tree(out)
    dead = _dead_pid()
    stale = tmp_path / f".out.old-{dead}-x"
    stale.mkdir()
    (stale / "older.txt").write_text("previous output")
    live = tmp_path / f".out.old-{os.getppid()}-y"  # a writer still running: not ours to touch
    live.mkdir()
    sweep_stale_temporaries(out)
    assert not stale.exists() and live.exists() and _tree(out) == new
