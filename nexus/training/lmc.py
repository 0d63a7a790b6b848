"""Linear mode connectivity (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"):
walk ``theta(alpha) = (1 - alpha) * theta_A + alpha * theta_B`` between two checkpoints, score every point, pick the
best alpha and report the barrier.

    result = lmc_refine(model, "runs/x/compress/model.safetensors", "runs/x/distill/checkpoints/step-00001000",
                        score_fn, LMCOptions(points=11, higher_is_better=True), out_dir="runs/x/refine")

``score_fn(model) -> float`` is any held-out measure (a multi-capability score, a loss). The barrier is the largest
gap between the path and the straight chord joining its endpoints, in the "worse" direction::

    lower is better : barrier = max_alpha  L(alpha) - ((1 - alpha) L(0) + alpha L(1))
    higher is better: barrier = max_alpha  ((1 - alpha) S(0) + alpha S(1)) - S(alpha)

It is 0 at the endpoints, so it is >= 0; near 0 means A and B are linearly connected (averaging them is safe).
The endpoints are evaluated on exactly A's and B's weights: ``(1 - alpha) * a + alpha * b`` is exact at 0 and 1
(``torch.lerp`` is not: ``a + 1 * (b - a)`` rounds). Outputs: ``lmc.json`` and ``lmc.png`` (written atomically).
"""

import itertools
import json
import math
from pathlib import Path

import torch
from nexus.conversion.atomic_output import atomic_file
from nexus.conversion.load_check import checked_load_file

from .distill_options import LMCOptions
from .preservation import canonical_parameters


def _state_of(source, template):
    """A full state dict (template's keys) from a module, a state dict, a .safetensors file or a folder with one."""
    if isinstance(source, torch.nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"LMC endpoint {source}: no such safetensors file (or folder with model.safetensors)")
        source = checked_load_file(path, what="LMC endpoint")
    if not isinstance(source, dict):
        raise TypeError(f"an LMC endpoint must be a module, a state dict or a path, got {type(source).__name__}")
    _, alias = canonical_parameters(template)
    state = dict(source)
    for key in template.state_dict():  # tied weights are saved once: fill the alias from its canonical name
        if key not in state and alias.get(key) in state:
            state[key] = state[alias[key]]
    return state


def _check_pair(state_a, state_b, template):
    expected = template.state_dict()
    for name, st in (("A", state_a), ("B", state_b)):
        missing = sorted(set(expected) - set(st))
        unexpected = sorted(set(st) - set(expected))
        if missing or unexpected:
            raise ValueError(f"LMC endpoint {name} does not fit the model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        for k, v in expected.items():
            if tuple(st[k].shape) != tuple(v.shape):
                raise ValueError(f"LMC endpoint {name}: {k} has shape {tuple(st[k].shape)}, the model {tuple(v.shape)}")


def interpolate_state(state_a, state_b, alpha):
    """``(1 - alpha) * a + alpha * b`` for floating tensors (exact at 0 and 1); other tensors are taken from A."""
    out = {}
    for k, a in state_a.items():
        b = state_b[k]
        if a.is_floating_point():
            out[k] = ((1.0 - alpha) * a.float() + alpha * b.float()).to(a.dtype)
        else:
            out[k] = a
    return out


def lmc_path(model, source_a, source_b, score_fn, options=None, alphas=None):
    """Score ``model`` loaded with theta(alpha) along the path; the model is left at the best alpha.

    Returns ``{alphas, scores, chord, excess, barrier, barrier_alpha, best_alpha, best_score, higher_is_better}``.
    """
    options = options if isinstance(options, LMCOptions) else LMCOptions(**(options or {}))
    n = options.points
    alphas = [i / (n - 1) for i in range(n)] if alphas is None else [float(a) for a in alphas]
    if alphas[0] != 0.0 or alphas[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(alphas)):
        raise ValueError(f"alphas must increase from 0.0 to 1.0, got {alphas}")
    state_a, state_b = _state_of(source_a, model), _state_of(source_b, model)
    _check_pair(state_a, state_b, model)
    scores = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state(state_a, state_b, alpha), strict=True)
        value = float(score_fn(model))
        if math.isnan(value):
            raise FloatingPointError(f"score_fn returned NaN at alpha={alpha}")
        scores.append(value)
    sign = -1.0 if options.higher_is_better else 1.0  # excess = how much worse than the chord
    chord = [(1 - a) * scores[0] + a * scores[-1] for a in alphas]
    excess = [sign * (s - c) for s, c in zip(scores, chord)]
    worst = max(range(len(alphas)), key=lambda i: excess[i])
    best = (max if options.higher_is_better else min)(range(len(alphas)), key=lambda i: scores[i])
    model.load_state_dict(interpolate_state(state_a, state_b, alphas[best]), strict=True)
    return {"alphas": alphas, "scores": scores, "chord": chord, "excess": excess,
            "barrier": excess[worst], "barrier_alpha": alphas[worst],
            "best_alpha": alphas[best], "best_score": scores[best], "higher_is_better": options.higher_is_better,
            "score_a": scores[0], "score_b": scores[-1]}


def write_lmc_report(result, out_dir, labels=("A", "B"), score_name="score"):
    """Write ``lmc.json`` and the barrier plot ``lmc.png`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "lmc.json", out_dir / "lmc.png"
    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps({**result, "labels": list(labels), "score_name": score_name}, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.plot(result["alphas"], result["scores"], "o-", label=f"{score_name} on the path")
        ax.plot(result["alphas"], result["chord"], "--", color="gray", label="linear chord of the endpoints")
        ax.axvline(result["best_alpha"], color="green", linestyle=":",
                   label=f"best alpha = {result['best_alpha']:.2f}")
        i = result["alphas"].index(result["barrier_alpha"])
        ax.annotate(f"barrier {result['barrier']:.4g}", (result["barrier_alpha"], result["scores"][i]),
                    textcoords="offset points", xytext=(0, 10), ha="center")
        ax.set_xlabel(f"alpha  (0 = {labels[0]}, 1 = {labels[1]})")
        ax.set_ylabel(score_name + (" (higher is better)" if result["higher_is_better"] else " (lower is better)"))
        ax.set_title("linear mode connectivity")
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_file(png_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return json_path, png_path


def lmc_refine(model, source_a, source_b, score_fn, options=None, out_dir=None, labels=("A", "B"),
               score_name="score"):
    """`lmc_path` + `write_lmc_report`: ``model`` ends at the best alpha; the result gains the file paths."""
    result = lmc_path(model, source_a, source_b, score_fn, options)
    if out_dir is not None:
        json_path, png_path = write_lmc_report(result, out_dir, labels, score_name)
        result = {**result, "json": str(json_path), "png": str(png_path)}
    return result
