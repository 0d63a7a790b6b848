"""Healing pruned candidates before they are compared (nexus/conversion/heal.py, compress's selection_heal_steps):
only the decoder layers train, the loss falls, the model's flags come back, the unpruned model is never touched, and
the selection keeps the candidate with the lowest loss after healing."""

import pytest
import torch
from conftest import char_tokenizer, tiny_teacher

from nexus.conversion.compress import Capability, CompressOptions, compress_model
from nexus.conversion.corpora import corpus_text
from nexus.conversion.heal import heal
from nexus.conversion.teacher_import import nexus_from_teacher


def _windows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randint(6, 40, (4, 24), generator=g), "b": torch.randint(40, 90, (4, 24), generator=g)}


def test_heal_trains_the_layers_only_and_lowers_the_loss():
    model = nexus_from_teacher(tiny_teacher("gemma3"))
    model.model.embed_tokens.weight.requires_grad_(True)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    losses = heal(model, _windows(), steps=30, lr=3e-3)
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # it learns the windows
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".layers." in k for k in changed)  # embedding, final norm, head frozen
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags


@pytest.mark.parametrize("steps, windows, match", [(-1, None, "steps"), (2, {}, "capability"),
                                                   (2, {"a": torch.zeros(0, 8, dtype=torch.long)}, "capability")])
def test_heal_refuses_bad_input(steps, windows, match):
    model = nexus_from_teacher(tiny_teacher("llama"))
    with pytest.raises(ValueError, match=match):
        heal(model, _windows() if windows is None else windows, steps=steps)


def test_selection_after_healing_keeps_the_lowest_healed_loss_and_leaves_the_teacher_alone():
    model = nexus_from_teacher(tiny_teacher("gemma3"))
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    caps = [Capability("prose", corpus_text("prose", "train")[:2500], 1.0, "prose"),
            Capability("code", corpus_text("code", "train")[:2500], 2.0, "code")]
    options = CompressOptions(scorer="capability", budget={"fraction": 0.5}, calibration_tokens=256, window_tokens=32,
                              selection_tokens=128, selection_heal_steps=3, selection_heal_lr=1e-3)
    _, _, record = compress_model(model, char_tokenizer(), caps, options)
    report = record["allocation_candidates"]
    assert all(len(c["heal_losses"]) == 3 and c["loss"] != c["loss_before_heal"] for c in report["candidates"])
    best = min(report["candidates"], key=lambda c: c["loss"])
    assert (report["chosen"], report["chosen_scores"]) == (best["allocation"], best["scores"])
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
