import pytest
import torch

import selfheal_ext  # noqa: F401  (loads the ops)

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
    ),
]

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

# Smallest error budget per dtype, relative to the largest magnitude compared:
# covers the rounding of the output itself when the eager path happens to be
# exact.
ERROR_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def assert_no_worse_than_eager(fused, eager, oracle, dtype, what=""):
    """Error of the fused result against an fp64 oracle is at most twice the
    error of the same-dtype eager PyTorch result, plus a rounding floor."""
    oracle = oracle.double().cpu()
    scale = oracle.abs().max().item() if oracle.numel() else 1.0
    scale = max(scale, 1e-6)
    fused_err = (fused.double().cpu() - oracle).abs().max().item() if oracle.numel() else 0.0
    eager_err = (eager.double().cpu() - oracle).abs().max().item() if oracle.numel() else 0.0
    budget = 2 * eager_err + ERROR_FLOOR[dtype] * scale
    assert fused_err <= budget, (
        f"{what}: fused error {fused_err:.3g} exceeds 2x eager error {eager_err:.3g} "
        f"+ floor ({budget:.3g})"
    )
