"""The malformed-input corpus (issue 20): lying safetensors headers, broken or absurd config.json files, tokenizers
that do not fit their embedding, symlink loops, bad recipe files, a full disk, outputs inside a teacher.

Every case feeds one malformed file (built here, tiny) to a real command through typer's CliRunner and must give
exit code 2 and ONE line ``error: ...`` naming the file and the field or tensor, no traceback, and leave the test
folder (and the shared teacher) exactly as it was. Cases are functions ``case_<what>(ctx) -> Case``.
"""

import contextlib
import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from test_bad_inputs import PLAN_LINE, PROGRESS_NOISE, _leftovers, snapshot
from typer.testing import CliRunner

from nexus.cli import app

FAST_PROFILE = {"max_items": 4, "n_bootstrap": 50, "window_tokens": 32, "batch_size": 4, "compute": "native"}


@dataclass
class Case:
    argv: list
    needles: list = field(default_factory=list)
    patch: Callable | None = None  # a context manager factory active while the command runs


@dataclass
class Ctx:
    tmp: Path
    teacher: Path

    def copy_teacher(self, name="teacher"):
        dst = self.tmp / name
        shutil.copytree(self.teacher, dst)
        return dst

    def config_variant(self, name, mutate):
        src = self.copy_teacher(name)
        config = json.loads((src / "config.json").read_text())
        mutate(config)
        (src / "config.json").write_text(json.dumps(config))
        return src

    def header_variant(self, name, mutate):
        """A teacher copy whose model.safetensors header was rewritten by ``mutate(header)`` (data untouched)."""
        src = self.copy_teacher(name)
        path = src / "model.safetensors"
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        mutate(header)
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        return src

    def recipe(self, text=None, filename="recipe.yaml", **top):
        path = self.tmp / filename
        if text is None:
            raw = {"name": "bad", "teachers": [{"name": "t", "source": str(self.teacher), "dtype": "fp32"}],
                   "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"}],
                   "stages": {"profile": dict(FAST_PROFILE)}, **top}
            text = yaml.safe_dump(raw, sort_keys=False)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def recipe_text(self, teacher=None):
        return (f"name: bad\nteachers:\n  - {{name: t, source: {teacher or self.teacher}, dtype: fp32}}\n"
                "capabilities:\n  - {name: prose, probe: lm, data: bundled:prose}\n"
                f"stages:\n  profile: {json.dumps(FAST_PROFILE)}\n")


def imp(src, out):
    return ["import", str(src), str(out)]


def profile(recipe):
    return ["profile", str(recipe), "--quiet"]


EMBED = "model.embed_tokens.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"

# ---------------------------------------------------------------------------------------- safetensors headers


def case_header_shape_lies_about_bytes(ctx):
    src = ctx.header_variant("h1", lambda h: h[EMBED].update(shape=[97, 33]))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), EMBED, "[97, 33]", "data_offsets"])


def case_header_shape_transposed_same_bytes(ctx):
    src = ctx.header_variant("h2", lambda h: h[EMBED].update(shape=[32, 97]))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "vocab_size is 97", EMBED, "32 rows"])


def case_header_offsets_overlap(ctx):
    def mutate(h):
        first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        second = min((k for k in h if k not in ("__metadata__", first)), key=lambda k: h[k]["data_offsets"][0])
        h[second]["data_offsets"] = list(h[first]["data_offsets"])
        h[second]["shape"], h[second]["dtype"] = list(h[first]["shape"]), h[first]["dtype"]
    src = ctx.header_variant("h3", mutate)
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "overlaps"])


def case_header_offsets_past_the_end(ctx):
    def mutate(h):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        start, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [start + 4, end + 4]
    src = ctx.header_variant("h4", mutate)
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "past the end"])


def case_header_unknown_dtype(ctx):
    src = ctx.header_variant("h5", lambda h: h[DOWN].update(dtype="F33"))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), DOWN, "unknown dtype 'F33'"])


def case_header_dtype_changes_bytes(ctx):
    src = ctx.header_variant("h6", lambda h: h[DOWN].update(dtype="F16"))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), DOWN, "F16"])


def case_header_offsets_not_integers(ctx):
    src = ctx.header_variant("h7", lambda h: h[DOWN].update(data_offsets=["0", "x"]))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), DOWN, "data_offsets"])


def case_header_entry_without_shape(ctx):
    src = ctx.header_variant("h8", lambda h: h[DOWN].pop("shape"))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), DOWN, "exactly dtype, shape"])


def case_header_negative_dimension(ctx):
    src = ctx.header_variant("h9", lambda h: h[DOWN].update(shape=[-32, -48]))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), DOWN, "non-negative"])


def case_header_tensor_removed(ctx):
    src = ctx.header_variant("h10", lambda h: h.pop(DOWN))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "gap"])


def case_header_metadata_not_strings(ctx):
    src = ctx.header_variant("h11", lambda h: h.update(__metadata__={"format": 5}))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "__metadata__"])


def case_header_is_a_json_list(ctx):
    src = ctx.copy_teacher("h12")
    raw = b"[1, 2, 3]"
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "JSON object"])


def case_header_not_utf8(ctx):
    src = ctx.copy_teacher("h13")
    raw = b"{\"a\xff\xfe\": 1}"
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "not valid JSON"])


def case_header_length_huge(ctx):
    src = ctx.copy_teacher("h14")
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "header length"])


def case_weights_file_empty(ctx):
    src = ctx.copy_teacher("h15")
    (src / "model.safetensors").write_bytes(b"")
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "8-byte"])


# ---------------------------------------------------------------------------------------- config.json


def case_config_without_hidden_size(ctx):
    src = ctx.config_variant("c1", lambda c: c.pop("hidden_size"))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "hidden_size is missing"])


def case_config_without_vocab_size(ctx):
    src = ctx.config_variant("c2", lambda c: c.pop("vocab_size"))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "vocab_size is missing"])


def case_config_vocab_size_differs_from_embedding_rows(ctx):
    src = ctx.config_variant("c3", lambda c: c.update(vocab_size=120))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "vocab_size is 120", EMBED, "97 rows"])


def case_config_vocab_size_absurd(ctx):
    src = ctx.config_variant("c4", lambda c: c.update(vocab_size=2_000_000_000))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "vocab_size is 2000000000"])


def case_config_layers_absurd(ctx):
    src = ctx.config_variant("c5", lambda c: c.update(num_hidden_layers=200_000))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "num_hidden_layers is 200000"])


def case_config_layers_differ_from_the_weights(ctx):
    src = ctx.config_variant("c5b", lambda c: c.update(num_hidden_layers=4))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "num_hidden_layers is 4",
                                            "the weights hold 3 layer(s)"])


def case_config_hidden_size_a_string(ctx):
    src = ctx.config_variant("c6", lambda c: c.update(hidden_size="32"))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "hidden_size must be a positive integer"])


def case_config_zero_heads(ctx):
    src = ctx.config_variant("c7", lambda c: c.update(num_attention_heads=0))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "num_attention_heads"])


def case_config_heads_not_multiple_of_kv_heads(ctx):
    src = ctx.config_variant("c8", lambda c: c.update(num_attention_heads=3))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "multiple of num_key_value_heads"])


def case_config_intermediate_size_differs(ctx):
    src = ctx.config_variant("c9", lambda c: c.update(intermediate_size=47))
    return Case(imp(src, ctx.tmp / "out"), [str(src / "model.safetensors"), "mlp", "[32, 47] in the model"])


def case_config_is_a_list(ctx):
    src = ctx.copy_teacher("c10")
    (src / "config.json").write_text("[1, 2]")
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "JSON object"])


def case_config_not_utf8(ctx):
    src = ctx.copy_teacher("c11")
    (src / "config.json").write_bytes(b"{\"model_type\": \"ll\xe9ama\"}")
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "not UTF-8"])


def case_config_nested_too_deeply(ctx):
    src = ctx.copy_teacher("c12")
    (src / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json")])


def case_config_truncated(ctx):
    src = ctx.copy_teacher("c13")
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text[: len(text) // 2])
    return Case(imp(src, ctx.tmp / "out"), [str(src / "config.json"), "not valid JSON"])


def case_tokenizer_larger_than_the_embedding(ctx):
    from conftest import small_bpe_tokenizer

    src = ctx.copy_teacher("tok-big")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    small_bpe_tokenizer(200).save_pretrained(src)
    return Case(imp(src, ctx.tmp / "out"), [str(src), "vocab_size is 97", "tokenizer"])


def case_tokenizer_larger_than_the_embedding_in_profile(ctx):
    from conftest import small_bpe_tokenizer

    src = ctx.copy_teacher("tok-big-profile")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    small_bpe_tokenizer(200).save_pretrained(src)
    return Case(profile(ctx.recipe(ctx.recipe_text(teacher=src))), [str(src), "vocab_size is 97", "tokenizer"])


# ---------------------------------------------------------------------------------------- symlink loops, folders


def case_teacher_symlink_loop(ctx):
    loop = ctx.tmp / "loop"
    os.symlink("loop", loop)
    return Case(imp(loop, ctx.tmp / "out"), [str(loop), "symlink that loops"])


def case_teacher_symlink_loop_in_recipe(ctx):
    loop = ctx.tmp / "tloop"
    os.symlink("tloop", loop)
    return Case(profile(ctx.recipe(ctx.recipe_text(teacher=loop))), ["teachers[0].source", "symlink that loops"])


def case_data_file_symlink_loop(ctx):
    os.symlink("data-loop.txt", ctx.tmp / "data-loop.txt")
    text = ctx.recipe_text().replace("data: bundled:prose", "data: data-loop.txt")
    return Case(profile(ctx.recipe(text)), ["capabilities[0].data", "data-loop.txt", "symlink that loops"])


def case_recipe_symlink_loop(ctx):
    os.symlink("r-loop.yaml", ctx.tmp / "r-loop.yaml")
    return Case(profile(ctx.tmp / "r-loop.yaml"), ["r-loop.yaml", "symlink that loops"])


def case_recipe_path_is_a_folder(ctx):
    (ctx.tmp / "a-folder.yaml").mkdir()
    return Case(profile(ctx.tmp / "a-folder.yaml"), ["a-folder.yaml", "is a folder"])


# ---------------------------------------------------------------------------------------- recipe files


def case_recipe_binary(ctx):
    path = ctx.recipe(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", filename="image.yaml")
    return Case(profile(path), ["image.yaml", "not UTF-8"])


def case_recipe_with_nul_bytes(ctx):
    path = ctx.recipe(b"name: bad\x00\x00\n", filename="nul.yaml")
    return Case(profile(path), ["nul.yaml", "NUL"])


def case_recipe_duplicate_top_level_key(ctx):
    path = ctx.recipe(ctx.recipe_text() + "name: other\n", filename="dup.yaml")
    return Case(profile(path), ["dup.yaml", "duplicate key 'name'", "line 8"])


def case_recipe_duplicate_nested_key(ctx):
    text = ctx.recipe_text().replace("dtype: fp32}", "dtype: fp32, dtype: bf16}")
    return Case(profile(ctx.recipe(text, filename="dup2.yaml")), ["dup2.yaml", "duplicate key 'dtype'"])


def case_recipe_weight_infinite(ctx):
    text = ctx.recipe_text().replace("data: bundled:prose}", "data: bundled:prose, weight: .inf}")
    return Case(profile(ctx.recipe(text, filename="inf.yaml")), ["inf.yaml", "capabilities[0].weight",
                                                                 "not a finite number"])


def case_recipe_weight_nan(ctx):
    text = ctx.recipe_text().replace("data: bundled:prose}", "data: bundled:prose, weight: .nan}")
    return Case(profile(ctx.recipe(text, filename="nan.yaml")), ["capabilities[0].weight", "not a finite number"])


def case_recipe_ram_infinite(ctx):
    path = ctx.recipe(ctx.recipe_text() + "memory: {ram_gb: .inf}\n", filename="ram.yaml")
    return Case(profile(path), ["memory.ram_gb", "not a finite number"])


def case_recipe_nested_too_deeply(ctx):
    path = ctx.recipe("name: " + "[" * 5000 + "]" * 5000 + "\n", filename="deep.yaml")
    return Case(profile(path), ["deep.yaml"])


def case_recipe_yaml_tab_indent(ctx):
    path = ctx.recipe("name: bad\nteachers:\n\t- {name: t}\n", filename="tab.yaml")
    return Case(profile(path), ["tab.yaml", "not valid YAML", "line 3"])


def case_run_dir_inside_the_teacher(ctx):
    src = ctx.copy_teacher("t-host")
    path = ctx.recipe(ctx.recipe_text(teacher=src) + f"run_dir: {src / 'runs'}\n", filename="inside.yaml")
    return Case(profile(path), ["run_dir", "inside teacher 't'"])


def case_teacher_inside_the_run_folder(ctx):
    (ctx.tmp / "runs" / "bad").mkdir(parents=True)
    src = ctx.tmp / "runs" / "bad" / "teacher"
    shutil.copytree(ctx.teacher, src)
    path = ctx.recipe(ctx.recipe_text(teacher=src), filename="holds.yaml")
    return Case(profile(path), ["teachers[0].source", "inside the run folder"])


def case_import_output_inside_the_teacher(ctx):
    src = ctx.copy_teacher("t-out")
    return Case(imp(src, src / "nexus"), [f"output {src / 'nexus'} is inside the source teacher"])


# ---------------------------------------------------------------------------------------- faults


def _enospc_on_save(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@contextlib.contextmanager
def _disk_full_in_save_pretrained():
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save(self, folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"half")  # something half-written first
        _enospc_on_save()
    PreTrainedModel.save_pretrained = save
    try:
        yield
    finally:
        PreTrainedModel.save_pretrained = original


def case_disk_full_during_import(ctx):
    return Case(imp(ctx.teacher, ctx.tmp / "out"), [f"cannot write output {ctx.tmp / 'out'}",
                                                    "No space left on device"],
                patch=_disk_full_in_save_pretrained)


@contextlib.contextmanager
def _disk_full_in_yaml_dump():
    import nexus.conversion.recipe as recipe_module

    original = recipe_module.yaml.safe_dump

    def dump(*_a, **_k):
        _enospc_on_save()
    recipe_module.yaml.safe_dump = dump
    try:
        yield
    finally:
        recipe_module.yaml.safe_dump = original


def case_disk_full_during_profile(ctx):
    return Case(profile(ctx.recipe()), ["cannot write output", "No space left on device"],
                patch=_disk_full_in_yaml_dump)


# ---------------------------------------------------------------------------------------- Nexus checkpoints


def _nexus_checkpoint(ctx, name, mutate):
    from nexus.conversion.teacher_import import import_teacher

    out = ctx.tmp / name
    import_teacher(ctx.teacher, out, on_note=lambda n: None)
    config = json.loads((out / "config.json").read_text())
    mutate(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


def case_export_student_vocab_absurd(ctx):
    src = _nexus_checkpoint(ctx, "student-vocab", lambda c: c.update(vocab_size=2_000_000_000))
    return Case(["export", str(src), str(ctx.tmp / "exported")], [str(src / "config.json"),
                                                                   "vocab_size is 2000000000"])


def case_export_student_layers_differ(ctx):
    def mutate(c):
        c["towers"][0]["layers"] = c["towers"][0]["layers"] * 1000
    src = _nexus_checkpoint(ctx, "student-layers", mutate)
    return Case(["export", str(src), str(ctx.tmp / "exported")], [str(src / "config.json"), "towers[0].layers",
                                                                   "3000"])


def case_export_student_header_lies(ctx):
    from nexus.conversion.teacher_import import import_teacher

    src = ctx.tmp / "student-header"
    import_teacher(ctx.teacher, src, on_note=lambda n: None)
    path = src / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s + 1 for s in header[key]["shape"]]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return Case(["export", str(src), str(ctx.tmp / "exported")], [str(path), key])


CASES = [v for k, v in dict(globals()).items() if k.startswith("case_")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_corpus_has_at_least_40_distinct_cases():
    assert len(CASES) >= 40 and len({c.__name__ for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_fn", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_malformed_input_is_one_clear_error_and_leaves_nothing(case_fn, llama_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    case = case_fn(Ctx(work, llama_dir))
    before, teacher_before = snapshot(work), snapshot(llama_dir)
    with (case.patch or contextlib.nullcontext)():
        result = CliRunner().invoke(app, [str(a) for a in case.argv], env={"COLUMNS": "1000"})
    output = result.output
    lines = [ln for ln in output.splitlines()
             if ln.strip() and not PROGRESS_NOISE.match(ln) and not PLAN_LINE.match(ln)]
    assert "Traceback" not in output, output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output!r} {result.exception!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line:\n{output}"
    for needle in case.needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    added, changed, removed = _leftovers(before, snapshot(work))
    assert not added and not changed and not removed, f"left behind {added}, changed {changed}, removed {removed}"
    assert snapshot(llama_dir) == teacher_before, "the shared teacher folder was modified"
