"""Times each fused selfheal op against its eager reference and torch.compile.

For every case the fused op (``selfheal_ext.ops``), the eager reference
(``selfheal_ext.reference``) and ``torch.compile`` of that reference run in the
same process on the same inputs, so the ratios printed are not skewed by a
different machine load or build. Every fused result is checked against the
reference before anything is timed; a mismatch stops the run.

    python bench/bench_ops.py [--device cpu|cuda] [--quick] [--out PATH.json] [--repeats N]

CPU times are wall-clock (``time.perf_counter``) per call. CUDA times come from
CUDA events, with L2 flushed before every repeat, and each fused op's achieved
bandwidth is set against the card's peak (``--peak-gbps``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import selfheal_ext
from selfheal_ext import ops, reference
from selfheal_ext._extension import has_kernel

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_SHRINK = 16
H200_PEAK_GBPS = 4800.0
# Larger than any GPU's L2 (H200: 60 MB), so writing it evicts the previous repeat's data.
L2_FLUSH_BYTES = 256 * 2**20
ADAPTER_RANK = 16
HISTOGRAM_BINS = 32
ERROR_TEXT_LIMIT = 2000

# (rtol, atol) keyed by the dtype the reference computes in. atol is multiplied
# by max(1, max|expected|): weight gradients sum thousands of terms, and their
# rounding error grows with their size, not with 1.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Workload:
    """One case built on a device: each implementation as a no-argument callable
    returning the tensors to compare (buffers may be reused between calls)."""

    fused: Callable[[], Sequence[torch.Tensor]]
    eager: Callable[[], Sequence[torch.Tensor]]
    compiled: Callable[[], Sequence[torch.Tensor]]
    compare_dtype: Optional[torch.dtype]  # None: integer outputs, compared exactly
    min_bytes: int  # least traffic any implementation must move; the basis of GB/s
    sizes: dict


@dataclass(frozen=True)
class Case:
    name: str
    kernels: tuple  # op names whose compiled kernels the fused path relies on
    build: Callable[[torch.device], Workload]


@dataclass
class Timing:
    all_ms: list = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.all_ms)

    @property
    def min_ms(self) -> float:
        return min(self.all_ms)

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "all_ms": self.all_ms}


# ---------------------------------------------------------------- workloads


def nbytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def compile_reference(fn):
    # Static shapes: each case compiles once for its own sizes, the best case for torch.compile.
    return torch.compile(fn, dynamic=False)


def build_adapter(device, shape, channels_first, backward, dtype=torch.float32, rank=ADAPTER_RANK):
    channels = shape[1] if channels_first else shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype)
    params = {
        "down_weight": torch.randn(rank, channels, device=device, dtype=dtype)
        / math.sqrt(channels),
        "up_weight": torch.randn(channels, rank, device=device, dtype=dtype)
        / math.sqrt(rank),
        "down_bias": 0.1 * torch.randn(rank, device=device, dtype=dtype),
        "scale": 1 + 0.1 * torch.randn(channels, device=device, dtype=dtype),
        "shift": 0.1 * torch.randn(channels, device=device, dtype=dtype),
    }
    options = {"activation": "gelu", "channels_first": channels_first}
    param_bytes = nbytes(*params.values())

    if backward:
        leaves = [x.requires_grad_(), *(p.requires_grad_() for p in params.values())]
        grad_y = torch.randn(shape, device=device, dtype=dtype)

        def runner(adapter_fn):
            def step():
                y = adapter_fn(x, **params, **options)
                # grad_outputs=grad_y gives the gradient of (y * grad_y).sum()
                # without timing that product and reduction too.
                return torch.autograd.grad(y, leaves, grad_outputs=grad_y)

            return step

        # Forward reads x, writes y; backward reads grad_y and x, writes grad_x.
        # Weights are read twice and their gradients written once.
        min_bytes = 5 * nbytes(x) + 3 * param_bytes
    else:

        def runner(adapter_fn):
            return lambda: (adapter_fn(x, **params, **options),)

        # base is x: x read once, y written once, plus the weights.
        min_bytes = 2 * nbytes(x) + param_bytes

    return Workload(
        fused=runner(ops.adapter),
        eager=runner(reference.adapter),
        compiled=runner(compile_reference(reference.adapter)),
        compare_dtype=dtype,
        min_bytes=min_bytes,
        sizes={
            "x": list(shape),
            "rank": rank,
            "activation": "gelu",
            "channels_first": channels_first,
            "scale_shift_bias": True,
            "backward": backward,
            "dtype": str(dtype),
        },
    )


def build_softmax_entropy(device, rows, classes, dtype):
    # Spread like trained-classifier logits, so the softmax is neither flat nor one-hot.
    logits = (4 * torch.randn(rows, classes, device=device)).to(dtype)

    def runner(entropy_fn):
        return lambda: entropy_fn(logits)

    return Workload(
        fused=runner(ops.softmax_entropy),
        eager=runner(reference.softmax_entropy),
        compiled=runner(compile_reference(reference.softmax_entropy)),
        compare_dtype=torch.float32,  # both compute in fp32 whatever the logits' dtype
        # entropy, max_prob and logsumexp: 3 floats per row
        min_bytes=nbytes(logits) + 3 * rows * 4,
        sizes={"logits": [rows, classes], "dtype": str(dtype)},
    )


def build_histogram(device, rows, features, bins, scale=1.0):
    # scale 3: a drifted stream, about a quarter of the values outside [lo, hi)
    x = torch.randn(rows, features, device=device) * scale
    # A sprinkle of NaN and inf so the check also covers the nonfinite counts.
    x.view(-1)[::997] = float("nan")
    x.view(-1)[::1009] = float("inf")
    lo = -3 - torch.rand(features, device=device)
    hi = 3 + torch.rand(features, device=device)
    counts = torch.zeros(features, bins + 2, dtype=torch.int64, device=device)
    nonfinite = torch.zeros(features, dtype=torch.int64, device=device)

    def runner(update_fn):
        def step():
            # Fresh tables every call: each repeat does the same work and the
            # last result can be compared. The zeroing is a few hundred KB, next
            # to the MBs of x.
            counts.zero_()
            nonfinite.zero_()
            update_fn(counts, nonfinite, x, lo, hi)
            return counts, nonfinite

        return step

    return Workload(
        fused=runner(ops.histogram_update_),
        eager=runner(reference.histogram_update_),
        compiled=runner(compile_reference(reference.histogram_update_)),
        compare_dtype=None,
        # x read once; counts and nonfinite read and written.
        min_bytes=nbytes(x, lo, hi) + 2 * nbytes(counts, nonfinite),
        sizes={"x": [rows, features], "bins": bins, "counts": list(counts.shape)},
    )


def build_divergence(device, name, features, width):
    p_counts = torch.randint(0, 1000, (features, width), device=device)
    q_counts = torch.randint(0, 1000, (features, width), device=device)
    # Empty bins are common in real tables and are where the pseudo-count matters.
    p_counts[p_counts < 100] = 0
    q_counts[q_counts < 100] = 0
    fused_fn, reference_fn = getattr(ops, name), getattr(reference, name)

    def runner(divergence_fn):
        return lambda: (divergence_fn(p_counts, q_counts),)

    return Workload(
        fused=runner(fused_fn),
        eager=runner(reference_fn),
        compiled=runner(compile_reference(reference_fn)),
        compare_dtype=torch.float32,
        min_bytes=nbytes(p_counts, q_counts) + features * 4,
        sizes={"p_counts": [features, width], "q_counts": [features, width], "dtype": "int64"},
    )


def shape_text(shape) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def case_table(device: torch.device, quick: bool) -> list:
    """Sizes from the issue; --quick divides the leading dimension by 16."""

    def rows(n):
        return max(1, n // QUICK_SHRINK) if quick else n

    cases = []
    adapter_kernels = {False: ("adapter_forward",), True: ("adapter_forward", "adapter_backward")}
    for layout, shape, channels_first in (
        ("cl", (rows(4096), 1024), False),
        ("cf", (rows(32), 256, 28, 28), True),
        # many small maps (late conv stages): CPU tiles group whole samples
        ("cf", (rows(1024), 256, 4, 4), True),
    ):
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            cases.append(Case(
                f"adapter {pass_name} {layout} x{shape_text(shape)} r{ADAPTER_RANK} fp32",
                adapter_kernels[backward],
                partial(build_adapter, shape=shape, channels_first=channels_first,
                        backward=backward),
            ))

    # the healer's own sizes: the bench_heal digits CNN's first adapted map
    # (rank 4) and an MLP's hidden layer (rank 8), one batch of 64, where
    # per-call overheads weigh as much as the arithmetic
    for layout, shape, channels_first, rank in (("cf", (64, 16, 16, 16), True, 4), ("cl", (64, 128), False, 8)):
        cases.append(Case(
            f"adapter fwd+bwd {layout} x{shape_text(shape)} r{rank} fp32 (healer-sized)",
            adapter_kernels[True],
            partial(build_adapter, shape=shape, channels_first=channels_first, backward=True, rank=rank),
        ))

    entropy_dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in entropy_dtypes:
        for classes in (1000, 32000):
            cases.append(Case(
                f"softmax_entropy {shape_text((rows(4096), classes))} {DTYPE_NAMES[dtype]}",
                ("softmax_entropy",),
                partial(build_softmax_entropy, rows=rows(4096), classes=classes, dtype=dtype),
            ))

    width = HISTOGRAM_BINS + 2
    cases.append(Case(
        f"histogram_update_ x{shape_text((rows(8192), 512))} {HISTOGRAM_BINS} bins",
        ("histogram_update_",),
        partial(build_histogram, rows=rows(8192), features=512, bins=HISTOGRAM_BINS),
    ))
    cases.append(Case(
        f"histogram_update_ x{shape_text((rows(8192), 512))} {HISTOGRAM_BINS} bins, x3 (a quarter out of range)",
        ("histogram_update_",),
        partial(build_histogram, rows=rows(8192), features=512, bins=HISTOGRAM_BINS, scale=3.0),
    ))

    for name in ("kl_divergence", "js_divergence"):
        for features in (rows(512), rows(65536)):
            cases.append(Case(
                f"{name} {shape_text((features, width))} int64",
                (name,),
                partial(build_divergence, name=name, features=features, width=width),
            ))
    return cases


# ---------------------------------------------------------------- checking


def mismatch(actual, expected, compare_dtype) -> Optional[str]:
    """Why actual differs from expected beyond tolerance, or None if it does not."""
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for index, (got, want) in enumerate(zip(actual, expected)):
        if got.shape != want.shape or got.dtype != want.dtype:
            return (f"output {index}: {got.dtype} {list(got.shape)}, "
                    f"expected {want.dtype} {list(want.shape)}")
        if compare_dtype is None:
            if not torch.equal(got, want):
                differing = (got != want).sum().item()
                return f"output {index}: {differing} of {want.numel()} integer counts differ"
            continue
        rtol, atol = TOLERANCES[compare_dtype]
        got_f, want_f = got.double(), want.double()
        finite = want_f[torch.isfinite(want_f)]
        magnitude = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        if not torch.allclose(got_f, want_f, rtol=rtol, atol=atol * magnitude, equal_nan=True):
            error = (got_f - want_f).abs().nan_to_num(nan=math.inf).max().item()
            return (f"output {index}: max abs error {error:.3e} exceeds "
                    f"rtol={rtol:g}, atol={atol * magnitude:.3e} (max |expected| {magnitude:.3e})")
    return None


def detached_copy(outputs) -> list:
    # Outputs may be buffers the next call overwrites (histogram counts).
    return [t.detach().clone() for t in outputs]


def build_workload(case, device) -> Workload:
    # Same seed in the check pass and the timing pass: the inputs checked are the inputs timed.
    torch.manual_seed(0)
    return case.build(device)


def check_cases(cases, device) -> list:
    """Runs fused and eager once per case; returns one message per mismatch."""
    failures = []
    for number, case in enumerate(cases, 1):
        workload = build_workload(case, device)
        expected = detached_copy(workload.eager())
        actual = detached_copy(workload.fused())
        problem = mismatch(actual, expected, workload.compare_dtype)
        print(f"  check [{number}/{len(cases)}] {case.name}: {'FAILED' if problem else 'ok'}",
              flush=True)
        if problem:
            failures.append(f"{case.name}: fused differs from eager: {problem}")
        del workload, expected, actual
        release_memory(device)
    return failures


# ---------------------------------------------------------------- timing


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Timer:
    """Times a callable: wall clock on CPU; on CUDA, CUDA events with L2 flushed first."""

    def __init__(self, device, warmup, repeats):
        self.device = device
        self.warmup = warmup
        self.repeats = repeats
        self.flush_buffer = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
            if device.type == "cuda" else None
        )

    def __call__(self, fn) -> Timing:
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            return self._time_cuda(fn)
        return self._time_cpu(fn)

    def _time_cpu(self, fn) -> Timing:
        timing = Timing()
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            timing.all_ms.append((time.perf_counter() - start) * 1e3)
        return timing

    def _time_cuda(self, fn) -> Timing:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for start, end in zip(starts, ends):
            self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return Timing([start.elapsed_time(end) for start, end in zip(starts, ends)])


def error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + " ..."


def warm_up_compiled(workload, device):
    """Compiles (first call) and checks the compiled reference.

    Returns (seconds spent, error text or None). torch.compile can fail on a
    machine without a working compiler toolchain; that is recorded, not fatal.
    """
    start = time.perf_counter()
    try:
        outputs = detached_copy(workload.compiled())
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001  (any compile failure is reported in the JSON)
        return time.perf_counter() - start, error_text(error)
    seconds = time.perf_counter() - start
    problem = mismatch(outputs, detached_copy(workload.eager()), workload.compare_dtype)
    if problem:
        return seconds, f"compiled result differs from eager: {problem}"
    return seconds, None


def run_case(case, device, timer, peak_gbps) -> dict:
    # Each case compiles from a clean slate, so its compile time is its own.
    torch._dynamo.reset()
    workload = build_workload(case, device)
    fused_is_kernel = all(has_kernel(op, device.type) for op in case.kernels)

    times = {"fused": timer(workload.fused), "eager": timer(workload.eager)}
    compile_seconds, compiled_error = warm_up_compiled(workload, device)
    times["compiled"] = None if compiled_error else timer(workload.compiled)

    fused_ms = times["fused"].median_ms
    ratios = {
        "eager/fused": times["eager"].median_ms / fused_ms,
        "compiled/fused": times["compiled"].median_ms / fused_ms if times["compiled"] else None,
    }
    fused_gbps = workload.min_bytes / (fused_ms * 1e-3) / 1e9
    result = {
        "name": case.name,
        "kernels": list(case.kernels),
        "fused_is_kernel": fused_is_kernel,
        "sizes": workload.sizes,
        "min_bytes": workload.min_bytes,
        "times": {name: t.as_dict() if t else None for name, t in times.items()},
        "ratios": ratios,
        "compile_seconds": compile_seconds,
        "compiled_error": compiled_error,
        "fused_gbps": fused_gbps,
        "fused_peak_fraction": fused_gbps / peak_gbps if peak_gbps else None,
    }
    del workload
    release_memory(device)
    return result


# ---------------------------------------------------------------- reporting


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, args, warmup, repeats, peak_gbps) -> dict:
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "selfheal_version": selfheal_ext.__version__,
        "build_info": selfheal_ext.build_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "quick": args.quick,
        "warmup": warmup,
        "repeats": repeats,
        "peak_gbps": peak_gbps,
        "timing": (
            "CUDA events per repeat, 256 MB written before each repeat to flush L2"
            if device.type == "cuda" else "time.perf_counter per call"
        ),
    }


def ms_cell(timing: Optional[dict]) -> str:
    if timing is None:
        return "n/a"
    return f"{timing['median_ms']:.3f} ({timing['min_ms']:.3f})"


def ratio_cell(ratio: Optional[float]) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def print_table(results, show_peak):
    name_width = max(len(r["name"]) for r in results) + 2
    header = (f"{'case':<{name_width}}{'fused ms':>20}{'eager ms':>20}{'compiled ms':>20}"
              f"{'eager/fused':>13}{'comp/fused':>12}{'fused GB/s':>12}")
    if show_peak:
        header += f"{'% peak':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        name = r["name"] + ("" if r["fused_is_kernel"] else " *")
        line = (f"{name:<{name_width}}{ms_cell(r['times']['fused']):>20}"
                f"{ms_cell(r['times']['eager']):>20}{ms_cell(r['times']['compiled']):>20}"
                f"{ratio_cell(r['ratios']['eager/fused']):>13}"
                f"{ratio_cell(r['ratios']['compiled/fused']):>12}{r['fused_gbps']:>12.1f}")
        if show_peak:
            line += f"{100 * r['fused_peak_fraction']:>7.1f}%"
        print(line)
    print("times: median (min) over the repeats; ratios > 1 mean the fused op is faster")
    if any(not r["fused_is_kernel"] for r in results):
        print("* no compiled kernel on this device: 'fused' ran the reference fallback")
    for r in results:
        if r["compiled_error"]:
            print(f"compiled n/a for {r['name']}: {r['compiled_error'].splitlines()[0]}")


def write_results(out_path, env, results, started, complete=False, check_failures=()):
    env = dict(env, total_seconds=time.perf_counter() - started)
    document = {
        "environment": env,
        "complete": complete,
        "check_failures": list(check_failures),
        "cases": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(document, indent=2) + "\n")


# ---------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"divide every size by {QUICK_SHRINK} (CI smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results path (default bench/results/ops_<device>.json)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per implementation (default 10 on cpu, 50 on cuda)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (default 2 on cpu, 10 on cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 gives steadier "
                             "CPU numbers on a machine shared with other jobs")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help=f"peak memory bandwidth for the %% of peak column "
                             f"(default {H200_PEAK_GBPS:g}, an H200, on cuda; none on cpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but torch {torch.__version__} sees no CUDA device")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = device.type == "cuda"
    repeats = args.repeats or (50 if on_cuda else 10)
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    peak_gbps = args.peak_gbps or (H200_PEAK_GBPS if on_cuda else None)
    out_path = args.out or RESULTS_DIR / f"ops_{device.type}.json"
    started = time.perf_counter()

    env = environment(device, args, warmup, repeats, peak_gbps)
    print(f"device: {env['device_name']} ({device.type}); torch {torch.__version__}; "
          f"{env['cpu_count']} CPUs, {env['torch_num_threads']} threads; "
          f"repeats {repeats}, warm-up {warmup}{'; quick sizes' if args.quick else ''}")
    if env["load_average"]:
        # Other jobs on the machine move CPU timings more than anything measured here.
        print(f"load average: {', '.join(f'{load:.2f}' for load in env['load_average'])}")
    print(f"compiled kernels: {env['build_info']['kernels']}")

    cases = case_table(device, args.quick)
    print("checking fused against eager before timing:")
    failures = check_cases(cases, device)
    if failures:
        write_results(out_path, env, [], started, check_failures=failures)
        print("\nABORTED: fused ops disagree with the eager reference, nothing was timed:",
              file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1

    timer = Timer(device, warmup, repeats)
    results = []
    print("timing:")
    for number, case in enumerate(cases, 1):
        case_start = time.perf_counter()
        results.append(run_case(case, device, timer, peak_gbps))
        # Written after every case: a run stopped at a time limit keeps what it measured.
        write_results(out_path, env, results, started, complete=number == len(cases))
        print(f"  [{number}/{len(cases)}] {case.name}: "
              f"{time.perf_counter() - case_start:.1f} s "
              f"(compile {results[-1]['compile_seconds']:.1f} s)", flush=True)

    print()
    print_table(results, show_peak=peak_gbps is not None)
    print(f"\nwrote {out_path} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
