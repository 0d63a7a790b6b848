"""Specialist teachers: tokenizers round-trip, training lowers the loss, folders are cached, load as plain HF models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nexus.conversion.corpora import arithmetic_check, arithmetic_items, corpus_text
from nexus.training import specialists as sp
from nexus.training.bpe_tokenizer import train_bpe_tokenizer
from nexus.training.char_tokenizer import DIGITS_AND_OPERATORS, PRINTABLE_ASCII, build_char_tokenizer



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TRICKY = ["def f(a, b):\n    return a  +  b\n\n", "\tx = 1 ", " ", "", "\n\n\n", "  leading and trailing  "]


def _round_trips(tok, text):
    with_bos = tok(text)["input_ids"]
    plain = tok(text, add_special_tokens=False)["input_ids"]
    return (tok.decode(with_bos, skip_special_tokens=True) == text and tok.decode(plain) == text
            and with_bos[:1] == [tok.bos_token_id] and with_bos[1:] == plain)


def test_char_tokenizer_round_trips_through_save_and_auto(tmp_path):
    tok = build_char_tokenizer(PRINTABLE_ASCII)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for t in (tok, loaded):
        assert [t.pad_token_id, t.bos_token_id, t.eos_token_id, t.unk_token_id] == [0, 1, 2, 3]
        assert len(t) == 4 + len(PRINTABLE_ASCII)
        for text in TRICKY + [corpus_text("code", "heldout")[:3000]]:
            assert _round_trips(t, text), repr(text)
        assert len(t("a b\nc", add_special_tokens=False)["input_ids"]) == 5  # one token per character
    assert loaded("é")["input_ids"] == [1, 3]  # outside the alphabet -> <unk>


def test_char_tokenizer_small_alphabet_and_bad_input():
    tok = build_char_tokenizer(DIGITS_AND_OPERATORS)
    assert len(tok) == 4 + 13
    assert _round_trips(tok, "1234+567=1801")
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer("")


def test_bpe_tokenizer_is_lossless_for_any_text(tmp_path):
    tok = train_bpe_tokenizer(corpus_text("code", "train")[:30_000], vocab_size=300)
    assert 260 <= len(tok) <= 300
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = TRICKY + ["héllo wörld — ünïcode 😀 中文\r\n", "\x00\x7f", corpus_text("prose", "heldout")[:3000]]
    for t in (tok, loaded):
        for text in texts:
            assert _round_trips(t, text), repr(text)
        assert t.unk_token_id not in t("😀 中文")["input_ids"]
    held = corpus_text("code", "heldout")[:5000]
    assert len(tok(held, add_special_tokens=False)["input_ids"]) < 0.9 * len(held)  # merges compress the text
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer("abc", vocab_size=100)


def test_bpe_split_digits_keeps_every_digit_a_token_and_stays_lossless(tmp_path):
    text = corpus_text("code", "train")[:30_000] + "\n".join(f"{i * 37}+{i * 91}={i * 128}" for i in range(300))
    plain, split = (train_bpe_tokenizer(text, vocab_size=400, split_digits=s) for s in (False, True))
    split.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = "x = 12345 + 678\nprint(2024)"
    for t in (split, loaded):
        pieces = t.convert_ids_to_tokens(t(sample, add_special_tokens=False)["input_ids"])
        assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123456782024")
        assert _round_trips(t, sample)
    numbers = "\n".join(f"{i * 37}+{i * 91}" for i in range(300))
    merged = plain.convert_ids_to_tokens(plain(numbers, add_special_tokens=False)["input_ids"])
    assert any(sum(c.isdigit() for c in p) > 1 for p in merged)  # without the option the same data merges digits


def _tiny(name, **update):
    base = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                warmup_steps=2, lr=3e-3, batch_size=8, bpe_vocab_size=300, train_items=1_000, eval_items=8)
    if name != "arithmetic":
        base.update(seq_len=32, sliding_window=8 if name == "code" else None)
    return sp.SpecialistRecipe(**{**sp.SPECIALISTS[name].model_dump(), **base, **update})  # validated


@pytest.mark.parametrize("name", ["arithmetic", "code", "prose", "reversal"])
def test_a_few_steps_lower_the_loss(name):
    recipe = _tiny(name, steps=40)
    tok = sp.build_tokenizer(recipe)
    model = sp.build_model(recipe, tok, seed=0)
    log = sp.train_model(model, recipe, sp.make_batches(recipe, tok, seed=0), progress=False, log_every=1)
    losses = [loss for _, loss in log["losses"]]
    assert len(losses) == 40 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_arithmetic_batches_mask_prompts_and_exclude_heldout_prompts():
    recipe = _tiny("arithmetic", train_items=3_000, eval_items=200)
    tok = sp.build_tokenizer(recipe)
    batches = sp.ArithmeticBatches(recipe, tok, seed=0)
    held = {i["prompt"] for i in arithmetic_items(200, recipe.eval_seed)}
    texts = tok.batch_decode(batches.ids, skip_special_tokens=True)
    assert not any(t[: t.index("=") + 1] in held for t in texts)
    ids, labels = batches()
    for row, lab in zip(ids, labels):
        targets = tok.decode(lab[lab != -100])
        text = tok.decode(row, skip_special_tokens=True)
        answer = text.split("=")[1]
        assert targets == answer + tok.eos_token  # only the answer and EOS are trained on
        assert arithmetic_check({"prompt": text.split("=")[0] + "=", "answer": answer})


def test_reversal_items_are_seeded_and_bundled():
    from nexus.conversion.corpora import reversal_items
    from nexus.conversion.probes.data_source import read_jsonl
    from nexus.conversion.training_text import training_text

    items = reversal_items(50, seed=3)
    assert items == reversal_items(50, seed=3) and items != reversal_items(50, seed=4)
    for item in items:
        assert item["prompt"][0] == "~" and item["prompt"][-1] == "=" and item["answer"] == item["prompt"][-2:0:-1]
    records, _ = read_jsonl("bundled:reversal")
    held = {r["prompt"] for _, r in records}
    train = training_text("reversal", "bundled:reversal", items=300)
    assert len(held) > 900 and len(train.chunks) == 300 and not held & set(train.prompts)
    recipe = _tiny("reversal", train_items=2_000)
    tok = sp.build_tokenizer(recipe)
    assert len(tok) == 4 + 12  # its own alphabet: digits, ~ and =
    ids, labels = sp.ArithmeticBatches(recipe, tok, seed=0)()
    for row, lab in zip(ids, labels):
        text = tok.decode(row, skip_special_tokens=True)
        assert tok.decode(lab[lab != -100]) == text.split("=")[1] + tok.eos_token
        assert text.split("=")[1] == text.split("=")[0][:0:-1]


def test_recipes_validate_their_fields():
    with pytest.raises(ValueError, match="num_kv_heads"):
        _tiny("code", num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="eval_seed"):
        sp.SpecialistRecipe(**{**sp.SPECIALISTS["arithmetic"].model_dump(), "eval_seed": 1_001})
    with pytest.raises(ValueError, match="unknown specialist"):
        sp.train_specialist("poetry", "/nonexistent")
    with pytest.raises(ValueError, match="already registered"):
        sp.register_specialist(sp.SPECIALISTS["code"])


def test_train_specialist_saves_a_plain_hf_folder_and_caches_it(tmp_path, monkeypatch):
    out = tmp_path / "arithmetic"
    recipe = _tiny("arithmetic", steps=5)
    assert sp.train_specialist(recipe, out, progress=False) == out
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    competence = json.loads((out / "competence.json").read_text())
    assert competence == sp.load_competence(out)
    assert competence["metric"] == "exact_match" and competence["n"] == 8 and 0.0 <= competence["score"] <= 1.0
    assert competence["ci"][0] <= competence["score"] <= competence["ci"][1]

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    ids = tok(["12+34="], return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached specialist was retrained")

    monkeypatch.setattr(sp, "train_model", no_training)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert sp.train_specialist(recipe, out, progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="retrained"):  # another step count is another recipe
        sp.train_specialist(recipe, out, steps=6, progress=False)
    assert sp.load_competence(out) == competence  # the failed retrain left the finished folder untouched


def test_lm_specialist_competence_and_foreign_folders(tmp_path):
    out = tmp_path / "code"
    sp.train_specialist(_tiny("code", steps=3), out, progress=False)
    competence = sp.load_competence(out)
    assert competence["metric"] == "bpb" and competence["score"] > 0
    assert competence["baseline"]["kind"].startswith("unigram over the specialist's tokens")
    held_bytes = len(corpus_text("code", "heldout").encode())
    assert 0.95 * held_bytes < competence["bytes"] <= held_bytes  # the whole held-out split (blank chunks aside)
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert config.model_type == "gemma3_text" and "sliding_attention" in config.layer_types

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a finished specialist"):
        sp.train_specialist(_tiny("code", steps=3), foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_early_stopping_on_validation_items():
    recipe = _tiny("arithmetic", steps=50, validate_every=10, stop_exact_match=0.5)
    tok = sp.build_tokenizer(recipe)
    model = sp.build_model(recipe, tok, seed=0)
    scores = iter([0.1, 0.6, 0.9])
    log = sp.train_model(model, recipe, sp.make_batches(recipe, tok, seed=0), progress=False,
                         validate=lambda m: next(scores))
    assert log["stopped_early"] and log["steps"] == 20 and log["max_steps"] == 50
    assert [v["score"] for v in log["validations"]] == [0.1, 0.6]
    with pytest.raises(ValueError, match="validation_seed"):  # early stopping must not peek at the held-out items
        sp.SpecialistRecipe(**{**recipe.model_dump(), "validation_seed": recipe.eval_seed})


@pytest.mark.parametrize("name", ["arithmetic", "code", "prose", "reversal"])
def test_specialist_architectures_import_into_nexus_exactly(name):
    from nexus.conversion.teacher_import import nexus_from_teacher

    recipe = _tiny(name, steps=1)
    tok = sp.build_tokenizer(recipe)
    model = sp.build_model(recipe, tok, seed=0).eval()
    nexus = nexus_from_teacher(model)
    ids = torch.randint(4, len(tok), (2, recipe.seq_len))  # longer than the code specialist's sliding window
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, nexus(ids).logits, atol=1e-5)
