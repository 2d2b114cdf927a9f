"""Loads the compiled ops (selfheal_ext._C) and tells what was compiled.

A build made against another torch is refused here with a message that says
how to rebuild, instead of an undefined-symbol error from the dynamic loader.
When no build exists at all (running from a source tree that was never
compiled), nothing is loaded and the op API falls back to the pure-PyTorch
reference.
"""

from __future__ import annotations

import sys

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

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` in the selfheal_ext source tree"


def _load():
    try:
        from ._build_config import BUILD_CONFIG
    except ImportError:
        return None
    built_with = BUILD_CONFIG["torch_version"]
    if built_with != torch.__version__:
        raise ImportError(
            f"selfheal_ext was compiled against torch {built_with}, but torch "
            f"{torch.__version__} is installed; {REBUILD_HINT}"
        )
    try:
        from . import _C  # noqa: F401  (registers the ops with the dispatcher)
    except ImportError as error:
        raise ImportError(
            f"selfheal_ext's compiled extension failed to load ({error}); {REBUILD_HINT}"
        ) from error
    return BUILD_CONFIG


BUILD_CONFIG = _load()
LOADED = BUILD_CONFIG is not None


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
    kernel.

    >>> import selfheal_ext as sh
    >>> sh.build_info()["kernels"]["softmax_entropy"]  # doctest: +SKIP
    ['cpu', 'cuda']
    """
    config = BUILD_CONFIG or {}
    return {
        "extension_loaded": LOADED,
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
