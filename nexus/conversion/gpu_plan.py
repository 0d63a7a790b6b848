"""Does a recipe fit one GPU? The planned peak GPU memory of each stage, and of serving the student, from configs.

`plan_gpu(recipe, gpu_gb)` answers, for one GPU of ``gpu_gb`` GiB, per stage of the recipe's pipeline and for inference
of the student: the planned peak (the largest set of things the stage holds on the device at once, by component) and
whether it fits. Nothing is loaded: teacher sizes come from their safetensors headers, a GGUF's tensor table, or (a
folder holding only ``config.json``, e.g. a 7B-class teacher planned before it is downloaded) the config's analytic
count (`memory_plan.hf_parameter_count`); the student's from its checkpoint in the run folder when it exists, else its
budget. The terms are those of the RAM plans (`stage_memory`), without what stays on the host (the tokenizer, the
aligned distillation rows, the process's own RSS), plus a CUDA context:

=============  ======================================================================================================
profile        the largest teacher's weights in its dtype + one no-grad forward of batch_size x window_tokens
localise       (when the pipeline runs it) the largest teacher's weights + a forward of tokens_per_batch tokens, and
               with ``attribution: gradient`` the activations its backward keeps
align          (when the pipeline runs it) every tower teacher in fp32, the merged copy and the plain average, one
               calibration forward of 4 x window_tokens, and ``method: ties``'s per-tensor working set
student_build  per tower teacher: the fp32 teacher, its Nexus import, the calibration gradients (3 x fp32), the
               student so far (fp32) and the calibration pass's activations (batch 2 x window_tokens, with backward)
distill        the larger of training (student x 16 bytes: weights, gradients, two AdamW moments; + preservation;
               + activations of batch_size x seq_len with backward; + LMC's copies) and caching (a teacher's
               weights + its forward of cache_batch_size x one chunk + the student in fp32)
validate       the larger of a teacher's scoring forward (as profile) and the student's (student_dtype, no grad)
export         runs on the CPU: no GPU memory
inference      `memory_plan.plan_final_model` on the student's config (bf16 weights, the routed tower's KV cache at
               ``context`` tokens, the prefill); before the student exists: its budget in bf16 plus the KV cache and
               prefill of the largest tower teacher's shapes
=============  ======================================================================================================

A plan that does not fit says by how much; it is a statement, not a refusal (`nexus plan` exits 0 either way).
"""

from pathlib import Path

from .memory_plan import (
    GIB,
    dtype_bytes,
    forward_activation_bytes,
    hf_parameter_count,
    load_config,
    plan_final_model,
    safetensors_numel,
)

CUDA_CONTEXT_BYTES = GIB // 2  # the CUDA context and the allocator's reserve, typical of one process on one GPU
STAGES = ("profile", "student_build", "distill", "validate", "export", "inference")


def teacher_size(recipe, spec) -> dict:
    """``{"params", "from", "config"}`` of a teacher, loading nothing: safetensors headers, else a GGUF's tensor table,
    else its config (a folder with only ``config.json`` is planned from the config alone)."""
    source = Path(spec.source)
    if source.is_dir() and (source / "config.json").is_file():
        config = load_config(source)
        stored = safetensors_numel(source)
        if stored is not None:
            return {"params": stored, "from": "safetensors headers", "config": config}
        return {"params": hf_parameter_count(config)["total"], "from": "config.json (no weights)", "config": config}
    from .stage_memory import teacher_footprint

    info = teacher_footprint(recipe, spec)  # a GGUF: its converted folder, or its tensor table
    config = load_config(info["folder"]) if info["folder"] is not None else None
    return {"params": info["params"], "from": "GGUF", "config": config}


def _plan(stage, components, **assumptions):
    return {"stage": stage, "kind": "gpu", "components": components, "total_bytes": sum(components.values()),
            "assumptions": assumptions}


def _largest(plans, stage, **assumptions):
    label = max(plans, key=lambda k: plans[k]["total_bytes"])
    return {**plans[label], "stage": stage,
            "assumptions": {**plans[label]["assumptions"], **assumptions, "peak": label},
            "per_model": {k: p["total_bytes"] for k, p in plans.items()}}


def _teacher_forwards(recipe, specs, sizes, batch, seq_len, stage, position_slices=False, extra=None):
    from .probes.token_scores import SLICED_HEAD_TYPES

    plans = {}
    for spec in specs:
        size = sizes[spec.name]
        components = {"cuda_context": CUDA_CONTEXT_BYTES, "teacher_weights": size["params"] * dtype_bytes(spec.dtype)}
        if size["config"] is not None:
            sliced = getattr(size["config"], "model_type", None) in SLICED_HEAD_TYPES
            acts = forward_activation_bytes(size["config"], batch, seq_len, spec.dtype, sliced_head=sliced,
                                            position_slices=position_slices)
            components["activations"] = acts["total"]
        plans[spec.name] = _plan(stage, {**components, **(extra or {})}, batch=batch, seq_len=seq_len,
                                 params_from=size["from"])
    return plans


def student_checkpoint(recipe):
    """The student's folder in the run folder (export, else distill, else the student build), or None."""
    for stage in ("export", "distill", "student_build"):
        folder = Path(recipe.run_path) / stage
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None


def _localise_plan(recipe, eligible, sizes):
    from .stage_memory import _training_activations

    options = recipe.stage("localise")
    per = _teacher_forwards(recipe, eligible, sizes, 1, options.tokens_per_batch, "localise")
    if options.attribution == "gradient":
        for spec in eligible:
            if sizes[spec.name]["config"] is not None:
                per[spec.name]["components"]["attribution_backward"] = _training_activations(
                    sizes[spec.name]["config"], 1, options.tokens_per_batch)
                per[spec.name]["total_bytes"] = sum(per[spec.name]["components"].values())
    return _largest(per, "localise", one_teacher_resident=True)


def _align_plan(recipe, towers, sizes):
    from .stage_memory import ties_working_set_bytes

    options = recipe.stage("align")
    members = [s for s in towers if sizes[s.name]["config"] is not None]
    if len(members) < 2:
        return _plan("align", {}, note="fewer than two tower teachers with a config: nothing to merge")
    fp32 = [4 * sizes[s.name]["params"] for s in members]
    acts = max(forward_activation_bytes(sizes[s.name]["config"], 4, options.window_tokens, "fp32")["total"]
               for s in members)
    components = {"cuda_context": CUDA_CONTEXT_BYTES, "members_fp32": sum(fp32),
                  "merged_and_plain_average_fp32": 2 * max(fp32), "forward_activations": acts}
    if options.method == "ties":
        components["ties_working_set_fp32"] = ties_working_set_bytes([sizes[s.name]["config"] for s in members])
    return _plan("align", components, members=[s.name for s in members],
                 note="every tower teacher, an upper bound: which of them share a family is known after the profile")


def plan_gpu(recipe, gpu_gb=16.0, context=4096) -> dict:
    """{stage: plan} with ``fits`` and ``headroom_bytes`` for one GPU of ``gpu_gb`` GiB; see the module docstring."""
    from .stage_memory import (
        _distill_teachers,
        _eligible,
        _nexus_activations,
        _tower_teachers,
        _training_activations,
        student_budget_params,
    )

    budget = int(gpu_gb * GIB)
    eligible = _eligible(recipe)
    sizes = {spec.name: teacher_size(recipe, spec) for spec in recipe.teachers}
    towers = _tower_teachers(recipe, None)
    student = student_checkpoint(recipe)
    student_config = None
    if student is not None:
        from ..modeling_nexus import NexusConfig

        student_config = NexusConfig.from_pretrained(student)
        student_params, student_from = safetensors_numel(student), f"the checkpoint in {student}"
    else:
        student_params, student_from = student_budget_params(recipe, towers), "the student budget (not built yet)"
    with_config = [s for s in towers if sizes[s.name]["config"] is not None]
    proxy = max(with_config, key=lambda s: sizes[s.name]["params"]) if with_config else None
    proxy_config = sizes[proxy.name]["config"] if proxy else None
    plans = {}

    prof = recipe.stage("profile")
    plans["profile"] = _largest(_teacher_forwards(recipe, eligible, sizes, prof.batch_size, prof.window_tokens,
                                                  "profile"), "profile", one_teacher_resident=True)
    pipeline = recipe.pipeline or ()
    if "localise" in pipeline:
        plans["localise"] = _localise_plan(recipe, eligible, sizes)
    if "align" in pipeline:
        plans["align"] = _align_plan(recipe, towers, sizes)

    build = recipe.stage("student_build")
    if build.layout == "dense":
        plans["student_build"] = _plan("student_build", {"cuda_context": CUDA_CONTEXT_BYTES,
                                                         "student_fp32": 4 * student_params}, layout="dense")
    else:
        per = {}
        for spec in towers:
            fp32 = 4 * sizes[spec.name]["params"]
            components = {"cuda_context": CUDA_CONTEXT_BYTES, "teacher_fp32": fp32, "nexus_import_fp32": fp32,
                          "calibration_gradients_fp32": fp32, "student_so_far_fp32": 4 * student_params}
            config = sizes[spec.name]["config"]
            if config is not None:
                seq = min(build.window_tokens, int(getattr(config, "max_position_embeddings", 2048) or 2048))
                components["calibration_activations"] = _training_activations(config, 2, seq)
            per[spec.name] = _plan("student_build", components)
        plans["student_build"] = _largest(per, "student_build", one_teacher_resident=True)

    distill = recipe.stage("distill")
    if student_config is not None:
        acts = _nexus_activations(student_config, distill.batch_size, distill.seq_len, True)
    else:
        acts = _training_activations(proxy_config, distill.batch_size, distill.seq_len) if proxy_config else 0
    state = 16 * student_params + (4 * student_params if distill.preservation.mode != "off" else 0) \
        + (4 * student_params if distill.preservation.mode == "anchor" else 0)
    per = {"training": _plan("distill", {"cuda_context": CUDA_CONTEXT_BYTES, "student_training_state": state,
                                         "training_activations": acts,
                                         "lmc_copies_fp32": 8 * student_params if distill.lmc else 0})}
    cached = {t.name: t for ts in _distill_teachers(recipe, None, distill.teachers_per_capability).values()
              for t in ts}
    per.update({f"caching {name}": plan for name, plan in _teacher_forwards(
        recipe, cached.values(), sizes, distill.cache_batch_size, distill.chunk_chars + 2, "distill",
        position_slices=True, extra={"student_fp32": 4 * student_params}).items()})
    plans["distill"] = _largest(per, "distill", student_params=student_params, student_params_from=student_from)

    validate = recipe.stage("validate")
    per = _teacher_forwards(recipe, eligible, sizes, prof.batch_size, prof.window_tokens, "validate")
    if student_config is not None:
        student_acts = _nexus_activations(student_config, prof.batch_size, prof.window_tokens, False)
    else:
        student_acts = forward_activation_bytes(proxy_config, prof.batch_size, prof.window_tokens,
                                                "fp32")["total"] if proxy_config else 0
    per["student"] = _plan("validate", {"cuda_context": CUDA_CONTEXT_BYTES,
                                        "student_weights": student_params * dtype_bytes(validate.student_dtype),
                                        "activations": student_acts})
    plans["validate"] = _largest(per, "validate")

    plans["export"] = _plan("export", {}, note="runs on the CPU: no GPU memory")

    if student_config is not None:
        final = plan_final_model(student_config, context)
        plans["inference"] = _plan("inference", {"cuda_context": CUDA_CONTEXT_BYTES, **final["components"]},
                                   **final["assumptions"], student_from=student_from)
    else:
        components = {"cuda_context": CUDA_CONTEXT_BYTES, "weights_bf16": 2 * student_params}
        if proxy_config is not None:
            hd = getattr(proxy_config, "head_dim", None) or proxy_config.hidden_size // proxy_config.num_attention_heads
            components["kv_cache_bf16"] = (2 * proxy_config.num_hidden_layers * proxy_config.num_key_value_heads
                                           * hd * context * 2)
            H, nh, nkv = proxy_config.hidden_size, proxy_config.num_attention_heads, proxy_config.num_key_value_heads
            # one layer's live set in one bf16 prefill pass: residual + normed copy, q/k/v, the MLP's three
            # (a fused SDPA kernel: no (T, T) scores)
            components["prefill_layer_working_set"] = 2 * context * (4 * H + 2 * (nh + 2 * nkv) * hd
                                                                     + 3 * proxy_config.intermediate_size)
            components["last_token_logits"] = proxy_config.vocab_size * (2 + 4)
        plans["inference"] = _plan("inference", components, context=context, batch=1, dtype="bf16",
                                   student_params=student_params, student_from=student_from,
                                   shapes_from=f"the largest tower teacher, {proxy.name}" if proxy else None)

    for plan in plans.values():
        plan["fits"] = plan["total_bytes"] <= budget
        plan["headroom_bytes"] = budget - plan["total_bytes"]
        plan["gpu_bytes"] = budget
    return plans
