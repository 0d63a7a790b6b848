"""A tower with its own vocabulary (spec ``vocabulary: own``): its own embedding, final norm and LM head over the
shared vocabulary. Two teachers of different families and widths in one student each keep their exact logits."""

import torch
from conftest import TINY_VOCAB, tiny_teacher

from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM

TOL = 1e-4


def _two_tower_student():
    """Tower 0: a Llama teacher through the shared embedding/head; tower 1: a Gemma-3 teacher with its own."""
    a = nexus_from_teacher(tiny_teacher("llama", seed=1)).eval()
    b = nexus_from_teacher(tiny_teacher("gemma3", seed=2, hidden_size=24)).eval()
    own = dict(b.config.towers[0], name="gemma", capabilities=["g"], vocabulary="own",
               embedding_scale=b.config.embedding_scale, final_logit_softcapping=b.config.final_logit_softcapping)
    assert own["norm"] == b.config.final_norm
    shared = dict(a.config.towers[0], name="llama", capabilities=["l"])
    cfg = a.config.to_dict()
    cfg.update(towers=[shared, own], capability_names=["l", "g"], tie_word_embeddings=False)
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        cfg.pop(key, None)
    student = NexusForCausalLM(NexusConfig(**cfg)).eval()
    state = {k: v for k, v in a.state_dict().items() if not k.startswith("model.towers.")}
    state.update({k.replace("model.towers.0.", "model.towers.0."): v for k, v in a.state_dict().items()
                  if k.startswith("model.towers.0.")})
    bs = b.state_dict()
    state.update({k.replace("model.towers.0.", "model.towers.1."): v for k, v in bs.items()
                  if k.startswith("model.towers.0.")})
    state["model.towers.1.embed_tokens.weight"] = bs["model.embed_tokens.weight"]
    state["model.towers.1.norm.weight"] = bs["model.norm.weight"]
    state["model.towers.1.lm_head.weight"] = bs["lm_head.weight"]
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"model.router.proj.weight", "model.router.proj.bias"}, missing
    return a, b, student


def _ids(batch=2, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_VOCAB, (batch, length), generator=g)


def test_each_tower_keeps_its_teachers_logits():
    a, b, student = _two_tower_student()
    assert student.config.towers[1]["hidden_size"] != student.config.hidden_size  # widths differ: no projections
    assert student.model.towers[1].in_proj is None
    ids = _ids()
    with torch.no_grad():
        assert (student(ids, tower="llama").logits - a(ids).logits).abs().max() <= TOL
        assert (student(ids, tower="gemma").logits - b(ids).logits).abs().max() <= TOL
        assert (student(ids, capability="g").logits - a(ids).logits).abs().max() > 1e-2  # the towers do differ


def test_mixed_batch_routes_rows_to_their_own_heads():
    a, b, student = _two_tower_student()
    student.model.router.forward = lambda embeds, mask=None: torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    ids = _ids()
    with torch.no_grad():
        out = student(ids)
        assert out.tower_index.tolist() == [1, 0]
        assert (out.logits[0] - b(ids[:1]).logits[0]).abs().max() <= TOL
        assert (out.logits[1] - a(ids[1:]).logits[0]).abs().max() <= TOL


def test_cached_generation_with_an_own_vocabulary_tower(tmp_path):
    a, b, student = _two_tower_student()
    student.save_pretrained(tmp_path)
    reloaded = NexusForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(batch=1, length=6, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = b.generate(ids, **kwargs)
    assert reloaded.generate(ids, capability="g", **kwargs).tolist() == want.tolist()
    assert reloaded.generate(ids, capability="g", use_cache=False, **kwargs).tolist() == want.tolist()


def test_inputs_embeds_alone_cannot_feed_an_own_vocabulary_tower():
    _, _, student = _two_tower_student()
    embeds = student.get_input_embeddings()(_ids())
    try:
        student(inputs_embeds=embeds, tower="gemma")
    except ValueError as exc:
        assert "own vocabulary" in str(exc) and "gemma" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_bad_vocabulary_kind_names_the_field():
    cfg = dict(towers=[{"type": "decoder", "vocabulary": "mine", "layers": [
        {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 16}]}])
    try:
        NexusConfig(**cfg)
    except ValueError as exc:
        assert "towers[0].vocabulary" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_an_own_vocabulary_tower_with_rows_for_some_ids_only():
    """``vocabulary_ids``: rows for those shared ids; every other id reads a zero row and shares the last head row's
    logit. On inputs from the ids, the logits on the ids are the full tower's."""
    a, b, student = _two_tower_student()
    ids = list(range(3, 60))
    cfg = student.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "num_hidden_layers"):
        cfg.pop(key, None)
    cfg["towers"][1]["vocabulary_ids"] = ids
    small = NexusForCausalLM(NexusConfig(**cfg)).eval()
    state = dict(student.state_dict())
    zero = torch.zeros(1, state["model.towers.1.embed_tokens.weight"].shape[1])
    state["model.towers.1.embed_tokens.weight"] = torch.cat([state["model.towers.1.embed_tokens.weight"][ids], zero])
    state["model.towers.1.lm_head.weight"] = torch.cat([state["model.towers.1.lm_head.weight"][ids], zero])
    small.load_state_dict(state, strict=False)
    inputs = torch.tensor([ids[:16], ids[10:26]])
    with torch.no_grad():
        want = b(inputs).logits
        got = small(inputs, tower="gemma").logits
    assert (got[..., ids] - want[..., ids]).abs().max() <= TOL
    others = [i for i in range(TINY_VOCAB) if i not in ids]
    assert torch.equal(got[..., others], got[..., others[:1]].expand(-1, -1, len(others)))  # one shared logit
    assert small.model.towers[1].embed_tokens.weight.shape[0] == len(ids) + 1


def test_vocabulary_ids_must_be_below_the_vocabulary():
    cfg = dict(vocab_size=50, towers=[{"type": "decoder", "vocabulary": "own", "vocabulary_ids": [1, 50], "layers": [
        {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 16}]}])
    try:
        NexusConfig(**cfg)
    except ValueError as exc:
        assert "towers[0].vocabulary_ids" in str(exc) and "50" in str(exc)
    else:
        raise AssertionError("expected a ValueError")
