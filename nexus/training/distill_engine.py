"""The distillation training engine: accelerate, gradient accumulation, AdamW + warm-up/cosine, clipping, a NaN/inf
guard, checkpoints with exact resume, in-process preservation, a rich progress bar.

    log = train_student(model, loss_module, batches, EngineOptions(steps=1000), "runs/demo/distill")

**Batches are a function of the step.** ``batches(i)`` (a callable, or anything with ``__getitem__``) returns the
``i``-th *global* micro-batch, a dict of tensors (``input_ids``, ``attention_mask``, ``labels``, ``capability``,
teacher top-k ...). Optimizer step ``s`` (0-based) consumes micro-batches ``s * A .. s * A + A - 1`` (``A`` =
``micro_batches_per_step``). With ``N`` processes each takes its ``1/N`` slice of the rows, so the global batch, and
up to float summation order the trajectory, do not depend on the process count. A resumed run asks for exactly the
micro-batches the uninterrupted run would have used.

**The loss** is ``loss_module(outputs, batch) -> (loss tensor, {part: float})``; ``outputs`` comes from
``forward(model, batch)`` (default `forward_batch`: ``input_ids``/``attention_mask``, and ``tower=`` when the batch
carries a ``tower`` entry). A loss module's own parameters (hidden-state projections) are optimised with the model,
clipped with it, averaged over ranks and checkpointed (``loss_module.safetensors``).

**Exact resume.** A checkpoint (``run_dir/checkpoints/step-XXXXXXXX/``, written atomically, the newest
``keep_last`` kept) holds the weights (``model.safetensors``), the AdamW state (``optimizer.safetensors`` for the
tensors + ``optimizer.json`` for the hyper-parameters), the LR schedule (``scheduler.json``), every rank's RNG state
(``rng.safetensors`` / ``rng.json``) and ``trainer_state.json`` (step, token count, loss curve, skipped steps, the
options). No pickle anywhere. Restarting with the same options continues from the newest checkpoint and reaches
bit-identical weights; changed options that alter the trajectory are refused, naming the fields.

**NaN/inf guard.** A step whose loss (on any rank, any micro-batch) or global gradient norm is not finite is skipped:
no optimizer update, gradients zeroed, the LR schedule still advances (it is a function of the step), the step is
counted and logged (``"skipped": true`` with the reason). ``max_consecutive_skips`` skips in a row abort the run.

**Keeping the best weights.** With ``evaluate`` (``evaluate(model) -> float``, lower is better: the distill stage's
held-out cross-entropy), the model is scored after every checkpoint step; each new best is written to
``run_dir/best/`` (weights + ``best.json``, atomically) and the run ends with the best-scored weights instead of the
last ones. The scores and the best step are in the trainer state, so a resumed run keeps them. It guards against
overfitting only as far as the score sees it: on Gemma-3-270M at 0.25, 300 steps on a 30k-token text lowered the
probe's retention while the held-out rows' loss (the training files' last chunks) kept falling (bench/RESULTS.md §5).

**Run log.** ``run_dir/run_log.jsonl``: one JSON line per step (loss, parts, lr, grad norm, tokens, skipped) and
events (start, resume, checkpoint). ``run_dir/train_log.json``: the returned summary.

**Multi-process on CPU (accelerate 1.16).** ``accelerate launch --cpu --num_processes 2 script.py`` starts ONE process
(the ``--cpu`` path uses the single-process launcher unless an MPI hostfile is given; the `nexus` commands re-execute
themselves as N processes then, see `rank_zero_first.py`). What works for any script::

    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 29511 script.py
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 script.py

Both start two processes through torch.distributed.run; the engine builds ``Accelerator(cpu=True)`` when there is no
GPU, which makes accelerate pick ``MULTI_CPU`` with the gloo backend. (Without ``cpu=True`` accelerate falls back
to ``DistributedType.NO`` and each process silently trains alone; the engine refuses that case, and FSDP / DeepSpeed
too: see `check_ddp_only`.) DDP wraps ``forward(model, batch)`` as a whole (`_ForwardCall`), so a forward that uses
parameters besides ``model(...)`` (the distill stage's router logits) is one DDP forward. DDP's
``find_unused_parameters`` is on by default only for multi-tower Nexus models (a batch routed to one tower leaves
the others without gradients); it costs a graph traversal per step.

**Speed** (tiny students, 1 thread; each figure a ratio within one run, medians of 3 interleaved rounds, two
runs): the engine runs at 0.97-1.03x a plain fwd+bwd+clip+AdamW loop, and at 0.88-0.95x a bare fwd+bwd loop on an
h128/4-layer student with 1024-token batches (0.68-0.72x on the h32 test model, where the optimizer step dominates).
"""

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

from nexus.conversion.atomic_output import atomic_dir, atomic_file
from nexus.conversion.load_check import (
    check_load_report,
    checked_load_file,
    checked_load_state_dict,
)

from .distill_options import RESUME_FREE_FIELDS, EngineOptions
from .forward_batch import forward_batch
from .preservation import Preservation, canonical_parameters
from .rank_zero_first import finish_follower, release_followers

CHECKPOINT_PREFIX = "step-"
RUN_LOG = "run_log.jsonl"
TRAIN_LOG = "train_log.json"
ANCHOR_FILE = "preservation_anchor.safetensors"
BEST_DIR = "best"  # the best-scored weights so far (``evaluate``)
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------ batches, forward


def fetch_batch(batches, index):
    """The ``index``-th global micro-batch of a callable or indexable source, checked."""
    batch = batches(index) if callable(batches) else batches[index]
    if not isinstance(batch, dict) or not torch.is_tensor(batch.get("input_ids")):
        raise ValueError(f"batch {index}: expected a dict with an 'input_ids' tensor, got {type(batch).__name__}")
    return batch


def shard_batch(batch, rank, world, device):
    """This rank's slice of the rows of every tensor whose first dimension is the batch size (nested dicts too,
    e.g. ``teacher_hidden``), moved to ``device``."""
    rows = batch["input_ids"].shape[0]
    if rows % world:
        raise ValueError(f"the global batch has {rows} rows, not divisible by {world} processes")
    per = rows // world

    def part(v):
        if isinstance(v, dict):
            return {k: part(x) for k, x in v.items()}
        if torch.is_tensor(v):
            if world > 1 and v.ndim >= 1 and v.shape[0] == rows:
                v = v[rank * per:(rank + 1) * per]
            return v.to(device)
        return v

    return part(batch)


def batch_tokens(batch):
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


# -------------------------------------------------------------------------------------------------- schedule


def lr_factor(step, options):
    """LR multiplier of 0-based optimizer step ``step``: linear warm-up, then cosine from 1 to ``min_lr_ratio``."""
    warm = options.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, options.steps - warm - 1))
    return options.min_lr_ratio + (1.0 - options.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, options, loss_module=None):
    """AdamW with weight decay on matrices except embeddings, none on vectors (norms, biases) and embeddings.

    Trainable parameters of ``loss_module`` (e.g. hidden-state projections) are optimised with the same rule.
    """
    decay, no_decay = [], []
    for module in (model, loss_module if isinstance(loss_module, torch.nn.Module) else None):
        for name, p in (module.named_parameters() if module is not None else []):
            if p.requires_grad:
                (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=tuple(options.betas), eps=options.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, options))
    return optimizer, schedule


def resolve_autocast(choice, device_type="cpu"):
    """'auto' -> 'bf16' only with native bf16 compute (AVX512-BF16/AMX CPU, bf16 GPU), else 'off'."""
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    from nexus.conversion.probes.compute_mode import native_bf16_matmul

    return "bf16" if native_bf16_matmul() else "off"


# ----------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(run_dir):
    """Finished checkpoints of ``run_dir``, oldest first, as (step, folder)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and (d / "trainer_state.json").is_file():
                try:
                    found.append((int(d.name[len(CHECKPOINT_PREFIX):]), d))
                except ValueError:
                    continue
    return sorted(found)


def _optimizer_files(optimizer):
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer, folder):
    path = folder / "optimizer.safetensors"
    tensors = checked_load_file(path)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    unexpected, mismatched = [], []
    for key, t in tensors.items():
        idx = key.split(".", 1)[0]
        if not idx.isdigit() or int(idx) >= len(params):
            unexpected.append(key)
        elif t.ndim and tuple(t.shape) != tuple(params[int(idx)].shape):
            mismatched.append((key, tuple(t.shape), tuple(params[int(idx)].shape)))
    check_load_report((), unexpected, path, "checkpoint", mismatched)
    meta = json.loads((folder / "optimizer.json").read_text())
    state = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _load_weights(module, path, device):
    """Resume ``module`` from ``path``: every tensor present, of the right shape, finite (else LoadCheckError)."""
    # (a multi-process CPU run's device is "cpu:0", which safetensors refuses: CPU tensors load as "cpu")
    where = "cpu" if torch.device(device).type == "cpu" else str(device)
    checked_load_state_dict(module, load_file(path, device=where), path, what="checkpoint")


def _load_rng(path, rank):
    tensors = checked_load_file(path)
    check_load_report([k for k in (f"torch.{rank}", f"numpy_keys.{rank}") if k not in tensors], (), path)
    return tensors


def _load_anchor(path, model):
    """The preservation anchor theta*: finite, and each tensor a parameter of ``model`` of the same shape."""
    anchor = checked_load_file(path, what="preservation anchor")
    params, _ = canonical_parameters(model)
    check_load_report((), [k for k in anchor if k not in params], path, "preservation anchor",
                      [(k, tuple(v.shape), tuple(params[k].shape)) for k, v in anchor.items()
                       if k in params and tuple(v.shape) != tuple(params[k].shape)])
    return anchor


def _rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": random.getstate()}


def _set_rng_state(tensors, meta, rank):
    torch.set_rng_state(tensors[f"torch.{rank}"])
    name, pos, has_gauss, cached = meta["numpy"][rank]
    np.random.set_state((name, tensors[f"numpy_keys.{rank}"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"][rank]
    random.setstate((version, tuple(internal), gauss))


def _json_safe(x):
    return x if x is None or math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------------ engine


def _line_step(line):
    """The step of a run-log line; a torn last line (a crash mid-write) counts as past every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class _RunLog:
    """The JSONL run log, written by the main process only; flushed every line."""

    def __init__(self, path, enabled, keep_until_step=None):
        self.path, self.enabled, self.fh = Path(path), enabled, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is None:
            self.path.write_text("")
        elif self.path.exists():  # resuming: drop the lines past the checkpoint, they will be redone
            kept = [ln for ln in self.path.read_text().splitlines() if _line_step(ln) <= keep_until_step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in kept))
        self.fh = open(self.path, "a")  # noqa: SIM115 -- kept open for the run, closed by close()

    def write(self, record):
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def check_ddp_only(distributed_type):
    """Refuse FSDP / DeepSpeed: the engine builds its optimizer before ``prepare()`` and clips gradients itself, which
    is right for DDP's replicated parameters and wrong for sharded ones."""
    kind = getattr(distributed_type, "value", str(distributed_type))
    if kind in ("FSDP", "DEEPSPEED"):
        raise ValueError(f"accelerate distributed_type {kind}: the distillation engine runs DDP only (its optimizer "
                         "and gradient clipping are not prepared for sharded parameters); launch without the "
                         "FSDP/DeepSpeed config (e.g. nexus/training/accelerate_configs/ddp_cpu.yaml)")


def _make_accelerator(options, model):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    find_unused = options.find_unused_parameters
    if find_unused is None:  # auto: a multi-tower Nexus model leaves the towers a batch does not use without grads
        find_unused = len(getattr(getattr(model, "config", None), "towers", None) or []) > 1
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="no",  # autocast is applied by the engine itself (see EngineOptions.autocast)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    check_ddp_only(accelerator.distributed_type)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"launched with WORLD_SIZE={launched} but accelerate set up {accelerator.num_processes} "
                           "process(es); on CPU launch with `accelerate launch --multi_gpu --num_processes N` or "
                           "`torchrun --nproc_per_node N` (not `accelerate launch --cpu`)")
    return accelerator


class _ForwardCall(torch.nn.Module):
    """``forward(model, batch)`` as one module call, so that DDP wraps the whole of it.

    A custom forward may use parameters outside ``model(...)`` (the distill stage calls the router on the batch's
    embeddings besides the tower forward). Called on a bare DDP-wrapped model, those uses happen outside DDP's
    forward: with ``find_unused_parameters`` DDP marks the router unused, then its gradient arrives in backward and
    DDP stops with "Expected to mark a variable ready only once". Wrapped here, every use is inside one DDP forward,
    and every tensor of the outputs (a ModelOutput, a dict or any object with attributes) is handed to DDP's
    unused-parameter search.
    """

    def __init__(self, model, forward):
        super().__init__()
        self.model, self.call = model, forward

    def forward(self, batch):
        outputs = self.call(self.model, batch)
        found = vars(outputs) if not isinstance(outputs, (dict, tuple, list)) and hasattr(outputs, "__dict__") \
            else outputs
        return outputs, [t for t in _tensors_of(found) if t.requires_grad]


def _tensors_of(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors_of(x)]
    return []


def _options_mismatch(saved, current):
    return sorted(k for k in set(saved) | set(current)
                  if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k))


def train_student(model, loss_module, batches, options, run_dir, *, preservation=None, forward=None, resume=True,
                  progress=True, accelerator=None, description="distill", evaluate=None):
    """Train ``model`` in place for ``options.steps`` optimizer steps; returns the training log (a dict).

    ``preservation``: a `Preservation` (or None); ``forward(model, batch) -> outputs`` replaces `forward_batch`;
    ``resume``: continue from the newest checkpoint in ``run_dir`` (False refuses a folder that has one);
    ``evaluate(model) -> float`` (lower is better): score the model at every checkpoint step and end with the
    best-scored weights (see "Keeping the best weights" above).
    """
    options = options if isinstance(options, EngineOptions) else EngineOptions(**options)
    preservation = preservation or Preservation({"mode": "off"})
    run_dir = Path(run_dir)
    accelerator = accelerator or _make_accelerator(options, model)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    autocast_mode = resolve_autocast(options.autocast, device.type)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast_mode == "bf16" \
        else contextlib.nullcontext
    if forward is None:
        def forward(m, b):
            return forward_batch(m, b, options.output_hidden_states)

    accum = options.micro_batches_per_step
    if not callable(batches) and hasattr(batches, "__len__") and len(batches) < options.steps * accum:
        raise ValueError(f"the batch source holds {len(batches)} micro-batches; {options.steps} steps x "
                         f"{accum} micro-batches per step need {options.steps * accum}")
    options_json = options.model_dump(mode="json")
    fingerprint = preservation.fingerprint()
    model.to(device)
    checkpointing = options.gradient_checkpointing and not getattr(model, "is_activation_checkpointing", False)
    if checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing is on but {type(model).__name__} does not support it")
    if checkpointing:  # switched off again at the end; a model that came in checkpointed stays so
        model.activation_checkpointing_enable({"use_reentrant": False})
    loss_state = isinstance(loss_module, torch.nn.Module) and bool(loss_module.state_dict())
    loss_params = []
    if isinstance(loss_module, torch.nn.Module):
        loss_module.to(device).train()
        loss_params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer, schedule = build_optimizer(model, options, loss_module)

    # ------------------------------------------------------------------ fresh start or resume
    checkpoints = list_checkpoints(run_dir)
    state = {"step": 0, "tokens": 0, "losses": [], "skipped": [], "sessions": 0}
    anchor_state = None
    if checkpoints and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints (newest: {checkpoints[-1][1].name}); "
                              "pass resume=True to continue it or choose another run folder")
    if checkpoints:
        folder = checkpoints[-1][1]
        saved = json.loads((folder / "trainer_state.json").read_text())
        changed = _options_mismatch(saved["options"], options_json)
        if changed:
            raise ValueError(f"cannot resume {folder}: option(s) {changed} differ from the checkpoint's "
                             f"({ {k: saved['options'].get(k) for k in changed} }); restore them or use another run folder")
        if saved["world_size"] != world:
            raise ValueError(f"cannot resume {folder} exactly: it was written by {saved['world_size']} process(es), "
                             f"this run has {world}")
        if saved["preservation"] != fingerprint:
            raise ValueError(f"cannot resume {folder}: the preservation options or importance scores changed")
        _load_weights(model, folder / "model.safetensors", device)
        if loss_state:
            if not (folder / "loss_module.safetensors").is_file():
                raise FileNotFoundError(f"cannot resume {folder}: the loss module has parameters/buffers but the "
                                        "checkpoint has no loss_module.safetensors")
            _load_weights(loss_module, folder / "loss_module.safetensors", device)
        _load_optimizer(optimizer, folder)
        schedule.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
        rng_meta = json.loads((folder / "rng.json").read_text())
        _set_rng_state(_load_rng(folder / "rng.safetensors", rank), rng_meta, rank)
        state = saved["state"]
        if preservation.options.mode == "anchor":
            if not (run_dir / ANCHOR_FILE).is_file():
                raise FileNotFoundError(f"cannot resume {folder}: the anchor weights {run_dir / ANCHOR_FILE} "
                                        "of the preservation penalty are missing")
            anchor_state = _load_anchor(run_dir / ANCHOR_FILE, model)
    else:
        torch.manual_seed(options.seed)
        random.seed(options.seed)
        np.random.seed(options.seed)
    resumed_from = state["step"] if checkpoints else None
    preservation.attach(model, optimizer, anchor_state=anchor_state)
    try:
        if main and preservation.options.mode == "anchor" and anchor_state is None:
            with atomic_file(run_dir / ANCHOR_FILE) as tmp:
                save_file(preservation.anchor_state(), str(tmp))
        state["sessions"] += 1
        log = _RunLog(run_dir / RUN_LOG, main, keep_until_step=resumed_from)
        log.write({"step": state["step"], "event": "resume" if checkpoints else "start", "world_size": world,
                   "autocast": autocast_mode, "options": options_json})
        release_followers(accelerator)  # ranks > 0 of a `nexus` command start their stage work now (rank_zero_first)
        wrapped = accelerator.prepare(_ForwardCall(model, forward))
    except BaseException:
        preservation.detach()
        raise
    params = [p for p in model.parameters() if p.requires_grad] + loss_params

    def save_checkpoint():
        rng = [_rng_state()]
        if world > 1:
            from accelerate.utils import gather_object
            rng = gather_object(rng)
        if main:
            target = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
            with atomic_dir(target, overwrite=True) as tmp:
                save_model(model, str(tmp / "model.safetensors"))
                if loss_state:
                    save_model(loss_module, str(tmp / "loss_module.safetensors"))
                tensors, meta = _optimizer_files(optimizer)
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                (tmp / "optimizer.json").write_text(json.dumps(meta))
                (tmp / "scheduler.json").write_text(json.dumps(schedule.state_dict()))
                rng_tensors = {f"torch.{r}": s["torch"] for r, s in enumerate(rng)}
                rng_tensors.update({f"numpy_keys.{r}": s["numpy_keys"] for r, s in enumerate(rng)})
                save_file(rng_tensors, str(tmp / "rng.safetensors"))
                (tmp / "rng.json").write_text(json.dumps({"numpy": [s["numpy"] for s in rng],
                                                          "python": [s["python"] for s in rng]}))
                (tmp / "trainer_state.json").write_text(json.dumps({
                    "version": STATE_VERSION, "options": options_json, "world_size": world,
                    "preservation": fingerprint, "state": state}))
            for _, old in list_checkpoints(run_dir)[:-options.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.write({"step": state["step"], "event": "checkpoint", "path": str(target)})
        accelerator.wait_for_everyone()

    def score_and_keep_best():
        """``evaluate`` the model now; a new best (lower) score writes its weights to ``run_dir/best/``."""
        model.eval()
        try:
            score = float(evaluate(model))
        finally:
            wrapped.train()
        state.setdefault("evaluations", []).append([state["step"], _json_safe(score)])
        best = state.get("best")
        if math.isfinite(score) and (best is None or score < best["score"]):
            state["best"] = {"step": state["step"], "score": score}
            if main:
                with atomic_dir(run_dir / BEST_DIR, overwrite=True) as tmp:
                    save_model(model, str(tmp / "model.safetensors"))
                    (tmp / "best.json").write_text(json.dumps(state["best"]))
            accelerator.wait_for_everyone()
        log.write({"step": state["step"], "event": "evaluation", "score": _json_safe(score),
                   "best_step": (state.get("best") or {}).get("step")})

    # ------------------------------------------------------------------ the loop
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..conversion.progress_bar import progress_with_columns

    bar = progress_with_columns(
        TextColumn(description), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s  skipped {task.fields[skips]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), enabled=bool(progress and main))
    consecutive, session_tokens, checkpoint_seconds, evaluation_seconds = 0, 0, 0.0, 0.0
    start = time.perf_counter()
    wrapped.train()
    try:
        with bar:
            task = bar.add_task("train", total=options.steps, completed=state["step"], loss=float("nan"), tps=0.0,
                                skips=len(state["skipped"]))
            while state["step"] < options.steps:
                step = state["step"]
                loss_sum, tokens, nonfinite, parts_sum = 0.0, 0, 0.0, {}
                for m in range(accum):
                    batch = shard_batch(fetch_batch(batches, step * accum + m), rank, world, device)
                    sync = contextlib.nullcontext() if m == accum - 1 else accelerator.no_sync(wrapped)
                    with sync:
                        with autocast():
                            outputs, _ = wrapped(batch)
                        loss, parts = loss_module(outputs, batch)
                        accelerator.backward(loss / accum)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        nonfinite = 1.0
                    loss_sum += value / accum
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / accum
                    tokens += batch_tokens(batch)
                if world > 1 and loss_params:  # DDP averages the model's gradients; the loss module's, here
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in loss_params]
                    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
                    for p, g in zip(loss_params, flat.split([g.numel() for g in grads])):
                        p.grad = g.view_as(p).clone()
                keys = sorted(parts_sum)
                packed = torch.tensor([loss_sum, float(tokens), nonfinite] + [parts_sum[k] for k in keys],
                                      dtype=torch.float64, device=device)
                if world > 1:
                    packed = accelerator.reduce(packed, reduction="sum")
                loss_value = float(packed[0]) / world
                tokens, nonfinite = int(packed[1]), float(packed[2]) > 0
                parts_mean = {k: float(packed[3 + i]) / world for i, k in enumerate(keys)}

                reason, grad_norm = None, None
                if nonfinite:
                    reason = "non-finite loss"
                else:
                    anchor = preservation.add_penalty_grad()
                    if preservation.options.mode == "anchor":
                        parts_mean["anchor"] = anchor
                        loss_value += anchor
                    if options.max_grad_norm is not None:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm))
                    else:
                        grad_norm = float(torch.nn.utils.get_total_norm(
                            [p.grad for p in params if p.grad is not None]))
                    if not math.isfinite(grad_norm):
                        reason = "non-finite gradient norm"
                lr = optimizer.param_groups[0]["lr"]
                if reason is None:
                    optimizer.step()
                    consecutive = 0
                else:
                    consecutive += 1
                    state["skipped"].append({"step": step + 1, "reason": reason})
                with warnings.catch_warnings():  # after a skipped first step torch warns "scheduler before optimizer"
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                    schedule.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] = step + 1
                state["tokens"] += tokens
                session_tokens += tokens
                state["losses"].append([step + 1, _json_safe(loss_value)])
                log.write({"step": step + 1, "loss": _json_safe(loss_value),
                           "parts": {k: _json_safe(v) for k, v in parts_mean.items()}, "lr": lr,
                           "grad_norm": None if grad_norm is None else _json_safe(grad_norm), "tokens": tokens,
                           "skipped": reason is not None, **({"reason": reason} if reason else {})})
                if reason is not None and main and progress:
                    bar.console.print(f"  step {step + 1}: skipped ({reason})")
                if consecutive >= options.max_consecutive_skips:
                    raise FloatingPointError(f"{consecutive} consecutive steps skipped by the NaN/inf guard "
                                             f"(last: step {step + 1}, {reason}); see {run_dir / RUN_LOG}")
                elapsed = time.perf_counter() - start - checkpoint_seconds - evaluation_seconds
                bar.update(task, advance=1, loss=loss_value, tps=session_tokens / max(elapsed, 1e-9),
                           skips=len(state["skipped"]))
                if state["step"] % options.checkpoint_every == 0 or state["step"] == options.steps:
                    if evaluate is not None:  # before the checkpoint, so that its state holds this score
                        began = time.perf_counter()
                        score_and_keep_best()
                        evaluation_seconds += time.perf_counter() - began
                    began = time.perf_counter()
                    save_checkpoint()
                    checkpoint_seconds += time.perf_counter() - began
    finally:
        log.close()
        preservation.detach()
        if checkpointing:
            model.activation_checkpointing_disable()
    wall = time.perf_counter() - start
    wrapped.eval()
    best, restored = state.get("best"), False
    if evaluate is not None and best is not None and best["step"] != state["step"]:
        saved = json.loads((run_dir / BEST_DIR / "best.json").read_text())
        if saved["step"] != best["step"]:
            raise RuntimeError(f"{run_dir / BEST_DIR} holds step {saved['step']}, the trainer state names step "
                               f"{best['step']} as the best: remove the run folder and train again")
        _load_weights(model, run_dir / BEST_DIR / "model.safetensors", device)
        restored = True
    finite = [x for _, x in state["losses"] if x is not None]
    summary = {
        "steps": state["step"], "tokens": state["tokens"], "session_tokens": session_tokens,
        "wall_seconds": wall, "checkpoint_seconds": checkpoint_seconds, "evaluation_seconds": evaluation_seconds,
        "tokens_per_second": (session_tokens / max(wall - checkpoint_seconds - evaluation_seconds, 1e-9)
                              if session_tokens else None),
        "skipped_steps": len(state["skipped"]), "skipped": state["skipped"], "losses": state["losses"],
        "first_loss": finite[0] if finite else None, "final_loss": finite[-1] if finite else None,
        "resumed_from": resumed_from, "world_size": world, "autocast": autocast_mode,
        "preservation": preservation.options.mode, "threads": torch.get_num_threads(),
        "run_log": str(run_dir / RUN_LOG), "checkpoints": [str(p) for _, p in list_checkpoints(run_dir)],
        "evaluations": state.get("evaluations", []), "best": best, "restored_best": restored,
    }
    if main:
        with atomic_file(run_dir / TRAIN_LOG) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
    finish_follower(accelerator)  # a rank > 0 of a `nexus` command stops here: rank 0 alone writes the outputs
    return summary
