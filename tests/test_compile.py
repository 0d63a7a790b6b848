"""torch.compile of the default forward: with a forced tower (``tower=`` / ``capability=``) or a single tower it has no
graph break, in the prompt pass and in a cached decoding step, and it computes what eager computes.

The student is the two-tower one of ``test_quantise.py`` (a shared-vocabulary tower and an own-vocabulary tower,
irregular widths). Dynamo's graph capture is what is tested, so the compiled functions use the ``eager`` backend.
"""

import pytest
import torch
from test_quantise import PROMPTS, two_tower_student
from transformers.cache_utils import DynamicCache

from nexus.modeling_nexus import NexusConfig, NexusForCausalLM


@pytest.fixture(scope="module")
def student():
    return two_tower_student()


@pytest.mark.parametrize("pick", [{"tower": 0}, {"tower": "arith"}, {"capability": "prose"}],
                         ids=["tower0", "own_vocab_tower", "capability"])
def test_forced_tower_forward_has_no_graph_break(student, pick):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(student)(PROMPTS, **pick)  # default path: use_cache from the config (a cache)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_router_forward_still_names_its_graph_break(student):
    """The router's pick decides from tensor data which towers run: that stays a break (and is why forcing helps)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(student)(PROMPTS)
    assert explained.graph_break_count >= 1
    assert any("unique" in str(r.reason) for r in explained.break_reasons)


def test_single_tower_model_has_no_graph_break():
    torch.manual_seed(0)
    model = NexusForCausalLM(NexusConfig(vocab_size=128, hidden_size=64, towers=[{"type": "decoder", "layers": [
        {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96}] * 2}])).eval()
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(PROMPTS).graph_break_count == 0


@pytest.mark.parametrize("tower", [0, 1])
def test_fullgraph_compile_matches_eager_for_prompt_and_decoding_step(student, tower):
    torch._dynamo.reset()
    compiled = torch.compile(student, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        eager_cache, compiled_cache = DynamicCache(config=student.config), DynamicCache(config=student.config)
        eager = student(PROMPTS, tower=tower, past_key_values=eager_cache)
        out = compiled(PROMPTS, tower=tower, past_key_values=compiled_cache)  # fullgraph: raises on a break
        assert torch.equal(out.tower_index, torch.full((len(PROMPTS),), tower))
        assert torch.allclose(out.logits, eager.logits, atol=1e-5)
        step = eager.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1): one cached decoding step
        eager_next = student(step, tower=tower, past_key_values=eager_cache)
        out_next = compiled(step, tower=tower, past_key_values=compiled_cache)
    assert torch.allclose(out_next.logits, eager_next.logits, atol=1e-5)


def test_forcing_another_tower_than_the_cache_holds_is_refused(student):
    with torch.no_grad():
        cache = DynamicCache(config=student.config)
        out = student(PROMPTS[:2], tower=0, past_key_values=cache)
        with pytest.raises(ValueError, match=r"this cache was filled by tower\(s\) \[0\], not the forced tower 1"):
            student(out.logits[:, -1].argmax(-1, keepdim=True), tower=1, past_key_values=cache)
