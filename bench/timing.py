"""Timing helpers shared by the benchmarks: configurations run interleaved
round-robin (the machine's drift in speed hits them alike), summarised per
block of consecutive batches so that a configuration that does its work on
one batch in k (``read_every``) is charged for it.
"""
import statistics
import time


def interleaved(configurations, repeats, synchronize=lambda: None, warmup=3):
    """``configurations``: ``{name: (function, inputs)}``; calls each
    ``function(inputs[i % len(inputs)])`` in turn, ``repeats`` times each.
    Returns ``{name: [seconds per call]}`` in call order."""
    for function, inputs in configurations.values():
        for x in inputs[:warmup]:
            function(x)
    samples = {name: [] for name in configurations}
    for repeat in range(repeats):
        for name, (function, inputs) in configurations.items():
            x = inputs[repeat % len(inputs)]
            synchronize()
            started = time.perf_counter()
            function(x)
            synchronize()
            samples[name].append(time.perf_counter() - started)
    return samples


def summary(values, block):
    """Seconds per batch: the median over blocks of ``block`` consecutive calls
    of each block's mean (robust to the odd slow call, and it averages a
    once-per-block cost over the block), plus the 95th percentile of single
    calls (what the one expensive call in a block costs)."""
    blocks = [values[start:start + block] for start in range(0, len(values) - block + 1, block)]
    if not blocks:
        raise ValueError(f"need at least {block} calls, got {len(values)}")
    ordered = sorted(values)
    return {"per_batch": statistics.median(sum(chunk) / len(chunk) for chunk in blocks),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "median_call": statistics.median(values)}
