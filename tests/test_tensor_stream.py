"""tensor_stream: a safetensors file read one tensor at a time, bit-identical to load_file, with its checks."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from nexus.conversion.load_check import LoadCheckError
from nexus.conversion.safetensors_header import SafetensorsHeaderError
from nexus.conversion.student_hashes import folder_tensor_hashes, tensor_hashes
from nexus.conversion.tensor_stream import stream_safetensors


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(5, 3, generator=g),
        "a.bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, generator=g).half(),
        "d.ids": torch.arange(7, dtype=torch.int64),
        "e.mask": torch.tensor([True, False]),
        "f.empty": torch.zeros(0, 4),
    }


def test_stream_equals_load_file_bit_for_bit(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    streamed = dict(stream_safetensors(path))
    loaded = load_file(str(path))
    assert set(streamed) == set(loaded) == set(tensors)
    for name, tensor in loaded.items():
        assert streamed[name].dtype == tensor.dtype and streamed[name].shape == tensor.shape
        assert torch.equal(streamed[name], tensor)
    assert tensor_hashes(streamed) == tensor_hashes(tensors) == folder_tensor_hashes(tmp_path)


def test_stream_only_the_keys_asked_for(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = dict(stream_safetensors(tmp_path / "model.safetensors", keys={"d.ids", "a.bf16"}))
    assert sorted(got) == ["a.bf16", "d.ids"]
    assert torch.equal(got["d.ids"], tensors["d.ids"])


def test_stream_refuses_nan_naming_the_tensor(tmp_path, tensors):
    tensors["b.weight"][1, 2] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadCheckError, match=r"b\.weight has 1 NaN/Inf"):
        dict(stream_safetensors(tmp_path / "model.safetensors"))


def test_stream_refuses_a_truncated_file(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(SafetensorsHeaderError, match="truncated"):
        next(stream_safetensors(path))
