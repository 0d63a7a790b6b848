"""Typed options of the distillation engine, in-process preservation and LMC refinement.

Sample (the ``distill`` stage embeds these under its own keys)::

    engine:
      steps: 2000
      micro_batches_per_step: 4     # gradient accumulation
      lr: 3.0e-4
      warmup_steps: 100
      max_grad_norm: 1.0
      autocast: auto                # bf16 only where the CPU/GPU has native bf16 (never on AVX2-only CPUs)
      checkpoint_every: 200
      keep_last: 2
    preservation: {mode: lr_scale, strength: 0.9, normalise: rank}
    lmc: {points: 11, higher_is_better: true}

Every model forbids unknown keys, so a typo is an error naming the field.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineOptions(_Strict):
    """How the student is optimised: the trajectory (steps, schedule, accumulation) and its bookkeeping."""

    steps: int = Field(ge=1, description="optimizer steps of the whole run (a resumed run continues up to this)")
    micro_batches_per_step: int = Field(
        1, ge=1, description="gradient accumulation: micro-batches summed into one optimizer step")
    lr: float = Field(3e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW decoupled weight decay, applied to matrices except embeddings")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from lr/warmup_steps to lr over this many steps")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="the cosine decay ends at lr * min_lr_ratio on the last step")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the global gradient norm to this; null disables clipping")
    autocast: Literal["auto", "off", "bf16"] = Field(
        "auto", description="bf16 autocast of the forward pass; 'auto' = bf16 only with native bf16 hardware "
                            "(AVX512-BF16/AMX CPUs, bf16 GPUs): on AVX2-only CPUs bf16 is several times slower")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the RNG (dropout etc.) at the start of a fresh run")
    checkpoint_every: int = Field(
        100, ge=1, description="write a checkpoint every N optimizer steps (and always after the last step)")
    keep_last: int = Field(2, ge=1, description="keep only the newest K checkpoints")
    max_consecutive_skips: int = Field(
        10, ge=1, description="the NaN/inf guard skips a step with a non-finite loss or gradient; "
                              "this many skips in a row abort the run")
    find_unused_parameters: bool | None = Field(
        None, description="multi-process only: let DDP tolerate parameters without gradients (towers and router "
                          "not used by a batch); null = auto, on for a multi-tower Nexus model")
    output_hidden_states: bool = Field(
        False, description="ask the model for hidden states (needed by hidden-state alignment losses)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass instead of keeping "
                           "them: less memory for ~1/3 more compute; the same gradients, so the same weights")

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        return self


# Fields that may change between a run and its resumption without changing the trajectory.
RESUME_FREE_FIELDS = ("checkpoint_every", "keep_last", "max_consecutive_skips", "gradient_checkpointing")


class PreservationOptions(_Strict):
    """Protect weights the localiser found critical while training (see `preservation.py`)."""

    mode: Literal["off", "lr_scale", "anchor"] = Field(
        "off", description="off; lr_scale: per-element learning rate x (1 - strength * importance); "
                           "anchor: EWC-like penalty anchor_lambda * sum importance * (theta - theta_start)^2")
    strength: float = Field(
        0.9, ge=0, le=1, description="lr_scale: how much the most important element's learning rate is cut (1 = frozen)")
    importance: Literal["taylor", "critical"] = Field(
        "taylor", description="what is protected: taylor = every element by its first-order Taylor importance on "
                              "calibration batches; critical = exactly the units the localiser found causally "
                              "necessary and the student build kept (1 on their rows/columns, 0 elsewhere, "
                              "normalised by 'max'; needs the localise stage before student_build)")
    anchor_lambda: float = Field(1.0, ge=0, description="anchor: weight of the penalty in the loss")
    normalise: Literal["rank", "max"] = Field(
        "rank", description="importance -> [0, 1]: 'rank' = its quantile over all protected elements (robust to "
                            "heavy tails), 'max' = divided by the largest value")


class LMCOptions(_Strict):
    """Linear mode connectivity between two checkpoints (see `lmc.py`)."""

    points: int = Field(11, ge=2, description="evaluate alpha on this many evenly spaced points of [0, 1]")
    higher_is_better: bool = Field(
        False, description="true for scores (accuracy, retention), false for losses; picks the best alpha and "
                           "the sign of the barrier")


class DistillTrainingOptions(_Strict):
    """Engine, preservation and LMC options together."""

    engine: EngineOptions = Field(description="optimisation and checkpointing")
    preservation: PreservationOptions = Field(
        default_factory=PreservationOptions, description="in-process protection of important weights")
    lmc: LMCOptions = Field(default_factory=LMCOptions, description="interpolation-path refinement")
