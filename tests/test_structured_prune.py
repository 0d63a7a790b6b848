"""Applying a prune plan equals masking the same structures in the full model, for every teacher family."""

import copy

import pytest
import torch
from conftest import FAMILIES, tiny_teacher
from transformers import AutoModelForCausalLM

from nexus.conversion.structured_prune import PrunePlan, TowerPlan, apply_prune_plan, parameter_count
from nexus.conversion.teacher_import import nexus_from_teacher


def _ids(seed=0):
    return torch.randint(6, 97, (2, 20), generator=torch.Generator().manual_seed(seed))


def _masked(model, heads=None, neurons=None, drop_layers=()):
    """The full model with pruned structures zeroed where they write into the residual stream."""
    masked = copy.deepcopy(model)
    layers = masked.model.towers[0].layers
    with torch.no_grad():
        for i, kept in (heads or {}).items():
            attn = layers[i].self_attn
            for h in range(attn.num_heads):
                if h not in kept:
                    attn.o_proj.weight[:, h * attn.head_dim:(h + 1) * attn.head_dim] = 0
        for i, kept in (neurons or {}).items():
            w = layers[i].mlp.down_proj.weight
            w[:, [j for j in range(w.shape[1]) if j not in kept]] = 0
        for i in drop_layers:
            layers[i].self_attn.o_proj.weight.zero_()
            layers[i].mlp.down_proj.weight.zero_()
    return masked


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_heads_neurons_layers_equals_masking(family, tmp_path):
    model = nexus_from_teacher(tiny_teacher(family))
    heads = {0: [2, 3], 2: [0, 2]}  # 4 heads in 2 kv groups: keep one whole group; keep one head of each group
    neurons = {1: list(range(0, 48, 2)), 2: [5, 7, 11]}
    plan = PrunePlan(towers={0: TowerPlan(heads=heads, neurons=neurons, drop_layers=[1])})
    pruned, notes = apply_prune_plan(model, plan)
    assert len(pruned.model.towers[0].layers) == 2 and notes == []
    assert [l.self_attn.num_heads for l in pruned.model.towers[0].layers] == [2, 2]
    assert parameter_count(pruned) < parameter_count(model)
    expected = _masked(model, heads, {2: neurons[2]}, drop_layers=[1])
    with torch.no_grad():
        assert (expected(_ids()).logits - pruned(_ids()).logits).abs().max() <= 1e-4
        assert (model(_ids()).logits - pruned(_ids()).logits).abs().max() > 1e-3
    pruned.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, pruned(_ids()).logits)


def test_removing_every_head_removes_attention_then_the_layer():
    model = nexus_from_teacher(tiny_teacher("llama"))
    pruned, notes = apply_prune_plan(model, PrunePlan(towers={0: TowerPlan(heads={0: []}, neurons={1: [], 2: []})}))
    assert any("layers[0]: every head pruned" in n for n in notes)
    layers = pruned.model.towers[0].layers
    assert layers[0].self_attn is None and layers[1].mlp is None and layers[2].mlp is None
    both, notes = apply_prune_plan(model, PrunePlan(towers={0: TowerPlan(heads={1: []}, neurons={1: []})}))
    assert any("layers[1]: nothing left in the layer, layer removed" in n for n in notes)
    assert len(both.model.towers[0].layers) == 2
    with torch.no_grad():
        assert torch.isfinite(both(_ids()).logits).all()


def test_vocabulary_trim_keeps_the_logits_of_kept_tokens():
    model = nexus_from_teacher(tiny_teacher("qwen3"))  # tied embeddings
    keep = [0, 1, 2, 3] + list(range(10, 60))
    pruned, _ = apply_prune_plan(model, PrunePlan(vocab=keep))
    assert pruned.config.vocab_size == len(keep) and pruned.lm_head.weight is pruned.model.embed_tokens.weight
    old = torch.randint(10, 60, (2, 12))
    new = old - 6  # ids 10..59 sit at positions 4..53
    with torch.no_grad():
        full = model(old).logits[..., keep]
        assert (full - pruned(new).logits).abs().max() <= 1e-5


def test_hidden_channel_pruning_is_consistent_and_loads(tmp_path):
    model = nexus_from_teacher(tiny_teacher("gemma3"))
    pruned, notes = apply_prune_plan(model, PrunePlan(hidden_channels=list(range(0, 32, 2))))
    assert pruned.config.hidden_size == 16 and pruned.model.towers[0].spec["hidden_size"] == 16
    with torch.no_grad():
        logits = pruned(_ids()).logits
    assert logits.shape == (2, 20, 97) and torch.isfinite(logits).all()
    assert any("embedding_scale" in n for n in notes)
    pruned.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, logits)


@pytest.mark.parametrize("plan,needle", [
    (PrunePlan(towers={0: TowerPlan(heads={0: [0, 1, 2]})}), "equally many query heads"),
    (PrunePlan(towers={0: TowerPlan(heads={0: [9]})}), "head 9 out of range"),
    (PrunePlan(towers={0: TowerPlan(drop_layers=[0, 1, 2])}), "removes every layer"),
    (PrunePlan(vocab=[1, 1, 2]), "distinct token ids"),
    (PrunePlan(hidden_channels=[40]), "below hidden_size=32"),
])
def test_bad_plans_name_the_problem(plan, needle):
    with pytest.raises(ValueError, match=needle):
        apply_prune_plan(nexus_from_teacher(tiny_teacher("llama")), plan)
