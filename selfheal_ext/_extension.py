"""Loads the compiled ops (selfheal_ext._C) and tells what was compiled.

Where the compiled extension cannot be used -- it was never built (a source
tree, no compiler), it was built against another torch, or the dynamic loader
refuses it -- nothing is loaded, the op API runs on the pure-PyTorch reference
ops, one warning says why and how to rebuild, and ``build_info()`` reports the
reason. A build made against another torch is never loaded (that would be an
undefined-symbol error or a crash, not a fallback).
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional, Tuple

import torch

OP_NAMES = (
    "adapter_forward",
    "adapter_backward",
    "softmax_entropy",
    "softmax_entropy_backward",
    "histogram_update_",
    "sketch_histogram_update_",
    "kl_divergence",
    "js_divergence",
)

REBUILD_HINT = ("rebuild it against the installed torch: `pip install --no-build-isolation .` in the "
                "selfheal_ext source tree (or `pip install --no-build-isolation --force-reinstall selfheal_ext`)")


class ExtensionFallbackWarning(RuntimeWarning):
    """The compiled extension could not be loaded: ops run on the pure-PyTorch reference."""


def _load() -> Tuple[Optional[dict], Optional[str]]:
    """(the build's configuration, None) when the compiled ops are loaded;
    (None, why not) otherwise."""
    try:
        from ._build_config import BUILD_CONFIG
    except ImportError:
        return None, "the compiled extension was not built"
    built_with = BUILD_CONFIG["torch_version"]
    if built_with != torch.__version__:
        return None, (f"the compiled extension was built against torch {built_with}, but torch "
                      f"{torch.__version__} is installed")
    try:
        from . import _C  # noqa: F401  (registers the ops with the dispatcher)
    except ImportError as error:
        return None, f"the compiled extension failed to load ({error})"
    return BUILD_CONFIG, None


BUILD_CONFIG, FALLBACK_REASON = _load()
LOADED = BUILD_CONFIG is not None
if not LOADED:
    warnings.warn(f"selfheal_ext: {FALLBACK_REASON}; running on the pure-PyTorch reference ops (slower). "
                  f"To use the fused kernels, {REBUILD_HINT}.", ExtensionFallbackWarning, stacklevel=2)


def _compiled_kernels() -> frozenset:
    if not LOADED:
        return frozenset()
    return frozenset(
        (name, device)
        for name in OP_NAMES
        for device, dispatch_key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"selfheal::{name}", dispatch_key)
    )


# Computed once at import: a set lookup is also what torch.compile can trace.
COMPILED_KERNELS = _compiled_kernels()


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the loaded extension has a kernel of op_name for device_type."""
    return (op_name, device_type) in COMPILED_KERNELS


def build_info() -> dict:
    """What this build of selfheal_ext holds.

    Returns a dict with the running torch and CUDA versions, the torch the
    extension was compiled against, whether CUDA kernels were compiled, the CUDA
    arch list, the compilers, and for each op the backends that have a compiled
    kernel. Where the compiled extension is not loaded, ``extension_loaded``
    is False, ``fallback_reason`` says why, and every op runs on the
    pure-PyTorch reference.

    >>> import selfheal_ext as sh
    >>> sh.build_info()["kernels"]["softmax_entropy"]  # doctest: +SKIP
    ['cpu', 'cuda']
    """
    config = BUILD_CONFIG or {}
    return {
        "extension_loaded": LOADED,
        "fallback_reason": FALLBACK_REASON,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "built_with_torch": config.get("torch_version"),
        "cuda_compiled": bool(config.get("cuda_compiled", False)),
        "nvcc_version": config.get("nvcc_version"),
        "cuda_arch_list": config.get("cuda_arch_list"),
        "cxx_compiler": config.get("cxx_compiler"),
        "python_version": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(),
        "kernels": {
            name: [device for device in ("cpu", "cuda") if has_kernel(name, device)]
            for name in OP_NAMES
        },
    }
