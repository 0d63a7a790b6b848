"""Issue 18 item 5: standard export of ANY single tower, whatever the other towers' families: a shared-vocabulary
tower whose family's final norm or embedding scale differs from the shared one, and an own-vocabulary tower (its own
embedding, final norm and head, mapped back to the shared vocabulary). The exported checkpoint loads without remote
code and gives the Nexus logits with that tower forced."""

import json

import pytest
import torch
from conftest import TINY_VOCAB, char_tokenizer, tiny_teacher
from test_own_vocabulary_tower import _two_tower_student
from transformers import AutoModelForCausalLM

from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.hub.standard_export import (
    StandardExportError,
    export_standard,
    standard_model,
)
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM

TOL = 1e-4


def _ids(length=16, seed=0):
    return torch.randint(0, TINY_VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(model, hf, tower, ids):
    with torch.no_grad():
        return float((model(ids, tower=tower).logits - hf(ids).logits).abs().max())


def _mixed(base):
    """Two shared-vocabulary towers, a Llama one and a Gemma-3 one, over one shared embedding / final norm / head
    taken from ``base``'s family (final norm kind and embedding scale); random weights."""
    llama = nexus_from_teacher(tiny_teacher("llama", seed=1)).config
    gemma = nexus_from_teacher(tiny_teacher("gemma3", seed=2)).config
    towers = [dict(llama.towers[0], name="llama", capabilities=["l"]),
              dict(gemma.towers[0], name="gemma", capabilities=["g"])]
    eps = towers[0]["rms_norm_eps"]
    for t in towers:
        assert t["rms_norm_eps"] == eps  # one eps: an eps cannot be folded
    ref = llama if base == "llama" else gemma
    config = NexusConfig(vocab_size=TINY_VOCAB, hidden_size=llama.hidden_size, towers=towers,
                         capability_names=["l", "g"], final_norm=ref.final_norm, final_norm_eps=eps,
                         embedding_scale=ref.embedding_scale, tie_word_embeddings=False,
                         max_position_embeddings=llama.max_position_embeddings)
    model = NexusForCausalLM(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("base", ["llama", "gemma3"])
def test_either_tower_of_a_mixed_family_student_exports(base, tmp_path):
    model = _mixed(base)
    for name, arch in (("llama", "llama"), ("gemma", "gemma3_text")):
        hf, notes = standard_model(model, tower=name)
        assert hf.config.model_type == arch
        crossed = (base == "llama") != (arch == "llama")  # the shared final norm is of the other family
        assert any("final norm" in n for n in notes) == crossed, notes
        assert _max_diff(model, hf, name, _ids()) <= TOL
    model.save_pretrained(tmp_path / "src")
    char_tokenizer().save_pretrained(tmp_path / "src")
    other = "gemma" if base == "llama" else "llama"
    info = export_standard(tmp_path / "src", tmp_path / "std", tower=other)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "std").eval()  # no remote code
    assert _max_diff(model, hf, other, _ids(seed=1)) <= TOL and info["max_logit_diff"] <= TOL
    assert json.loads((tmp_path / "std" / "nexus_export.json").read_text())["notes"] == info["notes"]


def test_tied_head_with_a_foreign_embedding_scale_is_refused():
    model = _mixed("gemma3")
    model.config.tie_word_embeddings = True  # the scale cannot be folded into rows the head shares
    with pytest.raises(StandardExportError, match=r"config\.embedding_scale = 5\.65.* cannot be expressed by llama"):
        standard_model(model, tower="llama")


@pytest.mark.parametrize("some_ids", [False, True])
def test_an_own_vocabulary_tower_exports_over_the_shared_vocabulary(some_ids, tmp_path):
    _, _, student = _two_tower_student()  # tower 1: a Gemma-3 (hidden 24) with its own embedding/norm/head
    if some_ids:  # rows for ids 3..59 only; every other id reads the last row and gets its head's last logit
        ids = list(range(3, 60))
        cfg = student.config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map", "num_hidden_layers"):
            cfg.pop(key, None)
        cfg["towers"][1]["vocabulary_ids"] = ids
        small = NexusForCausalLM(NexusConfig(**cfg)).eval()
        state = dict(student.state_dict())
        for key in ("model.towers.1.embed_tokens.weight", "model.towers.1.lm_head.weight"):
            w = state[key]
            last = torch.zeros(1, w.shape[1]) if "embed" in key else torch.randn(1, w.shape[1])
            state[key] = torch.cat([w[ids], last])
        small.load_state_dict(state, strict=False)
        student = small
    hf, notes = standard_model(student, tower="gemma")
    assert hf.config.model_type == "gemma3_text" and hf.config.hidden_size == 24
    assert hf.config.vocab_size == TINY_VOCAB and not hf.config.tie_word_embeddings
    assert any("own vocabulary" in n for n in notes) == some_ids
    assert _max_diff(student, hf, "gemma", _ids()) <= TOL  # ids inside and outside vocabulary_ids
    if some_ids:
        outside = [i for i in range(TINY_VOCAB) if i not in range(3, 60)]
        head = hf.lm_head.weight
        assert torch.equal(head[outside], head[outside[:1]].expand(len(outside), -1))  # one shared last row
        assert hf.model.embed_tokens.weight[outside].abs().max() == 0  # zero embedding rows
    hf_llama, _ = standard_model(student, tower="llama")  # the shared tower of the same student
    assert _max_diff(student, hf_llama, "llama", _ids()) <= TOL
