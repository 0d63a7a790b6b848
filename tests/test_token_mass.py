"""Extra vocabulary ranked by the base teacher's own next-token mass (issue 16; `nexus.conversion.token_mass`).

The mass is the teacher's mean softmax over the capabilities' text (each capability weighing the same); the student
build's ``keep_top_tokens`` keeps the tokens with the most mass by default (``keep_top_by: teacher_mass``), or the
first by id."""

import pytest
import torch
from conftest import small_bpe_tokenizer
from test_base_vocabulary import (
    BPE_VOCAB,
    one_teacher_recipe,
    teacher_with_vocab,
    texts_of,
)

from nexus.conversion.student_build import build_student
from nexus.conversion.teacher_source import load_tokenizer
from nexus.conversion.token_mass import (
    ordinary_tokens,
    teacher_token_mass,
    top_tokens_by_mass,
)

EXTRA = 100


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("token-mass")
    tok = small_bpe_tokenizer(BPE_VOCAB)
    model = teacher_with_vocab("llama", len(tok), seed=3)
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root, model, tok


def test_mass_is_the_mean_softmax_per_capability_averaged_over_capabilities(teacher):
    _, model, tok = teacher
    texts = texts_of(one_teacher_recipe(teacher[0] / "teacher", teacher[0]), n=3)
    mass = teacher_token_mass(model, tok, texts, positions_per_capability=50, window=16, bf16=False)
    assert mass.shape == (len(tok),) and mass.dtype == torch.float64
    assert abs(float(mass.sum()) - 1.0) < 1e-6 and float(mass.min()) >= 0.0
    expected = torch.zeros(len(tok), dtype=torch.float64)
    with torch.no_grad():
        for text in texts.values():  # the same windows, by hand: 15 text tokens per window (no BOS), 50 positions
            ids = [i for c in text.chunks for i in tok(c, add_special_tokens=False)["input_ids"]]
            per_chunk = [tok(c, add_special_tokens=False)["input_ids"] for c in text.chunks]
            rows, total = [], 0
            for chunk_ids in per_chunk:
                for b in range(0, len(chunk_ids), 15):
                    row = chunk_ids[b:b + 15]
                    if len(row) < 2 or total >= 50:
                        continue
                    row = row[:50 - total]
                    rows.append(row)
                    total += len(row)
            assert total == 50 and len(ids) > 50
            probs = torch.cat([model(torch.tensor([r])).logits[0].float().softmax(-1) for r in rows])
            expected += probs.double().mean(0)
    torch.testing.assert_close(mass, expected / len(texts), rtol=1e-5, atol=1e-9)


def test_top_tokens_by_mass_ranks_ordinary_tokens_only(teacher):
    _, _, tok = teacher
    ordinary = ordinary_tokens(tok)
    special = set(tok.all_special_ids)
    assert ordinary and not any(i in special for _, i in ordinary)
    mass = torch.zeros(len(tok), dtype=torch.float64)
    for rank, (_, i) in enumerate(reversed(ordinary)):  # the LAST ids get the most mass
        mass[i] = 1.0 / (rank + 1)
    for i in special:
        mass[i] = 10.0  # specials are never "extra": the trim keeps them anyway
    top = top_tokens_by_mass(tok, mass, 5)
    assert top == [t for t, _ in reversed(ordinary[-5:])]
    assert top_tokens_by_mass(tok, mass, 0) == []


def test_student_build_keeps_the_extra_tokens_its_ranking_puts_first(teacher):
    root, model, tok = teacher
    kept = {}
    for by in ("teacher_mass", "id"):
        recipe = one_teacher_recipe(root / "teacher", root / by, keep_top_tokens=EXTRA, keep_top_by=by,
                                    keep_top_positions=64)
        texts = texts_of(recipe, n=2)  # little text: most of the 700 tokens are left for the extra ranking
        path, record = build_student(recipe, {"best": {"prose": "teacher", "code": "teacher"}},
                                     root / by / "init", texts=texts, show_progress=False)
        assert record["tokenizer"]["choice"]["extra_tokens"]["by"] == by
        kept[by] = set(load_tokenizer(path).get_vocab())
    by_mass = top_tokens_by_mass(tok, teacher_token_mass(model, tok, texts, positions_per_capability=64), EXTRA)
    by_id = [t for t, _ in ordinary_tokens(tok)[:EXTRA]]
    assert set(by_mass) <= kept["teacher_mass"] and set(by_id) <= kept["id"]
    assert not set(by_mass) <= kept["id"]  # the rankings differ here, so the option decides what is kept
