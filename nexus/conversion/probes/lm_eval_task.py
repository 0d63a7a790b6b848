"""`lm_eval` probe: a local lm-eval task YAML, run through lm-eval's HFLM on the already-loaded teacher.

Users already have lm-eval tasks; this probe runs one on the teacher in memory (``HFLM(pretrained=model,
tokenizer=tokenizer)``), offline. lm-eval's built-in tasks download their data from the hub, which is not reachable
here, so the task must read a local dataset, e.g.::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: my_task.jsonl}}   # relative to the YAML's folder
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{prompt}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}]

The per-item scores are lm-eval's per-document metric values; the CI is ours (lm-eval's own bootstrap is turned off).
lm-eval runs with its working directory set to the YAML's folder, so relative ``data_files`` resolve there.
The baseline is chance for a multiple-choice task and 0 otherwise. Requires ``pip install lm-eval``.
"""

import contextlib
import os
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import Probe, ProbeResult, inference_context, mean_summary, select_items, summary
from .data_source import ProbeDataError
from .registry import register_probe

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class LMEvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description="task name inside the YAML; default: the YAML's `task:` field")
    metric: str | None = Field(None, description="which of the task's metrics is the score; default: its first")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; default: the task's own setting")


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval YAMLs, whose ``!function`` tags plain safe_load rejects."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


@contextlib.contextmanager
def _offline_in(folder):
    """Offline hub/datasets flags and the working directory set to ``folder``, both restored afterwards."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        with contextlib.chdir(folder):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_lm_eval():
    try:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ProbeDataError(
            f"the lm_eval probe needs lm-eval (pip install lm-eval); importing it failed: {exc}") from None
    return lm_eval, HFLM, TaskManager


class LMEvalTaskProbe(Probe):
    data_kind = "lm_eval_task"
    metric = "lm_eval"
    Options = LMEvalOptions

    def _read_yaml(self):
        path = Path(self.data)
        if not path.is_file():
            raise ProbeDataError(f"lm-eval task file {path} does not exist")
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
        except yaml.YAMLError as exc:
            raise ProbeDataError(f"lm-eval task file {path} is not valid YAML: {exc}") from None
        if not isinstance(config, dict) or not config:
            raise ProbeDataError(f"lm-eval task file {path} is empty")
        return path, config

    def _check_dataset(self, path, config):
        source = config.get("dataset_path")
        if source in LOCAL_BUILDERS:
            files = (config.get("dataset_kwargs") or {}).get("data_files")
            if not files:
                raise ProbeDataError(f"lm-eval task {path}: dataset_path {source!r} needs dataset_kwargs.data_files")
            names = files.values() if isinstance(files, dict) else [files]
            for entry in names:
                for name in entry if isinstance(entry, list) else [entry]:
                    data = (path.parent / name).resolve()
                    if not data.is_file():
                        raise ProbeDataError(f"lm-eval task {path}: data file {data} does not exist")
                    if not data.read_text(encoding="utf-8", errors="replace").strip():
                        raise ProbeDataError(f"lm-eval task {path}: data file {data} is empty")
        elif not (isinstance(source, str) and (path.parent / source).exists()):
            raise ProbeDataError(
                f"lm-eval task {path}: dataset_path {source!r} is neither a local dataset folder nor a local builder "
                f"({', '.join(LOCAL_BUILDERS)}) with data_files; hub datasets cannot be downloaded here")

    def _load(self):
        path, config = self._read_yaml()
        self.label = str(path)
        self.task = self.options.task or config.get("task")
        if not isinstance(self.task, str):
            raise ProbeDataError(f"lm-eval task file {path} has no `task:` name (or set options.task)")
        self._check_dataset(path, config)
        metrics = [m.get("metric") for m in config.get("metric_list") or [] if isinstance(m, dict)]
        self.metric_name = self.options.metric or (metrics[0] if metrics else None)
        if self.metric_name is None:
            raise ProbeDataError(f"lm-eval task {path}: no metric_list; set options.metric")
        spec = next((m for m in config.get("metric_list") or [] if m.get("metric") == self.metric_name), {})
        self.higher_is_better = bool(spec.get("higher_is_better", True))
        _, _, TaskManager = _import_lm_eval()
        with _offline_in(path.parent):
            try:
                self.task_manager = TaskManager(include_path=str(path.parent), include_defaults=False)
                task = self.task_manager.load([self.task])["tasks"][self.task]  # loads the dataset: bad data fails here
                docs = list(task.eval_docs)
            except Exception as exc:  # lm-eval raises many types; keep the cause, name the file
                raise ProbeDataError(f"lm-eval could not load task {self.task!r} from {path}: {exc}") from exc
        if not docs:
            raise ProbeDataError(f"lm-eval task {path}: the evaluation split has no documents")
        self.indices = select_items(len(docs), self.settings.max_items, self.settings.seed)
        self.chance = None
        if task.OUTPUT_TYPE == "multiple_choice":
            self.chance = float(np.mean([1.0 / len(task.doc_to_choice(docs[i])) for i in self.indices]))

    def __len__(self):
        self._require_loaded()
        return len(self.indices)

    def score(self, model, tokenizer, advance=None):
        self._require_loaded()
        lm_eval, HFLM, _ = _import_lm_eval()
        with _offline_in(Path(self.label).parent), inference_context(model, self.settings):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.settings.batch_size,
                      max_length=getattr(model.config, "max_position_embeddings", None))
            try:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[self.task], task_manager=self.task_manager, samples={self.task: self.indices},
                    num_fewshot=self.options.num_fewshot, bootstrap_iters=0, log_samples=True, verbosity="ERROR",
                    random_seed=self.settings.seed,
                )
            except Exception as exc:
                raise ValueError(f"lm-eval failed on task {self.task!r} ({self.label}): {exc}") from exc
        rows = sorted(out["samples"][self.task], key=lambda s: s["doc_id"])
        if not rows or self.metric_name not in rows[0]:
            have = sorted(k for k in (rows[0] if rows else {}) if k not in ("doc", "arguments", "resps"))
            raise ValueError(f"lm-eval task {self.task!r} reported no per-document {self.metric_name!r}; has {have}")
        values = [float(r[self.metric_name]) for r in rows]
        if advance:
            advance(len(values))
        return ProbeResult(values, mean_summary(self.metric_name, values, self.settings, self.higher_is_better,
                                                task=self.task))

    def baseline(self):
        self._require_loaded()
        if self.chance is not None:
            return summary(self.metric_name, self.chance, (self.chance, self.chance), len(self.indices), True,
                           kind="chance")
        return summary(self.metric_name, 0.0, (0.0, 0.0), len(self.indices), self.higher_is_better,
                       kind="zero (no trivial model for a generative task)")


register_probe("lm_eval", LMEvalTaskProbe)


# ---------------------------------------------------------------- extra lm-eval tasks of `nexus validate`


class LMEvalTaskSpec(LMEvalOptions):
    """One local lm-eval task that `nexus validate` runs on the student and on every teacher (``stages.validate.
    lm_eval_tasks``), reported per model with a bootstrap CI and the standard error::

        stages:
          validate:
            lm_eval_tasks:
              - {yaml: tasks/my_task.yaml}                  # relative to the recipe's folder
              - {yaml: tasks/other.yaml, metric: acc_norm, num_fewshot: 0}
    """

    yaml: Path = Field(description="a local lm-eval task YAML whose dataset is a local file (nothing is downloaded); "
                                   "relative to the recipe's folder")

    @field_validator("yaml")
    @classmethod
    def _resolve(cls, value, info):
        base = (info.context or {}).get("base_dir")
        value = Path(value).expanduser()
        return value if value.is_absolute() or base is None else Path(base) / value


def load_lm_eval_tasks(specs, settings):
    """The loaded probes of ``specs`` (`LMEvalTaskSpec`) as ``{TASK: probe}``; a bad task is a `ProbeDataError`
    naming its YAML, raised before any model is scored."""
    probes = {}
    for spec in specs:
        probe = LMEvalTaskProbe(spec.yaml, spec.model_dump(exclude={"yaml"}), settings).load()
        if probe.task in probes:
            raise ProbeDataError(f"lm-eval task {probe.task!r} is listed twice in stages.validate.lm_eval_tasks "
                                 f"({probes[probe.task].label} and {spec.yaml})")
        probes[probe.task] = probe
    return probes


def score_lm_eval_tasks(probes, model, tokenizer) -> dict:
    """``{TASK: {"score", "ci", "stderr", "n", "metric", "items"}}`` of one resident model on every task."""
    out = {}
    for task, probe in probes.items():
        result = probe.score(model, tokenizer)
        values = np.asarray(result.items, dtype=np.float64)
        stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
        out[task] = {"score": result.summary["score"], "ci": result.summary["ci"], "stderr": stderr,
                     "n": result.summary["n"], "metric": probe.metric_name, "items": list(result.items)}
    return out


def lm_eval_table(probes, per_model) -> dict:
    """The report's ``lm_eval`` section: per task, its metric and every model's score with its CI and stderr."""
    return {task: {"yaml": probe.label, "metric": probe.metric_name, "higher_is_better": probe.higher_is_better,
                   "n": len(probe), "ci": "bootstrap 95% percentile CI over documents; stderr = sd / sqrt(n)",
                   "models": {name: {k: v for k, v in scores[task].items() if k != "items"}
                              for name, scores in per_model.items() if task in scores}}
            for task, probe in probes.items()}
