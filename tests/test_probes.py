"""Probes and bootstrap intervals on tiny random teachers of two families with two tokenizers.

Every probe is checked against an independent computation (a plain forward pass, a per-prompt greedy decode), so a
windowing, batching or tokenisation-boundary mistake shows up as a mismatch.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from nexus.conversion.bootstrap import bootstrap_ci, ratio, ratio_ci
from nexus.conversion.corpora import arithmetic_check
from nexus.conversion.probes import PROBES, ProbeDataError, ProbeSettings, probe_class, register_probe, token_scores
from nexus.conversion.probes.compute_mode import resolve_compute
from nexus.conversion.probes.data_source import read_jsonl, read_text
from nexus.conversion.probes.lm import split_into_chunks
from nexus.conversion.probes.token_scores import next_token_scores

FAST = ProbeSettings(max_items=50, n_bootstrap=200, seed=0, batch_size=4, window_tokens=256, compute="native")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run far faster on one thread when other processes share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teachers(profile_teachers):
    """name -> (model in fp32, tokenizer) for the two families with different tokenizers."""
    out = {}
    for name in ("llama_char", "qwen_bpe"):
        model = AutoModelForCausalLM.from_pretrained(profile_teachers[name], dtype=torch.float32).eval()
        out[name] = (model, AutoTokenizer.from_pretrained(profile_teachers[name]))
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_brackets_the_mean_is_seeded_and_narrows_with_more_items():
    rng = np.random.default_rng(1)
    small, large = rng.normal(2.0, 1.0, 30), rng.normal(2.0, 1.0, 3000)
    lo, hi = bootstrap_ci(small, n=500, seed=3)
    assert lo < small.mean() < hi
    assert bootstrap_ci(small, n=500, seed=3) == (lo, hi)
    lo2, hi2 = bootstrap_ci(large, n=500, seed=3)
    assert hi2 - lo2 < (hi - lo) / 3


def test_bootstrap_ci_of_a_ratio_statistic_resamples_rows():
    rows = np.array([[1.0, 10.0], [4.0, 10.0], [2.0, 20.0], [3.0, 5.0]])
    lo, hi = bootstrap_ci(rows, n=300, seed=0, stat=lambda r: r[:, 0].sum() / r[:, 1].sum())
    assert lo <= rows[:, 0].sum() / rows[:, 1].sum() <= hi
    assert bootstrap_ci([0.7], n=50) == (0.7, 0.7)
    with pytest.raises(ValueError, match="at least one item"):
        bootstrap_ci([], n=10)


def test_ratio_ci_drops_resamples_whose_teacher_score_is_zero():
    """A teacher right on few items: some resamples hold none of them (a zero denominator). They are dropped, not a
    ZeroDivisionError, and the interval comes from the others."""
    teacher = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    student = np.array([1.0, 0.0, 1.0, 0.0, 0.0])
    lo, hi = ratio_ci(student, teacher, n=400)
    assert math.isfinite(lo) and math.isfinite(hi) and 1.0 <= lo <= hi
    with pytest.raises(ValueError, match="non-finite"):
        ratio_ci(student, np.zeros(5), n=50)


def test_ratio_ci_pairs_items_and_orients_lower_is_better():
    teacher = np.array([0.9, 0.5, 0.7, 0.2, 0.6, 0.8])
    assert ratio_ci(teacher, teacher, n=200) == (1.0, 1.0)  # paired: identical scores give exactly 1
    student = teacher * 0.5
    lo, hi = ratio_ci(student, teacher, n=200)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    lo, hi = ratio_ci(teacher * 2, teacher, n=200, lower_is_better=True)  # student bpb twice the teacher's
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    assert ratio(teacher * 2, teacher, lower_is_better=True) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same items"):
        ratio_ci(teacher[:3], teacher)


# ---------------------------------------------------------------- registry and data sources


def test_registry_rejects_a_duplicate_and_names_the_registered_probes():
    assert {"lm", "exact_match", "multiple_choice", "lm_eval"} <= set(PROBES)
    with pytest.raises(ValueError, match="already registered"):
        register_probe("lm", type("Other", (), {}))
    with pytest.raises(ValueError, match=r"unknown probe 'nope'; registered probes: exact_match, lm, lm_eval"):
        probe_class("nope")


def test_data_sources_name_the_file_and_line(tmp_path):
    with pytest.raises(ProbeDataError, match="unknown bundled data 'bundled:poetry'.*bundled:prose"):
        read_text("bundled:poetry")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ProbeDataError, match=f"{empty} is empty"):
        read_text(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(ProbeDataError, match="not UTF-8"):
        read_text(bad)
    with pytest.raises(ProbeDataError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    lines = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}, "", "{oops", {"prompt": "b"}])
    with pytest.raises(ProbeDataError, match=rf"{lines} line 3: not valid JSON"):
        read_jsonl(lines)
    arr = write_jsonl(tmp_path / "arr.jsonl", ["[1, 2]"])
    with pytest.raises(ProbeDataError, match="line 1: expected a JSON object"):
        read_jsonl(arr)
    records, _ = read_jsonl("bundled:arithmetic")
    assert arithmetic_check(records[0][1]) and len(records[0][1]["answer"]) == 5


def test_split_into_chunks_keeps_all_text_in_order():
    text = "alpha beta\n" * 30 + "x" * 250 + "\nend\n"
    chunks = split_into_chunks(text, 100)
    assert "".join(chunks) == text
    assert all(len(c) <= 100 for c in chunks)


# ---------------------------------------------------------------- lm


def manual_lm(model, tokenizer, chunks):
    """Total NLL (nats), scored tokens and correct top-1 from one plain forward per chunk, start token prepended."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    nll = tokens = correct = 0.0
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([[start] + tokenizer(chunk, add_special_tokens=False)["input_ids"]])
            logits = model(ids).logits[0, :-1].float()
            target = ids[0, 1:]
            nll -= torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
            correct += (logits.argmax(-1) == target).sum().item()
            tokens += len(target)
    return nll, tokens, correct


@pytest.mark.parametrize("name", ["llama_char", "qwen_bpe"])
def test_lm_probe_matches_a_plain_forward_pass(name, teachers, tmp_path):
    model, tok = teachers[name]
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\nPython is a programming language.\n" * 3)
    probe = probe_class("lm")(text, {"chunk_chars": 120}, FAST).load()
    result = probe.score(model, tok)
    nll, tokens, correct = manual_lm(model, tok, probe.chunks)
    total_bytes = len(text.read_text().encode())
    s = result.summary
    assert s["metric"] == "bpb" and s["higher_is_better"] is False
    assert s["score"] == pytest.approx(nll / (math.log(2) * total_bytes), rel=1e-4)
    assert s["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert s["accuracy"] == pytest.approx(correct / tokens)
    assert s["ci"][0] <= s["score"] <= s["ci"][1]
    assert s["n"] == len(probe.chunks) == len(result.items) and s["bytes"] == total_bytes


def test_lm_probe_sliding_window_scores_every_token_once(teachers, tmp_path):
    model, tok = teachers["llama_char"]
    text = tmp_path / "long.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 12)
    wide = probe_class("lm")(text, {"chunk_chars": 400}, FAST).load().score(model, tok)
    narrow_settings = ProbeSettings(**{**FAST.__dict__, "window_tokens": 16})
    narrow = probe_class("lm")(text, {"chunk_chars": 400}, narrow_settings).load().score(model, tok)
    assert [i["tokens"] for i in narrow.items] == [i["tokens"] for i in wide.items]
    assert narrow.summary["tokens"] == len(text.read_text())  # char-level: one scored token per character
    # a 16-token window sees less context, so its NLL differs; both stay finite and bracketed
    assert narrow.summary["score"] != wide.summary["score"]
    assert narrow.summary["ci"][0] <= narrow.summary["score"] <= narrow.summary["ci"][1]


def test_compute_modes_on_bf16_weights(teachers, tmp_path):
    """fp32 compute over bf16 weights equals an fp32 model holding the same (bf16-rounded) weights; bf16 autocast
    is close; the patched layers are restored afterwards."""
    model, tok = teachers["qwen_bpe"]
    settings = {"max_items": 3, "n_bootstrap": 50, "window_tokens": 64, "batch_size": 2}

    def bpb(m, compute):
        probe = probe_class("lm")("bundled:code", {}, ProbeSettings(**settings, compute=compute)).load()
        return probe.score(m, tok).summary["score"]

    rounded = copy.deepcopy(model).to(torch.bfloat16)
    reference = bpb(copy.deepcopy(rounded).to(torch.float32), "native")
    assert bpb(rounded, "fp32") == pytest.approx(reference, rel=2e-3)  # only rotary tables/embeddings stay bf16
    assert bpb(rounded, "bf16") == pytest.approx(reference, rel=3e-2)
    assert resolve_compute("auto", rounded) in ("bf16", "fp32")
    assert resolve_compute("fp32", model) == "native"  # fp32 weights: nothing to upcast
    assert all("forward" not in m.__dict__ for m in rounded.modules())
    with pytest.raises(ValueError, match="unknown compute mode"):
        resolve_compute("fp16", model)


def test_sliced_head_equals_full_logits_with_softcap(monkeypatch):
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                              sliding_window=4, final_logit_softcapping=3.0, max_position_embeddings=64)
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    monkeypatch.setattr(token_scores, "MIN_VOCAB_SLICE", 7)
    monkeypatch.setattr(token_scores, "LOGIT_BUDGET", 7 * 22)  # 22 positions x 7-token vocabulary slices
    with torch.no_grad():
        logp, correct = next_token_scores(model, ids, mask)
        logits = model(ids).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(correct, logits.argmax(-1) == ids[:, 1:])


def test_lm_baseline_is_the_in_sample_byte_entropy(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("aab\n")
    base = probe_class("lm")(text, {}, FAST).load().baseline()
    p = {"a": 2 / 4, "b": 1 / 4, "\n": 1 / 4}
    assert base["score"] == pytest.approx(-sum(math.log2(p[c]) for c in "aab\n") / 4)
    assert base["metric"] == "bpb" and "unigram" in base["kind"]


def test_lm_probe_refuses_a_tokenizer_that_cannot_represent_the_text(profile_tokenizers):
    probe = probe_class("lm")("bundled:prose", {}, FAST).load()
    reason = probe.cannot_score(profile_tokenizers["digits"], None)
    assert reason and "<unk>" in reason and "max_unk_fraction" in reason
    assert probe.cannot_score(profile_tokenizers["bpe"], None) is None


# ---------------------------------------------------------------- exact match


def greedy_one_by_one(model, tok, prompts, new_tokens):
    outs = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip())
    return outs


@pytest.mark.parametrize("name", ["llama_char", "qwen_bpe"])
def test_exact_match_counts_greedy_hits(name, teachers, tmp_path):
    model, tok = teachers[name]
    prompts = ["12+5=", "7+8=", "100-1=", "3+3=", "44+1=", "9-2="]
    outputs = greedy_one_by_one(model, tok, prompts, 3)
    # answers: the model's own greedy output for the first four (when non-empty), something else for the rest
    answers = [(o if o and k < 4 else f"wrong{k}") for k, o in enumerate(outputs)]
    expected = sum(a == o for a, o in zip(answers, outputs)) / len(prompts)
    data = write_jsonl(tmp_path / "em.jsonl", [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    result = probe_class("exact_match")(data, {"max_new_tokens": 3}, FAST).load().score(model, tok)
    assert result.summary["score"] == pytest.approx(expected)
    assert result.items == [float(a == o) for a, o in zip(answers, outputs)]
    assert result.summary["metric"] == "exact_match" and result.summary["n"] == 6


def test_exact_match_bad_data_names_the_file_and_line(tmp_path):
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    with pytest.raises(ProbeDataError, match=rf"{no_answer} line 2: missing 'answer'"):
        probe_class("exact_match")(no_answer).load()
    no_prompt = write_jsonl(tmp_path / "no_prompt.jsonl", [{"answer": "2"}])
    with pytest.raises(ProbeDataError, match="line 1: missing 'prompt'"):
        probe_class("exact_match")(no_prompt).load()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ProbeDataError, match=f"{empty} is empty"):
        probe_class("exact_match")(empty).load()
    numeric = write_jsonl(tmp_path / "numeric.jsonl", [{"prompt": "1+1=", "answer": 2}])
    assert probe_class("exact_match")(numeric).load().answers == ["2"]


def test_exact_match_drops_leading_blank_lines_then_cuts_at_the_stop(tmp_path):
    probe = probe_class("exact_match")("bundled:arithmetic", {}, FAST)
    assert probe._clean("\n\n 1801\n2+2=4") == "1801"
    assert probe._clean("1801 ") == "1801"


def test_exact_match_baseline_is_the_majority_answer(tmp_path):
    data = write_jsonl(tmp_path / "yn.jsonl", [{"prompt": f"q{i}", "answer": a} for i, a in enumerate("yyyn")])
    assert probe_class("exact_match")(data, {}, FAST).load().baseline()["score"] == pytest.approx(0.75)
    unique = probe_class("exact_match")("bundled:arithmetic", {}, FAST).load().baseline()
    assert unique["score"] == 0.0


# ---------------------------------------------------------------- multiple choice


def manual_choice_ll(model, tok, prompt, choice):
    context = tok(prompt)["input_ids"]
    whole = tok(prompt + choice)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole)))


@pytest.mark.parametrize("name", ["llama_char", "qwen_bpe"])
def test_multiple_choice_picks_the_most_likely_choice(name, teachers, tmp_path):
    model, tok = teachers[name]
    items = [("The capital of France is", [" Paris", " a dog", " 42"]), ("def f(x): return", [" x", " y z"]),
             ("1+1=", ["2", "3", "11"]), ("Hello", [" world", " there"])]
    rows, expected = [], []
    for k, (prompt, choices) in enumerate(items):
        best = int(np.argmax([manual_choice_ll(model, tok, prompt, c) for c in choices]))
        answer = best if k % 2 == 0 else (best + 1) % len(choices)  # right on even items, wrong on odd ones
        rows.append({"prompt": prompt, "choices": choices, "answer": answer})
        expected.append(float(k % 2 == 0))
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    probe = probe_class("multiple_choice")(data, {}, FAST).load()
    result = probe.score(model, tok)
    assert [i["correct"] for i in result.items] == expected
    assert result.summary["score"] == pytest.approx(0.5)
    assert probe.baseline()["score"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 3, 1 / 2]))


def test_multiple_choice_bad_data(tmp_path):
    bad_index = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "p", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(ProbeDataError, match=r"i.jsonl line 1: 'answer' must be a choice index in 0..1"):
        probe_class("multiple_choice")(bad_index).load()
    one_choice = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "choices": ["a"], "answer": 0}])
    with pytest.raises(ProbeDataError, match="at least two"):
        probe_class("multiple_choice")(one_choice).load()
    no_answer = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "choices": ["a", "b"]}])
    with pytest.raises(ProbeDataError, match="a.jsonl line 1: missing 'answer'"):
        probe_class("multiple_choice")(no_answer).load()


# ---------------------------------------------------------------- lm-eval


def write_local_task(folder, rows, name="tiny_mc"):
    """A local lm-eval multiple-choice task: a YAML and a JSONL beside it (no hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / f"{name}.jsonl", rows)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder / f"{name}.yaml"


def test_lm_eval_local_task_agrees_with_the_multiple_choice_probe(teachers, tmp_path):
    pytest.importorskip("lm_eval", reason="the lm_eval probe needs `pip install lm-eval`")
    model, tok = teachers["llama_char"]
    rows = [{"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "answer": k % 3}
            for k, (a, b) in enumerate([(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 1)])]
    task = write_local_task(tmp_path / "task", rows)
    probe = probe_class("lm_eval")(task, {}, FAST).load()
    result = probe.score(model, tok)
    mc = probe_class("multiple_choice")(tmp_path / "task" / "tiny_mc.jsonl", {}, FAST).load().score(model, tok)
    assert result.items == [i["correct"] for i in mc.items]  # same log-likelihood decision, item by item
    assert result.summary["metric"] == "acc" and result.summary["n"] == 6
    assert result.summary["score"] == pytest.approx(mc.summary["score"])
    assert probe.baseline()["score"] == pytest.approx(1 / 3)


def test_lm_eval_bad_tasks_are_clear_errors(tmp_path):
    pytest.importorskip("lm_eval", reason="the lm_eval probe needs `pip install lm-eval`")
    hub = tmp_path / "hub.yaml"
    hub.write_text("task: hubby\ndataset_path: some_org/some_dataset\noutput_type: multiple_choice\n")
    with pytest.raises(ProbeDataError, match="hub datasets cannot be downloaded"):
        probe_class("lm_eval")(hub).load()
    with pytest.raises(ProbeDataError, match="does not exist"):
        probe_class("lm_eval")(tmp_path / "absent.yaml").load()
    task = write_local_task(tmp_path / "empty_task", [])
    (tmp_path / "empty_task" / "tiny_mc.jsonl").write_text("")
    with pytest.raises(ProbeDataError, match="tiny_mc.jsonl is empty"):
        probe_class("lm_eval")(task).load()
