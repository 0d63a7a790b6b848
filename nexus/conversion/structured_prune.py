"""Structured pruning mechanics: slice a Nexus tower down to the structures a `PrunePlan` keeps.

This file only *applies* a plan; choosing what to keep (capability-weighted importance, or a baseline scorer such as
random, magnitude, weight-PCA) is the compressor's job. What can be cut, per tower:

- attention heads: a layer keeps any subset of query heads, as long as every kept kv group keeps the same number of
  query heads (grouped-query attention needs equal groups); a kv group with no kept query head is dropped;
- FFN neurons: any subset of a layer's intermediate units;
- whole layers;
- hidden channels of the residual stream, consistently for every matrix and norm that touches it (this changes the
  RMSNorm statistics, so unlike the others it is not exact: the compressor measures what it costs);
- vocabulary rows of the shared embedding and LM head (the tokenizer side lives in `vocab_trim.py`).

A layer whose plan keeps no head loses its attention sub-block; one that keeps no FFN neuron loses its MLP; a layer
that keeps neither is removed. `apply_prune_plan` says so in its returned notes.
"""

import copy
from dataclasses import dataclass, field

import torch

from ..modeling_nexus import NexusConfig, NexusForCausalLM


@dataclass
class TowerPlan:
    """What one tower keeps. ``None`` means keep everything of that kind."""

    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept query-head indices
    neurons: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept FFN unit indices
    drop_layers: list[int] = field(default_factory=list)


@dataclass
class PrunePlan:
    towers: dict[int, TowerPlan] = field(default_factory=dict)
    hidden_channels: list[int] | None = None  # kept residual channels (shared embedding width)
    vocab: list[int] | None = None  # kept token ids, in their new order


def _kept_kv_groups(heads, num_heads, num_kv, where):
    group = num_heads // num_kv
    per_group = {}
    for h in sorted(set(heads)):
        if not 0 <= h < num_heads:
            raise ValueError(f"{where}: head {h} out of range (layer has {num_heads})")
        per_group.setdefault(h // group, []).append(h)
    counts = {len(v) for v in per_group.values()}
    if len(counts) > 1:
        raise ValueError(f"{where}: kept kv groups must keep equally many query heads, got {sorted(per_group.items())}")
    return per_group


def _rows(indices, width):
    return torch.cat([torch.arange(i * width, (i + 1) * width) for i in indices]) if indices else torch.zeros(0, dtype=torch.long)


def apply_prune_plan(model: NexusForCausalLM, plan: PrunePlan):
    """Return ``(pruned_model, notes)``: a new NexusForCausalLM holding exactly the kept structures of ``model``."""
    cfg = copy.deepcopy(model.config.to_dict())
    for key in ("auto_map", "architectures", "transformers_version", "model_type"):
        cfg.pop(key, None)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    notes = []
    tied = model.config.tie_word_embeddings

    for t, tplan in sorted(plan.towers.items()):
        spec = cfg["towers"][t]
        prefix = f"model.towers.{t}.layers."
        new_layers, renumbered = [], {}
        for i, layer in enumerate(spec["layers"]):
            where = f"towers[{t}].layers[{i}]"
            lp = f"{prefix}{i}."
            layer = dict(layer)
            if i in tplan.heads and layer["num_attention_heads"] > 0:
                groups = _kept_kv_groups(tplan.heads[i], layer["num_attention_heads"], layer["num_key_value_heads"], where)
                hd = layer["head_dim"]
                kept_heads = [h for g in sorted(groups) for h in groups[g]]
                kept_kv = sorted(groups)
                for name, idx in (("q_proj", kept_heads), ("k_proj", kept_kv), ("v_proj", kept_kv)):
                    rows = _rows(idx, hd)
                    state[f"{lp}self_attn.{name}.weight"] = state[f"{lp}self_attn.{name}.weight"][rows]
                    if f"{lp}self_attn.{name}.bias" in state:
                        state[f"{lp}self_attn.{name}.bias"] = state[f"{lp}self_attn.{name}.bias"][rows]
                state[f"{lp}self_attn.o_proj.weight"] = state[f"{lp}self_attn.o_proj.weight"][:, _rows(kept_heads, hd)]
                layer["num_attention_heads"], layer["num_key_value_heads"] = len(kept_heads), len(kept_kv)
                if not kept_heads:
                    layer["num_key_value_heads"] = 0
                    notes.append(f"{where}: every head pruned, attention sub-block removed")
                    for k in [k for k in state if k.startswith(f"{lp}self_attn.") or k.startswith(f"{lp}input_layernorm.")
                              or k.startswith(f"{lp}post_attention_layernorm.")]:
                        del state[k]
            if i in tplan.neurons and layer["intermediate_size"] > 0:
                idx = torch.tensor(sorted(set(tplan.neurons[i])), dtype=torch.long)
                if len(idx) and (idx.min() < 0 or idx.max() >= layer["intermediate_size"]):
                    raise ValueError(f"{where}: FFN unit index out of range (layer has {layer['intermediate_size']})")
                for name in ("gate_proj", "up_proj"):
                    state[f"{lp}mlp.{name}.weight"] = state[f"{lp}mlp.{name}.weight"][idx]
                    if f"{lp}mlp.{name}.bias" in state:
                        state[f"{lp}mlp.{name}.bias"] = state[f"{lp}mlp.{name}.bias"][idx]
                state[f"{lp}mlp.down_proj.weight"] = state[f"{lp}mlp.down_proj.weight"][:, idx]
                layer["intermediate_size"] = len(idx)
                if not len(idx):
                    notes.append(f"{where}: every FFN unit pruned, MLP sub-block removed")
                    for k in [k for k in state if k.startswith(f"{lp}mlp.") or "feedforward_layernorm" in k and k.startswith(lp)]:
                        del state[k]
            drop = i in tplan.drop_layers
            if not drop and layer["num_attention_heads"] == 0 and layer["intermediate_size"] == 0:
                drop = True
                notes.append(f"{where}: nothing left in the layer, layer removed")
            if drop:
                for k in [k for k in state if k.startswith(lp)]:
                    del state[k]
                continue
            renumbered[i] = len(new_layers)
            new_layers.append(layer)
        if not new_layers:
            raise ValueError(f"towers[{t}]: the plan removes every layer; a tower needs at least one")
        spec["layers"] = new_layers
        moved = {}
        for k in list(state):
            if k.startswith(prefix):
                idx, rest = k[len(prefix):].split(".", 1)
                moved[f"{prefix}{renumbered[int(idx)]}.{rest}"] = state.pop(k)
        state.update(moved)

    if plan.hidden_channels is not None:
        ch = torch.tensor(sorted(set(plan.hidden_channels)), dtype=torch.long)
        if len(ch) == 0 or ch.min() < 0 or ch.max() >= cfg["hidden_size"]:
            raise ValueError(f"hidden_channels must be non-empty indices below hidden_size={cfg['hidden_size']}")
        for k, v in list(state.items()):
            tower_edge = ".in_proj." in k or ".out_proj." in k
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                state[k] = v[:, ch]
            elif k == "model.norm.weight" or (k.endswith("layernorm.weight") and not tower_edge):
                if _tower_has_own_width(cfg, k):
                    continue
                state[k] = v[ch]
            elif k.endswith(".in_proj.weight"):
                state[k] = v[:, ch]
            elif k.endswith(".out_proj.weight"):
                state[k] = v[ch]
            elif not _tower_has_own_width(cfg, k):
                if any(k.endswith(f"{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                    state[k] = v[:, ch]
                elif any(k.endswith(f"{n}.weight") for n in ("o_proj", "down_proj")) or any(
                        k.endswith(f"{n}.bias") for n in ("o_proj", "down_proj")):
                    state[k] = v[ch]
        shared = cfg["hidden_size"]
        for spec in cfg["towers"]:
            if spec.get("hidden_size") in (None, shared):
                spec["hidden_size"] = len(ch)
        cfg["hidden_size"] = len(ch)
        if cfg.get("embedding_scale"):
            notes.append("hidden channels pruned: embedding_scale kept at the teacher's value")

    if plan.vocab is not None:
        ids = torch.tensor(plan.vocab, dtype=torch.long)
        if len(ids) == 0 or ids.min() < 0 or ids.max() >= cfg["vocab_size"] or len(set(plan.vocab)) != len(ids):
            raise ValueError(f"vocab must be distinct token ids below vocab_size={cfg['vocab_size']}")
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][ids]
        if "lm_head.weight" in state:
            state["lm_head.weight"] = state["lm_head.weight"][ids]
        cfg["vocab_size"] = len(ids)
        remap = {int(old): new for new, old in enumerate(plan.vocab)}
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = cfg.get(key)
            if isinstance(value, list):
                cfg[key] = [remap[v] for v in value if v in remap] or None
            elif value is not None:
                cfg[key] = remap.get(value)

    if "model.router.proj.weight" in state and plan.hidden_channels is not None:
        state["model.router.proj.weight"] = state["model.router.proj.weight"][:, ch]
    pruned = NexusForCausalLM(NexusConfig(**cfg)).to(next(model.parameters()).dtype)
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"prune plan left inconsistent weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        pruned.tie_weights()
    return pruned.eval(), notes


def _tower_has_own_width(cfg, key):
    """True when ``key`` belongs to a tower whose width differs from the shared one (edge projections)."""
    if not key.startswith("model.towers."):
        return False
    t = int(key.split(".")[2])
    width = cfg["towers"][t].get("hidden_size")
    return width is not None and width != cfg["hidden_size"]


def parameter_count(model):
    """Parameters counted once (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
