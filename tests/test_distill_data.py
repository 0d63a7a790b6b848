"""The data side of distillation: the teacher-output cache, cross-tokenizer alignment and the losses (issue 5)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    _COMMON,
    TINY_VOCAB,
    char_tokenizer,
    small_bpe_tokenizer,
    tiny_teacher,
)
from nexus.conversion.corpora import corpus_text
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM
from nexus.training.distill_losses import (
    LOSSES,
    DistillLoss,
    LossMix,
    register_loss,
    topk_forward_kl,
    topk_jsd,
)
from nexus.training.teacher_cache import (
    CacheSettings,
    CorruptCacheError,
    build_teacher_cache,
    open_teacher_cache,
    topk_mass,
)
from nexus.training.token_alignment import (
    VocabularyMismatchError,
    check_alignment_mode,
    collate_distill_rows,
    edit_alignment,
    identity_rows,
    sequence_kd_rows,
    teacher_continuations,
    token_aligned_rows,
    token_char_spans,
)
from transformers import Qwen3Config, Qwen3ForCausalLM


class CountingLoader:
    """A teacher loader that counts how often the cache had to load the teacher."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self):
        self.calls += 1
        return self.model


def _windows(seed=0, lengths=(7, 12, 9, 5, 11, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 97, (n,), generator=g) for n in lengths]


SETTINGS = CacheSettings(k=5, layers=(1, -1), tokens_per_shard=20)


# ------------------------------------------------------------------------------------------------------ cache


@pytest.mark.parametrize("head_slice", [None, 3], ids=["one-slice", "3-position-slices"])
def test_cache_round_trip_matches_the_teacher_and_reports_bytes_per_token(tmp_path, monkeypatch, head_slice):
    """The cache runs the body once and the head over slices of positions (a 262k-token head would otherwise hold
    2 GB of logits for one 8 x 256 batch); slices of 3 positions must give what the model's own forward gives."""
    if head_slice:
        from nexus.conversion.probes import token_scores

        monkeypatch.setattr(token_scores, "FULL_LOGIT_BUDGET", head_slice * TINY_VOCAB)
    teacher = tiny_teacher("llama")
    windows = _windows()
    cache = build_teacher_cache(tmp_path / "c", teacher, windows, settings=SETTINGS, batch_size=4, progress=False)
    assert len(cache) == len(windows)
    assert len(cache.manifest["shards"]) > 1  # 52 tokens, 20 per shard
    for w, got in zip(windows, cache):
        with torch.no_grad():  # each window alone, no padding: the batched, padded run must agree
            ref = teacher(w[None], output_hidden_states=True)
        logits = ref.logits[0].float()
        values, indices = logits.topk(5, dim=-1)
        assert torch.equal(got["input_ids"], w)
        assert torch.equal(got["topk_indices"], indices)
        assert got["topk_values"].dtype == torch.float16
        torch.testing.assert_close(got["topk_values"].float(), values, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got["logsumexp"], torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)
        for layer in (1, -1):
            assert got["hidden"][layer].dtype == torch.bfloat16
            torch.testing.assert_close(got["hidden"][layer].float(), ref.hidden_states[layer][0], atol=3e-2,
                                       rtol=1e-2)

    n_tokens = sum(w.numel() for w in windows)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "c").glob("shard-*.safetensors"))
    assert cache.bytes_per_token == pytest.approx(on_disk / n_tokens)
    parts = cache.manifest["bytes_per_token_parts"]
    assert parts["topk_values"] == 5 * 2 and parts["topk_indices"] == 5 * 4 and parts["input_ids"] == 4
    assert parts["hidden"] == 2 * 32 * 2  # two layers of width 32 in bfloat16
    print(f"cache bytes/token (k=5, 2 hidden layers of 32): {cache.bytes_per_token:.1f}, parts {parts}")

    # a second build with the same key loads nothing; a different k is another key and rebuilds
    loader = CountingLoader(teacher)
    again = build_teacher_cache(tmp_path / "c", loader, windows, settings=SETTINGS, progress=False,
                                teacher_fingerprint=cache.manifest["teacher"]["fingerprint"])
    assert loader.calls == 0 and again.key == cache.key
    other = build_teacher_cache(tmp_path / "c", loader, windows, progress=False,
                                settings=SETTINGS.model_copy(update={"k": 3}),
                                teacher_fingerprint=cache.manifest["teacher"]["fingerprint"])
    assert loader.calls == 1 and other.key != cache.key and other[0]["topk_values"].shape == (7, 3)
    assert any("stale" in r["problem"] for r in other.report)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_shard_is_detected_reported_and_rebuilt(tmp_path, damage):
    teacher = tiny_teacher("llama")
    windows = _windows(1)
    path = tmp_path / "c"
    cache = build_teacher_cache(path, teacher, windows, settings=SETTINGS, progress=False)
    fingerprint = cache.manifest["teacher"]["fingerprint"]
    original = [{k: v for k, v in w.items() if k != "hidden"} for w in cache]
    shard0 = (path / "shard-00000.safetensors").read_bytes()
    bad = path / "shard-00001.safetensors"
    data = bad.read_bytes()
    if damage == "flip":
        bad.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    elif damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.unlink()

    with pytest.raises(CorruptCacheError, match="shard-00001"):
        open_teacher_cache(path)

    loader = CountingLoader(teacher)
    fixed = build_teacher_cache(path, loader, windows, settings=SETTINGS, progress=False,
                                teacher_fingerprint=fingerprint)
    assert loader.calls == 1
    assert [r["file"] for r in fixed.report] == ["shard-00001.safetensors"]
    assert fixed.report[0]["action"] == "rebuilt"
    assert (path / "shard-00000.safetensors").read_bytes() == shard0  # the good shard was not rewritten
    assert fixed.manifest["events"][-1]["file"] == "shard-00001.safetensors"
    for before, after in zip(original, fixed):
        for key, value in before.items():
            assert torch.equal(value, after[key]), key
    open_teacher_cache(path)  # verifies again


class KilledTeacher(torch.nn.Module):
    """Wraps a teacher; its forward fails after ``fail_after`` calls, like a run killed mid-build."""

    def __init__(self, model, fail_after):
        super().__init__()
        self.model, self.config, self.calls, self.fail_after = model, model.config, 0, fail_after

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        return self.model(**kwargs)


def test_interrupted_build_resumes_with_the_missing_shards_only(tmp_path):
    teacher, windows, path = tiny_teacher("llama"), _windows(3), tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(path, KilledTeacher(teacher, 1), windows, settings=SETTINGS, batch_size=8,
                            teacher_fingerprint="t", progress=False)
    with pytest.raises(CorruptCacheError, match="incomplete"):
        open_teacher_cache(path)
    first = (path / "shard-00000.safetensors").read_bytes()
    resumed = KilledTeacher(teacher, 99)
    cache = build_teacher_cache(path, resumed, windows, settings=SETTINGS, batch_size=8, teacher_fingerprint="t",
                                progress=False)
    n_shards = len(cache.manifest["shards"])
    assert n_shards >= 2 and resumed.calls == n_shards - 1  # one batch per shard, the first one not redone
    assert (path / "shard-00000.safetensors").read_bytes() == first
    assert not list(path.glob(".*tmp*"))  # no temporary files left behind
    # an uninterrupted build through the same forward (the wrapper's: full logits, not the sliced head, whose
    # matmul blocking may round differently) writes the same shards
    fresh = build_teacher_cache(tmp_path / "d", KilledTeacher(teacher, 99), windows, settings=SETTINGS,
                                progress=False, teacher_fingerprint="t")
    assert [s["sha256"] for s in fresh.manifest["shards"]] == [s["sha256"] for s in cache.manifest["shards"]]


def test_reader_refuses_a_shard_damaged_after_opening(tmp_path):
    path = tmp_path / "c"
    build_teacher_cache(path, tiny_teacher("llama"), _windows(2), settings=SETTINGS, progress=False)
    cache = open_teacher_cache(path)
    last = path / cache.manifest["shards"][-1]["file"]
    last.write_bytes(last.read_bytes()[:-3])
    cache[0]  # the first shard is still good
    with pytest.raises(CorruptCacheError, match="sha256 mismatch"):
        cache[len(cache) - 1]


def test_cache_bad_input_is_named(tmp_path):
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match="vocabulary"):
        build_teacher_cache(tmp_path / "a", teacher, [torch.tensor([1, 2, 500])], settings=SETTINGS, progress=False)
    with pytest.raises(ValueError, match="tokenizer="):
        build_teacher_cache(tmp_path / "b", teacher, ["some text"], settings=SETTINGS, progress=False)
    with pytest.raises(ValueError, match="teacher_fingerprint"):
        build_teacher_cache(tmp_path / "c", lambda: teacher, _windows(), settings=SETTINGS, progress=False)
    with pytest.raises(ValueError, match="layers"):
        build_teacher_cache(tmp_path / "d", teacher, _windows(), settings=CacheSettings(k=2, layers=(9,)),
                            progress=False)
    assert not any(any((tmp_path / name).glob("*")) for name in "abcd")  # nothing written


# ------------------------------------------------------------------------------------------------------ losses


def _reference_kd(z, v, idx, mask, temperature, kind, beta=0.5):
    """Float64 loops: the top-k + tail bucket definition of the module docstring, written out token by token."""
    B, T, _ = z.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t] or not np.isfinite(v[b, t]).any():
                continue
            zt = z[b, t] / temperature
            lse = math.log(sum(math.exp(x) for x in zt))
            present = [i for i in range(v.shape[-1]) if np.isfinite(v[b, t, i])]
            denom = sum(math.exp(v[b, t, i] / temperature) for i in present)
            q = {i: math.exp(v[b, t, i] / temperature) / denom for i in present}
            p = {i: math.exp(zt[idx[b, t, i]] - lse) for i in range(v.shape[-1])}
            if kind == "kl":
                loss = sum(q[i] * (math.log(q[i]) - math.log(p[i])) for i in present)
            else:
                p_tail = 1.0 - sum(p.values())
                loss = 0.0
                for i in range(v.shape[-1]):
                    qi = q.get(i, 0.0)
                    m = beta * qi + (1 - beta) * p[i]
                    if qi > 0:
                        loss += beta * qi * math.log(qi / m)
                    loss += (1 - beta) * p[i] * math.log(p[i] / m)
                if p_tail > 0:
                    loss += (1 - beta) * p_tail * math.log(p_tail / ((1 - beta) * p_tail))
            total += loss
            count += 1
    return total / max(count, 1)


def _kd_case(seed=0, B=2, T=4, V=13, k=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, T, k, generator=g, dtype=torch.float64) * 3
    idx = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * T)]).reshape(B, T, k)
    v[0, 1, 2] = -math.inf  # an entry dropped by vocabulary mapping
    v[1, 2, :] = -math.inf  # a position with nothing left: must count as masked
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    return z, v, idx, mask


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_kl_and_jsd_match_an_independent_reference(temperature):
    z, v, idx, mask = _kd_case()
    args = (z.numpy(), v.numpy(), idx.numpy(), mask.numpy(), temperature)
    kl = topk_forward_kl(z.float(), v.float(), idx, mask, temperature)
    assert float(kl) == pytest.approx(_reference_kd(*args, "kl"), abs=1e-5)
    for beta in (0.5, 0.2):
        jsd = topk_jsd(z.float(), v.float(), idx, mask, temperature, beta)
        assert float(jsd) == pytest.approx(_reference_kd(*args, "jsd", beta), abs=1e-5)
    # the modules: same values, times T² when t2_scale is on
    batch = {"teacher_topk_values": v.float(), "teacher_topk_indices": idx, "teacher_topk_mask": mask,
             "attention_mask": torch.ones_like(mask, dtype=torch.long)}
    out = SimpleNamespace(logits=z.float())
    scaled = LOSSES["forward_kl"](temperature, t2_scale=True)(out, batch)
    assert float(scaled) == pytest.approx(float(kl) * temperature**2, rel=1e-6)
    assert float(LOSSES["jsd"](temperature, t2_scale=False, beta=0.2)(out, batch)) == pytest.approx(
        _reference_kd(*args, "jsd", 0.2), abs=1e-5)


def test_temperature_behaviour():
    g = torch.Generator().manual_seed(3)
    V = 9
    teacher = torch.randn(1, 3, V, generator=g) * 3
    values, indices = teacher.topk(V, dim=-1)  # k = V: the top-k is the whole distribution
    mask = torch.ones(1, 3, dtype=torch.bool)
    for temperature in (0.5, 1.0, 4.0):
        # a student equal to the teacher has zero divergence at every temperature
        assert float(topk_forward_kl(teacher, values, indices, mask, temperature)) == pytest.approx(0, abs=1e-6)
        assert float(topk_jsd(teacher, values, indices, mask, temperature)) == pytest.approx(0, abs=1e-6)
        # with the whole vocabulary kept, d KL / d z = (softmax(z/T) - softmax(v/T)) / T per token
        z = torch.randn(1, 3, V, generator=g, requires_grad=True)
        topk_forward_kl(z, values, indices, mask, temperature).backward()
        expect = (torch.softmax(z.detach() / temperature, -1) - torch.softmax(teacher / temperature, -1))
        torch.testing.assert_close(z.grad, expect / temperature / 3, atol=1e-6, rtol=1e-5)
    # a higher temperature flattens the teacher: a uniform student gets closer to it
    uniform = torch.zeros(1, 3, V)
    kls = [float(topk_forward_kl(uniform, values, indices, mask, t)) for t in (0.5, 1.0, 2.0, 8.0)]
    assert kls == sorted(kls, reverse=True) and kls[-1] < 0.05 * kls[0]
    with pytest.raises(ValueError, match="temperature"):
        LossMix(temperature=0)


def test_ce_ignores_labels_and_padding():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 3] = labels[1, 1] = -100
    batch = {"labels": labels}
    got = LOSSES["ce"]()(SimpleNamespace(logits=logits), batch)
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b in range(2) for t in range(4)
             if labels[b, t + 1] != -100]
    assert float(got) == pytest.approx(float(torch.stack(terms).mean()), abs=1e-6)


def test_hidden_alignment_through_learned_projections():
    g = torch.Generator().manual_seed(5)
    student_h = [torch.randn(2, 6, 8, generator=g) for _ in range(4)]
    teacher_h = {3: torch.randn(2, 6, 8, generator=g), 5: torch.randn(2, 6, 12, generator=g)}
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    out = SimpleNamespace(hidden_states=tuple(student_h))
    batch = {"teacher_hidden": teacher_h, "attention_mask": mask}

    same = LOSSES["hidden_align"]({1: 3}, 8, {3: 8}, "mse")  # equal widths: starts as the identity
    keep = mask.bool()
    expect = ((student_h[1] - teacher_h[3]) ** 2).mean(-1)[keep].mean()
    assert float(same(out, batch).detach()) == pytest.approx(float(expect), abs=1e-6)
    cos = LOSSES["hidden_align"]({-1: 3}, 8, 8, "cosine")
    a, b = student_h[-1][keep], teacher_h[3][keep]
    expect = (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
    assert float(cos(out, batch).detach()) == pytest.approx(float(expect), abs=1e-6)

    # different widths: the projection learns; student layer 2 (8 wide) -> teacher layer 5 (12 wide)
    torch.manual_seed(0)
    proj = LOSSES["hidden_align"]({2: 5}, 8, {5: 12}, "mse")
    target = {5: student_h[2] @ torch.randn(8, 12, generator=g)}
    batch = {"teacher_hidden": target, "attention_mask": mask}
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    first = float(proj(out, batch).detach())
    for _ in range(60):
        opt.zero_grad()
        proj(out, batch).backward()
        opt.step()
    assert float(proj(out, batch).detach()) < 0.05 * first

    with pytest.raises(ValueError, match="teacher layer 4"):
        LOSSES["hidden_align"]({1: 4}, 8, 8)(out, {"teacher_hidden": teacher_h, "attention_mask": mask})
    with pytest.raises(ValueError, match="output_hidden_states"):
        same(SimpleNamespace(hidden_states=None), batch)


def _two_tower_student():
    torch.manual_seed(0)
    layer = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48}
    cfg = NexusConfig(vocab_size=61, hidden_size=32, eos_token_id=None, pad_token_id=0, towers=[
        {"type": "decoder", "name": "arith", "capabilities": ["arithmetic"], "layers": [layer] * 2},
        {"type": "decoder", "name": "prose", "capabilities": ["prose"], "hidden_size": 16, "layers": [layer]},
    ])
    return NexusForCausalLM(cfg)


def test_router_loss_and_accuracy_on_a_two_tower_student():
    model = _two_tower_student()
    ids = torch.randint(1, 61, (6, 5))
    ids[:3, :] = torch.randint(1, 20, (3, 5))  # the two capabilities use different tokens: learnable
    ids[3:, :] = torch.randint(30, 61, (3, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "capability": torch.tensor([0, 0, 0, 1, 1, -100])}
    loss_fn = DistillLoss(LossMix(kd=0, router=1.0))
    out = model(ids, attention_mask=batch["attention_mask"])
    total, parts = loss_fn(out, batch)
    logits = out.router_logits.detach().double()
    ref = np.mean([-(logits[i, c] - torch.logsumexp(logits[i], 0)).item() for i, c in enumerate([0, 0, 0, 1, 1])])
    assert parts["router"] == pytest.approx(ref, abs=1e-5) and float(total.detach()) == pytest.approx(ref, abs=1e-5)
    acc = np.mean([int(logits[i].argmax()) == c for i, c in enumerate([0, 0, 0, 1, 1])])
    assert parts["router_acc"] == pytest.approx(acc)

    opt = torch.optim.Adam(model.model.router.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model(ids, attention_mask=batch["attention_mask"]), batch)[0].backward()
        opt.step()
    _, after = loss_fn(model(ids, attention_mask=batch["attention_mask"]), batch)
    assert after["router"] < parts["router"] and after["router_acc"] == 1.0
    with pytest.raises(ValueError, match="router_logits"):
        loss_fn(model(ids, tower=0), batch)


def test_registry_and_mix_validation():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("forward_kl", LOSSES["jsd"])
    with pytest.raises(ValueError, match="forward_kl"):
        LossMix(kd_kind="reverse_kl")
    with pytest.raises(ValueError, match="at least one"):
        LossMix(kd=0)
    with pytest.raises(ValueError, match="hidden_layer_map"):
        LossMix(hidden=1.0)
    with pytest.raises(ValueError, match="typo"):
        LossMix.model_validate({"typo": 1})
    assert LossMix.model_validate({"hidden": 0.5, "hidden_layer_map": {"1": "2"}}).hidden_layer_map == {1: 2}


# ---------------------------------------------------------------------------------------------- cross-tokenizer


@pytest.fixture(scope="module")
def two_vocab_setup():
    """Teacher A: Llama + 97-entry char tokenizer (the student's vocabulary). Teacher B: Qwen3 + a 320-entry BPE."""
    char, bpe = char_tokenizer(), small_bpe_tokenizer()
    torch.manual_seed(7)
    qwen = Qwen3ForCausalLM(Qwen3Config(**{**_COMMON, "vocab_size": len(bpe)}, head_dim=16,
                                        tie_word_embeddings=True)).eval()
    text = corpus_text("prose", "heldout")
    texts = [text[i:i + 60] for i in range(0, 600, 60)]
    return {"char": char, "bpe": bpe, "llama": tiny_teacher("llama", seed=1), "qwen": qwen, "texts": texts}


def test_mode_none_with_different_vocabularies_names_the_modes(two_vocab_setup, tmp_path):
    s = two_vocab_setup
    with pytest.raises(VocabularyMismatchError) as err:
        check_alignment_mode("none", s["bpe"], s["char"])
    assert "'token_aligned'" in str(err.value) and "'sequence'" in str(err.value)
    assert check_alignment_mode("none", s["char"], char_tokenizer()) == "identity"
    with pytest.raises(ValueError, match="token_aligned"):
        check_alignment_mode("fuse", s["bpe"], s["char"])
    cache = build_teacher_cache(tmp_path / "q", s["qwen"], s["texts"][:2], tokenizer=s["bpe"],
                                settings=CacheSettings(k=4), progress=False)
    with pytest.raises(VocabularyMismatchError, match="token_aligned"):
        identity_rows(cache, 64, teacher_tokenizer=s["bpe"], student_tokenizer=s["char"])


def test_token_aligned_kd_maps_the_teachers_topk_into_the_student_vocabulary(two_vocab_setup, tmp_path):
    s = two_vocab_setup
    char, bpe, texts = s["char"], s["bpe"], s["texts"]
    k, seq_len = 8, 64
    cache = build_teacher_cache(tmp_path / "q", s["qwen"], texts, tokenizer=bpe,
                                settings=CacheSettings(k=k, layers=(2,)), progress=False)
    rows, report = token_aligned_rows(texts, cache, bpe, char, seq_len, capability=1)
    char_vocab = char.get_vocab()

    # independent check: pair positions by decoding prefixes, map top-k entries by decoding single tokens
    mass_kept, aligned = [], 0
    for text, row, w in zip(texts, rows, cache):
        t_ids = w["input_ids"].tolist()
        t_prefix = {bpe.decode(t_ids[: i + 1]): i for i in range(len(t_ids))}
        n = int(row["attention_mask"].sum())
        for j in range(n):
            i = t_prefix.get(char.decode(row["input_ids"][: j + 1].tolist()))
            if i is None:
                assert not row["teacher_topk_mask"][j]
                continue
            aligned += 1
            expect = {}
            for value, tid in zip(w["topk_values"][i].float().tolist(), w["topk_indices"][i].tolist()):
                piece = bpe.decode([tid])
                sid = char.eos_token_id if tid == bpe.eos_token_id else char_vocab.get(piece)  # EOS maps by role
                if sid is not None and sid not in expect:
                    expect[sid] = value
            got = {int(ix): float(v) for v, ix in zip(row["teacher_topk_values"][j], row["teacher_topk_indices"][j])
                   if math.isfinite(v)}
            assert got == expect
            assert bool(row["teacher_topk_mask"][j]) == bool(expect)
            probs = torch.softmax(w["topk_values"][i].float(), -1)
            kept_ids = [r for r, t in enumerate(w["topk_indices"][i].tolist())
                        if bpe.decode([t]) in char_vocab or t == bpe.eos_token_id]
            mass_kept.append(float(probs[kept_ids].sum()))
            assert torch.equal(row["teacher_hidden"][2][j], w["hidden"][2][i])
    assert aligned == report.aligned_positions > 0
    assert report.mass_kept == pytest.approx(float(np.mean(mass_kept)), abs=1e-5)
    assert 0 < report.mass_kept <= 1 and 0 < report.topk_mass <= 1 and report.kd_positions > 0
    print(f"token-aligned KD (BPE teacher -> char student): {report.as_dict()}")

    # the rows fit the loss contract and training on them lowers the KD loss
    student = nexus_from_teacher(tiny_teacher("llama", seed=3))
    batch = collate_distill_rows(rows[:4])
    mix = LossMix(kd=1.0, ce=0.5, hidden=0.1, hidden_layer_map={1: 2}, temperature=2.0)
    loss_fn = DistillLoss.for_model(mix, student, teacher_dims={2: 32})
    opt = torch.optim.Adam(list(student.parameters()) + list(loss_fn.parameters()), lr=3e-3)
    history = []
    for _ in range(6):
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True)
        total, parts = loss_fn(out, batch)
        assert math.isfinite(parts["total"]) and set(parts) == {"kd", "ce", "hidden", "total"}
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(parts["kd"])
    assert history[-1] < history[0]


def test_identity_rows_for_a_teacher_sharing_the_students_vocabulary(two_vocab_setup, tmp_path):
    s = two_vocab_setup
    cache = build_teacher_cache(tmp_path / "l", s["llama"], s["texts"][:3], tokenizer=s["char"],
                                settings=CacheSettings(k=6), progress=False)
    rows = identity_rows(cache, 64, capability=0, teacher_tokenizer=s["char"], student_tokenizer=char_tokenizer())
    batch = collate_distill_rows(rows)
    assert batch["input_ids"].shape == (3, 64) and batch["teacher_topk_values"].shape == (3, 64, 6)
    assert torch.equal(batch["teacher_topk_mask"], batch["attention_mask"].bool())
    # the teacher as its own student: with the top-k renormalised and the student's full-vocabulary probabilities,
    # KL = -log(teacher's true top-k mass) per token (the documented tail handling), from the cached logsumexp
    with torch.no_grad():
        out = SimpleNamespace(logits=s["llama"](batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    _, parts = DistillLoss(LossMix(kd=1.0))(out, batch)
    expect = torch.cat([-torch.log(topk_mass(w)) for w in cache]).mean()
    assert parts["kd"] == pytest.approx(float(expect), abs=2e-3)  # float16-rounded teacher values


def test_sequence_level_kd_rows_from_teacher_continuations(two_vocab_setup):
    s = two_vocab_setup
    prompts = ["The module ", "def main(", "It is"]
    texts = teacher_continuations(s["qwen"], s["bpe"], prompts, max_new_tokens=6)
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, prompts))
    rows = sequence_kd_rows(texts, s["char"], 48, capability=2, prompts=prompts)
    for row, text, prompt in zip(rows, texts, prompts):
        n = int(row["attention_mask"].sum())
        assert n == len(text)  # one character per student token, no BOS
        assert (row["labels"][: len(prompt)] == -100).all()
        assert torch.equal(row["labels"][len(prompt):n], row["input_ids"][len(prompt):n])
        assert (row["labels"][n:] == -100).all() and int(row["capability"]) == 2
    batch = collate_distill_rows(rows)
    student = nexus_from_teacher(tiny_teacher("llama", seed=3))
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    _, parts = DistillLoss(LossMix(kd=0, ce=1.0))(out, batch)
    assert math.isfinite(parts["ce"]) and parts["ce"] > 0
    with pytest.raises(ValueError, match="set kd to 0"):
        DistillLoss(LossMix(kd=1.0))(out, batch)


class _SlowTokenizer:
    """The same tokenizer without character offsets, to exercise the edit-distance fallback."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)


def test_edit_distance_fallback_gives_the_offsets_spans(two_vocab_setup):
    s = two_vocab_setup
    text = s["texts"][3]
    for tok in (s["bpe"], s["char"]):
        ids = tok(text)["input_ids"]
        assert torch.equal(token_char_spans(_SlowTokenizer(tok), ids, text), token_char_spans(tok, ids, text))
    # a lossy decode (one character dropped) still lands every boundary next to the right place
    assert edit_alignment("hello wrld", "hello world") == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11]
    assert edit_alignment("abc", "abc") == [0, 1, 2, 3]
    assert edit_alignment("", "xy") == [0]
