"""Calibration data in the forms users hold it, turned into the batches that
``calibrate`` reads, and the monitor window chosen from its amount.

``calibrate`` reads an iterable of batches: input tensors, or ``(x, y)``
pairs. Users also hold one tensor of healthy inputs (the habit of drift
libraries that take a reference set), one ``(x, y)`` pair of whole tensors,
or a ``DataLoader`` (an iterable of batches already).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

DEFAULT_BATCH_SIZE = 64
# The automatic window: the largest power of two that the healthy samples
# fill at least WINDOWS_IN_REFERENCE times (the reference and the bootstrap
# windows it is tested against come from them), between these bounds. The
# upper bound is the window the thresholds are documented for.
WINDOWS_IN_REFERENCE = 4
SMALLEST_AUTO_WINDOW = 32
LARGEST_AUTO_WINDOW = 512


def _whole(value) -> Optional[torch.Tensor]:
    """``value`` as a tensor when it is one array (a tensor or a NumPy array)."""
    if isinstance(value, torch.Tensor):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return torch.as_tensor(value)
    return None


def _whole_pair(data):
    """``(x, y)`` when ``data`` is one pair of whole tensors: inputs ``[N, ...]``
    and integer labels ``[N]``; else None (an iterable of two batches)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return None
    x, y = _whole(data[0]), _whole(data[1])
    if x is None or y is None or x.dim() < 2 or y.dim() != 1:
        return None
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.shape[0] != x.shape[0]:
        return None
    return x, y


def calibration_batches(data, batch_size: Optional[int] = None) -> Iterable:
    """The batches ``calibrate`` reads from ``data``.

    ``data`` is one of:

    * a tensor (or NumPy array) of healthy inputs ``[N, ...]``: split into
      batches of ``batch_size`` rows (default 64);
    * one ``(x, y)`` pair of whole tensors, inputs ``[N, ...]`` and integer
      labels ``[N]``: split alike into ``(x, y)`` batches;
    * an iterable of batches (a list, a generator, a ``DataLoader``), each an
      input tensor or an ``(x, y)`` pair: returned as it is.

    >>> len(calibration_batches(torch.zeros(300, 8)))
    5
    """
    size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"selfheal: batch_size must be an integer >= 1, got {batch_size!r}")
    whole = _whole(data)
    if whole is not None:
        if whole.dim() < 2:
            raise ValueError(f"selfheal: calibrate got one tensor of shape {tuple(whole.shape)}; a tensor of "
                             "healthy inputs must be [N, ...] with a sample per row (it is split into batches "
                             f"of {size} rows), or pass an iterable of batches such as x.split(64)")
        return list(whole.split(size))
    pair = _whole_pair(data)
    if pair is not None:
        return list(zip(pair[0].split(size), pair[1].split(size)))
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise TypeError(f"selfheal: calibrate takes a tensor of healthy inputs, an (x, y) pair of tensors, or "
                        f"an iterable of batches (e.g. a DataLoader or x.split(64)); got {type(data).__name__}")
    return data


def automatic_window(samples: int) -> int:
    """The monitor window for ``samples`` healthy samples: the largest power of
    two ``w`` with ``WINDOWS_IN_REFERENCE * w <= samples``, at most
    ``LARGEST_AUTO_WINDOW``. Raises when the samples do not fill the
    smallest window that often."""
    needed = WINDOWS_IN_REFERENCE * SMALLEST_AUTO_WINDOW
    if samples < needed:
        raise ValueError(f"selfheal: calibrate needs at least {needed} healthy samples with finite features and "
                         f"logits ({WINDOWS_IN_REFERENCE} x the smallest automatic window, "
                         f"{SMALLEST_AUTO_WINDOW}); got {samples}. Pass more batches.")
    window = SMALLEST_AUTO_WINDOW
    while window * 2 <= LARGEST_AUTO_WINDOW and WINDOWS_IN_REFERENCE * window * 2 <= samples:
        window *= 2
    return window
