"""The tensors of a safetensors file one at a time, read with plain file reads (no memory map).

    for name, tensor in stream_safetensors("student/model.safetensors"):
        ...  # only this tensor is resident; it is freed when the loop moves on

``safetensors.torch.load_file`` holds every tensor at once, and ``safe_open`` memory-maps the file: each page it
touches stays in the process's resident set (file-backed) until the map closes, so hashing or comparing a whole
checkpoint through either costs its full size in peak RAM. Here each tensor is read into its own buffer, so the peak
is the largest tensor. The header is checked in full first (`read_safetensors_header`), and a tensor holding a NaN
or an Inf is refused (`load_check.check_finite`), as `load_check.checked_load_file` does.
"""

from pathlib import Path

import torch

from .safetensors_header import read_safetensors_header

TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                "F64": torch.float64, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn}


def stream_safetensors(path, keys=None, what="checkpoint"):
    """Yield ``(name, tensor)`` of the safetensors file at ``path`` in file order (only ``keys`` when given), each
    tensor in its own memory; raises `SafetensorsHeaderError` / `LoadCheckError` naming the file and the tensor."""
    from .load_check import LoadCheckError, check_finite

    path = Path(path)
    header = read_safetensors_header(path)
    wanted = None if keys is None else set(keys)
    with open(path, "rb") as fh:
        data_start = 8 + int.from_bytes(fh.read(8), "little")
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if wanted is not None and name not in wanted:
                continue
            dtype = TORCH_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise LoadCheckError(f"{what} {path}: tensor {name}: dtype {entry['dtype']} is not readable here")
            start, stop = entry["data_offsets"]
            buf = bytearray(stop - start)
            fh.seek(data_start + start)
            if fh.readinto(buf) != len(buf):
                raise LoadCheckError(f"{what} {path}: tensor {name}: the file ended inside its data")
            tensor = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype))
            tensor = tensor.reshape(entry["shape"])
            check_finite({name: tensor}, path, what)
            yield name, tensor
