"""`nexus remove-capability` (issue 19): a capability leaves its tower; an emptied tower leaves the student with its
router class; every kept tensor is bit-identical and the renumbered towers compute exactly what they did."""

import json

import pytest
import torch
from conftest import small_bpe_tokenizer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.remove_capability import RemoveCapabilityError, remove_capability
from nexus.conversion.student_hashes import (
    HASHES_FILE,
    StudentFolderError,
    write_student_hashes,
)
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM

LAYER = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 24}


def tower(name, caps, layers, **extra):
    return {"type": "decoder", "name": name, "capabilities": caps, "layers": [LAYER] * layers, **extra}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """Three towers: t0 serves a and b, t1 (own vocabulary, width 16) serves c, t2 serves d; hashes recorded."""
    tok = small_bpe_tokenizer()
    config = NexusConfig(vocab_size=len(tok), hidden_size=32, towers=[
        tower("t0", ["a", "b"], 2), tower("t1", ["c"], 1, hidden_size=16, vocabulary="own",
                                          vocabulary_ids=list(range(0, 200, 2))),
        tower("t2", ["d"], 3)], capability_names=["a", "b", "c", "d"], max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = NexusForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("three-towers") / "student"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_student_hashes(folder)
    return folder


def _load(folder):
    return NexusForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_removing_the_only_capability_of_a_tower_drops_it_and_its_router_class(student, tmp_path):
    record = remove_capability(student, "c", tmp_path / "out")
    assert record["tower"] == {"index": 1, "name": "t1", "dropped": True}
    assert record["towers_after"] == ["t0", "t2"] and record["capability_to_tower"] == {"a": 0, "b": 0, "d": 1}
    before, after = load_file(str(student / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith("model.towers.2.") for k in after)
    for key, value in after.items():  # t2 moved to index 1; everything else kept as it was
        old = key.replace("model.towers.1.", "model.towers.2.")
        if key.startswith("model.router."):
            assert torch.equal(value, before[key][[0, 2]])
        else:
            assert torch.equal(value, before[old]), key
    kept = record["kept_tensors"]
    assert kept and all(v["sha256_before"] == v["sha256_after"] for v in kept.values())
    assert any(k.startswith("model.towers.1.") and v["from"].startswith("model.towers.2.") for k, v in kept.items())
    old, new = _load(student), _load(tmp_path / "out")
    assert new.config.num_hidden_layers == 1 + 2 + 3  # the routing slot, then t0 and t2's layers
    ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(old(ids, tower=2).logits, new(ids, tower=1).logits)
        assert torch.equal(old(ids, tower=0).logits, new(ids, tower=0).logits)
        assert torch.equal(old(ids).router_logits[:, [0, 2]], new(ids).router_logits)
        # cached decoding reads the renumbered cache slots
        a = old.generate(ids, max_new_tokens=5, do_sample=False, capability="d", pad_token_id=0)
        b = new.generate(ids, max_new_tokens=5, do_sample=False, capability="d", pad_token_id=0)
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "out" / HASHES_FILE).read_text())["tensors"]
    assert (student / "model.safetensors").is_file() and _load(student).config.capability_to_tower["c"] == 1


def test_removing_one_of_a_towers_capabilities_keeps_every_tensor(student, tmp_path):
    record = remove_capability(student, "a", tmp_path / "out")
    assert not record["tower"]["dropped"] and record["router"] == "unchanged"
    assert record["capability_to_tower"] == {"b": 0, "c": 1, "d": 2}
    before, after = load_file(str(student / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # removing down to one tower drops the router too
    remove_capability(tmp_path / "out", "c", tmp_path / "two")
    remove_capability(tmp_path / "two", "d", tmp_path / "one")
    one = _load(tmp_path / "one")
    assert one.model.router is None and one.config.capability_to_tower == {"b": 0}
    with pytest.raises(RemoveCapabilityError, match="'b' is the last one"):
        remove_capability(tmp_path / "one", "b", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_an_unknown_capability_lists_the_choices(student, tmp_path):
    with pytest.raises(RemoveCapabilityError, match="no capability 'z'; it serves: a, b, c, d"):
        remove_capability(student, "z", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_modified_or_foreign_student_is_refused(student, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(student, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["model.towers.0.layers.0.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StudentFolderError, match="modified .* model.towers.0.layers.0.mlp.up_proj.weight"):
        remove_capability(copy, "a", tmp_path / "out")
    other = tmp_path / "other"
    shutil.copytree(student, other)
    record = json.loads((other / HASHES_FILE).read_text())
    (other / HASHES_FILE).write_text(json.dumps({**record, "nexus_version": "0.0.1"}))
    with pytest.raises(StudentFolderError, match="written by NEXUS '0.0.1'"):
        remove_capability(other, "a", tmp_path / "out")
    with pytest.raises(StudentFolderError, match="not a NEXUS student"):
        remove_capability(tmp_path, "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_prints_one_line_errors(student, tmp_path):
    ok = CliRunner().invoke(app, ["remove-capability", str(student), "d", "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert "tower dropped" in ok.output and "all bit-identical" in ok.output
    bad = CliRunner().invoke(app, ["remove-capability", str(student), "zz", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "error:" in bad.output and "it serves: a, b, c, d" in bad.output
