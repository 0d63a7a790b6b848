"""Issue 15 item 5: every teacher tokenizer must give back the capability text it encodes.

A character ``tokenizer.json`` in a ``qwen2`` folder used to load as ``Qwen2Tokenizer`` (AutoTokenizer's class guess),
which rebuilds a byte-level pipeline over the character vocabulary and silently drops spaces and unknown characters;
`load_tokenizer` now notices that the guess changes the encoding and loads the folder's ``tokenizer.json`` as it is.
A tokenizer that really loses characters (silently, or as ``<unk>``) is one clear error naming the teacher and the
first differing text. All tokenizers and models here are tiny and built in code.
"""

import json
import re
import shutil

import pytest
import torch
import yaml
from conftest import TINY_VOCAB, char_tokenizer, small_bpe_tokenizer, tiny_teacher
from test_bad_inputs import FAST_PROFILE, PLAN_LINE, PROGRESS_NOISE
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.corpora import arithmetic_items, corpus_text
from nexus.conversion.profile import run_profile
from nexus.conversion.recipe import load_recipe
from nexus.conversion.teacher_source import load_tokenizer
from nexus.conversion.tokenizer_roundtrip import TokenizerRoundTripError, check_roundtrip
from nexus.training.bpe_tokenizer import train_bpe_tokenizer
from nexus.training.char_tokenizer import build_char_tokenizer

HELLO = "Hello, world. Every line of this text is the same.\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lossy_tokenizer():
    """A BPE with no unk token and no byte fallback, trained on a lowercase pangram: any other character (capitals,
    punctuation, digits, newlines) silently disappears, with no ``<unk>`` to count."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def _qwen2_folder(path, tokenizer):
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_char(tmp_path_factory):
    """A tiny Qwen2 teacher whose tokenizer.json is the project's character tokenizer (class TokenizersBackend)."""
    return _qwen2_folder(tmp_path_factory.mktemp("qwen2-char"), build_char_tokenizer())


@pytest.fixture(scope="module")
def lossy_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("lossy")
    tok = lossy_tokenizer()
    assert len(tok) <= TINY_VOCAB
    tiny_teacher("llama", seed=3).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cli(argv):
    """(exit code, the output's lines that are neither the memory plan nor a progress bar)."""
    result = CliRunner().invoke(app, [str(a) for a in argv], env={"COLUMNS": "1000"})
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines()
             if ln.strip() and not PLAN_LINE.match(ln) and not PROGRESS_NOISE.match(ln)]
    return result.exit_code, lines


def _recipe(folder, teachers, capabilities):
    raw = {"name": "roundtrip", "teachers": [{"name": n, "source": str(p), "dtype": "fp32"} for n, p in teachers.items()],
           "capabilities": capabilities, "stages": {"profile": dict(FAST_PROFILE)}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- the loader: a wrong class guess


@pytest.mark.parametrize("declared", ["TokenizersBackend", "Qwen2Tokenizer"])
def test_qwen2_folder_with_a_char_tokenizer_json_loads_that_tokenizer_json(qwen2_char, declared, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(qwen2_char, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = declared
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    tok = load_tokenizer(folder)
    text = "Hello, world!\n\tTwo  spaces, digits 1234 and {braces}.\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text and len(ids) == len(text)  # one token per character, spaces included
    # the specials and settings of tokenizer_config.json are kept
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<bos>", "<eos>", "<unk>", "<pad>")
    assert tok("ab")["input_ids"][0] == tok.bos_token_id and tok.padding_side == "left"
    assert tok.model_max_length == 2048
    check_roundtrip(tok, corpus_text("prose", "heldout"), "prose_char", "prose")


def test_the_class_guess_that_loses_spaces_fails_the_roundtrip_naming_teacher_and_text(qwen2_char):
    guessed = AutoTokenizer.from_pretrained(qwen2_char)  # what load_tokenizer returned before: Qwen2Tokenizer
    if guessed.decode(guessed("Hello, world", add_special_tokens=False).input_ids) == "Hello, world":
        pytest.skip(f"this transformers ({type(guessed).__name__}) guesses a class that keeps the spaces")
    with pytest.raises(TokenizerRoundTripError) as info:
        check_roundtrip(guessed, ["Hello, world"], "prose_char", "prose")
    assert str(info.value) == ("teacher 'prose_char': tokenizer does not round-trip the capability 'prose' text: "
                               "'Hello, world' decodes to 'Hello,world' (first difference at character 6)")


def test_profile_scores_the_qwen2_char_teacher_on_every_character(qwen2_char, tmp_path):
    (tmp_path / "hello.txt").write_text(HELLO * 40)
    recipe = load_recipe(_recipe(tmp_path, {"qwen2_char": qwen2_char},
                                 [{"name": "prose", "probe": "lm", "data": "hello.txt"}]))
    result = run_profile(recipe, show_progress=False)
    scored = result["capabilities"]["prose"]["qwen2_char"]
    assert scored["tokens"] == scored["bytes"]  # ASCII, one token per character: nothing was dropped


# ---------------------------------------------------------------- a tokenizer that loses characters: exit 2


def test_profile_of_a_teacher_whose_tokenizer_drops_characters_is_one_error_line(lossy_teacher, tmp_path):
    (tmp_path / "hello.txt").write_text(HELLO * 40)
    path = _recipe(tmp_path, {"prose_lossy": lossy_teacher}, [{"name": "prose", "probe": "lm", "data": "hello.txt"}])
    code, lines = _cli(["profile", path, "--quiet"])
    assert code == 2 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: teacher 'prose_lossy': tokenizer does not round-trip the capability 'prose' text:")
    assert "'Hello, world. Every line" in line and "decodes to 'ello world very line" in line, line
    assert line.endswith("(first difference at character 0)")
    assert not (tmp_path / "runs" / "roundtrip").exists()


def test_profile_of_a_teacher_whose_tokenizer_maps_the_items_to_unk_is_one_error_line(profile_teachers, tmp_path):
    (tmp_path / "quiz.jsonl").write_text("".join(
        json.dumps({"prompt": f"What is {a}+{a}? ", "choices": [str(2 * a), str(2 * a + 1)], "answer": 0}) + "\n"
        for a in range(5)))
    path = _recipe(tmp_path, {"gemma_digits": profile_teachers["gemma_digits"]},
                   [{"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl"}])
    code, lines = _cli(["profile", path, "--quiet"])
    assert code == 2 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: teacher 'gemma_digits': tokenizer does not round-trip the capability 'quiz' text:")
    assert re.search(r"'What is (\d)\+\1\? \d+' decodes to '<unk><unk><unk><unk> <unk><unk> ' \(first difference "
                     r"at character 0\)", line), line
    assert "of its tokens are '<unk>' (none allowed)" in line
    assert not (tmp_path / "runs" / "roundtrip").exists()


def test_a_lossy_teacher_tokenizer_cannot_become_the_students_tokenizer(lossy_teacher, tmp_path):
    from types import SimpleNamespace

    from nexus.conversion.student_build import shared_tokenizer
    from nexus.conversion.training_text import training_text

    recipe = load_recipe(_recipe(tmp_path, {"prose_lossy": lossy_teacher},
                                 [{"name": "prose", "probe": "lm", "data": "bundled:prose"}]))
    texts = {"prose": training_text("prose", "bundled:prose", max_chunks=20)}
    with pytest.raises(TokenizerRoundTripError, match="teacher 'prose_lossy': .* capability 'prose' text"):
        shared_tokenizer(SimpleNamespace(tokenizer="prose_lossy"), texts, recipe, {"prose_lossy": lossy_teacher})


# ---------------------------------------------------------------- tokenizers that are fine pass


def _arithmetic_text():
    return [i["prompt"] + i["answer"] for i in arithmetic_items(50, seed=1)]


@pytest.mark.parametrize("name", ["project_char", "project_bpe", "conftest_char", "conftest_bpe"])
def test_the_projects_own_tokenizers_round_trip_every_bundled_text(name):
    make = {"project_char": build_char_tokenizer,
            "project_bpe": lambda: train_bpe_tokenizer(corpus_text("prose", "train")[:20000], 400),
            "conftest_char": char_tokenizer, "conftest_bpe": small_bpe_tokenizer}[name]
    tok = make()
    for cap in ("prose", "code"):
        # the conftest char tokenizer has no '|', '}', '~' or tab: a few <unk>, within the lm probe's 1% limit
        stats = check_roundtrip(tok, corpus_text(cap, "heldout"), name, cap, max_unk_fraction=0.01)
        assert stats["windows"] >= 2 and stats["chars"] >= 6000
        assert stats["unk_fraction"] == 0.0 or name == "conftest_char"
    check_roundtrip(tok, _arithmetic_text(), name, "arithmetic")


def test_every_tiny_familys_teacher_tokenizer_round_trips(teacher_dir):
    family, folder = teacher_dir
    tok = load_tokenizer(folder)
    check_roundtrip(tok, corpus_text("prose", "heldout"), family, "prose")
    check_roundtrip(tok, corpus_text("code", "heldout"), family, "code", max_unk_fraction=0.01)
    check_roundtrip(tok, _arithmetic_text(), family, "arithmetic")
    assert tok.decode(tok("a  b\nc", add_special_tokens=False)["input_ids"]) == "a  b\nc"


# ---------------------------------------------------------------- the allowed normalisations, and no others


def _fast(tok, **specials):
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _trained_bpe(normalizer=None, pre=None, decoder=None):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre or pre_tokenizers.Metaspace()
    tok.decoder = decoder or decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,fi "))
    tok.train_from_iterator([HELLO * 5, "first file fine"], trainer=trainer)
    return _fast(tok, unk_token="<unk>")


def test_a_sentencepiece_prefix_space_and_unicode_normalisation_are_harmless():
    metaspace = _trained_bpe()  # a Metaspace prefix: " Hello" and "Hello" both decode without the leading space
    check_roundtrip(metaspace, [" Hello, world.", "Hello, world."], "spm", "prose")
    nfkc = _trained_bpe(normalizer=normalizers.NFKC())  # the "ﬁ" ligature comes back as "fi"
    check_roundtrip(nfkc, ["\ufb01rst \ufb01le"], "nfkc", "prose")


def test_other_changes_are_errors():
    lower = _trained_bpe(normalizer=normalizers.Lowercase())
    with pytest.raises(TokenizerRoundTripError, match=r"'Hello, world.' decodes to 'hello, world.' \(first "
                                                      r"difference at character 0\)"):
        check_roundtrip(lower, ["Hello, world."], "uncased", "prose")
    with pytest.raises(TokenizerRoundTripError, match="first difference at character 12"):  # "!" is unknown: <unk>
        check_roundtrip(_trained_bpe(), ["Hello, world!"], "bang", "prose")
    # within a tolerated unk fraction an <unk> is no error, but a silent loss still is
    check_roundtrip(build_char_tokenizer(), ["caf\u00e9 " + "x" * 200], "char", "prose", max_unk_fraction=0.01)
    with pytest.raises(TokenizerRoundTripError, match="first difference at character 0"):
        check_roundtrip(lossy_tokenizer(), ["Hello"], "lossy", "prose", max_unk_fraction=1.0)
