"""The KV cache under either name transformers uses: ``cache=`` (what ``generate`` passes from 5.2x on) and
``past_key_values=`` (earlier 5.x, and callers such as lm-eval); the same tokens either way, with the cache and without,
through ``generate`` and ``pipeline``, and no deprecation warning from Nexus itself."""

import logging
import warnings

import pytest
import torch
from conftest import char_tokenizer, tiny_teacher
from transformers import DynamicCache, pipeline
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from nexus.conversion.teacher_import import nexus_from_teacher

# the installed transformers' name for the cache field of model outputs
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@pytest.fixture(scope="module")
def model():
    return nexus_from_teacher(tiny_teacher("gemma3"))  # sliding layers: the window mask is exercised while decoding


def _decode_step_by_step(model, ids, steps, name):
    """Greedy decoding by hand, the cache passed back under ``name``; returns the generated tokens."""
    cache, out_ids = DynamicCache(config=model.config), ids
    with torch.no_grad():
        logits = getattr(model(ids, use_cache=True, **{name: cache}), "logits")
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out_ids = torch.cat([out_ids, nxt], dim=1)
            out = model(nxt, use_cache=True, **{name: cache})
            assert getattr(out, CACHE_FIELD) is cache  # the same cache object comes back, one token longer
            logits = out.logits
    assert cache.get_seq_length() == out_ids.shape[1]  # every token, the last one included, went through the cache
    return out_ids


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_either_cache_name_decodes_like_a_full_forward(model, name):
    ids = torch.randint(4, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    stepped = _decode_step_by_step(model, ids, 8, name)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(stepped, uncached)


def test_both_cache_names_at_once_is_an_error(model):
    ids = torch.randint(4, 97, (1, 3))
    with pytest.raises(ValueError, match="cache= or past_key_values="):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_generate_warns_nothing_about_cache_names(model, caplog):
    ids = torch.randint(4, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    hf_logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
            getattr(out, CACHE_FIELD)
    finally:
        hf_logging.disable_propagation()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if "past_key_values" in s or "deprecated" in s.lower()], said


def test_text_generation_pipeline_cached_equals_uncached(tmp_path):
    tokenizer = char_tokenizer()
    model = nexus_from_teacher(tiny_teacher("llama"))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "def add(a, b):"
    kw = dict(max_new_tokens=12, do_sample=False, return_full_text=False)
    cached = pipe(prompt, use_cache=True, **kw)[0]["generated_text"]
    uncached = pipe(prompt, use_cache=False, **kw)[0]["generated_text"]
    assert len(cached) > 0 and cached == uncached
