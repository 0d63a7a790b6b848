"""Export (issue 6): self-contained folder, standard-architecture tower, padding, GGUF, push checks, CLI errors.

Every logit comparison prints its max |Δlogit| (run with -s to see the figures).
"""

import json

import pytest
import torch
import typer
from conftest import char_tokenizer, small_bpe_tokenizer, tiny_teacher
from gguf import GGUFReader
from nexus.conversion.structured_prune import PrunePlan, TowerPlan, apply_prune_plan
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.export_command import export
from nexus.hub.export import export_checkpoint
from nexus.hub.fresh_load import fresh_process_logits
from nexus.hub.gguf_export import GGUFExportError, export_gguf
from nexus.hub.push import push_folder, validate_push_folder
from nexus.hub.standard_export import (
    StandardExportError,
    export_standard,
    standard_model,
)
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM
from nexus.push_command import push
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)
from typer.testing import CliRunner

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def _save(model, folder, tokenizer=None):
    model.save_pretrained(folder)
    (tokenizer or char_tokenizer()).save_pretrained(folder)
    return folder


def _diff(a, b, label):
    d = (a.float() - b.float()).abs().max().item()
    print(f"EXPORT_FIGURE {label}: max |dlogit| = {d:.3g}")
    return d


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _perturbed(model, seed=0):
    """Random weights large enough that a wrong mapping shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


# --------------------------------------------------------------------------------------------- self-contained


def test_self_contained_export_loads_in_a_fresh_process(tmp_path):
    model = nexus_from_teacher(tiny_teacher("gemma3"))
    src = _save(model, tmp_path / "src")
    out = tmp_path / "out"
    info = export_checkpoint(src, out, card_info={"name": "tiny-gemma", "teachers": "gemma3 (random)"}, verify=True)
    files = set(info["files"])
    assert {"model.safetensors", "config.json", "modeling_nexus.py", "configuration_nexus.py", "registry.py",
            "tokenizer.json", "model_card.md", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_nexus.NexusForCausalLM"
    card = (out / "model_card.md").read_text()
    assert "# tiny-gemma" in card and "gemma3 (random)" in card and card == (out / "README.md").read_text()
    assert info["loaded_as"].startswith("transformers_modules")  # the copied files, not the project
    assert _diff(torch.zeros(1), torch.tensor([info["max_abs_logit_diff"]]), "self-contained gemma3, fresh process") <= 1e-5
    assert not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())

    # a card in the source (or given explicitly) travels verbatim
    (src / "model_card.md").write_text("# from the report\nretention 0.97\n")
    export_checkpoint(src, tmp_path / "out2")
    assert (tmp_path / "out2" / "README.md").read_text() == "# from the report\nretention 0.97\n"
    given = tmp_path / "card.md"
    given.write_text("# given card\n")
    export_checkpoint(src, tmp_path / "out3", card=given)
    assert (tmp_path / "out3" / "model_card.md").read_text() == "# given card\n"


def test_self_contained_export_refuses_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    teacher = _save(tiny_teacher("llama"), tmp_path / "teacher")
    with pytest.raises(ValueError, match="model_type is 'llama', not 'nexus'"):
        export_checkpoint(teacher, tmp_path / "out")
    src = tmp_path / "no-tok"
    nexus_from_teacher(tiny_teacher("llama")).save_pretrained(src)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        export_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- standard export


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("gemma3", "gemma3_text"), ("qwen2", "qwen2"),
                                         ("qwen3", "qwen3")])
def test_standard_export_loads_without_remote_code_and_matches_the_tower(family, arch, tmp_path):
    model = nexus_from_teacher(tiny_teacher(family))
    src = _save(model, tmp_path / "src")
    info = export_standard(src, tmp_path / "std")
    config = json.loads((tmp_path / "std" / "config.json").read_text())
    assert config["model_type"] == arch and "auto_map" not in config and info["notes"] == []
    assert (tmp_path / "std" / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "std").eval()  # plain: no trust_remote_code
    assert type(hf).__module__.startswith(f"transformers.models.{arch.removesuffix('_text')}")
    assert _diff(_logits(hf), _logits(model, tower=0), f"standard {arch} vs tower 0") <= 1e-5


def _two_tower_model():
    layer = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48}
    towers = [{"type": "decoder", "name": "a", "capabilities": ["a"], "layers": [layer] * 2},
              {"type": "decoder", "name": "b", "capabilities": ["b"], "attention_bias": True,
               "attention_out_bias": True, "mlp_bias": True, "rms_norm_eps": 1e-5,
               "layers": [dict(layer, num_key_value_heads=1, intermediate_size=40, rope_theta=500.0)] * 3}]
    config = NexusConfig(vocab_size=97, hidden_size=32, towers=towers, final_norm_eps=1e-5, tie_word_embeddings=False)
    return _perturbed(NexusForCausalLM(config))


def test_standard_export_of_the_second_tower(tmp_path):
    model = _two_tower_model()
    hf, notes = standard_model(model, tower="b")
    assert hf.config.model_type == "llama" and hf.config.attention_bias and hf.config.mlp_bias
    assert hf.config.num_hidden_layers == 3 and notes == []
    assert _diff(_logits(hf), _logits(model, tower=1), "standard llama vs tower 1 of 2 (biases)") <= 1e-5
    with pytest.raises(StandardExportError, match="final_norm_eps"):  # tower a has eps 1e-6, the final norm 1e-5
        standard_model(model, tower=0)


def _pruned(family):
    """Irregular widths: kv groups of different sizes, a layer with no attention, one with no MLP."""
    model = nexus_from_teacher(tiny_teacher(family))
    plan = PrunePlan(towers={0: TowerPlan(heads={0: [0, 1], 1: [], 2: [0, 2]}, neurons={1: list(range(20)), 2: []})})
    pruned, notes = apply_prune_plan(model, plan)
    assert any("every head pruned" in n for n in notes) and any("every FFN unit pruned" in n for n in notes)
    return pruned


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pad_to_uniform_keeps_the_logits_of_a_pruned_tower(family, tmp_path):
    pruned = _pruned(family)
    with pytest.raises(StandardExportError, match=r"towers\[0\]\.layers\[1\]\.num_attention_heads = 0"):
        standard_model(pruned)
    src = _save(pruned, tmp_path / "src")
    info = export_standard(src, tmp_path / "std", pad_to_uniform=True)
    assert info["padded"] and any("layers[1]: FFN 20 padded to 48" in n for n in info["notes"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "std").eval()
    # layer 0 keeps one kv group of 2 query heads, layer 2 two groups of 1: the common layout duplicates a kv head
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads, hf.config.intermediate_size) == (2, 2, 48)
    assert _diff(_logits(hf), _logits(pruned, tower=0), f"padded {family} (pruned) vs tower") <= 1e-5
    if family == "gemma3":  # and in a fresh process without the project, no remote code
        logits, module = fresh_process_logits(tmp_path / "std", IDS, trust_remote_code=False)
        assert module.startswith("transformers.models.gemma3")
        assert _diff(logits, _logits(pruned, tower=0), "padded gemma3, fresh process") <= 1e-5


def test_irregular_widths_without_padding_name_the_layer_and_field():
    model = nexus_from_teacher(tiny_teacher("llama"))
    ffn_only, _ = apply_prune_plan(model, PrunePlan(towers={0: TowerPlan(neurons={2: list(range(30))})}))
    with pytest.raises(StandardExportError, match=r"towers\[0\]\.layers\[2\]\.intermediate_size = 30 differs"):
        standard_model(ffn_only)
    heads, _ = apply_prune_plan(model, PrunePlan(towers={0: TowerPlan(heads={1: [0, 1]})}))
    with pytest.raises(StandardExportError, match=r"layers\[1\]\.num_attention_heads = 2 differs"):
        standard_model(heads)
    hf, notes = standard_model(heads, pad_to_uniform=True)
    assert notes == ["layers[1]: attention 2q/1kv padded to 4q/2kv"]
    assert _diff(_logits(hf), _logits(heads, tower=0), "padded llama (heads pruned in one layer)") <= 1e-5


def test_features_a_standard_architecture_cannot_express_are_named():
    layer = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 16}
    odd_norm = NexusForCausalLM(NexusConfig(vocab_size=97, hidden_size=32, final_norm="gemma_rms", towers=[
        {"type": "decoder", "norm": "gemma_rms", "layers": [layer]}]))
    with pytest.raises(StandardExportError, match=r"towers\[0\]: norm 'gemma_rms' without sandwich_norms"):
        standard_model(odd_norm)
    narrow = NexusForCausalLM(NexusConfig(vocab_size=97, hidden_size=32, towers=[
        {"type": "decoder", "hidden_size": 16, "layers": [layer]}]))
    with pytest.raises(StandardExportError, match=r"towers\[0\]\.hidden_size = 16"):
        standard_model(narrow)
    windowed = NexusForCausalLM(NexusConfig(vocab_size=97, hidden_size=32, towers=[
        {"type": "decoder", "layers": [dict(layer, sliding_window=4)]}]))
    with pytest.raises(StandardExportError, match=r"layers\[0\]\.sliding_window = 4 cannot be expressed by llama"):
        standard_model(windowed)
    with pytest.raises(StandardExportError, match="out of range"):
        standard_model(windowed, tower=3)


# ----------------------------------------------------------------------------------------------------- GGUF


def _gguf_case(family, tmp_path):
    """A Nexus checkpoint whose standard export llama.cpp can express: Llama + byte-level BPE, or a Gemma-3 with
    llama.cpp's fixed 5:1 layer pattern and head_dim 256 (= query_pre_attn_scalar, as both readers assume)."""
    if family == "llama":
        tok = small_bpe_tokenizer()
        teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=False))
    else:
        tok = char_tokenizer()
        teacher = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
                                                     head_dim=256, query_pre_attn_scalar=256, sliding_window=4))
    model = nexus_from_teacher(_perturbed(teacher, seed=1))
    return model, _save(model, tmp_path / f"{family}-src", tok), tok


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gguf_round_trip_through_gguf_reader_and_transformers(family, tmp_path):
    model, src, tok = _gguf_case(family, tmp_path)
    std = tmp_path / "std"
    info = export_standard(src, std, gguf="f32")
    gguf_path = std / "model-f32.gguf"
    assert info["gguf"]["path"] == str(gguf_path) and info["gguf"]["transformers_reader_gaps"] == {}

    reader = GGUFReader(gguf_path)
    arch = "llama" if family == "llama" else "gemma3"
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    tensors = {t.name: t for t in reader.tensors}
    embed = model.model.embed_tokens.weight.detach().numpy()
    assert (tensors["token_embd.weight"].data.reshape(embed.shape) == embed).all()
    if family == "gemma3":  # llama.cpp stores Gemma norms as 1 + w
        norm = model.model.norm.weight.detach().numpy()
        assert abs(tensors["output_norm.weight"].data - (norm + 1)).max() < 1e-6
        assert "output.weight" not in tensors  # tied embeddings
    else:
        assert "output.weight" in tensors and info["gguf"]["tokenizer"] == "gpt2"

    standard = AutoModelForCausalLM.from_pretrained(std).eval()
    loaded = AutoModelForCausalLM.from_pretrained(std, gguf_file="model-f32.gguf", dtype=torch.float32).eval()
    ids = IDS % model.config.vocab_size
    assert _diff(_logits(loaded, ids), _logits(standard, ids), f"GGUF f32 {arch} via transformers vs standard") <= 1e-5
    assert _diff(_logits(loaded, ids), _logits(model, ids, tower=0), f"GGUF f32 {arch} vs Nexus tower") <= 1e-5
    if family == "llama":  # the byte-level BPE tokenizer survives the trip
        text = "def area(r):\n    return 3.14 * r * r  # the prose"
        gguf_tok = AutoTokenizer.from_pretrained(std, gguf_file="model-f32.gguf")
        assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"]

    q8 = export_gguf(std, tmp_path / "model-q8_0.gguf", dtype="q8_0")
    assert (tmp_path / "model-q8_0.gguf").stat().st_size < gguf_path.stat().st_size and q8["dtype"] == "q8_0"
    loaded_q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model-q8_0.gguf", dtype=torch.float32)
    d = _diff(_logits(loaded_q8.eval(), ids), _logits(standard, ids), f"GGUF q8_0 {arch} via transformers vs standard")
    assert 0 < d < _logits(standard, ids).abs().max().item()  # quantised: close, not identical


def test_gguf_refuses_what_llama_cpp_hard_codes(tmp_path):
    model = nexus_from_teacher(tiny_teacher("gemma3"))  # sliding/full/sliding: not llama.cpp's 5:1 pattern
    std = tmp_path / "std"
    export_standard(model, std)
    with pytest.raises(GGUFExportError, match="layer_types"):
        export_gguf(std, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="layer_types"):  # inside a standard export: nothing left behind
        export_standard(model, tmp_path / "std2", gguf="f32")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "std2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["std"]


# ----------------------------------------------------------------------------------------------------- push


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_file(self, **kw):
        self.calls.append(("upload_file", kw["path_in_repo"], kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["folder_path"], kw))
        return f"https://huggingface.co/{kw['repo_id']}/commit/fake"


def test_push_validates_then_uploads_through_the_api(tmp_path):
    src = _save(nexus_from_teacher(tiny_teacher("llama")), tmp_path / "src")
    out = tmp_path / "out"
    export_checkpoint(src, out)
    hub = FakeHub()
    assert push_folder(out, "me/nexus-tiny", api=hub) == "https://huggingface.co/me/nexus-tiny/commit/fake"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[1][2]["repo_id"] == "me/nexus-tiny" and hub.calls[1][1] == str(out)

    def refused(folder, needle, repo="me/x"):
        hub = FakeHub()
        with pytest.raises((ValueError, FileNotFoundError), match=needle):
            push_folder(folder, repo, api=hub)
        assert hub.calls == []  # nothing reached the network

    refused(out, "repo_id must look like", repo="no-slash")
    refused(tmp_path / "missing", "does not exist")
    (out / "extra.bin").write_bytes(b"\x80\x04pickle")
    refused(out, r"pickle file\(s\) extra.bin")
    (out / "extra.bin").unlink()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "auto_map"}))
    refused(out, "no auto_map")
    (out / "config.json").write_text(json.dumps(config))
    (out / "README.md").unlink()
    assert validate_push_folder(out)["model_type"] == "nexus"  # model_card.md alone is enough ...
    hub = FakeHub()
    push_folder(out, "me/x", api=hub)
    assert ("upload_file", "README.md") == hub.calls[1][:2]  # ... and is uploaded as the Hub's README.md
    (out / "model_card.md").unlink()
    refused(out, "no model card")
    (out / "model.safetensors").unlink()
    refused(out, "no \\*.safetensors")


# ------------------------------------------------------------------------------------------------------ CLI


def _cli():
    app = typer.Typer()
    app.command("export")(export)
    app.command("push")(push)
    return app


def _clean_failure(result, out, *needles):
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1, result.output  # (transformers' loading bar may precede it)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in " ".join(result.output.split()), result.output
    assert not any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir())


def test_cli_export_and_its_bad_inputs(tmp_path):
    runner, app = CliRunner(), _cli()
    out = tmp_path / "out"
    _clean_failure(runner.invoke(app, ["export", str(tmp_path / "nope"), str(out)]), out, "does not exist")
    assert not out.exists()

    src = _save(_pruned("llama"), tmp_path / "src")
    _clean_failure(runner.invoke(app, ["export", str(src), str(out), "--standard"]), out,
                   "towers[0].layers[1].num_attention_heads = 0", "--pad-to-uniform")
    assert not out.exists()
    _clean_failure(runner.invoke(app, ["export", str(src), str(out), "--gguf"]), out, "add --standard")

    ok = runner.invoke(app, ["export", str(src), str(out), "--standard", "--pad-to-uniform", "--gguf"])
    assert ok.exit_code == 0, ok.output
    assert "llama" in ok.output and (out / "model-f32.gguf").is_file() and (out / "model.safetensors").is_file()
    before = sorted(p.name for p in out.iterdir())
    _clean_failure(runner.invoke(app, ["export", str(src), str(out)]), out, "already exists")
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    again = runner.invoke(app, ["export", str(src), str(out), "--overwrite"])
    assert again.exit_code == 0 and (out / "modeling_nexus.py").is_file() and not (out / "model-f32.gguf").exists()

    _clean_failure(runner.invoke(app, ["push", str(tmp_path / "nope"), "me/x"]), tmp_path / "nope", "does not exist")
