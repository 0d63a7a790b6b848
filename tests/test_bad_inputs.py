"""The bad-input suite (issue 8): every case is one bad recipe, teacher, data file, budget or output, fed to a real
command (`nexus import | profile | localise | compress` through typer's CliRunner) or library function.

Each case must give
(a) a clear error: for the CLI, exit code 2 and exactly ONE output line, ``error: ...``, naming the bad
    field / file / value (no traceback); for a library call, its exception whose message names it;
(b) no partial output: the test folder (inputs, outputs, run folders, caches) is byte-for-byte what it was before
    the command ran, and no ``.*.tmp-*`` temporary is left. The only thing a command may leave is an *empty*
    ``runs/`` parent folder (the run folder ``runs/<name>/`` itself must not exist).

Cases are plain functions ``case_<what>(ctx) -> Case`` collected in CASES; a case that reveals a library bug is
listed in XFAIL with the observed output (the lead fixes the library; the suite keeps the case).
"""

import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from conftest import char_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from nexus.cli import app

# transformers' own "Loading weights: 30/30" bar (tqdm, on stderr) is progress, not part of the error; see the report
PROGRESS_NOISE = re.compile(r"^Loading weights: +\d+%\|")
# the stage's memory plan (stage_ram_guard), printed before the stage starts: information, not part of the error
PLAN_LINE = re.compile(r"^memory plan, \w+: peak RAM .*; budget [\d,]+ MiB$")
FAST_PROFILE = {"max_items": 4, "n_bootstrap": 50, "window_tokens": 32, "batch_size": 4, "compute": "native"}
FAST_COMPRESS = {"calibration_tokens": 64, "selection_tokens": 32, "window_tokens": 16}


@dataclass
class Case:
    argv: list | None = None  # a `nexus` command line ...
    call: Callable | None = None  # ... or a library call
    needles: list = field(default_factory=list)  # substrings the one error line / exception message must contain
    error: type = Exception  # the library call's exception type
    skip: str | None = None  # a reason to skip on this machine


@dataclass
class Ctx:
    tmp: Path
    teacher: Path  # a saved tiny Llama teacher with a tokenizer (session fixture, outside tmp)

    def copy_teacher(self, name="teacher"):
        dst = self.tmp / name
        shutil.copytree(self.teacher, dst)
        return dst

    def recipe(self, mutate=None, filename="recipe.yaml", **top):
        raw = {"name": "bad",
               "teachers": [{"name": "t", "source": str(self.teacher), "dtype": "fp32"}],
               "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"}],
               "stages": {"profile": dict(FAST_PROFILE)}, **top}
        if mutate:
            mutate(raw)
        path = self.tmp / filename
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def jsonl(self, name, rows):
        path = self.tmp / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path


def profile(path):
    return ["profile", str(path), "--quiet"]


def _set(path_in_raw, value):
    """A mutation setting ``raw[k1][k2]... = value`` (ints index lists)."""
    def mutate(raw):
        target = raw
        for key in path_in_raw[:-1]:
            target = target[key]
        target[path_in_raw[-1]] = value
    return mutate


def _caps(*caps):
    return _set(["capabilities"], list(caps))


# ---------------------------------------------------------------------------------------------- the recipe


def case_recipe_file_missing(ctx):
    return Case(profile(ctx.tmp / "nope.yaml"), needles=["recipe file", "nope.yaml", "does not exist"])


def case_recipe_not_yaml(ctx):
    path = ctx.tmp / "broken.yaml"
    path.write_text("name: bad\nteachers: [unclosed\n")
    return Case(profile(path), needles=["broken.yaml", "not valid YAML", "line 3"])


def case_recipe_empty_file(ctx):
    path = ctx.tmp / "empty.yaml"
    path.write_text("")
    return Case(profile(path), needles=["empty.yaml", "the file is empty"])


def case_recipe_top_level_not_a_mapping(ctx):
    path = ctx.tmp / "list.yaml"
    path.write_text("- name: bad\n")
    return Case(profile(path), needles=["top level must be a mapping", "got list"])


def case_recipe_unknown_top_level_key(ctx):
    return Case(profile(ctx.recipe(capabilites=[])), needles=["capabilites: unknown field (a typo?)", "capabilities"])


def case_recipe_unknown_teacher_key(ctx):
    return Case(profile(ctx.recipe(_set(["teachers", 0, "dtyp"], "bf16"))),
                needles=["teachers[0].dtyp: unknown field", "allowed: allow_pickle, dtype, name"])


def case_recipe_bad_dtype(ctx):
    return Case(profile(ctx.recipe(_set(["teachers", 0, "dtype"], "fp16"))), needles=["teachers[0].dtype", "'fp16'"])


def case_recipe_bad_teacher_name(ctx):
    return Case(profile(ctx.recipe(_set(["teachers", 0, "name"], "my teacher!"))),
                needles=["teachers[0].name", "'my teacher!'"])


def case_recipe_run_name_escapes(ctx):
    return Case(profile(ctx.recipe(name="../escape")), needles=["name:", "'../escape'"])


def case_recipe_duplicate_teacher(ctx):
    def mutate(raw):
        raw["teachers"].append(dict(raw["teachers"][0]))
    return Case(profile(ctx.recipe(mutate)), needles=["teachers[1].name", "duplicate teacher name 't'"])


def case_recipe_missing_teacher_path(ctx):
    return Case(profile(ctx.recipe(_set(["teachers", 0, "source"], "no_such_model"))),
                needles=["teachers[0].source", str(ctx.tmp / "no_such_model"), "does not exist"])


def case_recipe_unknown_probe(ctx):
    return Case(profile(ctx.recipe(_caps({"name": "prose", "probe": "perplexity", "data": "bundled:prose"}))),
                needles=["capabilities[0].probe", "unknown probe 'perplexity'", "exact_match, lm, lm_eval"])


def case_recipe_unknown_probe_option(ctx):
    return Case(profile(ctx.recipe(_caps({"name": "q", "probe": "exact_match", "data": "bundled:arithmetic",
                                          "options": {"max_new_tokenz": 4}}))),
                needles=["capabilities[0].options.max_new_tokenz: unknown field"])


def case_recipe_missing_data_file(ctx):
    return Case(profile(ctx.recipe(_caps({"name": "prose", "probe": "lm", "data": "nope.txt"}))),
                needles=["capabilities[0].data", f"data file {ctx.tmp / 'nope.txt'} does not exist"])


def case_recipe_data_is_a_folder(ctx):
    (ctx.tmp / "adir").mkdir()
    return Case(profile(ctx.recipe(_caps({"name": "prose", "probe": "lm", "data": "adir"}))),
                needles=["capabilities[0].data", f"data path {ctx.tmp / 'adir'} is not a file"])


def case_recipe_unknown_bundled_data(ctx):
    return Case(profile(ctx.recipe(_caps({"name": "poems", "probe": "lm", "data": "bundled:poetry"}))),
                needles=["capabilities[0].data", "unknown bundled data 'bundled:poetry'"])


def case_recipe_data_kind_mismatch(ctx):
    return Case(profile(ctx.recipe(_caps({"name": "sums", "probe": "exact_match", "data": "bundled:prose"}))),
                needles=["capabilities[0].data", "gives text data but probe 'exact_match' needs jsonl data"])


def case_recipe_capability_names_unknown_teacher(ctx):
    return Case(profile(ctx.recipe(_caps({"name": "prose", "probe": "lm", "data": "bundled:prose",
                                          "teachers": ["ghost"]}))),
                needles=["capabilities[0].teachers[0]", "unknown teacher 'ghost'"])


def case_recipe_reference_to_unknown_capability(ctx):
    return Case(profile(ctx.recipe(_caps({"name": "prose", "probe": "lm", "data": "bundled:prose",
                                          "reference": ["nope"]}))),
                needles=["capabilities[0].reference[0]", "'nope' is not another capability"])


def case_recipe_budget_with_both_fields(ctx):
    return Case(profile(ctx.recipe(student={"budget": {"params": 1000, "memory_gb": 1}})),
                needles=["student.budget", "give exactly one of params or memory_gb"])


def case_recipe_budget_with_neither_field(ctx):
    return Case(profile(ctx.recipe(student={"budget": {}})),
                needles=["student.budget", "give exactly one of params or memory_gb"])


def case_recipe_negative_budget(ctx):
    return Case(profile(ctx.recipe(student={"budget": {"params": -5}})),
                needles=["student.budget.params", "greater than 0", "-5"])


def case_recipe_unknown_stage(ctx):
    return Case(profile(ctx.recipe(_set(["stages", "distil"], {}))),
                needles=["stages.distil: unknown stage", "stages with options: align, compress"])


def case_recipe_unknown_stage_option(ctx):
    return Case(profile(ctx.recipe(_set(["stages", "profile", "max_itemz"], 3))),
                needles=["stages.profile.max_itemz: unknown field", "max_items"])


def case_recipe_bad_stage_option_value(ctx):
    return Case(profile(ctx.recipe(_set(["stages", "profile", "max_items"], "many"))),
                needles=["stages.profile.max_items", "'many'"])


def case_recipe_stage_options_not_a_mapping(ctx):
    return Case(profile(ctx.recipe(_set(["stages", "profile"], 5))),
                needles=["stages.profile", "expected a mapping of options, got 5"])


def case_recipe_compress_budget_fraction_out_of_range(ctx):
    recipe = ctx.recipe(_set(["stages", "compress"], {"budget": {"fraction": 1.5}, **FAST_COMPRESS}))
    return Case(["compress", str(recipe), "--quiet"], needles=["stages.compress.budget.fraction", "1.5"])


# ---------------------------------------------------------------------------------------------- teachers


def imp(src, out, *extra):
    return ["import", str(src), str(out), *extra]


def case_teacher_missing_path(ctx):
    return Case(imp(ctx.tmp / "nope", ctx.tmp / "out"), needles=[f"teacher path {ctx.tmp / 'nope'} does not exist"])


def case_teacher_pickle_only(ctx):
    src = ctx.copy_teacher("pickled")
    state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(src).state_dict().items()}
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    return Case(imp(src, ctx.tmp / "out"), needles=[str(src), "pytorch_model.bin", "pickle", "--allow-pickle"])


def case_teacher_remote_code_without_permission(ctx):
    src = ctx.copy_teacher("remote")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    return Case(imp(src, ctx.tmp / "out"), needles=[str(src), "needs remote code", "trust_remote_code"])


def case_teacher_without_tokenizer(ctx):
    src = ctx.copy_teacher("no-tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    return Case(imp(src, ctx.tmp / "out"), needles=[f"no tokenizer in {src}"])


def case_teacher_unknown_architecture(ctx):
    src = ctx.tmp / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97)).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    return Case(imp(src, ctx.tmp / "out"),
                needles=["unsupported teacher architecture 'gpt2'", "gemma3_text, llama, qwen2, qwen3"])


def case_teacher_corrupt_safetensors(ctx):
    src = ctx.copy_teacher("corrupt")
    (src / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors header" * 10)
    return Case(imp(src, ctx.tmp / "out"), needles=["model.safetensors"])


def case_teacher_truncated_safetensors(ctx):
    src = ctx.copy_teacher("truncated")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return Case(imp(src, ctx.tmp / "out"), needles=["model.safetensors"])


def case_teacher_gguf_that_is_not_gguf(ctx):
    fake = ctx.tmp / "model.gguf"
    fake.write_text("this is a text file, not GGUF\n" * 20)
    return Case(imp(fake, ctx.tmp / "out", "--cache-root", ctx.tmp / "cache"), needles=[str(fake)])


def case_teacher_file_that_is_not_gguf(ctx):
    fake = ctx.tmp / "model.txt"
    fake.write_text("hello")
    return Case(imp(fake, ctx.tmp / "out"), needles=[f"teacher {fake} is a file but not a .gguf"])


def case_teacher_folder_without_weights(ctx):
    src = ctx.copy_teacher("no-weights")
    (src / "model.safetensors").unlink()
    return Case(imp(src, ctx.tmp / "out"), needles=[f"teacher folder {src} has no weights"])


def case_teacher_folder_without_config(ctx):
    src = ctx.copy_teacher("no-config")
    (src / "config.json").unlink()
    return Case(imp(src, ctx.tmp / "out"), needles=[f"teacher folder {src} has no config.json"])


def case_teacher_config_not_json(ctx):
    src = ctx.copy_teacher("bad-config")
    (src / "config.json").write_text("{ this is not json")
    return Case(imp(src, ctx.tmp / "out"), needles=["config.json"])


# ---------------------------------------------------------------------------------------------- data


def case_data_empty_text_file(ctx):
    (ctx.tmp / "empty.txt").write_text("")
    return Case(profile(ctx.recipe(_caps({"name": "prose", "probe": "lm", "data": "empty.txt"}))),
                needles=["capabilities[0].data", f"data file {ctx.tmp / 'empty.txt'} is empty"])


def case_data_not_utf8(ctx):
    (ctx.tmp / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 20)
    return Case(profile(ctx.recipe(_caps({"name": "prose", "probe": "lm", "data": "latin1.txt"}))),
                needles=[f"{ctx.tmp / 'latin1.txt'} is not UTF-8 text", "offset 3"])


def case_data_malformed_jsonl_line(ctx):
    ctx.jsonl("broken.jsonl", [{"prompt": "1+1=", "answer": "2"}, '{"prompt": "2+2=", "answer": '])
    return Case(profile(ctx.recipe(_caps({"name": "sums", "probe": "exact_match", "data": "broken.jsonl"}))),
                needles=[f"{ctx.tmp / 'broken.jsonl'} line 2: not valid JSON"])


def case_data_jsonl_without_records(ctx):
    (ctx.tmp / "blank.jsonl").write_text("\n\n  \n")
    return Case(profile(ctx.recipe(_caps({"name": "sums", "probe": "exact_match", "data": "blank.jsonl"}))),
                needles=[f"data file {ctx.tmp / 'blank.jsonl'} is empty (no JSONL records)"])


def case_data_exact_match_without_answers(ctx):
    ctx.jsonl("noanswer.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
    return Case(profile(ctx.recipe(_caps({"name": "sums", "probe": "exact_match", "data": "noanswer.jsonl"}))),
                needles=[f"{ctx.tmp / 'noanswer.jsonl'} line 1: missing 'answer'"])


def case_data_multiple_choice_without_choices(ctx):
    ctx.jsonl("nochoices.jsonl", [{"prompt": "2+2=", "answer": 0}])
    return Case(profile(ctx.recipe(_caps({"name": "quiz", "probe": "multiple_choice", "data": "nochoices.jsonl"}))),
                needles=[f"{ctx.tmp / 'nochoices.jsonl'} line 1: 'choices' must be a list of at least two strings"])


def case_data_multiple_choice_answer_out_of_range(ctx):
    ctx.jsonl("badanswer.jsonl", [{"prompt": "2+2=", "choices": ["4", "5"], "answer": 0},
                                  {"prompt": "1+1=", "choices": ["2", "3"], "answer": 7}])
    return Case(profile(ctx.recipe(_caps({"name": "quiz", "probe": "multiple_choice", "data": "badanswer.jsonl"}))),
                needles=[f"{ctx.tmp / 'badanswer.jsonl'} line 2: 'answer' must be a choice index in 0..1, got 7"])


def case_data_probe_library_error_names_the_line(ctx):
    """The library (not only the CLI) names the file and line."""
    from nexus.conversion.probes.data_source import ProbeDataError, read_jsonl

    path = ctx.jsonl("array.jsonl", [{"prompt": "a", "answer": "b"}, "[1, 2]"])
    return Case(call=lambda: read_jsonl(str(path)), error=ProbeDataError,
                needles=[f"{path} line 2: expected a JSON object, got list"])


# ---------------------------------------------------------------------------------------------- budgets


def _compress_recipe(ctx, budget=None, student=None):
    def mutate(raw):
        raw["stages"] = {"compress": {**FAST_COMPRESS, **({"budget": budget} if budget else {})}}
        if student:
            raw["student"] = {"budget": student}
    return ["compress", str(ctx.recipe(mutate)), "--quiet"]


def case_budget_too_small(ctx):
    return Case(_compress_recipe(ctx, {"params": 50}),
                needles=["budget of 50 non_embedding params", "smaller than the smallest model"])


def case_budget_larger_than_the_teacher(ctx):
    return Case(_compress_recipe(ctx, {"params": 10**9}), needles=["budget of 1,000,000,000 non_embedding params", "larger than the teacher"])


def case_student_memory_budget_too_small(ctx):
    return Case(_compress_recipe(ctx, student={"memory_gb": 1e-6}), needles=["(1e-06 GB at 2 bytes/param)", "smaller than the smallest model"])


def case_budget_library_exactly_one(ctx):
    from nexus.conversion.budget import BudgetError, resolve_budget

    return Case(call=lambda: resolve_budget(params=10, fraction=0.5, teacher_counts={"total": 100,
                                                                                      "non_embedding": 50}),
                error=BudgetError, needles=["exactly one of params, fraction or memory_gb"])


# ---------------------------------------------------------------------------------------------- localise


def case_localise_without_reference_set(ctx):
    ctx.jsonl("sums.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(6)])
    recipe = ctx.recipe(_caps({"name": "prose", "probe": "lm", "data": "bundled:prose"},
                              {"name": "sums", "probe": "exact_match", "data": "sums.jsonl"}))
    return Case(["localise", str(recipe), "--quiet"], needles=["capabilities[0].reference", "no reference set"])


def case_localise_too_few_random_sets(ctx):
    recipe = ctx.recipe(_set(["stages", "localise"], {"random_sets": 3}))
    return Case(["localise", str(recipe), "--quiet"], needles=["stages.localise.random_sets"])


# ---------------------------------------------------------------------------------------------- outputs


def _permissions_enforced(tmp):
    probe = tmp / ".perm-probe"
    probe.mkdir()
    probe.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (probe / "x").write_text("x")
    except PermissionError:
        return True
    else:
        (probe / "x").unlink()
        return False
    finally:
        probe.chmod(0o755)
        probe.rmdir()


ROOT_SKIP = "directory permissions are not enforced for this user (running as root): chmod cannot make it unwritable"


def case_output_exists_without_overwrite(ctx):
    out = ctx.tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    return Case(imp(ctx.teacher, out), needles=[f"output {out} already exists"])


def case_output_parent_is_a_file(ctx):
    (ctx.tmp / "afile").write_text("not a folder")
    out = ctx.tmp / "afile" / "out"
    return Case(imp(ctx.teacher, out), needles=[f"cannot write output {out}"])


def case_output_dir_unwritable(ctx):
    enforced = _permissions_enforced(ctx.tmp)
    ro = ctx.tmp / "readonly"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return Case(imp(ctx.teacher, ro / "out"), needles=[f"cannot write output {ro / 'out'}", "Permission denied"],
                skip=None if enforced else ROOT_SKIP)


def case_run_dir_unwritable(ctx):
    enforced = _permissions_enforced(ctx.tmp)
    ro = ctx.tmp / "readonly-runs"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return Case(profile(ctx.recipe(run_dir="readonly-runs")), needles=[str(ro), "Permission denied"],
                skip=None if enforced else ROOT_SKIP)


def case_output_on_a_location_nobody_can_write(ctx):
    """Unwritable even for root (the chmod cases above are skipped then): /proc takes no new folders."""
    out = Path("/proc") / f"nexus-bad-input-{os.getpid()}"
    return Case(imp(ctx.teacher, out), needles=[f"cannot write output {out}"])


def case_run_dir_is_a_file(ctx):
    (ctx.tmp / "runs-file").write_text("not a folder")
    return Case(profile(ctx.recipe(run_dir="runs-file")), needles=[str(ctx.tmp / "runs-file")])


def case_compress_run_dir_is_a_file(ctx):
    (ctx.tmp / "runs-file").write_text("not a folder")
    recipe = ctx.recipe(_set(["stages", "compress"], {"budget": {"fraction": 0.5}, **FAST_COMPRESS}),
                        run_dir="runs-file")
    return Case(["compress", str(recipe), "--quiet"], needles=[str(ctx.tmp / "runs-file")])


def case_output_overwrite_keeps_the_old_output_when_the_teacher_is_bad(ctx):
    out = ctx.tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous import")
    src = ctx.copy_teacher("no-tok")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").unlink()
    return Case(imp(src, out, "--overwrite"), needles=[f"no tokenizer in {src}"])


def case_rerun_with_broken_data_keeps_the_previous_profile(ctx):
    from nexus.conversion.profile import run_profile
    from nexus.conversion.recipe import load_recipe

    (ctx.tmp / "prose.txt").write_text(("The cat sat on the mat. " * 40 + "\n") * 8)
    recipe = ctx.recipe(_caps({"name": "prose", "probe": "lm", "data": "prose.txt"}))
    run_profile(load_recipe(recipe), show_progress=False)
    assert (ctx.tmp / "runs" / "bad" / "profile" / "profile.json").is_file()
    (ctx.tmp / "prose.txt").write_text("")
    return Case(profile(recipe), needles=[f"data file {ctx.tmp / 'prose.txt'} is empty"])


def case_rerun_with_a_bad_budget_keeps_the_previous_compress(ctx):
    from nexus.conversion.compress import run_compress
    from nexus.conversion.recipe import load_recipe

    good = ctx.recipe(_set(["stages", "compress"], {"budget": {"fraction": 0.6}, **FAST_COMPRESS}))
    run_compress(load_recipe(good), show_progress=False)
    assert (ctx.tmp / "runs" / "bad" / "compress" / "compress.json").is_file()
    bad = ctx.recipe(_set(["stages", "compress"], {"budget": {"params": 10**9}, **FAST_COMPRESS}))
    return Case(["compress", str(bad), "--quiet"], needles=["budget of 1,000,000,000", "larger than the teacher"])


CASES = [v for k, v in dict(globals()).items() if k.startswith("case_")]

# Cases that reveal a library bug (observed output in the reason); strict: the lead's fix turns them into passes.
XFAIL = {}  # cases that expose a known bug: name -> reason (pytest xfail, strict)


# ---------------------------------------------------------------------------------------------- the runner


def snapshot(root):
    """Every path under ``root`` -> its bytes (files), "dir" or the link target: the state a command must keep."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = p.read_bytes()
    return state


def _leftovers(before, after):
    """(added, changed, removed) paths; an added ``runs`` folder that stays empty is not a leftover."""
    added = sorted(set(after) - set(before))
    empty_runs = {rel for rel in added if Path(rel).name == "runs" and after[rel] == "dir"
                  and not any(other.startswith(rel + os.sep) for other in after)}
    changed = sorted(rel for rel in set(before) & set(after) if before[rel] != after[rel])
    removed = sorted(set(before) - set(after))
    return [a for a in added if a not in empty_runs], changed, removed


def _params():
    for case in CASES:
        name = case.__name__.removeprefix("case_")
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else []
        yield pytest.param(case, id=name, marks=marks)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_suite_has_at_least_30_distinct_cases():
    assert len(CASES) >= 30 and len({c.__name__ for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_fn", list(_params()))
def test_bad_input_is_one_clear_error_and_leaves_nothing(case_fn, llama_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    ctx = Ctx(work, llama_dir)
    case = case_fn(ctx)
    try:
        if case.skip:
            pytest.skip(case.skip)
        before = snapshot(work)
        teacher_before = snapshot(llama_dir)
        if case.argv is not None:
            result = CliRunner().invoke(app, [str(a) for a in case.argv], env={"COLUMNS": "1000"})
            output = result.output
            lines = [ln for ln in output.splitlines()
                     if ln.strip() and not PROGRESS_NOISE.match(ln) and not PLAN_LINE.match(ln)]
            assert "Traceback" not in output, output
            assert result.exit_code == 2, f"exit {result.exit_code}: {output!r} {result.exception!r}"
            assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{output}"
            message = lines[0]
            assert message.startswith("error: "), message
        else:
            with pytest.raises(case.error) as info:
                case.call()
            message = str(info.value)
        for needle in case.needles:
            assert needle in message, f"{needle!r} not in {message!r}"
        added, changed, removed = _leftovers(before, snapshot(work))
        assert not added, f"left behind: {added}"
        assert not changed and not removed, f"changed: {changed}, removed: {removed}"
        assert snapshot(llama_dir) == teacher_before, "the shared teacher folder was modified"
        for arg in case.argv or ():
            if str(arg).startswith("/proc/"):
                assert not Path(arg).exists()
    finally:
        for p in work.rglob("*"):  # let pytest clean up chmod'ed folders
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
