"""A safetensors file's header, read and checked in full before any tensor of it is loaded.

The safetensors library refuses a lying header with ``SafetensorError: ... invalid shape, data type, or offset``,
naming neither the file nor the tensor, and a size-only check misses a header whose entries lie but whose total
still matches. `read_safetensors_header` reads only the header (never the data) and raises a
`SafetensorsHeaderError` (a ValueError: the CLI prints it as one line, exit 2) naming the file and the tensor::

    model.safetensors: tensor model.embed_tokens.weight: shape [97, 32] of F32 is 12416 bytes but data_offsets
    [0, 12000] hold 12000

Checked: the 8-byte length, a JSON object header, each entry's dtype (known), shape (a list of non-negative ints),
``data_offsets`` (two ints, start <= end), the entry's byte size = elements x dtype size, and the entries tiling the
data area exactly (no overlap, no gap, nothing past the end of the file).
"""

import json
import math
from pathlib import Path

# bytes per element of every dtype the safetensors format defines (F4/F6 packed types count as fractions)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class SafetensorsHeaderError(ValueError):
    """A safetensors file whose header is not valid; the message names the file and, when one is at fault, the
    tensor."""


def _shape_ok(shape):
    return isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)


def _offsets_ok(offsets):
    return (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1])


def read_safetensors_header(path) -> dict:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of the safetensors file at ``path`` (``__metadata__``
    dropped), or `SafetensorsHeaderError` naming the file and the tensor at fault. Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SafetensorsHeaderError(f"{path}: not a safetensors file (shorter than the 8-byte header "
                                             "length)")
            n = int.from_bytes(raw, "little")
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise SafetensorsHeaderError(f"{path}: not a safetensors file (header length {n} is past the end "
                                             f"of the {size}-byte file)" if n > size - 8 else
                                             f"{path}: header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
            text = fh.read(n)
    except OSError as exc:
        raise SafetensorsHeaderError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsHeaderError(f"{path}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafetensorsHeaderError(f"{path}: __metadata__ must map names to strings")
    data_bytes = size - 8 - n
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {name}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsHeaderError(f"{where}: the entry must hold exactly dtype, shape and data_offsets, got "
                                         f"{entry!r:.200}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise SafetensorsHeaderError(f"{where}: unknown dtype {dtype!r}")
        if not _shape_ok(shape):
            raise SafetensorsHeaderError(f"{where}: shape {shape!r:.200} is not a list of non-negative integers")
        if not _offsets_ok(offsets):
            raise SafetensorsHeaderError(f"{where}: data_offsets {offsets!r:.200} are not two integers start <= end")
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != want:
            raise SafetensorsHeaderError(f"{where}: shape {shape} of {dtype} is {want} bytes but data_offsets "
                                         f"{offsets} hold {offsets[1] - offsets[0]}")
        if offsets[1] > data_bytes:
            raise SafetensorsHeaderError(f"{where}: data_offsets {offsets} run past the end of the data "
                                         f"({data_bytes} bytes; the file is truncated or the header lies)")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves a gap of {start - end} bytes"
            raise SafetensorsHeaderError(f"{path}: tensor {name}: data_offsets [{start}, {stop}] {what}")
        end = stop
    if end != data_bytes:
        raise SafetensorsHeaderError(f"{path}: the header describes {8 + n + end} bytes but the file has {size} "
                                     "(truncated or padded)")
    return header
