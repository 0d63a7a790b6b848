"""generate() with transformers' own cache, and hard top-1 routing: only the chosen tower runs."""

import pytest
import torch
from conftest import tiny_teacher

from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM


def two_tower_model(seed=0):
    torch.manual_seed(seed)
    layer = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48}
    cfg = NexusConfig(
        vocab_size=61, hidden_size=32, eos_token_id=None, pad_token_id=0,
        towers=[
            {"type": "decoder", "name": "arith", "capabilities": ["arithmetic"], "layers": [layer] * 2},
            {"type": "decoder", "name": "prose", "capabilities": ["prose"], "norm": "gemma_rms",
             "sandwich_norms": True, "qk_norm": True, "hidden_act": "gelu_pytorch_tanh",
             "layers": [{**layer, "sliding_window": 3}, layer, {**layer, "intermediate_size": 20}]},
        ],
    )
    return NexusForCausalLM(cfg).eval()


class TowerCalls:
    """Counts forward calls per tower through hooks."""

    def __init__(self, model):
        self.calls = [0] * len(model.model.towers)
        for i, tower in enumerate(model.model.towers):
            tower.register_forward_hook(lambda *_, i=i: self.calls.__setitem__(i, self.calls[i] + 1))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_generate_same_with_and_without_cache(family):
    model = nexus_from_teacher(tiny_teacher(family))
    model.generation_config.pad_token_id = 0
    ids = torch.randint(4, 97, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)


def test_generate_matches_the_teacher():
    teacher = tiny_teacher("gemma3")  # window 4 < generated length: the sliding mask is exercised while decoding
    model = nexus_from_teacher(teacher)
    ids = torch.randint(4, 97, (1, 6))
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    assert torch.equal(teacher.generate(ids, **kw), model.generate(ids, **kw))


def test_forced_tower_is_the_only_one_that_runs():
    model = two_tower_model()
    calls = TowerCalls(model)
    ids = torch.randint(1, 61, (3, 5))
    out = model(ids, tower=1)
    assert calls.calls == [0, 1] and out.tower_index.tolist() == [1, 1, 1]
    model(ids, capability="arithmetic")
    assert calls.calls == [1, 1]
    model(ids, tower="prose")
    assert calls.calls == [1, 2]
    with pytest.raises(ValueError, match="unknown capability 'code'.*arithmetic"):
        model(ids, capability="code")


def test_generation_keeps_the_forced_tower_at_every_step():
    model = two_tower_model()
    calls = TowerCalls(model)
    ids = torch.randint(1, 61, (2, 5))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, tower=1)
    assert out.shape == (2, 11)
    assert calls.calls[0] == 0 and calls.calls[1] == 6  # prefill + 5 cached steps, all on tower 1
    # and the tokens equal an uncached run on the same tower
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False, tower=1, use_cache=False))


def test_router_picks_per_sequence_and_mixed_batches_match_single_runs():
    model = two_tower_model()
    router = model.model.router
    a = torch.full((1, 6), 1)
    b = torch.tensor([[2, 2, 3, 2, 3, 2]])
    with torch.no_grad():  # a router that sends prompts of token 1 to tower 1, prompts of tokens 2/3 to tower 0
        emb = model.model.embed_tokens.weight
        basis, _ = torch.linalg.qr(emb[[2, 3]].T)  # (H, 2), spans the embeddings of tokens 2 and 3
        d = emb[1] - basis @ (basis.T @ emb[1])  # orthogonal to them
        d = d / (d @ emb[1])  # d . emb[1] == 1, d . emb[2] == d . emb[3] == 0
        router.proj.weight.copy_(torch.stack([-20 * d, 20 * d]))
        router.proj.bias.copy_(torch.tensor([0.0, -10.0]))
    calls = TowerCalls(model)
    with torch.no_grad():
        both = model(torch.cat([a, b]))
    assert both.tower_index.tolist() == [1, 0] and calls.calls == [1, 1]
    assert both.router_logits.shape == (2, 2)
    with torch.no_grad():
        assert torch.allclose(both.logits[0], model(a, tower=1).logits[0], atol=1e-6)
        assert torch.allclose(both.logits[1], model(b, tower=0).logits[0], atol=1e-6)
    # a mixed batch generates the same tokens as each prompt alone, with and without the cache
    gen = model.generate(torch.cat([a, b]), max_new_tokens=5, do_sample=False)
    assert torch.equal(gen[0:1], model.generate(a, max_new_tokens=5, do_sample=False))
    assert torch.equal(gen[1:2], model.generate(b, max_new_tokens=5, do_sample=False))
