"""The feature map: where each capability lives in each teacher, as `nexus localise` writes it and `compress` reads it.

``runs/<name>/localise/feature_map.json``::

    {
      "_schema": "nexus.feature_map/1",
      "_recipe": "demo",
      "_options": {...},                                   # the resolved stages.localise options
      "_capabilities": {CAP: {"probe": "lm", "weight": 1.0}},
      TEACHER: {
        "_model": {"model_type", "tower", "num_layers", "hidden_size",
                   "heads": [per layer], "kv_heads": [...], "head_dim": [...], "ffn": [...]},
        "_seconds": {"items", "base", "perturbation", "activation", "spectral", "causal", "total"},  # wall
        "_cpu_seconds": {... the same stages ...},          # CPU time of this process (all threads)
        "_forwards": int,                                  # passes over all items (cost)
        CAP: {
          "present": true,
          "presence": {"score", "chance", "margin", "margin_ci", "confidence", "present", "n", "profile_competent"},
          "reference": [CAP, ...],                         # whose items formed the reference set
          "perturbation": {                                # stage 1; lists are indexed by layer
            "layer" | "attention" | "ffn": {"drop": [L], "drop_ci": [[lo, hi]], "ref_drop": [L],
                                            "specific": [L], "specific_ci": [[lo, hi]], "confidence": [L]},
            "head": {"drop": [[per head] or null], "specific": [...], "specific_ci": [...], "confidence": [...]},
            "kv_group": {"specific": [[per kv group] or null]},
            "head_layers": [l, ...],                       # layers whose heads were ablated one by one
            "flagged_layers": [l, ...], "confidence": float},
          "activation": {                                  # stage 2
            "method": "gradient" | "activation",
            "neuron": {"importance": [[per neuron] per layer], "specificity": [[...]]},
            "head": {"importance": [[per head] per layer], "specificity": [[...]]},
            "kv_group": {"specificity": [[per kv group] per layer]},
            "selected": {"neuron": [[l, n], ...], "head": [[l, h], ...]},
            "selected_in_flagged": {...}, "split_half_jaccard": float, "split_half_jaccard_in_flagged": float},
          "spectral": {"units", "k", "control", "write": {"top_k_energy", "random_top_k_energy": {"mean", "interval"},
                       "effective_rank", "random_effective_rank", "effective_rank_ratio", "p_value", "rows",
                       "layer_matched" | "global": {... the other control's random_* and p_value ...}},
                       "read": {...}, "confidence"},
          "causal": {"units": {"neuron": n, "head": h}, "drop", "drop_ci", "drop_nats", "reference_drop",
                     "random_drop", "random_drop_ci", "random_drops", "ratio", "ratio_ci", "confidence", "control",
                     "layer_matched": {... same random_* keys ...}},        # when that control was run
          "causal_in_flagged": {...},                      # stage 4 on the in-flagged-layers selection
          "agreement": {"fraction_in_flagged", "expected_fraction", "units"},
          "confidence": {"presence", "perturbation", "activation", "spectral", "causal", "agreement", "overall"}
        },
        CAP_NOT_PRESENT: {"present": false, "presence": {...}, "reason": "...", "causal": null,
                          "confidence": {"presence": float, ...: null}}
      }
    }

Units and signs: every drop is a fraction of the capability's margin over chance on the same items (1.0 = the whole
above-chance score is gone; negative = the ablation helped). ``activation.*.importance`` is the first-order estimate
(activation x gradient) of how much the capability's per-token log-odds of its reference tokens fall when that one
unit is ablated (positive = the unit helps); ``specificity`` subtracts the reference set's (when positive). Keys starting with ``_``
are metadata; teacher and capability names cannot start with ``_`` (the recipe forbids it), so they never collide.
"""

import json
from pathlib import Path

from .atomic_output import atomic_file
from .json_finite import json_finite

SCHEMA = "nexus.feature_map/1"
CONFIDENCE_KEYS = ("presence", "perturbation", "activation", "spectral", "causal", "agreement", "overall")
CAUSAL_KEYS = ("drop", "random_drop", "ratio")


class FeatureMapError(ValueError):
    pass


def teachers_of(feature_map):
    return [k for k, v in feature_map.items() if not k.startswith("_") and isinstance(v, dict)]


def capabilities_of(feature_map, teacher):
    return [k for k in feature_map[teacher] if not k.startswith("_")]


def validate_feature_map(fm, source="feature map"):
    """Raise `FeatureMapError` naming the first key that breaks the schema; return ``fm``."""
    if not isinstance(fm, dict) or fm.get("_schema") != SCHEMA:
        raise FeatureMapError(f"{source}: not a {SCHEMA} document (_schema is {fm.get('_schema')!r})"
                              if isinstance(fm, dict) else f"{source}: expected a JSON object")
    for teacher in teachers_of(fm):
        entry = fm[teacher]
        if not isinstance(entry, dict) or "_model" not in entry:
            raise FeatureMapError(f"{source}: {teacher}._model is missing")
        layers = entry["_model"]["num_layers"]
        for cap in capabilities_of(fm, teacher):
            where = f"{source}: {teacher}.{cap}"
            c = entry[cap]
            for key in ("present", "presence", "causal", "confidence"):
                if key not in c:
                    raise FeatureMapError(f"{where}.{key} is missing")
            if set(c["confidence"]) != set(CONFIDENCE_KEYS):
                raise FeatureMapError(f"{where}.confidence must have the keys {', '.join(CONFIDENCE_KEYS)}")
            if not c["present"]:
                if c["causal"] is not None:
                    raise FeatureMapError(f"{where}: a capability that is not present has no causal result")
                continue
            for key in CAUSAL_KEYS:
                if key not in c["causal"]:
                    raise FeatureMapError(f"{where}.causal.{key} is missing")
            for kind in ("layer", "attention", "ffn"):
                if len(c["perturbation"][kind]["drop"]) != layers:
                    raise FeatureMapError(f"{where}.perturbation.{kind}.drop must have one entry per layer ({layers})")
            for kind in ("neuron", "head"):
                if len(c["activation"][kind]["specificity"]) != layers:
                    raise FeatureMapError(f"{where}.activation.{kind}.specificity must have one list per layer")
    return fm


def write_feature_map(fm, path):
    """Validate and write ``fm`` as JSON, atomically (NaN/inf become null)."""
    validate_feature_map(fm)
    text = json.dumps(json_finite(fm), indent=1)
    with atomic_file(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def load_feature_map(path):
    """Read and validate a feature map."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no feature map at {path}; run `nexus localise RECIPE` first")
    try:
        fm = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FeatureMapError(f"{path}: not valid JSON ({exc})") from None
    return validate_feature_map(fm, str(path))



def layer_matrix(fm, teacher, key="specific", kind="layer"):
    """(capabilities, layers x capabilities matrix) of a perturbation statistic; NaN where not measured."""
    import numpy as np

    caps = capabilities_of(fm, teacher)
    layers = fm[teacher]["_model"]["num_layers"]
    out = np.full((layers, len(caps)), np.nan)
    for j, cap in enumerate(caps):
        entry = fm[teacher][cap]
        if not entry.get("present"):
            continue
        values = entry["perturbation"][kind][key]
        out[:, j] = [np.nan if v is None else v for v in values]
    return caps, out


def write_heatmaps(fm, folder):
    """One PNG per teacher: layers x capabilities, layer-ablation drop and its capability-specific part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for teacher in teachers_of(fm):
        caps, drop = layer_matrix(fm, teacher, "drop")
        _, spec = layer_matrix(fm, teacher, "specific")
        layers = drop.shape[0]
        fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.6 * max(1, len(caps)), 1.5 + 0.32 * layers), squeeze=False)
        for ax, data, title, cmap in ((axes[0, 0], drop, "layer ablation: drop", "viridis"),
                                      (axes[0, 1], spec, "drop - reference drop", "RdBu_r")):
            finite = data[np.isfinite(data)]
            if cmap == "RdBu_r":
                bound = float(np.abs(finite).max()) if finite.size else 1.0
                im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=-bound or -1, vmax=bound or 1)
            else:
                im = ax.imshow(data, aspect="auto", cmap=cmap)
            ax.set_xticks(range(len(caps)), caps, rotation=30, ha="right")
            ax.set_yticks(range(layers))
            ax.set_ylabel("layer")
            ax.set_title(title, fontsize=9)
            flagged = [fm[teacher][c]["perturbation"]["flagged_layers"] if fm[teacher][c].get("present") else []
                       for c in caps]
            for j, ls in enumerate(flagged):
                for l in ls:
                    ax.text(j, l, "*", ha="center", va="center", color="white" if cmap == "viridis" else "black")
                if not fm[teacher][caps[j]].get("present"):
                    ax.text(j, (layers - 1) / 2, "not present", ha="center", va="center", rotation=90, color="gray")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.suptitle(f"{teacher}: fraction of the margin over chance lost (* flagged)", fontsize=10)
        fig.tight_layout()
        path = Path(folder) / f"heatmap-{teacher}.png"
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
