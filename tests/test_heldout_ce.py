"""distill.heldout_ce: fewer rows per forward when the logits would pass the budget, and the same figure."""

import pytest
import torch

from nexus.conversion import distill
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM


def groups(vocab, n_rows=7, seq=12):
    g = torch.Generator().manual_seed(0)
    out = []
    for cap, tower in (("a", 0), ("b", 1)):
        rows = []
        for i in range(n_rows):
            ids = torch.randint(3, vocab, (seq,), generator=g)
            mask = torch.ones(seq, dtype=torch.long)
            mask[seq - i % 4:] = 0  # some padding
            rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
        out.append({"capability": cap, "tower": tower, "rows": rows})
    return out


def test_heldout_ce_is_the_same_when_the_logit_budget_splits_batches(monkeypatch):
    layer = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 24}
    torch.manual_seed(0)
    model = NexusForCausalLM(NexusConfig(vocab_size=50, hidden_size=16, towers=[
        {"type": "decoder", "name": "a", "layers": [layer]}, {"type": "decoder", "name": "b", "layers": [layer]}]))
    model.eval()
    data = groups(50)
    whole = distill.heldout_ce(model, data, batch_size=16)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or forward(*a, **k))
    monkeypatch.setattr(distill, "HELDOUT_LOGIT_BUDGET", 2 * 12 * 50)  # two rows of 12 tokens x 50 logits
    split = distill.heldout_ce(model, data, batch_size=16)
    assert max(calls) == 2 and len(calls) == 8  # 7 rows per group in batches of 2, 2, 2, 1
    assert split == pytest.approx(whole, rel=1e-5)
    assert whole > 0
