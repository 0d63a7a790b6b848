"""Teacher-output cache: run one teacher once over a dataset, keep its top-k logits and chosen hidden states on disk.

Distillation then never needs a teacher resident: every teacher of every capability is run once, one at a time
(the caller loads it and frees it), and the student trains from these files.

Layout of a cache folder::

    manifest.json                 key, settings, teacher / data fingerprints, one entry per shard (sha256, bytes)
    shard-00000.safetensors       a run of whole windows, concatenated along the token axis:
        input_ids     (N,)        int32   the teacher's token ids (teacher vocabulary)
        window_offsets (w + 1,)   int64   window j of the shard is tokens [offsets[j], offsets[j + 1])
        topk_values   (N, k)      float16 / bfloat16   raw logits of the teacher's top-k (no temperature)
        topk_indices  (N, k)      int32   their ids, teacher vocabulary
        logsumexp     (N,)        float32 full-vocabulary logsumexp: exp(value - logsumexp) = true probability
        hidden.<L>    (N, H)      hidden dtype          teacher hidden state L (HF indexing: 0 = embeddings,
                                                        i = output of layer i, last = final normed state)

Row t of a window is the teacher's prediction of the token *after* token t.

The **key** is a sha256 of (teacher fingerprint, data fingerprint, k, layers, dtypes, max_length, tokens_per_shard,
format version). Temperature is not in it: raw logits are stored and temperature is applied by the loss. A cache
folder whose manifest has another key is stale and is rebuilt.

**Integrity.** Every shard's sha256 is in the manifest. Opening a cache checks every shard (hash, readable,
shapes); a reader hashes the bytes it deserialises, so a shard that changes later is caught too. A bad shard is
never used: `open_teacher_cache` raises `CorruptCacheError` naming it, and `build_teacher_cache` reports it and
recomputes just that shard. Shards and the manifest are written with `atomic_file` (temporary file, then rename);
the manifest is rewritten after every shard, so an interrupted build resumes where it stopped.
"""

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeRemainingColumn,
)
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from nexus.conversion.atomic_output import atomic_file

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_console = Console(stderr=True)


class CorruptCacheError(RuntimeError):
    """A cache shard is missing, unreadable or does not match its manifest hash."""

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = list(problems)


class CacheSettings(BaseModel):
    """What to keep from the teacher. Every field is part of the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(32, ge=1, description="how many of the teacher's highest logits to keep per token")
    layers: tuple[int, ...] = Field((), description="teacher hidden states to keep (HF indexing, negatives allowed)")
    value_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16",
                             description="dtype of the stored top-k logits (float16 keeps ~3 significant digits)")
    hidden_dtype: Literal["float16", "bfloat16", "float32"] = Field("bfloat16",
                              description="dtype of the stored hidden states (bfloat16 has float32's range)")
    max_length: int = Field(2048, ge=1, description="text windows are cut to this many teacher tokens")
    tokens_per_shard: int = Field(65536, ge=1, description="a shard holds whole windows, about this many tokens")

    @field_validator("layers")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"layers {list(v)} has duplicates")
        return tuple(int(x) for x in v)


# ----------------------------------------------------------------------------------------------- fingerprints


def _sha():
    return hashlib.sha256()


def model_fingerprint(model):
    """sha256 of a model's config and every parameter / buffer (names, shapes, dtypes, bytes)."""
    h = _sha()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(windows):
    """sha256 of a list of 1-D token-id windows (their lengths and ids)."""
    h = _sha()
    for w in windows:
        a = w.to(torch.int64).contiguous().numpy()
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(teacher_fingerprint, data_fp, settings: CacheSettings):
    """The cache's identity: teacher, data, settings, and whether this CPU multiplies bf16 natively (the forward's
    "auto" compute follows it, so a cache built in bf16 is not reused where fp32 would be computed)."""
    from nexus.conversion.probes.compute_mode import native_bf16_matmul

    blob = json.dumps({"format": CACHE_FORMAT_VERSION, "teacher": teacher_fingerprint, "data": data_fp,
                       "native_bf16": native_bf16_matmul(), **settings.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _file_sha256(data: bytes):
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------- windows


def prepare_windows(windows, tokenizer=None, max_length=2048):
    """Token windows as a list of 1-D LongTensors (teacher tokenization).

    ``windows``: a (N, T) LongTensor, a list of 1-D LongTensors / int lists, or a list of strings (then
    ``tokenizer``, the teacher's, is required; each text is encoded with its special tokens and cut to
    ``max_length`` tokens).
    """
    if isinstance(windows, torch.Tensor):
        if windows.dim() != 2:
            raise ValueError(f"windows: a tensor must be (N, T) token ids, got shape {tuple(windows.shape)}")
        windows = list(windows)
    if not isinstance(windows, (list, tuple)) or not windows:
        raise ValueError("windows: give a non-empty list of token-id rows or text chunks")
    out = []
    for i, w in enumerate(windows):
        if isinstance(w, str):
            if tokenizer is None:
                raise ValueError("windows are text: pass the teacher's tokenizer= to tokenize them")
            ids = tokenizer(w, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            w = torch.tensor(ids, dtype=torch.long)
        else:
            w = torch.as_tensor(w)
            if w.dtype.is_floating_point or w.dtype == torch.bool or w.dim() != 1:
                raise ValueError(f"windows[{i}]: expected a 1-D row of integer token ids, got {w.dtype} "
                                 f"{tuple(w.shape)}")
            w = w.long()[:max_length]
        if w.numel() == 0:
            raise ValueError(f"windows[{i}] is empty")
        if int(w.min()) < 0:
            raise ValueError(f"windows[{i}] has a negative token id {int(w.min())}")
        out.append(w)
    return out


def _shard_plan(windows, tokens_per_shard):
    """[(first_window, end_window)] with whole windows, about ``tokens_per_shard`` tokens each."""
    plan, start, count = [], 0, 0
    for i, w in enumerate(windows):
        count += w.numel()
        if count >= tokens_per_shard:
            plan.append((start, i + 1))
            start, count = i + 1, 0
    if start < len(windows):
        plan.append((start, len(windows)))
    return plan


# ------------------------------------------------------------------------------------------------------ reader


class TeacherCache:
    """Read a verified cache folder window by window. ``len(cache)`` windows; ``cache[i]`` a dict of tensors.

    A window's dict: ``input_ids`` (T,) long, ``topk_values`` (T, k) stored dtype, ``topk_indices`` (T, k) long
    (teacher vocabulary), ``logsumexp`` (T,) float32, ``hidden`` {layer: (T, H)}.
    """

    def __init__(self, path, manifest):
        self.path = Path(path)
        self.manifest = manifest
        self.report = []  # problems found and shards rebuilt by the build that produced this object
        self._starts = [s["windows"][0] for s in manifest["shards"]]
        self._loaded = (None, None)

    def __len__(self):
        return self.manifest["data"]["n_windows"]

    @property
    def key(self):
        return self.manifest["key"]

    @property
    def bytes_per_token(self):
        return self.manifest["bytes_per_token"]

    @property
    def k(self):
        return self.manifest["settings"]["k"]

    @property
    def layers(self):
        return list(self.manifest["settings"]["layers"])

    def shard(self, index):
        """The tensors of shard ``index``, after checking its bytes against the manifest hash."""
        if self._loaded[0] != index:
            self._loaded = (index, _read_shard(self.path, self.manifest["shards"][index], self.manifest))
        return self._loaded[1]

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range: the cache holds {len(self)} windows")
        i %= len(self)
        s = max(j for j, start in enumerate(self._starts) if start <= i)
        tensors = self.shard(s)
        off = tensors["window_offsets"]
        j = i - self._starts[s]
        a, b = int(off[j]), int(off[j + 1])
        return {
            "input_ids": tensors["input_ids"][a:b].long(),
            "topk_values": tensors["topk_values"][a:b],
            "topk_indices": tensors["topk_indices"][a:b].long(),
            "logsumexp": tensors["logsumexp"][a:b],
            "hidden": {L: tensors[f"hidden.{L}"][a:b] for L in self.layers},
        }

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _read_shard(path, entry, manifest):
    """Deserialize one shard from the very bytes that were hashed; raise `CorruptCacheError` on any mismatch."""
    file = Path(path) / entry["file"]
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CorruptCacheError(f"cache shard {file}: cannot read it ({exc.strerror or exc})",
                                [(entry["file"], "unreadable")]) from exc
    digest = _file_sha256(data)
    if digest != entry["sha256"]:
        why = f"sha256 mismatch ({len(data)} bytes on disk, {entry['bytes']} recorded)"
        raise CorruptCacheError(f"cache shard {file}: {why}; it is corrupt or truncated and will not be used",
                                [(entry["file"], why)])
    try:
        tensors = load_safetensors(data)
    except Exception as exc:
        raise CorruptCacheError(f"cache shard {file}: not a readable safetensors file ({exc})",
                                [(entry["file"], "unreadable safetensors")]) from exc
    n, k = entry["tokens"], manifest["settings"]["k"]
    expect = {"input_ids": (n,), "topk_values": (n, k), "topk_indices": (n, k), "logsumexp": (n,),
              "window_offsets": (entry["windows"][1] - entry["windows"][0] + 1,)}
    expect.update({f"hidden.{L}": None for L in manifest["settings"]["layers"]})
    for name, shape in expect.items():
        if name not in tensors or (shape is not None and tuple(tensors[name].shape) != shape):
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise CorruptCacheError(f"cache shard {file}: tensor {name} is {got}, expected {shape}",
                                    [(entry["file"], f"bad tensor {name}")])
    return tensors


def _read_manifest(path):
    file = Path(path) / MANIFEST
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptCacheError(f"cache manifest {file} is unreadable ({exc})", [(MANIFEST, "unreadable")]) from exc


def verify_shards(path, manifest):
    """[(file, problem)] for every listed shard that is missing, corrupt or malformed (empty list: all good)."""
    problems = []
    for entry in manifest["shards"]:
        try:
            _read_shard(path, entry, manifest)
        except CorruptCacheError as exc:
            problems.extend(exc.problems)
    return problems


def open_teacher_cache(path):
    """Open a finished cache after verifying every shard; `CorruptCacheError` names any bad shard or manifest."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        raise FileNotFoundError(f"no teacher cache at {path}: {MANIFEST} is missing")
    if not manifest.get("complete"):
        raise CorruptCacheError(f"teacher cache {path} is incomplete (its build was interrupted): rebuild it",
                                [(MANIFEST, "incomplete")])
    problems = verify_shards(path, manifest)
    if problems:
        listing = "; ".join(f"{f}: {why}" for f, why in problems)
        raise CorruptCacheError(f"teacher cache {path} has bad shards ({listing}): rebuild them with "
                                "build_teacher_cache", problems)
    return TeacherCache(path, manifest)


# ------------------------------------------------------------------------------------------------------- writer


@torch.no_grad()
def _teacher_outputs(model, windows, settings, batch_size):
    """Per window: (topk values, topk indices int32, logsumexp, {layer: hidden}) from one right-padded batch run.

    The forward runs under `compute_context(model, "auto")`: a teacher resident in bf16 multiplies in fp32 on a CPU
    without native bf16 matmuls (about 7x faster there). The outputs go to disk, so their inference-mode flag never
    reaches a loss.
    """
    from nexus.conversion.peak_rss import release_freed_memory
    from nexus.conversion.probes.compute_mode import compute_context
    from nexus.conversion.probes.token_scores import (
        FULL_LOGIT_BUDGET,
        _sliced_head_layout,
    )

    value_dtype, hidden_dtype = _DTYPES[settings.value_dtype], _DTYPES[settings.hidden_dtype]
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    if settings.k > vocab:
        raise ValueError(f"k={settings.k} is larger than the teacher's vocabulary ({vocab})")
    # A 262k-token head over a batch of 8 x 256 positions is 2 GB of fp32 logits, four times Gemma-3-270M's bf16
    # weights: where the head is exactly lm_head(final state) (+ softcap), only FULL_LOGIT_BUDGET logits exist at once.
    layout = _sliced_head_layout(model)
    if layout is not None:
        head, cap = layout[1], layout[2]

        def logits_of(h):
            logits = head(h)
            return torch.tanh(logits / cap) * cap if cap else logits
    out = []
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        for w in chunk:
            if int(w.max()) >= vocab:
                raise ValueError(f"a window has token id {int(w.max())} but the teacher's vocabulary has {vocab} "
                                 "entries: the windows must use the teacher's tokenizer")
        T = max(w.numel() for w in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, w in enumerate(chunk):
            ids[r, :w.numel()], mask[r, :w.numel()] = w, 1
        with compute_context(model, "auto"):  # bf16 weights: fp32 matmuls where the CPU has no native bf16
            if layout is not None:  # the body once, the head a few positions at a time (below)
                res = layout[0](input_ids=ids.to(device), attention_mask=mask.to(device),
                                output_hidden_states=bool(settings.layers), use_cache=False)
                states = res.last_hidden_state  # (B, T, H)
            else:
                res = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            output_hidden_states=bool(settings.layers), use_cache=False)
                states = res.logits  # (B, T, V), the teacher's dtype
            hidden = {}
            for L in settings.layers:
                if not -len(res.hidden_states) <= L < len(res.hidden_states):
                    raise ValueError(f"layers: {L} is out of range; the teacher has {len(res.hidden_states)} hidden "
                                     "states (0 = embeddings ... last = final normed state)")
                hidden[L] = res.hidden_states[L]
            span = max(1, FULL_LOGIT_BUDGET // vocab)  # positions whose full-vocabulary fp32 logits exist at once
            for r, w in enumerate(chunk):
                n = w.numel()
                parts = [[], [], []]
                for start in range(0, n, span):
                    piece = states[r, start:min(start + span, n)]
                    row = (logits_of(piece) if layout is not None else piece).float()  # (<=span, V)
                    values, indices = row.topk(settings.k, dim=-1)  # sorted
                    parts[0].append(values.to(value_dtype).cpu())
                    parts[1].append(indices.to(torch.int32).cpu())
                    parts[2].append(torch.logsumexp(row, dim=-1).cpu())
                    del row
                with torch.autocast(device.type, enabled=False):  # autocast's cat refuses fp16 parts under bf16
                    out.append((torch.cat(parts[0]), torch.cat(parts[1]), torch.cat(parts[2]),
                                {L: h[r, :n].to(hidden_dtype).cpu() for L, h in hidden.items()}))
        del res, states
        # hand the batch's freed temporaries (logit slices of up to FULL_LOGIT_BUDGET floats) back to the OS: between
        # the small outputs kept per window, glibc otherwise keeps them and RSS grew ~1.2 MiB per window on Gemma-3-270M
        release_freed_memory()
    return out


def _write_shard(path, file, windows, outputs):
    tensors = {
        "input_ids": torch.cat(windows).to(torch.int32),
        "window_offsets": torch.tensor([0] + [int(x) for x in torch.tensor([w.numel() for w in windows]).cumsum(0)],
                                       dtype=torch.int64),
        "topk_values": torch.cat([o[0] for o in outputs]),
        "topk_indices": torch.cat([o[1] for o in outputs]),
        "logsumexp": torch.cat([o[2] for o in outputs]).float(),
    }
    for L in outputs[0][3]:
        tensors[f"hidden.{L}"] = torch.cat([o[3][L] for o in outputs])
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    with atomic_file(Path(path) / file) as tmp:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
        data = Path(tmp).read_bytes()
    return {"sha256": _file_sha256(data), "bytes": len(data), "tensor_bytes": sizes}


def _write_manifest(path, manifest):
    with atomic_file(Path(path) / MANIFEST) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1))


def _progress(disable=False):
    from ..conversion.progress_bar import progress_with_columns

    return progress_with_columns(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("tokens"), TimeRemainingColumn(), console=_console, transient=True,
                                 enabled=not disable)


def build_teacher_cache(path, teacher, windows, *, tokenizer=None, settings: CacheSettings | None = None,
                        teacher_fingerprint=None, batch_size=4, progress=True, description="teacher cache"):
    """Build (or resume, or repair) the teacher-output cache at ``path`` and return it opened.

    ``teacher``: a loaded HF causal LM, or a zero-argument callable that loads one (then it is only called when
    something must be computed, and ``teacher_fingerprint`` is required). The caller frees the teacher afterwards;
    only this one teacher is resident. ``windows``: see `prepare_windows` (token rows in the teacher's
    tokenization, or text chunks with the teacher's ``tokenizer``). ``teacher_fingerprint``: defaults to
    `model_fingerprint(teacher)`.

    A finished cache with the same key and good shards is returned without running the teacher. Shards that are
    missing, corrupt or truncated are reported (``cache.report``, and a line on stderr) and recomputed; a cache with
    another key is rebuilt from scratch. Memory: the teacher's logits for one batch (batch_size × T × vocab) plus
    one row of them in float32.
    """
    settings = settings or CacheSettings()
    if not isinstance(settings, CacheSettings):
        settings = CacheSettings.model_validate(settings)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    windows = prepare_windows(windows, tokenizer, settings.max_length)
    if teacher_fingerprint is None:
        if callable(teacher) and not isinstance(teacher, torch.nn.Module):
            raise ValueError("teacher is a loader: pass teacher_fingerprint= (e.g. a hash of its files) so the "
                             "cache key is known without loading it")
        teacher_fingerprint = model_fingerprint(teacher)
    data_fp = data_fingerprint(windows)
    key = cache_key(teacher_fingerprint, data_fp, settings)
    plan = _shard_plan(windows, settings.tokens_per_shard)
    report = []

    try:
        old = _read_manifest(path)
    except CorruptCacheError as exc:
        report.append({"file": MANIFEST, "problem": str(exc), "action": "rebuilt"})
        old = None
    done = {}
    if old is not None and old.get("key") == key:
        problems = verify_shards(path, old)
        bad = {f for f, _ in problems}
        for f, why in problems:
            report.append({"file": f, "problem": why, "action": "rebuilt"})
        done = {e["file"]: e for e in old["shards"] if e["file"] not in bad}
        if old.get("complete") and not bad:
            return TeacherCache(path, old)
    elif old is not None:
        report.append({"file": MANIFEST, "problem": f"stale cache (key {old.get('key', '?')[:12]} != {key[:12]})",
                       "action": "rebuilt"})
        for f in path.glob("shard-*.safetensors"):
            f.unlink()
    for item in report:
        _console.print(f"[yellow]teacher cache {path}: {item['file']}: {item['problem']} -> {item['action']}")

    manifest = {
        "format": CACHE_FORMAT_VERSION,
        "key": key,
        "complete": False,
        "teacher": {"fingerprint": teacher_fingerprint},
        "data": {"fingerprint": data_fp, "n_windows": len(windows), "n_tokens": int(sum(w.numel() for w in windows))},
        "settings": settings.model_dump(mode="json"),
        "shards": [],
        "events": (old["events"] if old is not None and old.get("key") == key else []) + report,
    }
    files = [f"shard-{i:05d}.safetensors" for i in range(len(plan))]
    todo = [i for i, f in enumerate(files) if f not in done]
    model = None
    if todo:
        model = teacher() if callable(teacher) and not isinstance(teacher, torch.nn.Module) else teacher
        model.eval()
        manifest["teacher"].update(_teacher_facts(model))
    else:  # every shard was already good (an interrupted build that wrote them all): keep the recorded facts
        manifest["teacher"] = old["teacher"]
    n_todo = sum(sum(w.numel() for w in windows[a:b]) for i, (a, b) in enumerate(plan) if i in todo)
    with _progress(disable=not (progress and todo)) as bar:
        task = bar.add_task(description, total=n_todo)
        for i, (a, b) in enumerate(plan):
            if i in todo:
                outputs = _teacher_outputs(model, windows[a:b], settings, batch_size)
                facts = _write_shard(path, files[i], windows[a:b], outputs)
                done[files[i]] = {"file": files[i], "windows": [a, b],
                                  "tokens": int(sum(w.numel() for w in windows[a:b])), **facts}
                bar.advance(task, done[files[i]]["tokens"])
                manifest["shards"] = [done[f] for f in files if f in done]
                _write_manifest(path, manifest)
    manifest["shards"] = [done[f] for f in files]
    manifest.update(_size_facts(manifest))
    manifest["complete"] = True
    _write_manifest(path, manifest)
    cache = open_teacher_cache(path)
    cache.report = report
    return cache


def _teacher_facts(model):
    cfg = getattr(model, "config", None)
    return {"vocab_size": int(model.get_output_embeddings().weight.shape[0]),
            "hidden_size": int(getattr(cfg, "hidden_size", 0) or 0),
            "model_type": getattr(cfg, "model_type", None),
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None)}


def _size_facts(manifest):
    """Bytes per token: the whole shard files, and per stored tensor."""
    tokens = manifest["data"]["n_tokens"]
    total = sum(s["bytes"] for s in manifest["shards"])
    parts = {}
    for s in manifest["shards"]:
        for name, n in s["tensor_bytes"].items():
            key = "hidden" if name.startswith("hidden.") else name
            parts[key] = parts.get(key, 0) + n
    return {"total_bytes": total, "bytes_per_token": total / max(tokens, 1),
            "bytes_per_token_parts": {k: v / max(tokens, 1) for k, v in sorted(parts.items())}}


def topk_mass(window):
    """Per token, the teacher's true probability mass inside its stored top-k (at temperature 1): (T,) float32."""
    v = window["topk_values"].float()
    return torch.exp(torch.logsumexp(v, -1) - window["logsumexp"]).clamp(max=1.0)

