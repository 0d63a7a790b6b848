"""Issue 20, items 2, 3 and 6: config dimensions are planned against the RAM budget before any allocation, remote
code in a teacher's tokenizer files is not carried into an import, and progress shows from the first second, as plain
lines when the output is not a terminal."""

import io
import json
import shutil
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.checkpoint_config import CheckpointConfigError, check_checkpoint_config
from nexus.conversion.progress_bar import PlainLineProgress, stage_progress

# ---------------------------------------------------------------------------------------- item 2: dimensions


def _config_only(tmp_path, llama_dir, **changes):
    """A teacher folder holding only config.json (pickle-only teachers are planned from the config alone)."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_tiny_teacher_is_planned_from_its_config_and_fits(llama_dir):
    plan = check_checkpoint_config(llama_dir, dtype="float32")
    assert plan["planned_bytes"] >= 4 * plan["stored_numel"] > 0


@pytest.mark.parametrize("field, value", [("vocab_size", 2_000_000_000), ("num_hidden_layers", 200_000),
                                          ("hidden_size", 10**7), ("intermediate_size", 10**10)])
def test_absurd_dimensions_are_refused_against_the_ram_budget_before_allocating(tmp_path, llama_dir, field, value):
    folder = _config_only(tmp_path, llama_dir, **{field: value})
    with pytest.raises(CheckpointConfigError) as info:
        check_checkpoint_config(folder, what="teacher", dtype="float32", budget_bytes=8 * 2**30)
    message = str(info.value)
    assert str(folder / "config.json") in message
    if field == "num_hidden_layers":  # 200,000 tiny layers fit in RAM but take hours to build
        assert "num_hidden_layers is 200000, over the 4,096 layers" in message
    else:
        assert "over the RAM budget of 8,192 MiB" in message and f"{field} {value}" in message


def test_a_budget_smaller_than_the_model_is_refused_with_the_numbers(llama_dir):
    with pytest.raises(CheckpointConfigError, match=r"need \d[\d,]* MiB in float32, over the RAM budget of 0 MiB"):
        check_checkpoint_config(llama_dir, dtype="float32", budget_bytes=1000)


def test_the_import_command_refuses_an_absurd_config_in_one_line(tmp_path, llama_dir):
    src = tmp_path / "absurd"
    shutil.copytree(llama_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = 2_000_000_000
    (src / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["import", str(src), str(tmp_path / "out")], env={"COLUMNS": "1000"})
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: {src / 'config.json'}: vocab_size is 2000000000" in result.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- item 3: remote code


def _remote_code_teacher(tmp_path, llama_dir):
    src = tmp_path / "remote-tok"
    shutil.copytree(llama_dir, src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "tokenization_evil.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    return src


def test_auto_map_in_a_tokenizer_is_stripped_at_import_with_a_note(tmp_path, llama_dir):
    src = _remote_code_teacher(tmp_path, llama_dir)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["import", str(src), str(out)], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    assert "note: removed remote code from tokenizer_config.json: auto_map" in result.output
    assert "--trust-remote-code" in result.output
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in written and not (out / "tokenization_evil.py").exists()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # as the README loads a Nexus checkpoint
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True) == "hello world"


def test_auto_map_is_kept_when_remote_code_is_trusted(tmp_path, llama_dir):
    src = _remote_code_teacher(tmp_path, llama_dir)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["import", str(src), str(out), "--trust-remote-code"], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    assert "removed remote code" not in result.output
    assert "auto_map" in json.loads((out / "tokenizer_config.json").read_text())


# ---------------------------------------------------------------------------------------- item 6: progress


def _plain_console():
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_a_non_terminal_gets_plain_progress_lines_while_the_work_runs():
    console, buffer = _plain_console()
    with stage_progress(console, True, interval=0.0) as progress:
        assert isinstance(progress, PlainLineProgress)
        task = progress.add_task("profile t", total=4)
        assert buffer.getvalue().splitlines() == ["profile t: 0/4 (0%), 0 s"]  # printed at once, not at the end
        for _ in range(4):
            progress.advance(task)
        lines_before_stop = buffer.getvalue().splitlines()
    assert lines_before_stop[1:4] == ["profile t: 1/4 (25%), 0 s", "profile t: 2/4 (50%), 0 s",
                                      "profile t: 3/4 (75%), 0 s"]
    assert lines_before_stop[-1] == "profile t: 4/4 (100%), 0 s, done"
    assert buffer.getvalue().splitlines() == lines_before_stop  # no bar drawn at the end
    assert "━" not in buffer.getvalue()


def test_plain_lines_are_spaced_by_the_interval():
    console, buffer = _plain_console()
    with stage_progress(console, True, interval=3600.0) as progress:
        task = progress.add_task("distill", total=100)
        for _ in range(99):
            progress.advance(task)
        assert len(buffer.getvalue().splitlines()) == 1  # only the start line within the interval
        progress.advance(task)
    assert buffer.getvalue().splitlines()[-1].endswith("100/100 (100%), 0 s, done")


def test_quiet_and_terminal_progress_keep_the_rich_bar():
    console, buffer = _plain_console()
    with stage_progress(console, False) as progress:
        progress.advance(progress.add_task("x", total=2), 2)
    assert buffer.getvalue() == ""
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert not isinstance(stage_progress(terminal, True), PlainLineProgress)


def test_the_cli_prints_its_first_line_before_importing_torch(tmp_path):
    """`nexus consolidate` prints its first line before torch and transformers are imported (they take seconds)."""
    code = ("import sys\n"
            "from nexus.cli import app\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported too early'\n"
            "import builtins\n"
            "real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name in ('torch', 'transformers') and name not in sys.modules:\n"
            "        print(f'IMPORT {name}', flush=True)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            "sys.argv = ['nexus', 'consolidate', 'missing.yaml']\n"
            "app()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={"COLUMNS": "1000", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    lines = result.stdout.splitlines()
    assert lines and lines[0] == "nexus consolidate missing.yaml: starting (importing torch and transformers)", \
        result.stdout + result.stderr
    assert result.returncode == 2 and "recipe file missing.yaml does not exist" in result.stderr
