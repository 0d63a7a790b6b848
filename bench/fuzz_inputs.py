"""Fuzz the loaders (issue 20, item 7): random mutations of recipes, config.json files and safetensors headers, each
fed to the library call a command makes, counted by outcome.

Targets (a third of the cases each):

- ``recipe``: a valid recipe (the tests' tiny Llama teacher, bundled data) mutated as a tree (a key deleted, renamed
  to a typo or duplicated, a value replaced by another type, a non-finite number, a bad string) or as text
  (truncated, bytes flipped, NUL or invalid UTF-8 inserted); then `load_recipe` + the run path, as every command does.
- ``config``: the teacher's ``config.json`` mutated (a dimension deleted, zeroed, negated, made huge, a string, a
  float, off by one; an unknown model_type; the file truncated, not UTF-8, not an object, nested deeply); then
  `import_teacher` into a fresh output, as `nexus import` does.
- ``header``: the teacher's ``model.safetensors`` header mutated (a shape, dtype or offset changed, an entry removed,
  renamed or added, the length field changed, bytes flipped, the file truncated or padded; ``__metadata__`` edits as
  benign controls); then `import_teacher`.

Each case runs in a forked child (the parent has torch and transformers imported, so a case costs the call alone) under
the CLI's `clean_errors`, with a per-case timeout and an address-space cap (a memory bomb fails instead of swapping).
Outcomes: ``clear_error`` (exit 2, one ``error:`` line naming the mutated file or its folder), ``unclear_error`` (exit 2
without the file), ``traceback`` (any other exception, or a crash), ``hang`` (timeout), ``accepted`` (returned).
An accepted case is ``accepted_corrupt`` when its mutation is one the spec must refuse (labelled per mutation), else
``accepted_valid``. ``left_output`` counts failed cases that left anything behind. Writes
bench/results/fuzz_inputs.json; asserts nothing.

    OMP_NUM_THREADS=1 python bench/fuzz_inputs.py [--cases 1500] [--seed 0] [--timeout 30]
"""

import argparse
import contextlib
import copy
import io
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import ARTEFACTS, RESULTS  # noqa: E402

OUT = RESULTS / "fuzz_inputs.json"
SCRATCH = ARTEFACTS / "fuzz_inputs"
MEMORY_CAP = 6 * 2**30
DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")
TYPED_NUMBERS = ("rms_norm_eps", "rope_theta", "max_position_embeddings", "initializer_range")
RECIPE_REQUIRED = {("name",), ("teachers",), ("capabilities",), ("teachers", "*", "name"), ("teachers", "*", "source"),
                   ("capabilities", "*", "name"), ("capabilities", "*", "probe"), ("capabilities", "*", "data")}
# string fields a " !" suffix makes invalid (a name pattern, a registry name, a path that then does not exist)
RECIPE_STRICT_STRINGS = {"name", "probe", "dtype", "source", "data", "compute"}


# ---------------------------------------------------------------------------------------------- fixtures


def build_base(root):
    """The tiny teacher folder and a valid recipe next to it."""
    from conftest import char_tokenizer, tiny_teacher

    teacher = root / "teacher"
    if not (teacher / "model.safetensors").is_file():
        shutil.rmtree(teacher, ignore_errors=True)
        tiny_teacher("llama").save_pretrained(teacher)
        char_tokenizer().save_pretrained(teacher)
    recipe = {"name": "fuzz", "run_dir": "runs",
              "teachers": [{"name": "t", "source": str(teacher), "dtype": "fp32"}],
              "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose", "weight": 1.0},
                               {"name": "sums", "probe": "exact_match", "data": "bundled:arithmetic",
                                "teachers": ["t"], "reference": False}],
              "student": {"budget": {"params": 50000}}, "memory": {"ram_gb": 8.0},
              "stages": {"profile": {"max_items": 4, "n_bootstrap": 50, "seed": 0}}}
    return teacher, recipe


# ---------------------------------------------------------------------------------------------- recipe mutations


def _paths(tree, prefix=()):
    """Every (path, value) in a parsed YAML tree."""
    out = [(prefix, tree)] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


def _generic(path):
    return tuple("*" if isinstance(p, int) else p for p in path)


def _parent(tree, path):
    for p in path[:-1]:
        tree = tree[p]
    return tree


def _kind(value):
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _other_type(rng, value):
    pool = {"str": [{"a": 1}, [1, 2], 123], "number": ["not-a-number", [1], {"x": 1}],
            "bool": ["maybe", [True], {"b": 1}], "list": ["abc", 5, {"k": "v"}], "dict": ["abc", 5, [1, 2]],
            "NoneType": [None]}[_kind(value)]
    return rng.choice(pool)


def mutate_recipe(rng, base):
    """(YAML text or bytes, description, corrupt: True / False / None = not judged)."""
    tree = copy.deepcopy(base)
    op = rng.choice(["delete", "typo_key", "other_type", "nonfinite", "bad_string", "duplicate_key", "negative",
                     "huge", "truncate", "flip_bytes", "nul", "bad_utf8", "reorder"])
    paths = [(p, v) for p, v in _paths(tree)]
    path, value = rng.choice(paths)
    key = path[-1]
    if op == "delete":
        parent = _parent(tree, path)
        del parent[key]
        required = _generic(path) in RECIPE_REQUIRED or _generic(path) == ("student", "budget", "params")
        return yaml.safe_dump(tree, sort_keys=False), f"delete {path}", True if required else None
    if op == "typo_key":
        dicts = [(p, v) for p, v in paths if isinstance(v, dict) and v]
        dicts.append(((), tree))
        where, d = rng.choice(dicts)
        old = rng.choice(list(d))
        new = old[:-1] if len(old) > 1 and rng.random() < 0.5 else old + rng.choice("sxz_")
        if new in d:
            new += "q"
        d[new] = d.pop(old)
        return yaml.safe_dump(tree, sort_keys=False), f"rename key {where + (old,)} -> {new!r}", True
    if op == "other_type":
        new = _other_type(rng, value)
        _parent(tree, path)[key] = new
        corrupt = value is not None  # every field of the base recipe has one type (bool | list for reference)
        return yaml.safe_dump(tree, sort_keys=False), f"set {path} = {new!r} (was {value!r})", corrupt
    if op == "nonfinite":
        numbers = [(p, v) for p, v in paths if _kind(v) == "number"] or [(path, value)]
        path, value = rng.choice(numbers)
        new = rng.choice([float("inf"), float("-inf"), float("nan")])
        _parent(tree, path)[path[-1]] = new
        return yaml.safe_dump(tree, sort_keys=False), f"set {path} = {new}", True
    if op == "bad_string":
        strings = [(p, v) for p, v in paths if isinstance(v, str)]
        path, value = rng.choice(strings)
        _parent(tree, path)[path[-1]] = value + " !"
        return yaml.safe_dump(tree, sort_keys=False), f"set {path} = {value + ' !'!r}", \
            path[-1] in RECIPE_STRICT_STRINGS or (len(path) > 1 and path[-2] == "teachers")
    if op == "duplicate_key":
        lines = yaml.safe_dump(tree, sort_keys=False).splitlines()
        candidates = [i for i, ln in enumerate(lines) if ":" in ln and not ln.lstrip().startswith("- ")]
        i = rng.choice(candidates)
        copy_line = lines[i] if not lines[i].rstrip().endswith(":") else lines[i] + " {}"
        lines.insert(i + 1, copy_line)
        return "\n".join(lines) + "\n", f"duplicate line {i + 1}: {lines[i].strip()!r}", True
    if op in ("negative", "huge"):
        numbers = [(p, v) for p, v in paths if _kind(v) == "number"]
        path, value = rng.choice(numbers)
        new = -abs(value) - 1 if op == "negative" else 10**30
        _parent(tree, path)[path[-1]] = new
        return yaml.safe_dump(tree, sort_keys=False), f"set {path} = {new}", None
    text = yaml.safe_dump(tree, sort_keys=False).encode()
    if op == "truncate":
        cut = rng.randrange(0, len(text))
        return text[:cut], f"truncate at byte {cut} of {len(text)}", None
    if op == "flip_bytes":
        data = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), "flip 1-4 random bytes", None
    if op == "nul":
        at = rng.randrange(len(text))
        return text[:at] + b"\x00" + text[at:], f"insert NUL at byte {at}", True
    if op == "bad_utf8":
        at = rng.randrange(len(text))
        return text[:at] + b"\xff\xfe" + text[at:], f"insert invalid UTF-8 at byte {at}", True
    # reorder: the same recipe, keys in another order (a control: must be accepted)
    items = list(tree.items())
    rng.shuffle(items)
    return yaml.safe_dump(dict(items), sort_keys=False), "reorder top-level keys", False


# ---------------------------------------------------------------------------------------------- config mutations


def mutate_config(rng, config_text):
    """(new config.json bytes, description, corrupt)."""
    config = json.loads(config_text)
    op = rng.choice(["dim_delete", "dim_value", "dim_value", "dim_off", "typed_number", "model_type", "truncate",
                     "not_utf8", "not_object", "deep", "add_unknown_key"])
    if op.startswith("dim"):
        key = rng.choice([k for k in DIMENSIONS if k in config])
        if op == "dim_delete":
            del config[key]
            # head_dim / num_key_value_heads have defaults that happen to match this teacher's weights
            return json.dumps(config).encode(), f"delete {key}", key not in ("head_dim", "num_key_value_heads") or None
        if op == "dim_off":
            new = config[key] + rng.choice([-1, 1, config[key]])
            config[key] = new
            return json.dumps(config).encode(), f"{key} = {new}", True
        new = rng.choice([0, -1, -64, 2_000_000_000, 10**12, 200_000, "32", 32.5, None, [32], True])
        config[key] = new
        return json.dumps(config).encode(), f"{key} = {new!r}", True
    if op == "typed_number":
        key = rng.choice([k for k in TYPED_NUMBERS if k in config or k in config.get("rope_parameters", {})])
        new = rng.choice(["abc", [1], {"a": 1}, None, -1])
        (config if key in config else config["rope_parameters"])[key] = new
        # an explicit null is used as is (no class default) where the model computes with it; a negative
        # initializer_range only matters for random init
        corrupt = key in ("rms_norm_eps", "rope_theta") or (new is not None and not (key == "initializer_range"
                                                                                     and new == -1))
        return json.dumps(config).encode(), f"{key} = {new!r}", corrupt or None
    if op == "model_type":
        new = rng.choice(["nonexistent_arch", "", None, 5])
        config["model_type"] = new
        return json.dumps(config).encode(), f"model_type = {new!r}", True
    raw = json.dumps(config).encode()
    if op == "truncate":
        cut = rng.randrange(1, len(raw) - 1)
        return raw[:cut], f"truncate at byte {cut}", True
    if op == "not_utf8":
        at = rng.randrange(1, len(raw) - 1)
        return raw[:at] + b"\xff" + raw[at:], f"invalid UTF-8 at byte {at}", True
    if op == "not_object":
        return rng.choice([b"[]", b"42", b"null", b'"config"']), "top level not an object", True
    if op == "deep":
        n = rng.choice([1000, 100_000])
        return b"[" * n + b"]" * n, f"nested {n} deep", True
    config[f"fuzz_{rng.randrange(1000)}"] = rng.choice([1, "x", [1, 2]])
    return json.dumps(config).encode(), "add an unknown key (a control: must be accepted)", False


# ---------------------------------------------------------------------------------------------- header mutations


def _split(data):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body, length=None):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def mutate_header(rng, data):
    """(new model.safetensors bytes, description, corrupt)."""
    n, header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["shape", "shape", "dtype", "offsets", "offsets", "delete", "rename", "add", "length",
                     "flip", "truncate", "pad", "metadata", "swap_offsets"])
    if op == "shape":
        shape = list(entry["shape"])
        how = rng.choice(["plus", "double", "swap", "add_dim", "drop_dim", "zero", "negative", "float"])
        if how == "plus":
            shape[rng.randrange(len(shape))] += 1
        elif how == "double":
            shape[rng.randrange(len(shape))] *= 2
        elif how == "swap":
            shape = shape[::-1] if len(shape) > 1 and shape[0] != shape[-1] else shape + [1]
        elif how == "add_dim":
            shape = shape + [2]
        elif how == "drop_dim":
            shape = shape[1:] if len(shape) > 1 else [shape[0] * 2]
        elif how == "zero":
            shape[0] = 0
        elif how == "negative":
            shape[0] = -shape[0]
        else:
            shape[0] = shape[0] + 0.5
        entry["shape"] = shape
        return _join(header, body), f"{name} shape -> {shape} ({how})", True
    if op == "dtype":
        new = rng.choice(["F16", "BF16", "I32", "F64", "U8", "F33", "f32", 5])
        if new == entry["dtype"]:
            new = "F16"
        entry["dtype"] = new
        return _join(header, body), f"{name} dtype -> {new!r}", True
    if op == "offsets":
        start, end = entry["data_offsets"]
        new = rng.choice([[start + 4, end + 4], [start - 4 if start else 4, end], [start, end + 4], [end, start],
                          [start, 10**12], ["0", end], [start]])
        entry["data_offsets"] = new
        return _join(header, body), f"{name} data_offsets -> {new}", True
    if op == "swap_offsets":
        # two tensors of different byte sizes trade offsets (equal sizes would be a valid file with swapped weights:
        # no format check can see that, so it is not generated)
        other = rng.choice([k for k in names if k != name])
        a, b = entry["data_offsets"], header[other]["data_offsets"]
        if a[1] - a[0] == b[1] - b[0]:
            entry["data_offsets"] = [a[0], a[1] + 4]
            return _join(header, body), f"{name} data_offsets grown by 4", True
        entry["data_offsets"], header[other]["data_offsets"] = b, a
        return _join(header, body), f"swap data_offsets of {name} and {other}", True
    if op == "delete":
        del header[name]
        return _join(header, body), f"delete entry {name}", True
    if op == "rename":
        header[name + rng.choice(["x", ".bak", "_"])] = header.pop(name)
        return _join(header, body), f"rename entry {name}", True
    if op == "add":
        header["model.extra.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
        return _join(header, body + b"\x00" * 4), "add an entry model.extra.weight (with its data)", True
    if op == "length":
        delta = rng.choice([-3, -1, 1, 8, 2**40])
        raw = json.dumps(header).encode()
        return _join(header, body, length=len(raw) + delta), f"header length {delta:+d}", True
    if op == "flip":
        blob = bytearray(data)
        i = 8 + rng.randrange(n)
        blob[i] = rng.randrange(256)
        try:
            unchanged = _split(bytes(blob))[1] == _split(data)[1]
        except (ValueError, UnicodeDecodeError, struct.error):
            unchanged = False
        return bytes(blob), f"flip header byte {i}", not unchanged
    if op == "truncate":
        cut = rng.randrange(0, len(data) - 1)
        return data[:cut], f"truncate at byte {cut} of {len(data)}", True
    if op == "pad":
        return data + b"\x00" * rng.choice([1, 7, 1024]), "append bytes", True
    header["__metadata__"] = {**header.get("__metadata__", {}), "fuzz": str(rng.randrange(1000))}
    return _join(header, body), "add a __metadata__ string (a control: must be accepted)", False


# ---------------------------------------------------------------------------------------------- running one case


def _run_in_child(call, names):
    """In the forked child: run ``call`` under the CLI's clean_errors; return the outcome record."""
    import typer

    from nexus.errors import clean_errors

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), clean_errors():
            call()
        return {"outcome": "accepted"}
    except typer.Exit as exc:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
        if exc.exit_code != 2 or len(lines) != 1:
            return {"outcome": "unclear_error", "message": err.getvalue()[-400:], "exit": exc.exit_code}
        named = any(n in lines[0] for n in names)
        return {"outcome": "clear_error" if named else "unclear_error", "message": lines[0][:400]}
    except BaseException as exc:  # noqa: BLE001 - what the user would see as a traceback
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        return {"outcome": "traceback", "message": f"{type(exc).__name__}: {str(exc)[:300]}", "where": where}


def run_case(call, names, timeout):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
            record = _run_in_child(call, names)
        except BaseException as exc:  # noqa: BLE001
            record = {"outcome": "traceback", "message": f"{type(exc).__name__}: {exc}"[:300]}
        os.write(w, json.dumps(record, default=str).encode())
        os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([r], [], [], max(0.0, left))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return {"outcome": "hang", "message": f"no answer within {timeout} s"}
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"outcome": "traceback", "message": f"the child died (wait status {status})"}
    return json.loads(b"".join(chunks))


def _leftovers(case_dir, keep):
    return sorted(str(p.relative_to(case_dir)) for p in case_dir.rglob("*")
                  if not any(p == k or k in p.parents for k in keep))


# ---------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from nexus.conversion.recipe import load_recipe
    from nexus.conversion.teacher_import import import_teacher

    SCRATCH.mkdir(parents=True, exist_ok=True)
    teacher, base_recipe = build_base(SCRATCH)
    warm = SCRATCH / "warm-out"
    shutil.rmtree(warm, ignore_errors=True)
    import_teacher(teacher, warm, on_note=lambda n: None)  # imports every lazy module once, before forking
    shutil.rmtree(warm)
    config_text = (teacher / "config.json").read_text()
    weights = (teacher / "model.safetensors").read_bytes()

    rng = random.Random(args.seed)
    targets = ["recipe", "config", "header"]
    records, counts, by_target = [], Counter(), {t: Counter() for t in targets}
    started = time.time()
    for i in range(args.cases):
        target = targets[i % 3]
        case_dir = SCRATCH / f"case-{i}"
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir()
        if target == "recipe":
            data, what, corrupt = mutate_recipe(rng, base_recipe)
            path = case_dir / "recipe.yaml"
            path.write_bytes(data if isinstance(data, bytes) else data.encode())
            names, keep = [str(path)], [path]

            def call(path=path):
                recipe = load_recipe(path)
                _ = recipe.run_path
        else:
            src = case_dir / "teacher"
            shutil.copytree(teacher, src)
            if target == "config":
                data, what, corrupt = mutate_config(rng, config_text)
                (src / "config.json").write_bytes(data)
            else:
                data, what, corrupt = mutate_header(rng, weights)
                (src / "model.safetensors").write_bytes(data)
            out = case_dir / "out"
            names, keep = [str(src)], [src]

            def call(src=src, out=out):
                import_teacher(src, out, on_note=lambda n: None)
        t0 = time.perf_counter()
        record = run_case(call, names, args.timeout)
        record.update(case=i, target=target, mutation=what, corrupt=corrupt,
                      seconds=round(time.perf_counter() - t0, 3))
        if record["outcome"] == "accepted":
            record["outcome"] = "accepted_corrupt" if corrupt is True else "accepted_valid"
        else:
            left = _leftovers(case_dir, keep)
            if left:
                record["left_output"] = left[:5]
                counts["left_output"] += 1
        counts[record["outcome"]] += 1
        by_target[target][record["outcome"]] += 1
        records.append(record)
        shutil.rmtree(case_dir, ignore_errors=True)
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{args.cases} cases, {time.time() - started:.0f} s: {dict(counts)}", flush=True)

    problems = [r for r in records if r["outcome"] in ("traceback", "hang", "accepted_corrupt", "unclear_error")
                or "left_output" in r]
    examples = {}
    for r in records:
        examples.setdefault(r["outcome"], [])
        if len(examples[r["outcome"]]) < 4:
            examples[r["outcome"]].append({k: r.get(k) for k in ("target", "mutation", "message")})
    result = {"seed": args.seed, "cases": args.cases, "timeout_seconds": args.timeout,
              "memory_cap_bytes": MEMORY_CAP, "wall_seconds": round(time.time() - started, 1),
              "by_outcome": dict(counts), "by_target": {t: dict(c) for t, c in by_target.items()},
              "accepted_valid_controls": sum(1 for r in records if r["outcome"] == "accepted_valid"
                                             and r["corrupt"] is False),
              "accepted_unjudged": sum(1 for r in records if r["outcome"] == "accepted_valid" and r["corrupt"] is None),
              "accepted_unjudged_mutations": [f"{r['target']}: {r['mutation']}" for r in records
                                              if r["outcome"] == "accepted_valid" and r["corrupt"] is None],
              "problems": problems, "examples": examples,
              "max_case_seconds": max(r["seconds"] for r in records)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("by_outcome", "by_target", "accepted_valid_controls",
                                             "accepted_unjudged", "wall_seconds", "max_case_seconds")}, indent=1))
    for r in problems[:40]:
        print(f"  {r['outcome']:16s} {r['target']:7s} {r['mutation']}: {r.get('message', '')[:200]}"
              + (f" left {r['left_output']}" if "left_output" in r else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
