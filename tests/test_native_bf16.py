"""The bf16 paths every "auto" takes on a CPU with native bf16 matmuls (AVX512-BF16 / AMX).

The rest of the suite pins ``NEXUS_NATIVE_BF16=0`` (conftest) so its fp32 tolerances hold on any machine; these tests
set it to 1 so the autocast paths run on every machine (autocast works without native bf16, only slower), and check
that the override itself refuses a bad value.
"""

import pytest
import torch
from conftest import TINY_VOCAB, tiny_teacher
from nexus.conversion.probes.compute_mode import compute_context, native_bf16_matmul, resolve_compute
from nexus.training.distill_engine import resolve_autocast
from nexus.training.teacher_cache import CacheSettings, build_teacher_cache


def _windows(lengths=(7, 12, 9, 5)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, TINY_VOCAB, (n,), generator=g) for n in lengths]


def test_the_override_drives_every_auto(monkeypatch):
    model = tiny_teacher("llama")
    for value, native, compute, autocast in (("1", True, "bf16", "bf16"), ("0", False, "native", "off")):
        monkeypatch.setenv("NEXUS_NATIVE_BF16", value)
        assert native_bf16_matmul() is native
        assert resolve_compute("auto", model) == compute
        assert resolve_autocast("auto") == autocast
    monkeypatch.setenv("NEXUS_NATIVE_BF16", "yes")
    with pytest.raises(ValueError, match=r"NEXUS_NATIVE_BF16='yes'.*0.*1"):
        native_bf16_matmul()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-teacher", "bf16-teacher"])
@pytest.mark.parametrize("head_slice", [None, 3], ids=["one-slice", "3-position-slices"])
def test_the_teacher_cache_builds_under_bf16_autocast_and_matches_the_fp32_teacher(tmp_path, monkeypatch, dtype,
                                                                                    head_slice):
    """Under autocast the kept values are fp16 and the hidden states bf16: concatenating them must not go through
    autocast's type promotion (it refused fp16 there), and the numbers must stay within bf16 error of fp32."""
    if head_slice:
        from nexus.conversion.probes import token_scores

        monkeypatch.setattr(token_scores, "FULL_LOGIT_BUDGET", head_slice * TINY_VOCAB)
    monkeypatch.setenv("NEXUS_NATIVE_BF16", "1")
    reference = tiny_teacher("llama")
    teacher = tiny_teacher("llama").to(dtype)
    windows = _windows()
    cache = build_teacher_cache(tmp_path / "c", teacher, windows, settings=CacheSettings(k=5, layers=(1,)),
                                batch_size=4, progress=False)
    assert len(cache) == len(windows)
    for w, got in zip(windows, cache):
        with torch.no_grad():
            logits = reference(w[None]).logits[0].float()
        assert got["topk_values"].dtype == torch.float16 and got["hidden"][1].dtype == torch.bfloat16
        # the kept logits are the teacher's at the kept indices, to bf16 precision
        torch.testing.assert_close(got["topk_values"].float(), logits.gather(-1, got["topk_indices"].long()),
                                   atol=0.1, rtol=0.05)
        torch.testing.assert_close(got["logsumexp"], torch.logsumexp(logits, -1), atol=0.1, rtol=0.05)
        top1 = (got["topk_indices"][:, 0].long() == logits.argmax(-1)).float().mean().item()
        assert top1 >= 0.75, f"top-1 agreement with the fp32 teacher {top1:.2f}"


def test_compute_context_autocasts_when_native(monkeypatch):
    monkeypatch.setenv("NEXUS_NATIVE_BF16", "1")
    model = tiny_teacher("llama")
    ids = torch.randint(4, TINY_VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with compute_context(model, "auto") as mode:
        out = model(ids).logits
    assert mode == "bf16" and out.dtype == torch.bfloat16
