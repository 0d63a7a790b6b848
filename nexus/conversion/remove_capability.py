"""Remove one capability from a student: ``nexus remove-capability STUDENT_DIR NAME --out OUT``.

    record = remove_capability("runs/demo/export", "code", "out/no-code")

The capability leaves its tower's ``capabilities``. If that tower then serves nothing, the tower goes too: its
tensors are dropped, the towers after it move down one index (``model.towers.{j}`` -> ``model.towers.{j-1}``), the
router loses that class (the rows of ``router.proj.weight`` / ``.bias`` are sliced; a single tower left needs no
router and its tensors are dropped) and the config is rebuilt, so the KV-cache slots (``tower_layer_offset``) are
renumbered from the new tower list. Every kept tensor is copied as stored, so it is bit-identical; the record lists
the sha256 of each before and after. The output is written all at once (`atomic_dir`), with ``nexus_hashes.json``;
``STUDENT_DIR`` is never modified.

Refused with one line: an unknown capability (the choices are listed), the student's last capability, a folder that
is not a NEXUS student or whose recorded hashes do not match (`student_hashes`).
"""

import json
import re
import shutil
from pathlib import Path

import torch

from .atomic_output import atomic_dir
from .student_capabilities import (
    CAPABILITIES_FILE,
    read_student_capabilities,
    write_student_capabilities,
)
from .student_hashes import (
    HASHES_FILE,
    check_student_folder,
    folder_tensor_hashes,
    read_student_tensors,
)

RECORD_FILE = "remove_capability.json"
ROUTER_KEYS = ("model.router.proj.weight", "model.router.proj.bias")
SKIPPED_FILES = {"config.json", "model.safetensors.index.json", HASHES_FILE, CAPABILITIES_FILE, RECORD_FILE,
                 "model_card.md", "README.md"}


class RemoveCapabilityError(ValueError):
    pass


def rebuilt_config(config, towers, capability_names):
    """A new `NexusConfig` from ``config`` with ``towers`` (derived fields, e.g. the cache slot count, recomputed)."""
    from ..modeling_nexus import NexusConfig

    raw = config.to_dict()
    for key in ("num_hidden_layers", "transformers_version"):
        raw.pop(key, None)
    raw.update(towers=towers, capability_names=list(capability_names))
    return NexusConfig(**raw)


def dropped_tower_state(tensors, index, n_towers):
    """``tensors`` without tower ``index``: later towers renumbered, the router's class ``index`` sliced out (or the
    router dropped when one tower is left). Tensors are the same objects (nothing is copied or cast)."""
    pattern = re.compile(r"^model\.towers\.(\d+)\.(.*)$")
    out = {}
    for key, value in tensors.items():
        m = pattern.match(key)
        if m:
            j = int(m.group(1))
            if j == index:
                continue
            out[f"model.towers.{j - 1 if j > index else j}.{m.group(2)}"] = value
        elif key in ROUTER_KEYS:
            if n_towers - 1 > 1:
                keep = [i for i in range(n_towers) if i != index]
                out[key] = value[keep].contiguous()
        else:
            out[key] = value
    return out


def check_state_fits(config, tensors, where):
    """Every tensor of a model built from ``config`` is in ``tensors`` with its shape (a tied LM head may be absent),
    and nothing else is: checked on the meta device, nothing allocated."""
    from ..modeling_nexus import NexusForCausalLM

    with torch.device("meta"):
        model = NexusForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in expected if k not in tensors and k not in tied]
    extra = [k for k in tensors if k not in expected]
    wrong = [k for k in tensors if k in expected and tuple(tensors[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise RemoveCapabilityError(f"{where}: the rebuilt student does not match its tensors (missing {missing[:3]}, "
                                    f"unexpected {extra[:3]}, wrong shape {wrong[:3]})")


def copy_side_files(src, dst):
    """Tokenizer, modeling code and other small files of ``src`` (not the weights, config or records)."""
    for path in Path(src).iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in SKIPPED_FILES:
            shutil.copy2(path, Path(dst) / path.name)


def save_student(tmp, config, tensors):
    """Write ``config.json`` and one ``model.safetensors`` (tensors as given) into ``tmp``."""
    from safetensors.torch import save_file

    config.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / "model.safetensors"),
              metadata={"format": "pt"})


def remove_capability(student, name, out, overwrite=False) -> dict:
    """Write the student at ``student`` without capability ``name`` into ``out``; returns the record."""
    from ..modeling_nexus import NexusConfig, NexusForCausalLM
    from .load_check import checked_from_pretrained

    student, out = Path(student), Path(out)
    checked = check_student_folder(student)
    config = NexusConfig.from_pretrained(student)
    mapping = config.capability_to_tower
    if name not in mapping:
        raise RemoveCapabilityError(f"student {student} has no capability {name!r}; it serves: "
                                    f"{', '.join(sorted(mapping))}")
    if len(mapping) == 1:
        raise RemoveCapabilityError(f"capability {name!r} is the last one student {student} serves; removing it "
                                    "would leave no student")
    index = mapping[name]
    if config.encoders and config.towers[index]["type"] == "whisper_decoder":
        raise RemoveCapabilityError(f"capability {name!r} is served by the speech tower of student {student}, which "
                                    "reads its audio encoder: use the text student it was attached to instead")
    towers = json.loads(json.dumps(config.towers))
    towers[index]["capabilities"] = [c for c in towers[index]["capabilities"] if c != name]
    tensors = read_student_tensors(student)
    dropped = not towers[index]["capabilities"]
    tower_name = towers[index].get("name") or f"tower{index}"
    if dropped:
        new_tensors = dropped_tower_state(tensors, index, len(towers))
        towers = towers[:index] + towers[index + 1:]
    else:
        new_tensors = dict(tensors)
    names = [c for c in (getattr(config, "capability_names", None) or list(mapping)) if c != name]
    new_config = rebuilt_config(config, towers, names)
    check_state_fits(new_config, new_tensors, f"student {student}")
    before = checked["hashes"]
    kept_from = {}  # new key -> old key (the renumbered tower keys)
    for old_key in tensors:
        m = re.match(r"^model\.towers\.(\d+)\.(.*)$", old_key)
        if m and dropped and int(m.group(1)) != index:
            j = int(m.group(1))
            kept_from[f"model.towers.{j - 1 if j > index else j}.{m.group(2)}"] = old_key
        elif old_key in new_tensors and not (dropped and old_key in ROUTER_KEYS):
            kept_from[old_key] = old_key
    with atomic_dir(out, overwrite=overwrite, sources={"student": student}) as tmp:
        save_student(tmp, new_config, new_tensors)
        copy_side_files(student, tmp)
        checked_from_pretrained(NexusForCausalLM, tmp, what="student without " + name, dtype=None)
        after = folder_tensor_hashes(tmp)
        identical = {new: before[old] == after[new] for new, old in kept_from.items()}
        if not all(identical.values()):
            bad = next(k for k, ok in identical.items() if not ok)
            raise RemoveCapabilityError(f"tensor {bad} changed while it was copied; nothing was written")
        capabilities = read_student_capabilities(student)
        if capabilities is not None:
            capabilities["capabilities"] = [c for c in capabilities["capabilities"] if c["name"] != name]
            capabilities.pop("schema", None)
            write_student_capabilities(tmp, capabilities)
        record = {
            "schema": "nexus.remove_capability/1", "student": str(student), "capability": name,
            "tower": {"index": index, "name": tower_name, "dropped": dropped},
            "towers_after": [t.get("name") for t in towers],
            "capability_to_tower": dict(new_config.capability_to_tower),
            "router": ("dropped (one tower left)" if dropped and len(towers) == 1 else
                       f"class {index} sliced out" if dropped else "unchanged"),
            "cache_slots": new_config.num_hidden_layers,
            "student_hashes": checked["note"],
            "kept_tensors": {new: {"from": old, "sha256_before": before[old], "sha256_after": after[new]}
                             for new, old in sorted(kept_from.items())},
            "all_kept_tensors_identical": True,
            "dropped_tensors": sorted(k for k in tensors if k not in kept_from.values()),
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(f"# NEXUS student\n\n{student.name} without capability `{name}` "
                                       f"(`nexus remove-capability`); serves: "
                                       f"{', '.join(sorted(new_config.capability_to_tower))}. See {RECORD_FILE}.\n")
        from .student_hashes import write_student_hashes

        write_student_hashes(tmp)
    return {**record, "path": str(out)}
