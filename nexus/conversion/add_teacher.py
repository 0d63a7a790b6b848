"""Add one teacher to an existing student without redoing the others: ``nexus add-teacher STUDENT FRAGMENT --out``.

    report = add_teacher("runs/gemma/export", "reverse.yaml", "out/gemma+reverse")

1. **Check** (nothing loaded but configs and tokenizers): the student folder is a NEXUS student whose recorded
   hashes match (`student_hashes`); the fragment (`add_teacher_fragment`) names one teacher and capabilities the
   student does not serve yet (with ``replace``, capabilities it serves are first removed from their towers:
   `remove_capability`); the old capabilities' probes come from ``student_recipe`` or the student's
   ``nexus_capabilities.json``.
2. **Profile** only the new teacher on its capabilities (`profile.run_profile` on the fragment's recipe); a teacher
   not competent at one of them (`profile.no_competent_teacher`: its CI not clear of the trivial baseline, or exact
   match 0) is refused with its score and the baseline.
3. **Build** its tower the way consolidate does (`student_build._compress_tower`, the fragment's student_build
   options, ``tower_budget_fraction`` of its layer parameters) with its own embedding, final norm and head over the
   student's existing shared vocabulary (`tower_vocabulary`); the shared vocabulary and weights do not change, and
   how much of the new text the shared vocabulary covers is reported. The tower is appended (index n) and the
   router grows a class; the router is refitted on old + new capability text (`router_fit.fit_router`).
4. **Distil** only the new tower and the router (`distill.run_distill`): every old tower is marked exact in the
   init's ``student_build.json``, so distill freezes it with the shared embedding, final norm and head; the old
   capabilities' rows train the router only (their "teacher" is the student itself, never run).
5. **Prove and export** (`no_regression`): per-tensor sha256 of every old tower and shared weight before and after,
   old capabilities' scores before / after (and against the original validation report, when found), router
   accuracy on old capabilities, interference (old capabilities with the new tower forced), the new capabilities'
   retention; then the new student folder with ``nexus_hashes.json``, ``nexus_capabilities.json``,
   ``add_teacher_report.json`` and ``add_teacher_report.md``, written all at once. ``STUDENT_DIR`` is never
   modified; work files live in a sibling ``.OUT.work-PID`` folder removed at the end.

Memory: at most one copy of the student is resident. Its tensors are read one at a time (`tensor_stream`: hashed,
compared, copied into the grown student), the freed heap goes back to the OS between phases, and each scored model
is dropped before the next loads. bench/add_teacher.py measures the peak against a full consolidate and the floor
(imports + one student copy) no implementation can go under.
"""

import gc
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .add_teacher_fragment import STUDENT_TEACHER, load_fragment
from .atomic_output import atomic_dir, check_output_vs_sources
from .peak_rss import release_freed_memory
from .recipe import load_recipe, validate_recipe
from .student_capabilities import (
    capability_record,
    read_student_capabilities,
    write_student_capabilities,
)
from .student_hashes import (
    check_student_folder,
    folder_tensor_hashes,
    iter_student_tensors,
    tensor_sha256,
    write_student_hashes,
)

REPORT = "add_teacher_report.json"
SCHEMA = "nexus.add_teacher/1"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class AddTeacherError(ValueError):
    pass


def old_capabilities_recipe(student, fragment, fragment_path, served):
    """A recipe holding the student's old (served) capabilities: from ``student_recipe`` or the student's record."""
    if fragment.student_recipe is not None:
        recipe = load_recipe(fragment.student_recipe)
    else:
        record = read_student_capabilities(student)
        if record is None:
            raise AddTeacherError(f"fragment {fragment_path}: student_recipe is not set and student {student} records "
                                  "no capabilities (nexus_capabilities.json); name the recipe it was built from")
        caps = [{**c, "teachers": None} for c in record["capabilities"]]
        recipe = validate_recipe({"name": "student", "teachers": [{"name": STUDENT_TEACHER, "source": str(student)}],
                                  "capabilities": caps,
                                  "stages": {"profile": record.get("profile", {}),
                                             "validate": record.get("validate", {}),
                                             "distill": {"train_data": record.get("train_data", {})}}},
                                 base_dir=student)
    missing = [c for c in served if c not in {x.name for x in recipe.capabilities}]
    if missing:
        raise AddTeacherError(f"fragment {fragment_path}: the student serves {missing}, which "
                              f"{fragment.student_recipe or 'nexus_capabilities.json'} does not describe")
    return recipe.model_copy(update={"capabilities": [c for c in recipe.capabilities if c.name in served]})


def check_competence(recipe, profile, fragment_path):
    """Refuse capabilities the new teacher is not competent at, naming its score and the trivial baseline."""
    from .profile import dropped_capabilities

    teacher = recipe.teachers[0].name
    bad = []
    for cap in dropped_capabilities(recipe, profile):
        r, b = profile["capabilities"][cap][teacher], profile["baselines"][cap]
        ci = r.get("ci") or [float("nan")] * 2
        bad.append(f"{cap}: {r['metric']} {r['score']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] vs trivial baseline "
                   f"{b['score']:.4f} ({b['metric']}, {'higher' if b['higher_is_better'] else 'lower'} is better)")
    if bad:
        raise AddTeacherError(f"fragment {fragment_path}: teacher {teacher!r} is not competent (its CI is not clear "
                              "of the trivial baseline): " + "; ".join(bad))


def vocabulary_coverage(student_tok, teacher_tok, plan, texts):
    """How the shared vocabulary covers the new capabilities' text: tokens per byte under the student's and the
    teacher's tokenizers, the share of student tokens with a row of the new tower, byte-fallback tokens."""
    s_tokens = t_tokens = n_bytes = with_row = byte_tokens = 0
    strings = student_tok.convert_ids_to_tokens(list(range(len(student_tok))))
    rows = set(plan)
    for text in texts.values():
        for chunk in text.chunks:
            ids = student_tok(chunk, add_special_tokens=False)["input_ids"]
            s_tokens += len(ids)
            with_row += sum(i in rows for i in ids)
            byte_tokens += sum(1 for i in ids if str(strings[i]).startswith("<0x"))
            t_tokens += len(teacher_tok(chunk, add_special_tokens=False)["input_ids"])
            n_bytes += len(chunk.encode())
    how = {}
    for kind, _ in plan.values():
        how[kind] = how.get(kind, 0) + 1
    return {"student_tokens_per_byte": s_tokens / max(n_bytes, 1), "teacher_tokens_per_byte": t_tokens / max(n_bytes, 1),
            "student_tokens_with_own_row": with_row / max(s_tokens, 1), "byte_fallback_tokens": byte_tokens,
            "rows": how, "note": "the shared vocabulary is not extended: text it lacks tokens for is split into "
                                "existing tokens (or byte fallback)"}


def build_new_tower(student_dir, recipe, old_recipe, fragment, console, show_progress, init_dir):
    """The init student: old weights as they are + the new own-vocabulary tower + a refitted router; returns its
    record. Writes ``init_dir`` (with a ``student_build.json`` marking every old tower exact, so distill freezes
    them)."""
    from ..modeling_nexus import NexusConfig, NexusForCausalLM
    from .load_check import checked_load_state_dict
    from .remove_capability import rebuilt_config
    from .router_fit import fit_router
    from .student_build import DTYPES as BUILD_DTYPES
    from .student_build import _compress_tower, student_training_texts, teacher_counts
    from .teacher_source import load_tokenizer, resolve_teacher_folder
    from .tokenizer_roundtrip import probe_unk_tolerance
    from .tower_vocabulary import fill_own_vocabulary, own_vocabulary_plan

    teacher = recipe.teachers[0]
    options = recipe.stage("student_build")
    old_config = NexusConfig.from_pretrained(student_dir)  # its weights are streamed in below, never loaded whole
    student_tok = load_tokenizer(student_dir)
    names = [t.get("name") for t in old_config.towers]
    if teacher.name in names:
        raise AddTeacherError(f"the student already has a tower named {teacher.name!r} (towers: {names}); give the "
                              "new teacher another name")
    folder = resolve_teacher_folder(teacher.source, teacher.allow_pickle, recipe.cache_dir)
    counts = teacher_counts(folder)
    texts = student_training_texts(recipe)
    budget = int(fragment.add_teacher.tower_budget_fraction * counts["layers"])
    caps = [c.name for c in recipe.capabilities]
    info = _compress_tower(teacher.name, teacher.name, folder, BUILD_DTYPES[teacher.dtype], texts, budget, options,
                           console, show_progress, {c.name: probe_unk_tolerance(c) for c in recipe.capabilities},
                           weights={c.name: c.weight for c in recipe.capabilities}, keep_head=True)
    plan = own_vocabulary_plan(student_tok, info["tokenizer"], [c for t in texts.values() for c in t.chunks],
                               counts["vocab_size"])
    own = info["own_vocabulary"]
    spec = {**info["tower_spec"], "name": teacher.name, "capabilities": caps, "vocabulary": "own",
            "embedding_scale": own["embedding_scale"], "final_logit_softcapping": own["final_logit_softcapping"],
            "vocabulary_ids": list(plan)}
    old_names = list(getattr(old_config, "capability_names", None) or old_config.capability_to_tower)
    config = rebuilt_config(old_config, json.loads(json.dumps(old_config.towers)) + [spec], old_names + caps)
    torch.manual_seed(options.seed)
    model = NexusForCausalLM(config).eval()
    n_old = len(old_config.towers)
    with torch.no_grad():
        old_router = copy_old_tensors(model, student_dir, n_old)
        tower = model.model.towers[n_old]
        checked_load_state_dict(tower, info["tower_state"], info["source"], what=f"tower {teacher.name!r}",
                                allow_missing=("in_proj", "out_proj", "embed_tokens", "norm.", "lm_head"))
        embedding = info["embedding"]
        head = own["lm_head"] if own["lm_head"] is not None else embedding
        rows = fill_own_vocabulary(tower, plan, embedding, head, own["norm_weight"])
        if old_router:  # old rows kept until the refit below
            model.model.router.proj.weight[:n_old] = old_router["model.router.proj.weight"]
            model.model.router.proj.bias[:n_old] = old_router["model.router.proj.bias"]
    model.tie_weights()
    old_texts = student_training_texts(old_recipe)
    if fragment.add_teacher.router == "new_row" and old_router:
        from .router_new_class import fit_new_router_row

        router_fit = fit_new_router_row(model, student_tok, {**old_texts, **texts}, n_old,
                                        window=options.window_tokens, seed=options.seed)
    else:  # refit, or the old student had one tower (no router: both classes are new)
        router_fit = fit_router(model, student_tok, {**old_texts, **texts}, window=options.window_tokens,
                                seed=options.seed)
    coverage = vocabulary_coverage(student_tok, info["tokenizer"], plan, texts)
    del info
    gc.collect()
    model.save_pretrained(init_dir)
    student_tok.save_pretrained(init_dir)
    record = {"towers": [{"index": i, "name": names[i], "exact": True, "note": "old tower: frozen"}
                         for i in range(n_old)]
              + [{"index": n_old, "name": teacher.name, "exact": False, "capabilities": caps}],
              "new_tower": {"index": n_old, "name": teacher.name, "capabilities": caps, "layer_budget": budget,
                            "teacher_layer_params": counts["layers"],
                            "params": sum(p.numel() for p in tower.parameters()), "own_vocabulary_rows": rows},
              "router_fit": router_fit, "vocabulary_coverage": coverage}
    (Path(init_dir) / "student_build.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def copy_old_tensors(model, student_dir, n_old):
    """Copy every stored tensor of the student at ``student_dir`` into the grown ``model``, one tensor resident at a
    time (the old student is never loaded whole); returns the old router's tensors ({} when it had none). Raises
    `AddTeacherError` when the stored tensors do not fit the grown student."""
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    router, seen, unexpected = {}, set(), []
    for name, tensor in iter_student_tensors(student_dir):
        if name.startswith("model.router."):
            router[name] = tensor
        elif name in params and tuple(params[name].shape) == tuple(tensor.shape):
            params[name].copy_(tensor)
        else:
            unexpected.append(name)
        seen.add(name)
    stray = [k for k in model.state_dict() if k not in seen
             and not k.startswith((f"model.towers.{n_old}.", "model.router.", "lm_head.weight"))]
    if stray or unexpected:
        raise AddTeacherError(f"student {student_dir}: its tensors do not fit the grown student (missing {stray[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return router


def distill_new_tower(recipe, old_recipe, profile, init_dir, run_dir, fragment_stages, console, show_progress,
                      router_frozen=False):
    """`run_distill` on a recipe of old capabilities (taught by the frozen student: router rows only) + the new
    teacher's; returns its summary."""
    from .distill import run_distill

    new_teacher = recipe.teachers[0]
    distill_raw = dict(fragment_stages.get("distill") or {})
    train_data = {**dict(old_recipe.stage("distill").train_data), **dict(recipe.stage("distill").train_data)}
    distill_raw.update(train_data=train_data, freeze_exact_towers=True)
    distill_raw.setdefault("lmc", False)  # interpolating would round frozen weights; nothing of them may move
    if router_frozen:  # new_row: the fitted router stays as it is (its old rows are part of the proof)
        loss = dict(distill_raw.get("loss") or {"kd": 1.0, "ce": 0.2})
        distill_raw["loss"] = {**loss, "router": 0.0}
    caps = [{**c.model_dump(mode="json"), "teachers": None} for c in old_recipe.capabilities] + \
           [{**c.model_dump(mode="json"), "teachers": None} for c in recipe.capabilities]
    raw = {"name": "add-teacher-distill", "run_dir": str(run_dir),
           "teachers": [new_teacher.model_dump(mode="json"), {"name": STUDENT_TEACHER, "source": str(init_dir),
                                                             "dtype": "fp32"}],
           "capabilities": caps, "stages": {"distill": distill_raw}}
    distill_recipe = validate_recipe(raw, base_dir=run_dir)
    old_caps = [c.name for c in old_recipe.capabilities]
    d_profile = {"best": {**{c: STUDENT_TEACHER for c in old_caps}, **{c.name: new_teacher.name
                                                                      for c in recipe.capabilities}},
                 "capabilities": {**{c: {STUDENT_TEACHER: {"score": 1.0, "higher_is_better": True}}
                                     for c in old_caps},
                                  **{c.name: {new_teacher.name: profile["capabilities"][c.name][new_teacher.name]}
                                     for c in recipe.capabilities}}}
    return run_distill(distill_recipe, init_dir, profile=d_profile, out=Path(run_dir) / "distill", console=console,
                       show_progress=show_progress)


def add_teacher(student, fragment_path, out, replace=False, overwrite=False, console=None, show_progress=True):
    """Add the fragment's teacher to the student at ``student``, writing the new student to ``out``; returns the
    report (also ``out/add_teacher_report.json``)."""
    from rich.console import Console

    from ..modeling_nexus import NexusConfig
    from . import no_regression as nr
    from .profile import run_profile

    start = time.perf_counter()
    console = console or Console(quiet=not show_progress)
    student, out, fragment_path = Path(student), Path(out), Path(fragment_path)
    check_output_vs_sources(out, {"student": student, "fragment": fragment_path})
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass --overwrite")
    checked = check_student_folder(student)
    work = out.parent / f".{out.name}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        fragment, recipe = load_fragment(fragment_path, work / "profile-run")
        config = NexusConfig.from_pretrained(student)
        if config.encoders:
            raise AddTeacherError(f"student {student} has encoder(s) {[e.get('name') for e in config.encoders]} "
                                  "(nexus attach-speech): add teachers to the text student, then attach speech again")
        served = list(config.capability_to_tower)
        new_caps = [c.name for c in recipe.capabilities]
        existing = [c for c in new_caps if c in served]
        base_student = student
        if existing and not replace:
            raise AddTeacherError(f"fragment {fragment_path}: capability {existing[0]!r} already exists in student "
                                  f"{student} (tower {config.towers[config.capability_to_tower[existing[0]]]['name']!r}"
                                  "); pass --replace to let the new teacher take it over")
        if existing:  # --replace: the capabilities leave their old towers first (an emptied tower goes)
            from .remove_capability import remove_capability

            for i, cap in enumerate(existing):
                nxt = work / f"replaced-{i}"
                remove_capability(base_student, cap, nxt)
                base_student = nxt
            config = NexusConfig.from_pretrained(base_student)
            served = list(config.capability_to_tower)
        old_recipe = old_capabilities_recipe(student, fragment, fragment_path, served + existing)
        old_recipe = old_recipe.model_copy(update={"capabilities": [c for c in old_recipe.capabilities
                                                                    if c.name in served]})
        console.rule(f"[bold]add-teacher: profile {recipe.teachers[0].name} on {', '.join(new_caps)}")
        profile = run_profile(recipe, console=console, show_progress=show_progress)
        check_competence(recipe, profile, fragment_path)

        console.rule("[bold]add-teacher: build the new tower")
        init_dir = work / "init"
        build = build_new_tower(base_student, recipe, old_recipe, fragment, console, show_progress, init_dir)
        release_freed_memory()  # the grown model is gone: hand its heap back before distill loads the student
        console.print(f"  tower {build['new_tower']['name']}: {build['new_tower']['params']:,} params; router refit "
                      f"held-out accuracy {build['router_fit'].get('held_out_accuracy')}")
        console.rule("[bold]add-teacher: distil the new tower and the router (everything else frozen)")
        n_old = build["new_tower"]["index"]
        router_frozen = fragment.add_teacher.router == "new_row" and n_old > 1
        summary = distill_new_tower(recipe, old_recipe, profile, init_dir, work / "distill-run",
                                    fragment.stages, console, show_progress, router_frozen=router_frozen)
        distilled = Path(summary["student"])
        release_freed_memory()

        # ------------------------------------------------ final tensors: the old ones exactly as stored
        # One copy of the student is resident: the distilled tensors, each old one swapped for its stored bytes
        # as the base student is streamed past them (compared first, hashed on the way).
        final = dict(iter_student_tensors(distilled))
        old_keys, moved, router_before = [], [], {}
        # the check at the start hashed STUDENT_DIR; a --replace base (capabilities removed first) is hashed here
        hashes_before = checked["hashes"] if base_student == student else {}
        for key, stored in iter_student_tensors(base_student):
            if base_student != student:
                hashes_before[key] = tensor_sha256(stored)
            if key.startswith("model.router."):
                router_before[key] = stored
                continue
            old_keys.append(key)
            if key not in final or not torch.equal(final[key].float(), stored.float()):
                moved.append(key)
            final[key] = stored  # the stored dtype of every old tensor is kept
        if moved:
            raise AddTeacherError(f"distillation changed {len(moved)} frozen tensor(s) (first: {moved[0]}); "
                                  "nothing was written")
        router_rows = {}  # new_row: the old classes' rows of the router, as stored before
        if router_frozen:
            for key in ("model.router.proj.weight", "model.router.proj.bias"):
                if not torch.equal(final[key][:n_old].float(), router_before[key].float()):
                    raise AddTeacherError(f"the old rows of {key} changed; nothing was written")
                final[key] = torch.cat([router_before[key], final[key][n_old:].to(router_before[key].dtype)])
                router_rows[key] = router_before[key]

        console.rule("[bold]add-teacher: no-regression proof")
        vopts = old_recipe.stage("validate")
        dtype = DTYPES[vopts.student_dtype]
        old_caps = [c.name for c in old_recipe.capabilities]
        n_boot, seed = old_recipe.stage("profile").n_bootstrap, old_recipe.stage("profile").seed
        routed = ((lambda m, c: {}) if vopts.routing == "router"
                  else (lambda m, c: {"capability": c} if c in m.config.capability_to_tower else {}))
        items = fragment.add_teacher.router_items
        with atomic_dir(out, overwrite=overwrite, sources={"student": student, "fragment": fragment_path}) as tmp:
            from safetensors.torch import save_file

            for path in distilled.iterdir():
                if path.is_file() and path.suffix != ".safetensors" and path.name != "student_build.json":
                    shutil.copy2(path, tmp / path.name)
            save_file({k: v.contiguous() for k, v in final.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            del final  # from here on one scored student at a time is resident
            release_freed_memory()
            measured_before = nr.measure_student(base_student, old_recipe, old_caps, dtype, routed, items, old_caps)
            new_index = build["new_tower"]["index"]
            measured_after = nr.measure_student(tmp, old_recipe, old_caps, dtype, routed, items, old_caps)
            forced = nr.measure_student(tmp, old_recipe, old_caps, dtype, lambda m, c: {"tower": new_index})
            new_scores = nr.measure_student(tmp, recipe, new_caps, dtype, lambda m, c: {}, items, new_caps)
            report_path, original = nr.find_original_report(
                student, [old_recipe.run_path / "validate" / "report.json"] if fragment.student_recipe else [])
            probes = measured_before["probes"]
            retention = {cap: nr.retention_change(probes[cap], measured_before["scores"][cap],
                                                  measured_after["scores"][cap],
                                                  (original or {}).get("retention", {}).get(cap), n_boot, seed)
                         for cap in old_caps}
            router = {cap: nr.router_entry(measured_before["router"][cap], measured_after["router"][cap], n_boot,
                                           seed) for cap in old_caps}
            interference = {cap: nr.interference_entry(probes[cap], measured_after["scores"][cap],
                                                       forced["scores"][cap],
                                                       (original or {}).get("retention", {}).get(cap))
                            for cap in old_caps}
            hashes_after = folder_tensor_hashes(tmp)
            written = dict(iter_student_tensors(tmp, router_rows))
            rows_before = {f"{k}[:{n_old}]": tensor_sha256(v) for k, v in router_rows.items()}
            rows_after = {f"{k}[:{n_old}]": tensor_sha256(written[k][:n_old]) for k in router_rows}
            tensors = nr.tensor_proof({**hashes_before,
                                       **rows_before}, {**hashes_after, **rows_after}, old_keys + list(rows_before))
            new = new_capability_retention(recipe, profile, new_scores, n_boot, seed)
            passed = (tensors["all_equal"] and all(e["unchanged_within_ci"] for e in retention.values())
                      and all(e["not_below_before_ci"] for e in router.values()))
            report = {
                "schema": SCHEMA, "student": str(student), "fragment": str(fragment_path),
                "teacher": recipe.teachers[0].name, "replaced": existing,
                "new_capabilities": new, "old_capabilities": old_caps,
                "student_hashes": checked["note"], "original_report": str(report_path) if report_path else None,
                "profile": {c: profile["capabilities"][c] for c in new_caps},
                "baselines": {c: profile["baselines"][c] for c in new_caps},
                "build": build, "distill": {k: summary.get(k) for k in ("train", "router_accuracy",
                                                                        "router_accuracy_before", "frozen",
                                                                        "heldout_ce", "alignment", "params")},
                "proof": {"tensors": tensors, "retention": retention, "router": router,
                          "interference": interference, "passed": passed,
                          "router_tensors": ("model.router.proj.weight/bias grew one row (the new class); the old "
                                             "rows are kept bit-identical (listed as [:n] above)") if router_frozen
                          else ("model.router.proj.weight/bias grew one row and were refitted (router: refit): the "
                                "only old tensors that change")},
                "capability_to_tower": build_capability_map(tmp), "seconds": None,
            }
            if not tensors["all_equal"]:
                raise AddTeacherError(f"old tensors changed: {tensors['changed'][:3]}; nothing was written")
            record = capability_record(old_recipe, old_caps)
            new_record = capability_record(recipe, new_caps)
            record["capabilities"] += new_record["capabilities"]
            record["train_data"].update(new_record["train_data"])
            write_student_capabilities(tmp, record)
            write_student_hashes(tmp)
            report["seconds"] = round(time.perf_counter() - start, 1)
            (tmp / REPORT).write_text(json.dumps(nr_json(report), indent=1, default=str))
            (tmp / "add_teacher_report.md").write_text(nr.proof_markdown(report))
            (tmp / "README.md").write_text(f"# NEXUS student\n\n{student.name} + teacher `{report['teacher']}` "
                                           f"(`nexus add-teacher`). See add_teacher_report.md.\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**report, "path": str(out)}


def build_capability_map(folder):
    from ..modeling_nexus import NexusConfig

    return dict(NexusConfig.from_pretrained(folder).capability_to_tower)


def nr_json(obj):
    from .json_finite import json_finite

    return json_finite(obj)


def new_capability_retention(recipe, profile, scored, n_boot, seed):
    """Each new capability: the student's retention vs the new teacher on the profile's items (paired CI)."""
    from . import no_regression as nr
    from .retention import item_rows

    items_path = Path(profile["path"]) / "items.json"
    items = json.loads(items_path.read_text())
    teacher = recipe.teachers[0].name
    out = {}
    for cap in recipe.capabilities:
        probe = scored["probes"][cap.name]
        summary, s_items = scored["scores"][cap.name]
        metric, lower = ("bpb", True) if probe.name == "lm" else (summary["metric"], not summary["higher_is_better"])
        s_rows, t_rows = item_rows(probe.name, s_items, metric), item_rows(probe.name, items[cap.name][teacher], metric)
        num, den = (t_rows, s_rows) if lower else (s_rows, t_rows)
        value, ci = nr.paired_ratio(num, den, n_boot, seed)
        hits = scored["router"].get(cap.name, [])
        out[cap.name] = {"teacher": teacher, "metric": metric, "value": value, "ci": ci, "n": len(s_rows),
                         "router_accuracy": sum(hits) / max(len(hits), 1)}
    return out
