"""The Nexus architecture reproduces real teacher blocks exactly, including irregular (pruned) per-layer widths."""

import copy

import pytest
import torch
from conftest import TINY_VOCAB, tiny_teacher
from transformers import AutoModelForCausalLM

from nexus.conversion.teacher_import import import_teacher, nexus_from_teacher
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM

TOL = 1e-4


def _inputs(seed=0, batch=2, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, TINY_VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    return ids, mask


def _max_diff(a, b, mask=None):
    if mask is not None:  # compare only real (unpadded) positions
        keep = mask.bool()
        return (a[keep] - b[keep]).abs().max().item()
    return (a - b).abs().max().item()


def test_lossless_import_every_family(teacher_dir, tmp_path):
    family, src = teacher_dir
    out = import_teacher(src, tmp_path / "nexus")
    teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(student).__name__ == "NexusForCausalLM"
    ids, mask = _inputs()
    with torch.no_grad():
        assert _max_diff(teacher(ids).logits, student(ids).logits) <= TOL
        t, s = teacher(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits
        assert _max_diff(t, s, mask) <= TOL
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_comparison_is_sensitive_to_a_wrong_mapping():
    """The 1e-4 check can fail: dropping Gemma's sliding window (one config field) changes the logits."""
    teacher = tiny_teacher("gemma3")
    student = nexus_from_teacher(teacher)
    broken_cfg = copy.deepcopy(student.config.to_dict())
    for layer in broken_cfg["towers"][0]["layers"]:
        layer["sliding_window"] = None
    broken = NexusForCausalLM(NexusConfig(**broken_cfg))
    broken.load_state_dict(student.state_dict())
    ids, _ = _inputs(length=24)
    with torch.no_grad():
        assert _max_diff(teacher(ids).logits, student(ids).logits) <= TOL
        assert _max_diff(teacher(ids).logits, broken.eval()(ids).logits) > 1e-3


def _prune_by_hand(model, layer, keep_kv_groups, ffn_layer, keep_neurons):
    """Slice one layer's heads (whole kv groups) and another layer's FFN neurons into a new, irregular model."""
    cfg = copy.deepcopy(model.config.to_dict())
    spec = cfg["towers"][0]["layers"]
    heads, kv, hd = spec[layer]["num_attention_heads"], spec[layer]["num_key_value_heads"], spec[layer]["head_dim"]
    group = heads // kv
    keep_heads = [g * group + j for g in keep_kv_groups for j in range(group)]
    spec[layer]["num_attention_heads"] = len(keep_heads)
    spec[layer]["num_key_value_heads"] = len(keep_kv_groups)
    spec[ffn_layer]["intermediate_size"] = len(keep_neurons)
    pruned = NexusForCausalLM(NexusConfig(**cfg)).eval()

    def rows(heads_):
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads_])

    state = model.state_dict()
    prefix = f"model.towers.0.layers.{layer}.self_attn."
    state[prefix + "q_proj.weight"] = state[prefix + "q_proj.weight"][rows(keep_heads)]
    state[prefix + "k_proj.weight"] = state[prefix + "k_proj.weight"][rows(keep_kv_groups)]
    state[prefix + "v_proj.weight"] = state[prefix + "v_proj.weight"][rows(keep_kv_groups)]
    state[prefix + "o_proj.weight"] = state[prefix + "o_proj.weight"][:, rows(keep_heads)]
    mlp = f"model.towers.0.layers.{ffn_layer}.mlp."
    idx = torch.tensor(keep_neurons)
    state[mlp + "gate_proj.weight"] = state[mlp + "gate_proj.weight"][idx]
    state[mlp + "up_proj.weight"] = state[mlp + "up_proj.weight"][idx]
    state[mlp + "down_proj.weight"] = state[mlp + "down_proj.weight"][:, idx]
    pruned.load_state_dict(state)
    return pruned, keep_heads


def test_irregular_widths_save_reload_and_match_masked_teacher(tmp_path):
    """Pruning heads/neurons by hand == zeroing them in the full model; the irregular model round-trips exactly."""
    full = nexus_from_teacher(tiny_teacher("llama"))
    pruned, keep_heads = _prune_by_hand(full, layer=1, keep_kv_groups=[1], ffn_layer=2, keep_neurons=list(range(0, 48, 3)))
    widths = [(l.self_attn.num_heads, l.mlp.down_proj.in_features) for l in pruned.model.towers[0].layers]
    assert widths == [(4, 48), (2, 48), (4, 16)]

    masked = copy.deepcopy(full)
    with torch.no_grad():
        hd = 8
        o = masked.model.towers[0].layers[1].self_attn.o_proj.weight
        for h in range(4):
            if h not in keep_heads:
                o[:, h * hd:(h + 1) * hd] = 0
        down = masked.model.towers[0].layers[2].mlp.down_proj.weight
        drop = [i for i in range(48) if i % 3]
        down[:, drop] = 0
    ids, mask = _inputs(seed=3)
    with torch.no_grad():
        expected = masked(ids, attention_mask=mask).logits
        got = pruned(ids, attention_mask=mask).logits
        assert _max_diff(expected, got, mask) <= TOL
        assert _max_diff(full(ids, attention_mask=mask).logits, got, mask) > 1e-3  # pruning did change the model

    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, got)


def test_layers_without_attention_or_mlp_and_tower_edge_projections(tmp_path):
    layer = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32}
    cfg = NexusConfig(vocab_size=50, hidden_size=24, towers=[{
        "type": "decoder", "hidden_size": 16, "layers": [
            layer, {**layer, "num_attention_heads": 0, "num_key_value_heads": 0}, {**layer, "intermediate_size": 0},
        ],
    }])
    model = NexusForCausalLM(cfg).eval()
    tower = model.model.towers[0]
    assert tower.layers[1].self_attn is None and tower.layers[2].mlp is None
    assert tower.in_proj.weight.shape == (16, 24) and tower.out_proj.weight.shape == (24, 16)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 9, 50) and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


@pytest.mark.parametrize("field,value,needle", [
    ("num_attention_heads", 3, "multiple of num_key_value_heads"),
    ("head_dim", -1, "towers[0].layers[1].head_dim"),
    ("rope_scaling", {"rope_type": "yarn"}, "rope_scaling.rope_type"),
    ("bogus", 1, "unknown field"),
])
def test_bad_tower_config_names_the_field(field, value, needle):
    layer = {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 16}
    with pytest.raises(ValueError) as err:
        NexusConfig(towers=[{"type": "decoder", "layers": [layer, {**layer, field: value}]}])
    assert needle in str(err.value)


def test_unknown_tower_type_lists_registered_types():
    with pytest.raises(ValueError, match=r"towers\[0\].type: unknown tower type 'mamba'.*decoder"):
        NexusForCausalLM(NexusConfig(towers=[{"type": "mamba", "layers": []}]))
