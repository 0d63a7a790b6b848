"""The distillation engine, preservation and LMC on tiny random Nexus students (no downloads, CPU, seconds each).

The data-side loss modules are stood in for by `CELoss` (same signature: ``(outputs, batch) -> (loss, parts)``).
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_teacher
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.training.distill_engine import list_checkpoints, train_student
from nexus.training.distill_options import (
    EngineOptions,
    LMCOptions,
    PreservationOptions,
)
from nexus.training.lmc import lmc_refine
from nexus.training.preservation import (
    Preservation,
    check_importance,
    taylor_importance,
)
from safetensors.torch import load_file, load_model, save_model

TESTS_DIR = Path(__file__).resolve().parent
VOCAB = 97


def tiny_student(seed=0):
    return nexus_from_teacher(tiny_teacher("llama", seed=seed)).train()


def token_batches(seed=0, rows=4, length=16, poison=()):
    """Global micro-batch ``i`` is a pure function of (seed, i); indices in ``poison`` make the loss infinite."""
    def batch(i):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        ids = torch.randint(4, VOCAB, (rows, length), generator=gen)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
               "capability": torch.zeros(rows, dtype=torch.long)}
        if i in poison:
            out["loss_scale"] = torch.tensor(float("inf"))
        return out
    return batch


class CELoss(torch.nn.Module):
    """Next-token cross-entropy: the stand-in for the data side's loss modules. ``learnable``: a trained logit
    temperature, standing in for a loss module's own parameters (hidden-state projections)."""

    def __init__(self, learnable=False):
        super().__init__()
        self.log_temperature = torch.nn.Parameter(torch.zeros(())) if learnable else None

    def forward(self, outputs, batch):
        logits = outputs.logits[:, :-1].float()  # (B, T-1, V)
        if self.log_temperature is not None:
            logits = logits * torch.exp(-self.log_temperature)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
        if "loss_scale" in batch:
            loss = loss * batch["loss_scale"]
        return loss, {"ce": float(loss.detach())}


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(model, options, run_dir, batches=None, loss=None, **kwargs):
    return train_student(model, loss or CELoss(), batches or token_batches(), options, run_dir, progress=False,
                         **kwargs)


# ----------------------------------------------------------------------------------------- (1) loss regression


def test_two_step_losses_match_an_independent_loop(tmp_path):
    lr, wd, clip = 1e-2, 0.1, 0.05  # clip well below the gradient norm so clipping is exercised
    opts = EngineOptions(steps=2, micro_batches_per_step=2, lr=lr, weight_decay=wd, warmup_steps=2,
                         max_grad_norm=clip, betas=(0.9, 0.95), eps=1e-8, checkpoint_every=10)
    log = run(tiny_student(0), opts, tmp_path / "engine")

    # independent re-implementation: plain torch, same init, same batches, same hyper-parameters
    model, batches = tiny_student(0), token_batches()
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    expected, norms = [], []
    for step in range(2):
        for g in opt.param_groups:
            g["lr"] = lr * (step + 1) / 2  # linear warm-up over 2 steps
        total = 0.0
        for micro in range(2):
            b = batches(step * 2 + micro)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1))
            (loss / 2).backward()
            total += loss.item() / 2
        expected.append(total)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()

    got = [loss for _, loss in log["losses"]]
    assert [s for s, _ in log["losses"]] == [1, 2]
    assert got == pytest.approx(expected, abs=1e-5)
    assert norms[0] > clip  # clipping was active
    assert log["tokens"] == 2 * 2 * 4 * 16 and log["skipped_steps"] == 0 and log["autocast"] == "off"
    lines = [json.loads(ln) for ln in (tmp_path / "engine" / "run_log.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "loss" in ln]
    assert [ln["loss"] for ln in steps] == pytest.approx(expected, abs=1e-5)
    assert [ln["grad_norm"] for ln in steps] == pytest.approx(norms, rel=1e-4)
    assert steps[0]["lr"] == pytest.approx(lr / 2) and steps[1]["lr"] == pytest.approx(lr)


# ----------------------------------------------------------------------------------------- (2) exact resume


@pytest.mark.parametrize("mode", ["off", "lr_scale", "anchor"])
def test_resume_after_a_crash_gives_bit_identical_weights(tmp_path, mode):
    opts = EngineOptions(steps=6, micro_batches_per_step=2, lr=1e-2, warmup_steps=2, weight_decay=0.01,
                         checkpoint_every=3, keep_last=1)
    calib = token_batches(seed=7)
    importance = taylor_importance(tiny_student(0), [calib(0)], CELoss()) if mode != "off" else None
    keep = {"mode": mode, "anchor_lambda": 10.0}

    straight, loss_a = tiny_student(0), CELoss(learnable=True)
    log_a = run(straight, opts, tmp_path / "a", loss=loss_a, preservation=Preservation(keep, importance))
    assert float(loss_a.log_temperature.detach()) != 0.0  # the loss module's own parameter trained
    assert [p.name for _, p in list_checkpoints(tmp_path / "a")] == ["step-00000006"]  # keep_last=1

    good = token_batches()

    def crashing(i):
        if i == 9:  # micro-batch 9 = step 5's second micro-batch: steps 1-4 ran, the checkpoint is at step 3
            raise RuntimeError("simulated crash")
        return good(i)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_student(0), opts, tmp_path / "b", batches=crashing, loss=CELoss(learnable=True),
            preservation=Preservation(keep, importance))
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]

    resumed, loss_b = tiny_student(seed=5), CELoss(learnable=True)  # different weights: all from the checkpoint
    with torch.no_grad():
        loss_b.log_temperature.fill_(0.3)
    log_b = run(resumed, opts, tmp_path / "b", loss=loss_b, preservation=Preservation(keep, importance))
    assert log_b["resumed_from"] == 3 and log_b["steps"] == 6
    wa, wb = weights(straight), weights(resumed)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.equal(loss_a.log_temperature, loss_b.log_temperature)
    assert log_b["losses"] == log_a["losses"]
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "run_log.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "loss" in ln] == [1, 2, 3, 4, 5, 6]  # the crashed run's step 4 was redone

    # a finished run is returned as it is; changed trajectory options are refused, naming the field
    again = run(tiny_student(0), opts, tmp_path / "a", loss=CELoss(learnable=True),
                preservation=Preservation(keep, importance))
    assert again["steps"] == 6 and again["session_tokens"] == 0
    with pytest.raises(ValueError, match="'lr'"):
        run(tiny_student(0), opts.model_copy(update={"lr": 2e-2}), tmp_path / "a", loss=CELoss(learnable=True),
            preservation=Preservation(keep, importance))
    with pytest.raises(FileExistsError, match="resume=True"):
        run(tiny_student(0), opts, tmp_path / "a", resume=False, loss=CELoss(learnable=True),
            preservation=Preservation(keep, importance))


# ----------------------------------------------------------------------------------------- (3) two processes

_TWO_PROCESS_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from accelerate import PartialState
from safetensors.torch import save_file
from test_distill_engine import CELoss, tiny_student, token_batches
from nexus.training.distill_engine import train_student
from nexus.training.distill_options import EngineOptions

model, loss = tiny_student(0), CELoss(learnable=True)
log = train_student(model, loss, token_batches(), EngineOptions(**json.loads({opts!r})), {run_dir!r},
                    progress=False)
rank = PartialState().process_index
tensors = {{k: v.contiguous() for k, v in model.state_dict().items()}}
tensors["loss.log_temperature"] = loss.log_temperature.detach().clone()
save_file(tensors, f"{out}/rank{{rank}}.safetensors")
with open(f"{out}/rank{{rank}}.json", "w") as fh:
    json.dump(log, fh)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run_agrees(tmp_path):
    opts = EngineOptions(steps=3, micro_batches_per_step=2, lr=1e-2, warmup_steps=1, checkpoint_every=2)
    script = tmp_path / "two_process.py"
    script.write_text(_TWO_PROCESS_SCRIPT.format(tests=str(TESTS_DIR), opts=opts.model_dump_json(),
                                                 run_dir=str(tmp_path / "run"), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(log["world_size"] == 2 and log["steps"] == 3 for log in logs)
    assert logs[0]["losses"] == logs[1]["losses"]
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    init = weights(tiny_student(0))
    assert any(not torch.equal(w0[k], init[k]) for k in init)  # it trained
    assert float(w0["loss.log_temperature"]) != 0.0

    # each rank saw half of every global batch: the same trajectory as one process, up to summation order
    single, loss1 = tiny_student(0), CELoss(learnable=True)
    log1 = run(single, opts, tmp_path / "single", loss=loss1)
    assert log1["tokens"] == logs[0]["tokens"]
    assert [x for _, x in log1["losses"]] == pytest.approx([x for _, x in logs[0]["losses"]], abs=1e-4)
    ws = {**weights(single), "loss.log_temperature": loss1.log_temperature.detach()}
    assert max(float((ws[k] - w0[k]).abs().max()) for k in ws) < 1e-4
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 3]


# ----------------------------------------------------------------------------------------- (4) NaN/inf guard


def test_nonfinite_step_is_skipped_logged_and_training_continues(tmp_path):
    opts = EngineOptions(steps=5, lr=1e-2, checkpoint_every=1, keep_last=5)
    log = run(tiny_student(0), opts, tmp_path / "run", batches=token_batches(poison={2}))  # step 3 is poisoned
    assert log["steps"] == 5 and log["skipped_steps"] == 1
    assert log["skipped"] == [{"step": 3, "reason": "non-finite loss"}]
    assert log["losses"][2] == [3, None] and all(math.isfinite(x) for s, x in log["losses"] if s != 3)
    lines = {ln["step"]: ln for ln in map(json.loads, (tmp_path / "run" / "run_log.jsonl").read_text().splitlines())
             if "loss" in ln}
    assert lines[3]["skipped"] is True and lines[3]["reason"] == "non-finite loss"
    assert not any(lines[s]["skipped"] for s in (1, 2, 4, 5))
    ckpt = {s: load_file(p / "model.safetensors") for s, p in list_checkpoints(tmp_path / "run")}
    assert all(torch.equal(ckpt[2][k], ckpt[3][k]) for k in ckpt[2])  # no update on the skipped step
    assert any(not torch.equal(ckpt[3][k], ckpt[4][k]) for k in ckpt[3])  # training went on
    assert all(torch.isfinite(v).all() for v in ckpt[5].values())
    opt_state = {s: load_file(p / "optimizer.safetensors") for s, p in list_checkpoints(tmp_path / "run")}
    assert float(opt_state[3]["0.step"]) == float(opt_state[2]["0.step"]) == 2.0

    with pytest.raises(FloatingPointError, match="2 consecutive steps skipped"):
        run(tiny_student(0), EngineOptions(steps=5, max_consecutive_skips=2), tmp_path / "bad",
            batches=token_batches(poison=set(range(10))))


# ----------------------------------------------------------------------------------------- (5) preservation


def test_preservation_slows_the_most_important_weights(tmp_path):
    calib = token_batches(seed=3)
    importance = taylor_importance(tiny_student(0), [calib(0), calib(1)], CELoss())
    names = list(importance)
    flat = torch.cat([importance[n].reshape(-1) for n in names])
    top = flat >= flat.quantile(0.95)  # the 5% most important elements
    bottom = flat <= flat.quantile(0.5)
    init = torch.cat([p.detach().reshape(-1) for p in (dict(tiny_student(0).named_parameters())[n] for n in names)])

    def moved(mode, **kw):
        model = tiny_student(0)
        run(model, EngineOptions(steps=8, lr=1e-2, checkpoint_every=100), tmp_path / mode,
            preservation=Preservation({"mode": mode, **kw}, importance))
        params = dict(model.named_parameters())
        delta = (torch.cat([params[n].detach().reshape(-1) for n in names]) - init).abs()
        return float(delta[top].mean()), float(delta[bottom].mean())

    off_top, off_bottom = moved("off")
    scale_top, scale_bottom = moved("lr_scale", strength=0.9)
    anchor_top, anchor_bottom = moved("anchor", anchor_lambda=50.0)
    print(f"\nmean |delta theta| of the top-5% important elements: off {off_top:.2e}  lr_scale {scale_top:.2e}  "
          f"anchor {anchor_top:.2e}; bottom half: off {off_bottom:.2e}  lr_scale {scale_bottom:.2e}  "
          f"anchor {anchor_bottom:.2e}")
    assert off_top > 0
    assert scale_top < 0.5 * off_top
    assert anchor_top < 0.5 * off_top
    assert scale_bottom > 0.5 * off_bottom  # the unimportant weights still train


def test_importance_is_checked_against_the_model():
    model = tiny_student(0)
    q = "model.towers.0.layers.0.self_attn.q_proj.weight"
    out_dim = model.get_parameter(q).shape[0]
    rows = check_importance({q: torch.rand(out_dim, 1)}, model)
    assert rows[q].shape == (out_dim, 1)
    with pytest.raises(ValueError, match="no such parameter"):
        check_importance({"model.towers.0.layers.9.mlp.up_proj.weight": torch.ones(1)}, model)
    with pytest.raises(ValueError, match="ambiguous"):
        check_importance({q: torch.rand(out_dim)}, model)
    with pytest.raises(ValueError, match="does not broadcast"):
        check_importance({q: torch.rand(out_dim + 1, 1)}, model)
    with pytest.raises(ValueError, match="needs importance"):
        Preservation(PreservationOptions(mode="anchor"))


# ----------------------------------------------------------------------------------------- (6) LMC


def test_lmc_endpoints_barrier_and_artefacts(tmp_path):
    model_a, model_b = tiny_student(0).eval(), tiny_student(1).eval()
    batch = token_batches(seed=11)(0)

    @torch.no_grad()
    def score(model):
        return CELoss()(model(input_ids=batch["input_ids"], use_cache=False), batch)[0].item()

    score_a, score_b = score(model_a), score(model_b)
    save_model(model_b, str(tmp_path / "b.safetensors"))  # one endpoint as a checkpoint file
    template = tiny_student(2).eval()
    result = lmc_refine(template, model_a, tmp_path / "b.safetensors", score, LMCOptions(points=5),
                        out_dir=tmp_path / "lmc", labels=("seed0", "seed1"), score_name="CE")
    assert result["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result["scores"][0] == score_a and result["scores"][-1] == score_b
    assert result["barrier"] == max(result["excess"]) >= 0
    assert result["best_score"] == min(result["scores"])
    assert score(template) == result["best_score"]  # the model is left at the best alpha
    saved = json.loads((tmp_path / "lmc" / "lmc.json").read_text())
    chord = [(1 - a) * score_a + a * score_b for a in saved["alphas"]]
    assert saved["barrier"] == pytest.approx(max(s - c for s, c in zip(saved["scores"], chord)))
    assert (tmp_path / "lmc" / "lmc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="does not fit"):
        bigger = nexus_from_teacher(tiny_teacher("qwen3"))
        lmc_refine(template, model_a, bigger, score, LMCOptions(points=3))


# ----------------------------------------------------------------------------------------- engine details


def test_multi_tower_batches_train_only_their_tower_and_tied_checkpoints_load(tmp_path):
    from nexus.modeling_nexus import NexusConfig, NexusForCausalLM

    layer = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 24}
    torch.manual_seed(0)
    model = NexusForCausalLM(NexusConfig(vocab_size=VOCAB, hidden_size=16, tie_word_embeddings=True, towers=[
        {"type": "decoder", "name": "a", "layers": [layer]}, {"type": "decoder", "name": "b", "layers": [layer]}]))
    before = weights(model)
    base = token_batches()
    log = run(model, EngineOptions(steps=2, lr=1e-2, checkpoint_every=1, keep_last=2), tmp_path,
              batches=lambda i: {**base(i), "tower": torch.ones(4, dtype=torch.long)})
    after = weights(model)
    assert log["steps"] == 2 and log["skipped_steps"] == 0
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.towers.0."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.towers.1."))
    reloaded = NexusForCausalLM(model.config)
    load_model(reloaded, list_checkpoints(tmp_path)[-1][1] / "model.safetensors")
    assert all(torch.equal(v, after[k]) for k, v in weights(reloaded).items())
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_bf16_autocast_switch_runs_close_to_fp32(tmp_path):
    fp32 = run(tiny_student(0), EngineOptions(steps=2, checkpoint_every=10), tmp_path / "fp32")
    bf16 = run(tiny_student(0), EngineOptions(steps=2, autocast="bf16", checkpoint_every=10), tmp_path / "bf16")
    assert fp32["autocast"] == "off" and bf16["autocast"] == "bf16"
    assert [x for _, x in bf16["losses"]] == pytest.approx([x for _, x in fp32["losses"]], abs=0.05)
    assert [x for _, x in bf16["losses"]] != [x for _, x in fp32["losses"]]  # bf16 really ran


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path):
    """Checkpointing recomputes activations in the backward pass; the gradients, and so the weights, are the same,
    and the model is left without checkpointing afterwards."""
    base = dict(steps=3, micro_batches_per_step=2, lr=1e-2, warmup_steps=1, checkpoint_every=3)
    plain, ckpt = tiny_student(0), tiny_student(0)
    run(plain, EngineOptions(**base), tmp_path / "plain")
    calls = []
    for layer in ckpt.model.towers[0].layers:  # count calls of each MLP's forward (hooks do not rerun on recompute)
        layer.mlp.forward = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(layer.mlp.forward)
    run(ckpt, EngineOptions(**base, gradient_checkpointing=True), tmp_path / "ckpt")
    layers = len(ckpt.model.towers[0].layers)
    assert len(calls) == 2 * 3 * 2 * layers  # every MLP ran twice per micro-batch: forward + recomputation
    assert not ckpt.model.gradient_checkpointing
    wa, wb = weights(plain), weights(ckpt)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------- keeping the best weights


def test_the_best_scored_checkpoint_is_kept_and_survives_a_resume(tmp_path):
    """``evaluate`` scores the model at every checkpoint step; the run ends with the weights of the lowest score (here
    step 2 of 6, a stand-in for a held-out loss that rises as a run overfits), resumed runs keep the scores, and
    without ``evaluate`` the last weights stay."""
    opts = EngineOptions(steps=6, lr=1e-2, checkpoint_every=2, keep_last=1)
    scores = {2: 1.0, 4: 3.0, 6: 2.0}  # by step: the best is step 2

    def scorer(seen):
        def evaluate(model):
            assert not model.training  # scored in eval mode
            step = 2 * (len(seen) + 1)
            seen.append(weights(model))
            return scores[step]
        return evaluate

    last = tiny_student(0)
    plain = run(last, opts, tmp_path / "plain")
    assert plain["evaluations"] == [] and plain["best"] is None and not plain["restored_best"]

    seen = []
    model = tiny_student(0)
    log = run(model, opts, tmp_path / "best", evaluate=scorer(seen))
    assert log["evaluations"] == [[2, 1.0], [4, 3.0], [6, 2.0]]
    assert log["best"] == {"step": 2, "score": 1.0} and log["restored_best"]
    got, at_two, at_six = weights(model), seen[0], seen[2]
    assert all(torch.equal(got[k], at_two[k]) for k in got)
    assert not all(torch.equal(at_six[k], at_two[k]) for k in got)  # (the weights did move after step 2)
    assert all(torch.equal(at_six[k], v) for k, v in weights(last).items())  # evaluating changes no trajectory
    assert json.loads((tmp_path / "best" / "best" / "best.json").read_text()) == {"step": 2, "score": 1.0}

    # a crash after step 4's checkpoint: the resumed run keeps step 2's score and still ends with its weights
    good = token_batches()

    def crashing(i):
        if i == 4:
            raise RuntimeError("simulated crash")
        return good(i)

    seen_b = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_student(0), opts, tmp_path / "b", batches=crashing, evaluate=scorer(seen_b))
    resumed = tiny_student(seed=5)
    log_b = run(resumed, opts, tmp_path / "b", evaluate=scorer(seen_b))
    assert log_b["resumed_from"] == 4 and log_b["evaluations"] == log["evaluations"] and log_b["restored_best"]
    assert all(torch.equal(v, got[k]) for k, v in weights(resumed).items())

    # the best weights on disk must be the ones the trainer state names
    (tmp_path / "best" / "best" / "best.json").write_text(json.dumps({"step": 4, "score": 3.0}))
    with pytest.raises(RuntimeError, match="holds step 4"):
        run(tiny_student(0), opts, tmp_path / "best", evaluate=scorer([]))
