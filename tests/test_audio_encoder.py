"""The audio encoder inside NexusForCausalLM: a registered encoder type, a prefix before the text, and text-only use
unchanged."""

import pytest
import torch

from nexus.modeling_nexus import NexusConfig, NexusForCausalLM, registered

ENCODER = {"type": "whisper_audio", "name": "speech", "num_mel_bins": 80, "d_model": 32, "downsample": 2,
           "max_source_positions": 64, "transcribe_prompt_ids": [1, 2],
           "layers": [{"num_attention_heads": 2, "head_dim": 16, "intermediate_size": 48},
                      {"num_attention_heads": 0, "head_dim": 16, "intermediate_size": 24}]}
TOWER = {"type": "decoder", "layers": [
    {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64},
    {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "intermediate_size": 0, "attends": "text"},
    {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "intermediate_size": 64,
     "attends": "prefix", "rope_scaling": {"rope_type": "linear", "factor": 1e9}},
]}


def tiny(encoders=(), seed=0):
    torch.manual_seed(seed)
    config = NexusConfig(vocab_size=97, hidden_size=64, towers=[TOWER], encoders=list(encoders), eos_token_id=2)
    return NexusForCausalLM(config).eval()


def test_encoder_type_is_registered():
    assert "whisper_audio" in registered("encoder")


def test_text_only_logits_unchanged_by_an_encoder():
    plain, with_audio = tiny(), tiny([ENCODER])
    missing, unexpected = with_audio.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("model.encoders.0.") for k in missing)
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding too
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            assert torch.equal(plain(ids, **kwargs).logits, with_audio(ids, **kwargs).logits)
        a = plain.generate(ids[1:], max_new_tokens=5, do_sample=False)
        b = with_audio.generate(ids[1:], max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_prefix_forward_and_cached_decoding_agree():
    model = tiny([ENCODER])
    feats = torch.randn(1, 80, 24)  # 12 encoder positions -> 6 prefix embeddings
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        full = model(ids, input_features=feats).logits  # (1, 6 + 5, V)
        assert full.shape == (1, 6 + 5, 97)
        out = model(ids[:, :3], input_features=feats, use_cache=True)
        step = model(ids[:, 3:4], past_key_values=out.past_key_values if "past_key_values" in out else out.cache,
                     use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, 6 + 3], rtol=1e-5, atol=1e-5)


def test_prefix_scopes():
    """A "text" layer never reads the prefix; a "prefix" layer's text queries read only the prefix."""
    model = tiny([ENCODER])
    ids = torch.randint(0, 97, (1, 4))
    f1, f2 = torch.randn(1, 80, 8), torch.randn(1, 80, 8)
    captured = {}
    layers = model.model.towers[0].layers
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o.detach()))
    with torch.no_grad():
        model(ids, input_features=f1)
        first = dict(captured)
        model(ids, input_features=f2)
    assert not torch.allclose(first[2][:, -4:], captured[2][:, -4:])  # the prefix layer reads the audio
    # make layer 1 ("text") see the same input in both runs: it must then give the same text outputs
    x = torch.randn(1, 2 + 4, 64)
    from nexus.modeling_nexus.modeling_nexus import ForwardContext
    ctx = ForwardContext(None, torch.arange(6)[None], 0, 6, 1, "cpu")
    ctx.prefix_length = 2
    y1 = layers[1].self_attn(x, ctx)
    x2 = x.clone()
    x2[:, :2] = torch.randn(1, 2, 64)  # other prefix
    ctx2 = ForwardContext(None, torch.arange(6)[None], 0, 6, 1, "cpu")
    ctx2.prefix_length = 2
    assert torch.allclose(layers[1].self_attn(x2, ctx2)[:, 2:], y1[:, 2:], atol=1e-6)
    x3 = x.clone()
    x3[:, 3] = torch.randn(64)  # another text token: a "prefix" layer's later text queries must not care
    ctx3 = ForwardContext(None, torch.arange(6)[None], 0, 6, 1, "cpu")
    ctx3.prefix_length = 2
    assert torch.allclose(layers[2].self_attn(x3, ctx3)[:, 4:], layers[2].self_attn(x, ctx)[:, 4:], atol=1e-6)


def test_labels_skip_the_prefix():
    model = tiny([ENCODER])
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids, input_features=torch.randn(2, 80, 16), labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.encoders[0].conv1.weight.grad is not None  # the encoder trains through the towers


@pytest.mark.parametrize("bad, match", [
    ({"d_modle": 8}, r"encoders\[0\]: unknown field"),
    ({"projector": "conv"}, r"encoders\[0\].projector"),
    ({"layers": [{"num_attention_heads": 2}]}, r"encoders\[0\].layers\[0\]"),
    ({"type": "nope"}, r"encoders\[0\].type: unknown encoder type 'nope'"),
])
def test_bad_encoder_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny([{**ENCODER, **bad}])


def test_bad_attends_names_the_layer():
    tower = {"type": "decoder", "layers": [{"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
                                            "intermediate_size": 8, "attends": "audio"}]}
    with pytest.raises(ValueError, match=r"towers\[0\].layers\[0\].attends"):
        NexusConfig(towers=[tower])


def test_text_model_refuses_features_clearly():
    with pytest.raises(ValueError, match="no encoders"):
        tiny()(torch.randint(0, 97, (1, 4)), input_features=torch.randn(1, 80, 8))


def test_pruning_keeps_exact_outputs_and_counts_params():
    from nexus.conversion.speech_prune import allocate_units, audio_encoder_parameter_count, prune_audio_encoder

    model = tiny([ENCODER])
    enc = model.model.encoders[0]
    everything = {"heads": [list(range(2)), []], "neurons": [list(range(48)), list(range(24))]}
    same = prune_audio_encoder(model, everything)
    feats = torch.randn(1, 80, 16)
    with torch.no_grad():
        assert torch.equal(same.model.encoders[0](feats)[0], enc(feats)[0])
    total = sum(p.numel() for p in enc.parameters())
    assert total == audio_encoder_parameter_count(model.config.encoders[0], 64)
    scores = {"heads": [torch.tensor([0.1, 5.0]), None], "neurons": [torch.rand(48), torch.rand(24)]}
    budget = total - 3000
    keep = allocate_units(enc, scores, budget, hidden_size=64)
    assert keep["heads"][0] == [1]  # the better head survives
    small = prune_audio_encoder(model, keep)
    n = sum(p.numel() for p in small.model.encoders[0].parameters())
    assert n <= budget and n == audio_encoder_parameter_count(small.config.encoders[0], 64)
    with torch.no_grad():
        assert torch.isfinite(small(torch.randint(0, 97, (1, 3)), input_features=feats).logits).all()
