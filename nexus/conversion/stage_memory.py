"""Peak-RAM plans of the consolidate stages, from the recipe and each stage's real inputs, made before it runs.

`run_consolidate` plans every stage before the first one starts (upper bounds where an input does not exist yet: any
eligible teacher may serve a tower, the student is as large as its budget) and again just before each stage (from
what the earlier stages produced), prints the plans, and refuses a stage whose plan exceeds the RAM budget with a
`MemoryPlanError` naming the stage, the estimate, the budget and every component. The budget is ``memory.ram_gb`` in
the recipe, else the machine's total RAM. The final model's GPU plan (`memory_plan.plan_final_model`, 16 GiB by
default) is a separate check.

Plans are coarse on purpose: each is a sum of the largest things the stage holds at once, every term derived from a
real input (teacher sizes from their safetensors headers, or a GGUF's tensor table; the student's from its headers,
or its budget before it exists; batch, sequence and token counts from the stage options), on top of ``runtime``,
this process's RSS when the plan is made:

=============  ======================================================================================================
profile        one teacher at a time (`memory_plan.plan_stage`): weights in its dtype + tokenizer + one forward of
               batch_size x window_tokens through the probes' vocabulary-sliced head; a GGUF not converted yet: its
               dequantisation (fp32 model + fp32 state dict + the file)
student_build  per tower teacher: the fp32 teacher and its Nexus import (2 x fp32) + the calibration pass's gradients
               (fp32) and activations (every layer kept for backward, compress's batch of 2 x window_tokens) + its
               tokenizer + the student so far (budget x fp32); ``layout: dense``: the random-init student alone
distill        the larger of caching (student fp32 + one teacher + its forward of cache_batch_size x one chunk, the
               head over a few positions at a time for the families `teacher_cache` slices, else full logits) and training (student x 16 bytes: weights, gradients, two AdamW moments; + preservation's
               importance and anchor; + activations of batch_size x seq_len with backward; + LMC's two extra
               copies), plus the aligned rows held for training (tokens x (top_k x 6 + 24) bytes)
validate       the larger of the tokenisation check (each teacher's tokenizer loaded in turn: the largest one's parse
               peak) and the largest model scored (the student and its checkpoints in student_dtype; teachers as in
               profile, unless their scores come from a matching profile and CKA is off) + CKA's hidden states
export         the student loaded and serialised (2 x fp32)
=============  ======================================================================================================

Stages register their planner in `STAGE_RAM_PLANS` (`register_stage_ram_plan` refuses a duplicate name). The
stand-alone stage commands (`nexus profile`, `distill`, `validate`, `export`) check the same plans through
`stage_ram_guard`; `nexus export` has no recipe and plans with `plan_checkpoint_export_ram`.
"""

import json
import os
from pathlib import Path

from .memory_plan import (
    GIB,
    MemoryPlanError,
    check_plan,
    dtype_bytes,
    forward_activation_bytes,
    hf_parameter_count,
    load_config,
    plan_stage,
    safetensors_numel,
    tokenizer_bytes,
)

COMPRESS_BATCH = 2  # CompressOptions.batch_size: windows per calibration forward/backward in the student build
ROW_BYTES_PER_TOKEN = 24  # input ids, labels, attention mask (int64) per aligned row position
TOPK_BYTES = 6  # per kept teacher logit in a row: a 16-bit value and an int32 index

STAGE_RAM_PLANS: dict = {}


def register_stage_ram_plan(name, planner):
    """Register ``planner(recipe, runtime, profile=None, student=None) -> plan`` for stage ``name``."""
    if name in STAGE_RAM_PLANS:
        raise ValueError(f"stage {name!r} already has a RAM planner ({STAGE_RAM_PLANS[name].__qualname__})")
    STAGE_RAM_PLANS[name] = planner
    return planner


# ---------------------------------------------------------------------------------------------- budget


def machine_ram_bytes() -> int:
    """Total RAM of this machine (``MemTotal`` in /proc/meminfo, else the page count x page size)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def ram_budget(recipe) -> tuple[int, str]:
    """(bytes, where the number comes from) of the peak RAM any stage may plan for."""
    gb = recipe.memory.ram_gb
    if gb is not None:
        return int(gb * GIB), f"memory.ram_gb = {gb:g} GiB"
    return machine_ram_bytes(), "the machine's total RAM (memory.ram_gb unset)"


RECIPE_BUDGET_HINT = "set memory.ram_gb in the recipe to change it"


def check_stage_plan(plan, budget, source, hint=RECIPE_BUDGET_HINT):
    """`check_plan` against the RAM budget; the refusal also says where the budget comes from and ``hint``: how to
    change it."""
    try:
        return check_plan(plan, budget)
    except MemoryPlanError as exc:
        raise MemoryPlanError(f"{exc}. The budget is {source}; {hint}") from None


# ---------------------------------------------------------------------------------------------- inputs


def teacher_footprint(recipe, spec) -> dict:
    """``{"folder", "params", "gguf"}`` of a teacher without loading or converting anything.

    ``folder``: the HF folder a stage will load (None for a GGUF not converted yet); ``params``: from the
    safetensors headers, else the config (pickle weights), else the GGUF's tensor table.
    """
    from .teacher_source import _gguf_file, check_teacher_source, gguf_cache_dir

    if check_teacher_source(spec.source, spec.allow_pickle) == "hf":
        folder = Path(spec.source)
        params = safetensors_numel(folder)
        if params is None:
            params = hf_parameter_count(load_config(folder))["total"]
        return {"folder": folder, "params": params, "gguf": None}
    gguf = _gguf_file(spec.source)
    folder = gguf_cache_dir(gguf, recipe.cache_dir or Path.home() / ".cache" / "nexus" / "gguf")
    if (folder / "config.json").is_file():
        return {"folder": folder, "params": safetensors_numel(folder), "gguf": gguf}
    from gguf import GGUFReader

    params = sum(int(t.n_elements) for t in GGUFReader(str(gguf)).tensors)
    return {"folder": None, "params": params, "gguf": gguf}


def forward_dtype(compute, weights_dtype) -> str:
    """The dtype a teacher's forward computes in under a probe's ``compute`` mode (see probes.compute_mode)."""
    from .probes.compute_mode import native_bf16_matmul

    if compute == "bf16" or (compute == "auto" and native_bf16_matmul()):
        return "bf16"
    return weights_dtype if compute == "native" else "fp32"


def _plan(stage, components, **assumptions):
    return {"stage": stage, "kind": "ram", "components": components, "total_bytes": sum(components.values()),
            "assumptions": assumptions}


def _largest(plans, stage, **assumptions):
    """The plan among ``plans`` ({label: plan}) with the largest total, relabelled as ``stage``'s."""
    if not plans:  # no model to load (the stage itself reports why)
        return {**_plan(stage, {}, **assumptions), "per_model": {}}
    label = max(plans, key=lambda k: plans[k]["total_bytes"])
    peak = plans[label]
    return {**_plan(stage, dict(peak["components"]), **{**peak.get("assumptions", {}), **assumptions, "peak": label}),
            "per_model": {k: p["total_bytes"] for k, p in plans.items()}}


def _teacher_forward_plans(recipe, specs, runtime, batch, seq_len, compute, stage, sliced_head=True,
                           position_slices=False):
    """{teacher: plan} of loading it and running one no-grad forward (or converting its GGUF, when not done yet);
    ``sliced_head``: the head runs over slices (probes, teacher cache) where the family allows it (see
    `memory_plan.plan_stage`)."""
    plans = {}
    for spec in specs:
        info = teacher_footprint(recipe, spec)
        if info["folder"] is None:
            plans[spec.name] = _plan(stage, {"runtime": runtime, "gguf_dequantised_fp32_model": 4 * info["params"],
                                             "gguf_fp32_state_dict": 4 * info["params"],
                                             "gguf_file": info["gguf"].stat().st_size},
                                     note="GGUF not converted yet: its conversion sets the peak")
            continue
        plan = plan_stage([(spec.name, info["folder"], spec.dtype, info["folder"])], stage, batch, seq_len, runtime,
                          activation_dtype=forward_dtype(compute, spec.dtype), sliced_head=sliced_head,
                          position_slices=position_slices)
        plans[spec.name] = _plan(stage, plan["components"], batch=batch, seq_len=seq_len,
                                 params_from=plan["per_teacher"][spec.name]["params_from"])
    return plans


def _eligible(recipe):
    return [t for t in recipe.teachers if any(t in recipe.eligible_teachers(c) for c in recipe.capabilities)]


def _tower_teachers(recipe, profile):
    """The teachers that build towers (one tower each): the profile's best teachers of the capabilities the student
    serves (`student_build.tower_teachers`: none for a capability no teacher is competent at), or (no profile yet)
    every eligible teacher."""
    if profile is None:
        return _eligible(recipe)
    from .student_build import tower_teachers

    names = set(tower_teachers(recipe, profile).values())
    return [t for t in recipe.teachers if t.name in names]


def student_budget_params(recipe, teachers) -> int:
    """The student's parameter budget as the build resolves it (a fraction of its tower teachers, or the recipe's)."""
    from .budget import resolve_budget

    options = recipe.stage("student_build")
    if options.budget_fraction is not None:
        return int(options.budget_fraction * sum(teacher_footprint(recipe, t)["params"] for t in teachers))
    b = recipe.student.budget
    return resolve_budget(b.params, None, b.memory_gb, "total").params


def _checkpoint_params(folder) -> int:
    """Elements of the checkpoint at ``folder``, from its safetensors headers (no weights loaded)."""
    params = safetensors_numel(folder)
    if params is None:
        raise MemoryPlanError(f"cannot plan memory for {folder}: no *.safetensors weights there")
    return params


def _student_params(recipe, student, profile):
    if student is not None:
        return _checkpoint_params(student), "the student's safetensors headers"
    return student_budget_params(recipe, _tower_teachers(recipe, profile)), "the student budget (not built yet)"


def _training_activations(config, batch, seq_len):
    """fp32 activations a forward + backward keeps: every layer's working set, and the logits three times (logits,
    their log-softmax, their gradient)."""
    acts = forward_activation_bytes(config, batch, seq_len, "fp32")
    return config.num_hidden_layers * acts["layer_working_set"] + 3 * acts["logits"]


def _nexus_activations(config, batch, seq_len, backward):
    """fp32 activations of the Nexus student's worst tower: one layer's working set (no grad) or every layer's
    (backward), plus the logits (three times with backward)."""
    tokens, b = batch * seq_len, 4
    worst = 0
    for spec in config.towers:
        live = []
        for layer in spec["layers"]:
            nh, nkv, hd, ffn = (layer[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                   "intermediate_size"))
            live.append(4 * tokens * spec["hidden_size"] * b + 2 * tokens * (nh + 2 * nkv) * hd * b
                        + 2 * batch * nh * seq_len * seq_len * b + 3 * tokens * ffn * b)
        worst = max(worst, sum(live) if backward else max(live, default=0))
    logits = tokens * config.vocab_size * b
    return worst + (3 if backward else 1) * logits


def _is_nexus(folder) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MemoryPlanError(f"cannot plan memory for {folder}: no config.json (not a checkpoint folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") == "nexus"
    except ValueError:
        raise MemoryPlanError(f"cannot plan memory for {folder}: config.json is not valid JSON") from None


def _student_config(student):
    """The student's config: a `NexusConfig` for a Nexus checkpoint, else (validate scores plain HF students too)
    its HF config."""
    if not _is_nexus(student):
        return load_config(student)
    from ..modeling_nexus import NexusConfig

    return NexusConfig.from_pretrained(student)


def _proxy_config(recipe, teachers):
    """The config of the largest teacher with one (a stand-in for the student's shapes before it exists)."""
    best, size = None, -1
    for spec in teachers:
        info = teacher_footprint(recipe, spec)
        if info["folder"] is not None and info["params"] > size:
            best, size = load_config(info["folder"]), info["params"]
    return best


# ---------------------------------------------------------------------------------------------- stage planners


def plan_profile_ram(recipe, runtime, profile=None, student=None):
    options = recipe.stage("profile")
    plans = _teacher_forward_plans(recipe, _eligible(recipe), runtime, options.batch_size, options.window_tokens,
                                   options.compute, "profile")
    return _largest(plans, "profile", one_teacher_resident=True)


def plan_student_build_ram(recipe, runtime, profile=None, student=None):
    options = recipe.stage("student_build")
    teachers = _tower_teachers(recipe, profile)
    student_params = student_budget_params(recipe, teachers)
    if options.layout == "dense":  # one random-init tower built from a config: no teacher's weights are loaded
        components = {"runtime": runtime, "student_fp32": 4 * student_params}
        # but the shared tokenizer is (a base teacher's, e.g. Gemma's 262k entries: measured 1.84x a plan without it)
        folders = [f for f in (teacher_footprint(recipe, spec)["folder"] for spec in teachers) if f is not None]
        if folders:
            components["tokenizer_load"] = max(tokenizer_bytes(f)["load_peak"] for f in folders)
        return _plan("student_build", components, student_budget_params=student_params, tower_teachers=[],
                     layout="dense")
    plans = {}
    for spec in teachers:
        info = teacher_footprint(recipe, spec)
        fp32 = 4 * info["params"]
        components = {"runtime": runtime, "teacher_fp32": fp32, "nexus_import_fp32": fp32,
                      "calibration_gradients_fp32": fp32, "student_so_far_fp32": 4 * student_params}
        if info["folder"] is not None:
            config = load_config(info["folder"])
            seq = min(options.window_tokens, int(getattr(config, "max_position_embeddings", 2048) or 2048))
            components["calibration_activations"] = _training_activations(config, COMPRESS_BATCH, seq)
            components["tokenizer"] = tokenizer_bytes(info["folder"])["resident"]
        plans[spec.name] = _plan("student_build", components)
    return _largest(plans, "student_build", student_budget_params=student_params,
                    tower_teachers=[t.name for t in teachers], one_teacher_resident=True)


def _distill_teachers(recipe, profile, n):
    if profile is None:
        return {c.name: recipe.eligible_teachers(c) for c in recipe.capabilities}
    from .distill import capability_teachers

    return {cap: [recipe.teacher(t) for t in ts] for cap, ts in capability_teachers(recipe, profile, n).items()}


def _distill_tokens(recipe, options):
    """Training tokens per capability: ``tokens`` when set, else the characters of its training text (a token covers
    at least one character in the tokenizers NEXUS builds)."""
    if options.tokens is not None:
        return {c.name: options.tokens for c in recipe.capabilities}
    from .training_text import training_text

    return {c.name: sum(len(x) for x in training_text(c.name, c.data, options.train_data.get(c.name),
                                                      options.chunk_chars, items=options.arithmetic_items).chunks)
            for c in recipe.capabilities}


def plan_distill_ram(recipe, runtime, profile=None, student=None):
    options = recipe.stage("distill")
    params, params_from = _student_params(recipe, student, profile)
    teachers_of = _distill_teachers(recipe, profile, options.teachers_per_capability)
    tokens = _distill_tokens(recipe, options)
    rows = int(sum(tokens[c] * len(ts) for c, ts in teachers_of.items()) * (1 + options.heldout_fraction)
               * (options.top_k * TOPK_BYTES + ROW_BYTES_PER_TOKEN))
    if student is not None:
        config = _student_config(student)
        activations = (_nexus_activations(config, options.batch_size, options.seq_len, True)
                       if config.model_type == "nexus" else _training_activations(config, options.batch_size,
                                                                                  options.seq_len))
    else:
        proxy = _proxy_config(recipe, [t for ts in teachers_of.values() for t in ts])
        activations = _training_activations(proxy, options.batch_size, options.seq_len) if proxy else 0
    state = 16 * params + (4 * params if options.preservation.mode != "off" else 0) \
        + (4 * params if options.preservation.mode == "anchor" else 0)
    plans = {"training": _plan("distill", {"runtime": runtime, "student_training_state": state,
                                           "training_activations": activations, "aligned_rows": rows,
                                           "lmc_copies_fp32": 8 * params if options.lmc else 0})}
    unique = {t.name: t for ts in teachers_of.values() for t in ts}
    seq = options.chunk_chars + 2  # a chunk of ~chunk_chars characters, with BOS/EOS
    for name, plan in _teacher_forward_plans(recipe, unique.values(), runtime, options.cache_batch_size, seq, "auto",
                                             "distill", position_slices=True).items():
        plans[f"caching {name}"] = _plan("distill", {**plan["components"], "student_fp32": 4 * params,
                                                     "aligned_rows": rows})
    return _largest(plans, "distill", student_params=params, student_params_from=params_from,
                    tokens_per_capability=tokens)


def validate_loads_teachers(recipe) -> bool:
    """Whether validate will load teachers: not when it reuses a matching profile's per-item scores and has no CKA
    to compute (with CKA on, any teacher tokenising like the student is loaded: planned as all of them)."""
    from .validate import profile_matches

    validate = recipe.stage("validate")
    return validate.cka or not (validate.reuse_profile and profile_matches(recipe))


def plan_validate_ram(recipe, runtime, profile=None, student=None):
    validate, prof = recipe.stage("validate"), recipe.stage("profile")
    plans = (_teacher_forward_plans(recipe, _eligible(recipe), runtime, prof.batch_size, prof.window_tokens,
                                    prof.compute, "validate") if validate_loads_teachers(recipe) else {})
    params, params_from = _student_params(recipe, student, profile)
    if student is not None:
        config = _student_config(student)
        if config.model_type == "nexus":
            acts = _nexus_activations(config, prof.batch_size, prof.window_tokens, False)
            hidden = sum(len(s["layers"]) * s["hidden_size"] for s in config.towers)
        else:
            acts = forward_activation_bytes(config, prof.batch_size, prof.window_tokens, "fp32")["total"]
            hidden = config.num_hidden_layers * config.hidden_size
        tok = tokenizer_bytes(student)["resident"]
    else:
        proxy = _proxy_config(recipe, _tower_teachers(recipe, profile))
        acts = forward_activation_bytes(proxy, prof.batch_size, prof.window_tokens, "fp32")["total"] if proxy else 0
        hidden = proxy.num_hidden_layers * proxy.hidden_size if proxy else 0
        tok = 0
    plans["student"] = _plan("validate", {"runtime": runtime,
                                          "student_weights": params * dtype_bytes(validate.student_dtype),
                                          "tokenizer": tok, "activations": acts})
    cka = 2 * validate.cka_max_tokens * hidden * 4 * len(recipe.capabilities) if validate.cka else 0
    plan = _largest(plans, "validate", student_params=params, student_params_from=params_from)
    plan["components"]["cka_hidden_states"] = cka
    plan["total_bytes"] += cka
    # before anything is scored, validate loads each teacher's tokenizer in turn to compare tokenisations
    peaks = {spec.name: tokenizer_bytes(info["folder"])["load_peak"]
             for spec in _eligible(recipe) if (info := teacher_footprint(recipe, spec))["folder"] is not None}
    if peaks:
        name = max(peaks, key=peaks.get)
        check = _plan("validate", {"runtime": runtime, "teacher_tokenizer_load_peak": peaks[name]})
        plan["per_model"][f"tokenizer check {name}"] = check["total_bytes"]
        if check["total_bytes"] > plan["total_bytes"]:
            plan = {**check, "assumptions": {**plan["assumptions"], **check["assumptions"],
                                             "peak": f"tokenizer check {name}"}, "per_model": plan["per_model"]}
    return plan


def _export_plan(runtime, params, params_from):
    return _plan("export", {"runtime": runtime, "student_fp32": 4 * params, "serialised_copy": 4 * params},
                 student_params=params, student_params_from=params_from)


def plan_export_ram(recipe, runtime, profile=None, student=None):
    return _export_plan(runtime, *_student_params(recipe, student, profile))


def plan_checkpoint_export_ram(src, runtime):
    """`plan_export_ram` without a recipe (`nexus export SRC OUT`): the checkpoint at ``src``, from its headers."""
    return _export_plan(runtime, _checkpoint_params(src), "the checkpoint's safetensors headers")


for _name, _planner in (("profile", plan_profile_ram), ("student_build", plan_student_build_ram),
                        ("distill", plan_distill_ram), ("validate", plan_validate_ram), ("export", plan_export_ram)):
    register_stage_ram_plan(_name, _planner)


def plan_stages(recipe, runtime, profile=None, student=None) -> dict:
    """{stage: plan} of every registered stage, in order, from what exists now."""
    return {name: planner(recipe, runtime, profile=profile, student=student)
            for name, planner in STAGE_RAM_PLANS.items()}


def largest_parts(plan, n=3) -> str:
    """The ``n`` largest components in MiB, and which model or phase sets the peak."""
    parts = sorted(plan["components"].items(), key=lambda kv: -kv[1])[:n]
    peak = plan["assumptions"].get("peak")
    return ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in parts) + (f"; peak: {peak}" if peak else "")


def plan_summary(plan) -> str:
    """One line: the total and its largest components, in MiB."""
    return f"{plan['total_bytes'] / 2**20:,.0f} MiB ({largest_parts(plan)})"


def plan_table(plans, budget, source, measured=None):
    """A rich table: stage, planned peak RAM, its largest parts, the budget's share, and the measured peak if given."""
    from rich.table import Table

    table = Table(title=f"memory plan: peak RAM per stage (budget {budget / 2**20:,.0f} MiB: {source})")
    for col in ("stage", "planned MiB", "largest parts (MiB)", "of budget") + (("measured MiB", "plan / measured")
                                                                              if measured else ()):
        table.add_column(col, justify="left" if col in ("stage", "largest parts (MiB)") else "right")
    for name, plan in plans.items():
        row = [name, f"{plan['total_bytes'] / 2**20:,.0f}", largest_parts(plan), f"{plan['total_bytes'] / budget:.1%}"]
        if measured:
            m = measured.get(name)
            row += [f"{m / 2**20:,.0f}" if m else "-", f"{plan['total_bytes'] / m:.2f}" if m else "-"]
        table.add_row(*row)
    return table


def plan_localise_ram(recipe, runtime, profile=None, student=None):
    """Localisation: one teacher resident at a time in the dtype it is localised in (`localise.localise_compute`: fp32
    for a bf16 teacher on a CPU without native bf16), forwards of ``tokens_per_batch`` tokens with the head over all
    positions (ablation scores), plus the activations kept for the attribution gradient (one backward through the
    teacher: `_training_activations`) when ``attribution: gradient``."""
    from .localise import localise_compute

    options = recipe.stage("localise")
    specs = [s.model_copy(update={"dtype": localise_compute(s.dtype, options.autocast)[0]}) for s in _eligible(recipe)]
    plans = _teacher_forward_plans(recipe, specs, runtime, 1, options.tokens_per_batch, "native", "localise",
                                   sliced_head=False)
    if options.attribution == "gradient":
        for spec in specs:
            folder = teacher_footprint(recipe, spec)["folder"]
            if folder is not None:
                grad = _training_activations(load_config(folder), 1, options.tokens_per_batch)
                plans[spec.name] = _plan("localise", {**plans[spec.name]["components"], "attribution_backward": grad},
                                         **plans[spec.name]["assumptions"])
    return _largest(plans, "localise", one_teacher_resident=True)



def plan_align_ram(recipe, runtime, profile=None, student=None):
    """The align stage: per group of tower teachers, every member resident in fp32 at once, plus the merged copy, the
    plain average and one calibration forward of each (no group: nothing loads). Groups are merged one after another,
    so the plan is the largest group's. Without a profile every eligible teacher is a candidate and teachers are
    grouped by their config's shapes alone (the tokenizer is not compared), an upper bound. ``method: ties`` also
    holds its per-tensor working set (`ties_working_set_bytes`)."""
    from .align import SHAPE_KEYS

    options = recipe.stage("align")
    teachers = _tower_teachers(recipe, profile)
    infos = [(spec, teacher_footprint(recipe, spec)) for spec in teachers]
    groups = {}
    for spec, info in infos:
        if info["folder"] is None:
            continue
        config = load_config(info["folder"])
        config = getattr(config, "text_config", None) or config
        key = json.dumps([getattr(config, k, None) for k in SHAPE_KEYS], default=str)
        groups.setdefault(key, []).append((spec, info))
    groups = [g for g in groups.values() if len(g) > 1]
    if not groups:
        return _largest({}, "align")
    members = max(groups, key=lambda g: sum(info["params"] for _, info in g))
    weights = sum(4 * info["params"] for _, info in members)
    largest = max(4 * info["params"] for _, info in members)
    activations = 0
    for _, info in members:
        acts = forward_activation_bytes(load_config(info["folder"]), 4, options.window_tokens, "fp32")
        activations = max(activations, acts["layer_working_set"] + 2 * acts["logits"])
    components = {"runtime": runtime, "members_fp32": weights, "merged_and_plain_average_fp32": 2 * largest,
                  "forward_activations": activations,
                  "tokenizer": max(tokenizer_bytes(info["folder"])["resident"] for _, info in members)}
    if options.method == "ties":
        components["ties_working_set_fp32"] = ties_working_set_bytes([load_config(i["folder"]) for _, i in members])
    return _plan("align", components, members=[spec.name for spec, _ in members])


def ties_working_set_bytes(configs) -> int:
    """``method: ties``'s working set: (3 x the members other than the base + 5) fp32 copies of the largest tensor
    (the embedding or an FFN matrix) of ``configs`` (`ties_merge.ties_tensor`; measured 7.3 copies with one)."""
    tensor = 0
    for config in configs:
        config = getattr(config, "text_config", None) or config
        wide = max(config.vocab_size, getattr(config, "intermediate_size", 0) or 0)
        tensor = max(tensor, config.hidden_size * wide)
    return (3 * (len(configs) - 1) + 5) * 4 * tensor
