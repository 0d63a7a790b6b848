"""Per-tensor sha256 of a student folder, recorded beside its weights (``nexus_hashes.json``) and checked on read.

    record = write_student_hashes("out/student")        # after writing model.safetensors
    check = check_student_folder("out/student")         # raises StudentFolderError on a modified folder

A tensor's hash covers its dtype, its shape and its bytes, so two tensors have equal hashes exactly when they are
bit-identical. ``add-teacher`` and ``remove-capability`` record the hashes of what they write and refuse a student
folder whose tensors no longer match its record (a modified folder) or whose record was written by another NEXUS
version (its weights and config may mean something else to this one). A folder with no record at all (a student
exported before records existed) is accepted with a note saying it could not be verified.

The file::

    {"schema": "nexus.hashes/1", "nexus_version": "0.1.0", "algorithm": "sha256(dtype|shape|bytes)",
     "tensors": {"model.towers.0.layers.0.mlp.up_proj.weight": "9f2c...", ...}}
"""

import hashlib
import json
from pathlib import Path

import torch

HASHES_FILE = "nexus_hashes.json"
SCHEMA = "nexus.hashes/1"
ALGORITHM = "sha256(dtype|shape|bytes)"


class StudentFolderError(ValueError):
    """The folder is not a NEXUS student this version can take (the message names the folder and the reason)."""


def nexus_version() -> str:
    from .. import __version__

    return __version__


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 over the dtype, the shape and the raw bytes of ``tensor`` (equal exactly when bit-identical)."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def tensor_hashes(tensors: dict) -> dict:
    """{name: sha256} in name order."""
    return {name: tensor_sha256(tensors[name]) for name in sorted(tensors)}


def weight_files(folder) -> list[Path]:
    """The safetensors files of a checkpoint folder (the shards of an index, else every ``*.safetensors``)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def read_student_tensors(folder) -> dict:
    """Every tensor of the checkpoint at ``folder`` as stored (dtype kept), refused on NaN/Inf or a bad file; read one
    tensor at a time, so the peak is the checkpoint's size (a memory-mapped read would hold it twice)."""
    return dict(iter_student_tensors(folder))


def iter_student_tensors(folder, keys=None):
    """``(name, tensor)`` of the checkpoint at ``folder`` (only ``keys`` when given), one tensor resident at a time
    (`tensor_stream`): hashing or comparing a student this way costs its largest tensor in RAM, not its size."""
    from .tensor_stream import stream_safetensors

    for path in weight_files(folder):
        yield from stream_safetensors(path, keys, what="student")


def folder_tensor_hashes(folder, keys=None) -> dict:
    """{name: sha256} of the checkpoint at ``folder`` in name order, read one tensor at a time."""
    return dict(sorted((name, tensor_sha256(t)) for name, t in iter_student_tensors(folder, keys)))


def hashes_record(hashes: dict) -> dict:
    return {"schema": SCHEMA, "nexus_version": nexus_version(), "algorithm": ALGORITHM, "tensors": hashes}


def write_student_hashes(folder, tensors=None) -> dict:
    """Write ``nexus_hashes.json`` into ``folder`` from its own weight files (or ``tensors``); returns the record."""
    folder = Path(folder)
    record = hashes_record(folder_tensor_hashes(folder) if tensors is None else tensor_hashes(tensors))
    (folder / HASHES_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def check_student_folder(folder) -> dict:
    """Check that ``folder`` is a NEXUS student whose recorded hashes (if any) match; returns
    ``{"path", "verified": bool, "note", "hashes": {name: sha256}}``. Raises `StudentFolderError` with one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StudentFolderError(f"student folder {folder} does not exist or is not a folder")
    config = folder / "config.json"
    if not config.is_file():
        raise StudentFolderError(f"student folder {folder} has no config.json: not a NEXUS student")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StudentFolderError(f"student folder {folder}: config.json is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "nexus":
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise StudentFolderError(f"student folder {folder} is not a NEXUS student (config.json model_type is "
                                 f"{kind!r}, not 'nexus')")
    if not weight_files(folder):
        raise StudentFolderError(f"student folder {folder} has no *.safetensors weights")
    hashes = folder_tensor_hashes(folder)
    record_path = folder / HASHES_FILE
    if not record_path.is_file():
        return {"path": str(folder), "verified": False, "hashes": hashes,
                "note": f"no {HASHES_FILE} (exported before hashes were recorded): could not check for modification"}
    try:
        record = json.loads(record_path.read_text())
    except ValueError as exc:
        raise StudentFolderError(f"student folder {folder}: {HASHES_FILE} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA or not isinstance(record.get("tensors"), dict):
        raise StudentFolderError(f"student folder {folder}: {HASHES_FILE} has schema {record.get('schema')!r} "
                                 f"(expected {SCHEMA!r}): written by another NEXUS version; refusing it")
    if record.get("nexus_version") != nexus_version():
        raise StudentFolderError(f"student folder {folder} was written by NEXUS {record.get('nexus_version')!r}, "
                                 f"this is NEXUS {nexus_version()!r} ({HASHES_FILE}); refusing it")
    recorded = record["tensors"]
    changed = sorted(k for k in recorded if k in hashes and hashes[k] != recorded[k])
    missing = sorted(set(recorded) - set(hashes))
    extra = sorted(set(hashes) - set(recorded))
    if changed or missing or extra:
        parts = [f"{len(changed)} tensor(s) changed (first: {changed[0]})" if changed else "",
                 f"{len(missing)} missing (first: {missing[0]})" if missing else "",
                 f"{len(extra)} not recorded (first: {extra[0]})" if extra else ""]
        raise StudentFolderError(f"student folder {folder} was modified after it was written: "
                                 + "; ".join(p for p in parts if p) + f" against {HASHES_FILE}; refusing it")
    return {"path": str(folder), "verified": True, "hashes": hashes, "note": f"every tensor matches {HASHES_FILE}"}
