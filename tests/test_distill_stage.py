"""The distill stage end to end on two tiny teachers with different tokenizers (issue 5): a 2-tower student is built
(one tower per best teacher; here each capability has its own), distilled for a few steps with token-aligned KD, and the
checkpoint loads through AutoModelForCausalLM; exact resume, the alignment-mode error and cache repair."""

import json
import shutil

import pytest
import torch
from conftest import _COMMON, char_tokenizer, small_bpe_tokenizer, tiny_teacher
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from nexus.conversion import distill as distill_module
from nexus.conversion.distill import DistillError, run_distill
from nexus.conversion.recipe import validate_recipe
from nexus.conversion.student_build import build_student
from nexus.conversion.training_text import training_text

STEPS = 4


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    """``llama_char`` (Llama + 97-entry char tokenizer) and ``qwen_bpe`` (Qwen3 + byte-level BPE): two vocabularies."""
    return save_two_teachers(tmp_path_factory.mktemp("distill-teachers"))


def save_two_teachers(root):
    """The `two_teachers` fixture's teachers saved under ``root`` (also used by bench/kill_resume.py)."""
    bpe = small_bpe_tokenizer()
    torch.manual_seed(3)
    qwen = Qwen3ForCausalLM(Qwen3Config(**{**_COMMON, "vocab_size": len(bpe)}, head_dim=16,
                                        tie_word_embeddings=True)).eval()
    out = {}
    for name, model, tok in (("llama_char", tiny_teacher("llama", seed=1), char_tokenizer()), ("qwen_bpe", qwen, bpe)):
        out[name] = root / name
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out


def make_recipe(teachers, run_dir, **distill):
    raw = {
        "name": "tiny", "run_dir": str(run_dir),
        "teachers": [{"name": n, "source": str(p), "dtype": "fp32"} for n, p in teachers.items()],
        "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"},
                         {"name": "code", "probe": "lm", "data": "bundled:code"}],
        "stages": {
            "student_build": {"tokenizer": "base", "bpe_vocab_size": 300, "budget_fraction": 0.6,
                              "allocation": "dynamic", "calibration_tokens": 64, "window_tokens": 32},
            "distill": {"steps": STEPS, "batch_size": 2, "tokens": 300, "chunk_chars": 100, "seq_len": 32,
                        "checkpoint_every": 2, "lmc_points": 2, "top_k": 4, "cache_batch_size": 4, **distill},
        },
    }
    return validate_recipe(raw, base_dir=run_dir)


# llama_char is the best prose teacher, qwen_bpe the best code teacher (profile scores written by hand: the stage
# reads only "best" and the per-teacher scores of a profile)
PROFILE = {
    "best": {"prose": "llama_char", "code": "qwen_bpe"},
    "capabilities": {cap: {t: {"score": s, "higher_is_better": False} for t, s in scores.items()}
                     for cap, scores in {"prose": {"llama_char": 2.0, "qwen_bpe": 3.0},
                                         "code": {"llama_char": 3.0, "qwen_bpe": 2.0}}.items()},
}


def small_texts(recipe):
    out = {}
    for cap in recipe.capabilities:
        t = training_text(cap.name, cap.data, chunk_chars=100)
        t.chunks = t.chunks[:40]
        out[cap.name] = t
    return out


@pytest.fixture(scope="module")
def built(two_teachers, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distill-run")
    recipe = make_recipe(two_teachers, run_dir)
    init, record = build_student(recipe, PROFILE, run_dir / "init", texts=small_texts(recipe), show_progress=False)
    return recipe, init, record


@pytest.fixture(scope="module")
def straight(built, tmp_path_factory):
    recipe, init, _ = built
    out = tmp_path_factory.mktemp("straight") / "distill"
    return out, run_distill(recipe, init, profile=PROFILE, out=out, show_progress=False)


def state(folder):
    return load_file(str(folder / "model.safetensors"))


def test_student_has_one_tower_per_best_teacher_within_budget(built):
    _, init, record = built
    assert [(t["capability"], t["teacher"]) for t in record["towers"]] == [("prose", "llama_char"),
                                                                           ("code", "qwen_bpe")]
    assert record["params"] <= record["budget"]["params"] == int(0.6 * record["teacher_params_total"])
    # the default tokenizer is the base teacher's: best on one capability each, so the larger (qwen_bpe), its rows
    # copied exactly (train_bpe's rows by owner: tests/test_base_vocabulary.py)
    assert record["tokenizer"]["base_teacher"] == "qwen_bpe"
    assert record["embedding_rows"] == {"from base teacher qwen_bpe (exact)": record["tokenizer"]["kept"]}
    model = AutoModelForCausalLM.from_pretrained(init, trust_remote_code=True)
    assert model.config.capability_to_tower == {"prose": 0, "code": 1}
    assert sum(p.numel() for p in model.parameters()) == record["params"]


def test_distilled_student_loads_trains_and_reports_router_accuracy(straight):
    out, summary = straight
    assert summary["train"]["steps"] == STEPS and summary["train"]["skipped_steps"] == 0
    # qwen_bpe is the base teacher and the prose + code text use its whole 320-token vocabulary: identity
    assert summary["alignment"] == {"llama_char": "token_aligned", "qwen_bpe": "identity"}
    router = summary["router_accuracy"]
    assert 0.0 <= router["overall"] <= 1.0 and router["n"] > 0 and set(router["per_capability"]) == {"prose", "code"}
    for key, bpt in summary["bytes_per_token"].items():
        entry = summary["caches"][key]
        assert bpt == pytest.approx(entry["train_cache"]["bytes_per_token"]) and bpt > 0
        if key.startswith("llama_char"):
            assert 0 < entry["train_alignment"]["aligned_fraction"] <= 1
    assert (out / "lmc" / "lmc.png").is_file() and summary["lmc"]["best_alpha"] in (0.0, 1.0)
    assert json.loads((out / "distill.json").read_text())["router_accuracy"] == router
    # keep_best (the default): the held-out CE scored at each checkpoint step (2 and 4), the best one kept
    train = summary["train"]
    assert [s for s, _ in train["evaluations"]] == [2, 4]
    best = min(train["evaluations"], key=lambda e: e[1])
    assert train["best"] == {"step": best[0], "score": best[1]} and train["restored_best"] == (best[0] != STEPS)
    assert summary["heldout_ce"]["distilled"] == pytest.approx(best[1], abs=1e-6)
    lines = (out / "engine" / "run_log.jsonl").read_text().splitlines()
    steps = [json.loads(ln) for ln in lines if '"loss"' in ln]
    assert len(steps) == STEPS and all("router" in s["parts"] and "kd" in s["parts"] for s in steps)
    model = AutoModelForCausalLM.from_pretrained(out / "student", trust_remote_code=True).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        for tower in (0, 1):
            assert torch.isfinite(model(ids, tower=tower).logits).all()
        assert model(ids).router_logits.shape == (1, 2)


def test_resume_after_a_simulated_crash_gives_bit_identical_weights(built, straight, tmp_path, monkeypatch):
    recipe, init, _ = built
    out_a, _ = straight
    original = distill_module.GroupBatches.__call__

    def crashing(self, i):
        if i == 2 * len(self.groups) + 1:  # inside step 3: the checkpoint of step 2 is on disk
            raise RuntimeError("simulated crash")
        return original(self, i)

    monkeypatch.setattr(distill_module.GroupBatches, "__call__", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distill(recipe, init, profile=PROFILE, out=tmp_path / "distill", show_progress=False)
    assert not (tmp_path / "distill" / "student").exists()
    assert (tmp_path / "distill" / "engine" / "checkpoints" / "step-00000002").is_dir()
    monkeypatch.setattr(distill_module.GroupBatches, "__call__", original)
    resumed = run_distill(recipe, init, profile=PROFILE, out=tmp_path / "distill", show_progress=False)
    assert resumed["train"]["resumed_from"] == 2
    a, b = state(out_a / "student"), state(tmp_path / "distill" / "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_identity_alignment_with_a_different_vocabulary_names_the_modes(two_teachers, built, tmp_path):
    _, init, _ = built
    recipe = make_recipe(two_teachers, tmp_path, alignment={"llama_char": "identity"})
    with pytest.raises(DistillError, match="llama_char") as err:
        run_distill(recipe, init, profile=PROFILE, out=tmp_path / "distill", show_progress=False)
    assert "'token_aligned'" in str(err.value) and "'sequence'" in str(err.value)
    assert not (tmp_path / "distill").exists()  # refused before anything was written


def test_a_corrupted_cache_shard_is_detected_and_rebuilt(built, straight, tmp_path):
    recipe, init, _ = built
    out_a, first = straight
    out = tmp_path / "distill"
    shutil.copytree(out_a, out)
    key = "qwen_bpe--code"
    cache = out / "caches" / f"{key}--train"
    shard = cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10:] = bytes(10)  # damage the tensor bytes at the end
    shard.write_bytes(bytes(data))
    again = run_distill(recipe, init, profile=PROFILE, out=out, show_progress=False, force=True)
    events = again["caches"][key]["train_cache"]["events"]
    assert events and events[0]["file"] == "shard-00000.safetensors" and events[0]["action"] == "rebuilt"
    manifest = json.loads((cache / "manifest.json").read_text())
    import hashlib
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == manifest["shards"][0]["sha256"]
    a, b = state(out_a / "student"), state(out / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)  # retrained on the rebuilt shard: the same teacher outputs


def test_consolidate_cli_runs_every_stage_and_a_rerun_reuses_them(two_teachers, tmp_path):
    """`nexus consolidate RECIPE`: profile -> student build -> distill -> validate -> export; the second run reuses
    the profile, the distilled student (no new training) and the report."""
    from typer.testing import CliRunner

    from nexus.cli import app

    recipe = consolidate_recipe_file(two_teachers, tmp_path, steps=2)
    first = CliRunner().invoke(app, ["consolidate", str(recipe), "--quiet"])
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "tiny"
    assert {"profile", "student_build", "distill", "validate", "export"} <= {p.name for p in run.iterdir()}
    report = json.loads((run / "validate" / "report.json").read_text())
    assert set(report["retention"]) == {"prose", "code"} and report["student_params"] > 0
    exported = AutoModelForCausalLM.from_pretrained(run / "export", trust_remote_code=True)
    best = json.loads((run / "profile" / "profile.json").read_text())["best"]
    towers = list(dict.fromkeys(best[c] for c in ("prose", "code")))  # one tower per best teacher
    assert [t["name"] for t in exported.config.towers] == towers
    assert exported.config.capability_to_tower == {c: towers.index(best[c]) for c in ("prose", "code")}
    weights = state(run / "distill" / "student")
    second = CliRunner().invoke(app, ["consolidate", str(recipe), "--quiet"], env={"COLUMNS": "200"})
    assert second.exit_code == 0, second.output
    for stage in ("profile", "student build", "distill"):
        assert f"{stage}: inputs unchanged" in second.output, second.output
    after = state(run / "distill" / "student")
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # the distilled student was not retrained


def consolidate_recipe_file(teachers, root, steps, **validate):
    """A tiny `nexus consolidate` recipe over ``teachers`` (prose and code), written to ``root/recipe.yaml``;
    ``validate`` adds stages.validate options (e.g. ``min_retention``)."""
    import yaml

    # the teachers are random, so no teacher is competent at anything: the capabilities are kept anyway (their
    # retention is flagged), since these runs exercise the pipeline, not the teachers
    raw = {
        "name": "tiny", "run_dir": str(root / "runs"),
        "teachers": [{"name": n, "source": str(p), "dtype": "fp32"} for n, p in teachers.items()],
        "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose", "require_competent_teacher": False},
                         {"name": "code", "probe": "lm", "data": "bundled:code", "require_competent_teacher": False}],
        "stages": {
            "profile": {"max_items": 6, "n_bootstrap": 50, "window_tokens": 32},
            "student_build": {"tokenizer": "base", "bpe_vocab_size": 300, "budget_fraction": 0.6,
                              "allocation": "dynamic", "calibration_tokens": 64, "window_tokens": 32},
            "distill": {"steps": steps, "batch_size": 2, "tokens": 300, "chunk_chars": 100, "seq_len": 32,
                        "checkpoint_every": 1, "lmc_points": 2, "top_k": 4, "cache_batch_size": 4},
            "validate": {"cka": False, **validate},
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return root / "recipe.yaml"


def test_a_top_k_above_a_teachers_vocabulary_caches_its_whole_distribution(built, two_teachers, tmp_path):
    """top_k 200: llama_char has 97 tokens, so its cache keeps all 97 logits (exact) instead of failing; qwen_bpe
    (320 tokens) keeps 200."""
    _, init, _ = built
    recipe = make_recipe(two_teachers, tmp_path / "run", top_k=200, steps=1, checkpoint_every=1)
    summary = run_distill(recipe, init, profile=PROFILE, out=tmp_path / "distill", show_progress=False)
    k = {key: entry["top_k"] for key, entry in summary["caches"].items() if "top_k" in entry}
    assert k == {"llama_char--prose": 97, "qwen_bpe--code": 200}
    from nexus.training.teacher_cache import open_teacher_cache

    cache = open_teacher_cache(summary["caches"]["llama_char--prose"]["train_cache"]["path"])
    assert cache.manifest["settings"]["k"] == 97
