"""`nexus import` end to end, and its bad inputs: each gives one clear error and leaves no output folder."""

import shutil

import torch
from conftest import char_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from nexus.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["import", *map(str, args)])


def _assert_clean_failure(result, out, *needles):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir())


def test_import_writes_a_loadable_checkpoint(llama_dir, tmp_path):
    out = tmp_path / "out"
    result = _run(llama_dir, out)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.model_type == "nexus" and model.config.nexus_source["architecture"] == "llama"
    assert {"model.safetensors", "config.json", "modeling_nexus.py"} <= {p.name for p in out.iterdir()}
    assert model.config.auto_map["AutoModelForCausalLM"] == "modeling_nexus.NexusForCausalLM"


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97)).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    _assert_clean_failure(_run(src, out), out, "unsupported teacher architecture 'gpt2'",
                          "gemma3_text, llama, qwen2, qwen3")


def _pickle_only(llama_dir, tmp_path):
    src = tmp_path / "pickled"
    shutil.copytree(llama_dir, src)
    state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(llama_dir).state_dict().items()}
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    return src


def test_pickle_only_folder_is_refused_unless_allowed(llama_dir, tmp_path):
    src, out = _pickle_only(llama_dir, tmp_path), tmp_path / "out"
    _assert_clean_failure(_run(src, out), out, "pytorch_model.bin", "pickle", "--allow-pickle")
    allowed = _run(src, out, "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output
    assert (out / "model.safetensors").is_file()  # what NEXUS writes is always safetensors


def test_missing_tokenizer_is_a_clear_error(llama_dir, tmp_path):
    src = tmp_path / "no-tok"
    shutil.copytree(llama_dir, src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    _assert_clean_failure(_run(src, out), out, "no tokenizer in", str(src.name))


def test_missing_source_and_existing_output(llama_dir, tmp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_run(tmp_path / "nope", out), out, "does not exist")
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = _run(llama_dir, out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out / "keep.txt").read_text() == "user data"


def test_failure_midway_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    """A crash while writing (here: the tokenizer save) removes the temporary folder."""
    import nexus.conversion.teacher_import as ti

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ti.NexusForCausalLM, "save_pretrained", boom)
    out = tmp_path / "out"
    _assert_clean_failure(_run(llama_dir, out), out, "No space left on device")


def test_a_cached_teacher_gets_a_bf16_sibling_that_loads_without_an_fp32_copy(llama_dir, tmp_path):
    """The GGUF cache is fp32; a bf16 teacher loads from a bf16 sibling made once, tensor by tensor."""
    from safetensors import safe_open

    from nexus.conversion.teacher_source import cast_cache_folder

    cached = tmp_path / "teacher-abc"
    shutil.copytree(llama_dir, cached)
    sibling = cast_cache_folder(cached, torch.bfloat16)
    assert sibling.name == "teacher-abc-bfloat16" and (sibling / "tokenizer.json").is_file()
    with safe_open(str(cached / "model.safetensors"), "pt") as fp32, safe_open(str(sibling / "model.safetensors"), "pt") as bf16:
        assert set(fp32.keys()) == set(bf16.keys())
        for key in fp32.keys():
            assert bf16.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(bf16.get_tensor(key), fp32.get_tensor(key).to(torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(sibling)
    assert model.dtype == torch.bfloat16
    (sibling / "model.safetensors").unlink()  # made once: an existing sibling is reused, not rebuilt
    assert cast_cache_folder(cached, torch.bfloat16) == sibling and not (sibling / "model.safetensors").exists()
