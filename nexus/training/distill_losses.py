"""Distillation losses, each a small `nn.Module`, and `DistillLoss`: their weighted mix, set by a typed `LossMix`.

Losses are plugins in an explicit registry (`LOSSES`, `register_loss`): each class has a ``part`` (``"kd"``,
``"ce"``, ``"hidden"`` or ``"router"``) and a ``from_mix(mix, **context)`` constructor. The built-ins:

| name           | part   | what it compares                                                                     |
|----------------|--------|--------------------------------------------------------------------------------------|
| `forward_kl`   | kd     | KL(teacher ‖ student) on the teacher's top-k, with temperature (Hinton et al. 2015)  |
| `jsd`          | kd     | generalised Jensen-Shannon divergence on the top-k (GKD, Agarwal et al. 2024)         |
| `ce`           | ce     | next-token cross-entropy on the data labels                                          |
| `hidden_align` | hidden | student hidden states through learned linear projections vs. the teacher's (FitNets) |
| `router`       | router | cross-entropy of the router's logits against the capability labels                   |

**How the tail outside the teacher's top-k is handled.** The cache keeps only the teacher's top-k logits. Both KD
losses compare two distributions over k + 1 outcomes: the k cached tokens and one *tail* bucket (every other token).
The teacher's top-k is renormalised (softmax of ``values / T`` over the k entries present), so its tail mass is 0.
The student's log-probabilities are the full-vocabulary ``log_softmax(logits / T)`` gathered at the k indices, and
its tail mass is ``1 - sum(p_topk)``. Forward KL over these k + 1 outcomes is ``sum_i q_i (log q_i - log p_i)``
(the tail term vanishes because q_tail = 0): it is >= 0 and pulls the student's mass into the teacher's top-k. JSD
includes the tail term ``(1 - beta) p_tail log(1 / (1 - beta))``. Entries whose value is ``-inf`` are absent (dropped
when mapping a teacher's top-k into the student vocabulary, or padding): they get probability 0 and the rest is
renormalised. A position whose k entries are all absent counts as masked.

**Batch contract** (what ``DistillLoss(outputs, batch)`` reads; the engine calls ``loss_module(outputs, batch)``):

``batch`` is a dict with

- ``input_ids`` (B, T) long — student token ids;
- ``attention_mask`` (B, T) — 1 for real tokens, 0 for padding;
- ``labels`` (B, T) long, -100 ignored — Hugging Face convention: *unshifted* (equal to ``input_ids`` where
  trained); the loss shifts, so ``logits[:, t]`` is scored against ``labels[:, t + 1]``;
- ``capability`` (B,) long — the router target of each row: the index of the tower that serves the row's capability
  (`NexusConfig.capability_to_tower`); -100 ignored;
- optional ``teacher_topk_values`` (B, T, k) float — the teacher's raw (untempered) logits of its top-k tokens;
- ``teacher_topk_indices`` (B, T, k) long — those tokens' ids in the STUDENT vocabulary;
- ``teacher_topk_mask`` (B, T) bool — where the teacher's top-k is valid. Teacher entries at position t are the
  teacher's distribution of the token *after* position t, so they pair with ``logits[:, t]`` with no shift;
- optional ``teacher_hidden`` {teacher_layer_int: (B, T, H_t)} — teacher hidden states aligned to the student's
  positions (Hugging Face indexing: 0 = embeddings, i = output of layer i, last = final normed state).

``outputs`` is a `NexusForCausalLM` output: ``.logits`` (B, T, V), ``.router_logits`` (B, n_towers) when the router
ran (no ``tower=`` / ``capability=`` forced), ``.hidden_states`` when called with ``output_hidden_states=True``
(Nexus indexing: entry i is the input of the tower's layer i, the last entry is the final normed state — the same
convention as Hugging Face's).

`DistillLoss` may own parameters (the hidden-state projections): give ``loss_module.parameters()`` to the optimizer
too, and save its ``state_dict`` with checkpoints.
"""

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

PARTS = ("kd", "ce", "hidden", "router")
LOSSES: dict[str, type] = {}


def register_loss(name, cls=None):
    """Add a loss class under ``name`` (usable as a decorator); a taken name is an error, never a silent override.

    The class needs ``part`` (one of `PARTS`) and a ``from_mix(mix, **context)`` classmethod, and its
    ``forward(outputs, batch)`` returns a scalar tensor.
    """

    def add(cls):
        if not isinstance(name, str) or not name:
            raise ValueError(f"loss name must be a non-empty string, got {name!r}")
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {LOSSES[name].__qualname__})")
        if getattr(cls, "part", None) not in PARTS:
            raise ValueError(f"loss {name!r}: class attribute part must be one of {PARTS}, got "
                             f"{getattr(cls, 'part', None)!r}")
        if not callable(getattr(cls, "from_mix", None)):
            raise ValueError(f"loss {name!r}: the class needs a from_mix(mix, **context) classmethod")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return add if cls is None else add(cls)


# ------------------------------------------------------------------------------------------ tensor-level functions


def masked_mean(per_token, mask):
    """Mean of ``per_token`` over the True entries of ``mask``; 0 (still in the graph) when the mask is empty."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _kd_inputs(student_logits, values, indices, mask, temperature):
    """(teacher log q, student log p at the top-k, valid mask), all (B, T, k) / (B, T), in float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher top-k shapes {tuple(values.shape)} / {tuple(indices.shape)} do not match the "
                         f"student logits {tuple(student_logits.shape)}: expected (B, T, k) for (B, T, V)")
    vocab = student_logits.shape[-1]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(f"teacher_topk_indices must be student vocabulary ids in [0, {vocab}); got range "
                         f"[{int(indices.min())}, {int(indices.max())}]: map a foreign teacher's top-k with "
                         "nexus.training.token_alignment first")
    values = values.float()
    present = torch.isfinite(values)  # (B, T, k); -inf marks an absent entry
    valid = mask.bool() & present.any(-1)  # (B, T)
    values = torch.where(present & valid[..., None], values, torch.full_like(values, -math.inf))
    values = torch.where(valid[..., None], values, torch.zeros_like(values))  # all-absent rows: harmless zeros
    log_q = torch.log_softmax(values / temperature, dim=-1)  # (B, T, k), -inf where absent
    z = student_logits.float() / temperature  # (B, T, V)
    log_p = z.gather(-1, indices.long()) - torch.logsumexp(z, dim=-1, keepdim=True)  # (B, T, k), full-vocab
    return log_q, log_p, valid


def topk_forward_kl(student_logits, values, indices, mask, temperature=1.0):
    """Per-token-mean forward KL(q ‖ p) on the teacher's top-k (see the module docstring for the tail); not T²-scaled.

    ``student_logits`` (B, T, V); ``values`` (B, T, k) teacher logits (-inf = absent); ``indices`` (B, T, k) student
    ids; ``mask`` (B, T) bool.
    """
    log_q, log_p, valid = _kd_inputs(student_logits, values, indices, mask, temperature)
    q = log_q.exp()
    safe_log_q = torch.where(q > 0, log_q, torch.zeros_like(log_q))
    per_token = (q * (safe_log_q - log_p)).sum(-1)  # (B, T)
    return masked_mean(per_token, valid)


def topk_jsd(student_logits, values, indices, mask, temperature=1.0, beta=0.5):
    """Per-token-mean generalised JSD_beta on the top-k + tail bucket; not T²-scaled.

    JSD_beta = beta KL(q ‖ m) + (1 - beta) KL(p ‖ m), m = beta q + (1 - beta) p, over the k cached tokens and the
    tail bucket (q_tail = 0, p_tail = 1 - sum p_topk). ``beta`` in (0, 1); 0.5 is the symmetric JSD.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    log_q, log_p, valid = _kd_inputs(student_logits, values, indices, mask, temperature)
    q, p = log_q.exp(), log_p.exp()
    log_m = torch.logaddexp(math.log(beta) + log_q, math.log(1.0 - beta) + log_p)  # (B, T, k)
    safe_log_q = torch.where(q > 0, log_q, torch.zeros_like(log_q))
    teacher_term = (q * (safe_log_q - log_m)).sum(-1)
    student_term = (p * (log_p - log_m)).sum(-1)
    p_tail = (-torch.expm1(torch.logsumexp(log_p, dim=-1))).clamp(min=0.0)  # (B, T)
    tail_term = p_tail * -math.log(1.0 - beta)  # p_tail log(p_tail / ((1 - beta) p_tail))
    per_token = beta * teacher_term + (1.0 - beta) * (student_term + tail_term)
    return masked_mean(per_token, valid)


def next_token_ce(logits, labels, ignore_index=-100):
    """Mean next-token cross-entropy: ``logits[:, t]`` against ``labels[:, t + 1]``; 0 when every label is ignored."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}: expected (B, T)")
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return total / (shift_labels != ignore_index).sum().clamp(min=1)


# --------------------------------------------------------------------------------------------------- loss modules


def _require(batch, key, why):
    if key not in batch or batch[key] is None:
        raise ValueError(f"batch has no {key!r}, needed by {why}")
    return batch[key]


def _kd_mask(batch):
    mask = _require(batch, "teacher_topk_mask", "the KD loss").bool()
    if batch.get("attention_mask") is not None:
        mask = mask & batch["attention_mask"].bool()
    return mask


class ForwardKLTopK(nn.Module):
    """Forward KL(teacher ‖ student) on the teacher's top-k, at ``temperature``, times T² when ``t2_scale``."""

    part: ClassVar[str] = "kd"

    def __init__(self, temperature=1.0, t2_scale=True):
        super().__init__()
        self.temperature, self.t2_scale = float(temperature), bool(t2_scale)

    @classmethod
    def from_mix(cls, mix, **context):
        return cls(mix.temperature, mix.t2_scale)

    def forward(self, outputs, batch):
        why = f"the {self.name} loss (kd weight > 0); sequence-level KD rows carry no teacher logits: set kd to 0"
        loss = topk_forward_kl(outputs.logits, _require(batch, "teacher_topk_values", why),
                               _require(batch, "teacher_topk_indices", why), _kd_mask(batch), self.temperature)
        return loss * (self.temperature ** 2 if self.t2_scale else 1.0)


class JSDTopK(ForwardKLTopK):
    """Generalised JSD_beta between teacher and student on the top-k + tail, at ``temperature`` (× T² if asked)."""

    def __init__(self, temperature=1.0, t2_scale=True, beta=0.5):
        super().__init__(temperature, t2_scale)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        self.beta = float(beta)

    @classmethod
    def from_mix(cls, mix, **context):
        return cls(mix.temperature, mix.t2_scale, mix.jsd_beta)

    def forward(self, outputs, batch):
        why = f"the {self.name} loss (kd weight > 0); sequence-level KD rows carry no teacher logits: set kd to 0"
        loss = topk_jsd(outputs.logits, _require(batch, "teacher_topk_values", why),
                        _require(batch, "teacher_topk_indices", why), _kd_mask(batch), self.temperature, self.beta)
        return loss * (self.temperature ** 2 if self.t2_scale else 1.0)


class DataCE(nn.Module):
    """Next-token cross-entropy on ``batch["labels"]`` (unshifted, -100 ignored)."""

    part: ClassVar[str] = "ce"

    @classmethod
    def from_mix(cls, mix, **context):
        return cls()

    def forward(self, outputs, batch):
        return next_token_ce(outputs.logits, _require(batch, "labels", "the ce loss"))


class HiddenAlignLoss(nn.Module):
    """Student hidden states, through a learned linear projection per mapped layer, against the teacher's.

    ``layer_map`` {student_layer: teacher_layer}; ``student_dims`` / ``teacher_dims`` the widths (an int for all
    layers, or a dict per layer). The projection maps student width -> teacher width; it starts as the identity
    when the widths are equal. ``kind``: ``"mse"`` (mean squared error per element) or ``"cosine"`` (1 - cosine
    similarity per token). Averaged over the valid positions (attention mask & teacher top-k mask when present), then
    over the mapped layers.
    """

    part: ClassVar[str] = "hidden"

    def __init__(self, layer_map, student_dims, teacher_dims, kind="mse"):
        super().__init__()
        if not layer_map:
            raise ValueError("hidden_layer_map is empty: map at least one student layer to a teacher layer")
        if kind not in ("mse", "cosine"):
            raise ValueError(f"hidden kind must be 'mse' or 'cosine', got {kind!r}")
        self.layer_map = {int(s): int(t) for s, t in layer_map.items()}
        self.kind = kind
        self.proj = nn.ModuleDict()
        for s, t in self.layer_map.items():
            ds = student_dims if isinstance(student_dims, int) else student_dims.get(s)
            dt = teacher_dims if isinstance(teacher_dims, int) else teacher_dims.get(t)
            if not isinstance(ds, int) or not isinstance(dt, int):
                raise ValueError(f"hidden_layer_map {s}->{t}: no width known for student layer {s} or teacher "
                                 f"layer {t} (student_dims={student_dims}, teacher_dims={teacher_dims})")
            lin = nn.Linear(ds, dt, bias=False)
            if ds == dt:
                with torch.no_grad():
                    lin.weight.copy_(torch.eye(ds))
            self.proj[str(s)] = lin

    @classmethod
    def from_mix(cls, mix, student_dims=None, teacher_dims=None, **context):
        if student_dims is None or teacher_dims is None:
            raise ValueError("the hidden_align loss needs student_dims and teacher_dims (widths of the mapped "
                             "layers): build DistillLoss with them, or with DistillLoss.for_model")
        return cls(mix.hidden_layer_map, student_dims, teacher_dims, mix.hidden_kind)

    def forward(self, outputs, batch):
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None:
            raise ValueError("the hidden_align loss needs outputs.hidden_states: call the student with "
                             "output_hidden_states=True (and one tower per batch)")
        teacher = _require(batch, "teacher_hidden", "the hidden_align loss (hidden weight > 0)")
        mask = batch["attention_mask"].bool() if batch.get("attention_mask") is not None else None
        if batch.get("teacher_topk_mask") is not None:
            tm = batch["teacher_topk_mask"].bool()
            mask = tm if mask is None else mask & tm
        losses = []
        for s, t in self.layer_map.items():
            if not -len(hidden) <= s < len(hidden):
                raise ValueError(f"hidden_layer_map: student layer {s} is out of range: the student output has "
                                 f"{len(hidden)} hidden states")
            if t not in teacher:
                raise ValueError(f"hidden_layer_map: teacher layer {t} is not in batch['teacher_hidden'] (has "
                                 f"{sorted(teacher)}): cache that layer")
            hs = self.proj[str(s)](hidden[s].float())  # (B, T, H_t)
            ht = teacher[t].float()
            if hs.shape != ht.shape:
                raise ValueError(f"hidden_layer_map {s}->{t}: projected student {tuple(hs.shape)} vs teacher "
                                 f"{tuple(ht.shape)}")
            if self.kind == "mse":
                per_token = (hs - ht).pow(2).mean(-1)
            else:
                per_token = 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
            m = mask if mask is not None else torch.ones(per_token.shape, dtype=torch.bool, device=hs.device)
            losses.append(masked_mean(per_token, m))
        return torch.stack(losses).mean()


class RouterLoss(nn.Module):
    """Cross-entropy of ``outputs.router_logits`` (B, n_towers) against ``batch["capability"]`` (B,), -100 ignored."""

    part: ClassVar[str] = "router"

    @classmethod
    def from_mix(cls, mix, **context):
        return cls()

    @staticmethod
    def inputs(outputs, batch):
        logits = getattr(outputs, "router_logits", None)
        if logits is None:
            raise ValueError("the router loss needs outputs.router_logits: run the student without tower= / "
                             "capability= (the router only runs then; a one-tower model has none), or set router 0")
        labels = _require(batch, "capability", "the router loss").long()
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"capability {tuple(labels.shape)} does not match router_logits {tuple(logits.shape)}")
        if labels.numel() and int(labels.max()) >= logits.shape[-1]:
            raise ValueError(f"capability label {int(labels.max())} is not a tower index (model has "
                             f"{logits.shape[-1]} towers)")
        return logits.float(), labels

    def forward(self, outputs, batch):
        logits, labels = self.inputs(outputs, batch)
        total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp(min=1)

    @classmethod
    def accuracy(cls, outputs, batch):
        """Fraction of rows (labels != -100) whose router argmax is the capability's tower; nan if none."""
        logits, labels = cls.inputs(outputs, batch)
        keep = labels != -100
        if not bool(keep.any()):
            return float("nan")
        return float((logits.argmax(-1)[keep] == labels[keep]).float().mean())


register_loss("forward_kl", ForwardKLTopK)
register_loss("jsd", JSDTopK)
register_loss("ce", DataCE)
register_loss("hidden_align", HiddenAlignLoss)
register_loss("router", RouterLoss)


# ------------------------------------------------------------------------------------------------------- the mix


class LossMix(BaseModel):
    """The loss mix of a distillation run (the recipe's ``distill.loss`` block).

    ```yaml
    loss:
      kd: 1.0
      kd_kind: forward_kl
      temperature: 2.0
      ce: 0.5
      hidden: 0.1
      hidden_layer_map: {2: 6, 4: 12}
      router: 0.2
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kd: float = Field(1.0, ge=0, description="weight of the logit-distillation loss on the teacher's top-k")
    kd_kind: str = Field("forward_kl", description="registered KD loss: 'forward_kl' or 'jsd' (or a plugin's name)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature for teacher and student in the KD loss")
    t2_scale: bool = Field(True, description="multiply the KD loss by temperature² (keeps gradient scale, Hinton)")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="mixture weight of the teacher in JSD; 0.5 is symmetric")
    ce: float = Field(0.0, ge=0, description="weight of next-token cross-entropy on the data labels")
    hidden: float = Field(0.0, ge=0, description="weight of hidden-state alignment through learned projections")
    hidden_kind: Literal["mse", "cosine"] = Field("mse", description="hidden alignment distance")
    hidden_layer_map: dict[int, int] = Field(
        default_factory=dict, description="student hidden-state index -> teacher hidden-state index (HF indexing)")
    router: float = Field(0.0, ge=0, description="weight of the router cross-entropy against capability labels")

    @field_validator("kd_kind")
    @classmethod
    def _known_kd(cls, v):
        if v not in LOSSES or LOSSES[v].part != "kd":
            kd = sorted(n for n, c in LOSSES.items() if c.part == "kd")
            raise ValueError(f"kd_kind {v!r} is not a registered KD loss; choose one of {kd}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.kd == self.ce == self.hidden == self.router == 0:
            raise ValueError("every loss weight (kd, ce, hidden, router) is 0: give at least one a positive weight")
        if self.hidden > 0 and not self.hidden_layer_map:
            raise ValueError("hidden > 0 needs hidden_layer_map (student layer -> teacher layer)")
        return self

    def weights(self):
        return {"kd": self.kd, "ce": self.ce, "hidden": self.hidden, "router": self.router}


class DistillLoss(nn.Module):
    """The weighted sum of the parts whose weight is > 0; ``forward(outputs, batch) -> (total, {part: float})``.

    The dict holds each computed part's *unweighted* value, ``"total"``, and ``"router_acc"`` (router accuracy on
    the batch) when the router part is on. Parts with weight 0 are not computed, so their inputs may be absent.
    """

    def __init__(self, mix: LossMix, student_dims=None, teacher_dims=None):
        super().__init__()
        if not isinstance(mix, LossMix):
            mix = LossMix.model_validate(mix)
        self.mix = mix
        names = {"kd": mix.kd_kind, "ce": "ce", "hidden": "hidden_align", "router": "router"}
        context = {"student_dims": student_dims, "teacher_dims": teacher_dims}
        self.parts = nn.ModuleDict({
            part: LOSSES[names[part]].from_mix(mix, **context) for part, w in mix.weights().items() if w > 0
        })

    @classmethod
    def for_model(cls, mix, model, teacher_dims=None, tower=0):
        """Build with the student widths read from ``model`` (a NexusForCausalLM) for its tower ``tower``."""
        return cls(mix, student_hidden_dims(model.config, tower), teacher_dims)

    def forward(self, outputs, batch):
        weights = self.mix.weights()
        total, report = None, {}
        for part, module in self.parts.items():
            value = module(outputs, batch)
            report[part] = float(value.detach())
            term = weights[part] * value
            total = term if total is None else total + term
        if "router" in self.parts:
            report["router_acc"] = RouterLoss.accuracy(outputs, batch)
        report["total"] = float(total.detach())
        return total, report


def student_hidden_dims(config, tower=0):
    """{hidden-state index: width} of a Nexus student's ``output_hidden_states`` for tower ``tower``.

    Entry i < n_layers is the input of layer i (the tower's width); the last entry (also index -1) is the final
    normed state (the shared hidden size).
    """
    spec = config.towers[tower]
    n = len(spec["layers"])
    dims = {i: int(spec["hidden_size"]) for i in range(n)}
    dims[n] = dims[-1] = int(config.hidden_size)
    for i in range(n):
        dims[i - n - 1] = dims[i]
    return dims
