"""End-to-end cost of serving through selfheal_ext: latency and throughput
of one served batch with

  (a) the plain model,
  (b) the drift monitor only (``DriftMonitor``), reading every batch, and
      (b8) reading one batch in 8 (``read_every=8``),
  (c) ``SelfHealer`` dormant (monitor + dormant adapters), and (c8) with the
      monitor reading one batch in 8,
  (d) ``SelfHealer`` healing (adapters active, one adaptation step per batch),
  (e) (d) with the audit log and a rule gate,

all measured in the same run, interleaved round-robin so that the machine's
drift in speed hits every configuration alike. Time per batch is the median,
over blocks of 8 consecutive batches, of the block's mean (so a once-in-8
read is charged to the block); p95 is over single batches. CPU by default; ``--device
cuda`` on a GPU (``bench/gpu_check.sh``).

    python bench/overhead.py                  # about 2 minutes on 2 cores
    python bench/overhead.py --quick          # smoke run
"""
import argparse
import copy
import json
import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import selfheal_ext as sh  # noqa: E402
from selfheal_ext.demo import CORRUPTIONS, load_digits, load_digits_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, summary  # noqa: E402

SPARSE = 8  # read_every of the (b8) and (c8) rows, and the block of the summary


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 512),
                         nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10)).eval()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


POOL = 16  # distinct batches cycled through (one batch repeated would itself look like drift)


def setups(name, batch, device, quick):
    """(model, calibration batches, clean batches, drifted batches, monitor options)."""
    generator = torch.Generator().manual_seed(0)
    if name == "digits-cnn":
        digits = load_digits(device)
        model = load_digits_model()[0].to(device)
        calibration = list(digits["calibration"][0].split(64))
        test = digits["test"][0]
        clean = [test[torch.randint(len(test), (batch,), generator=generator).to(device)] for _ in range(POOL)]
        drifted = [CORRUPTIONS["contrast"](x, generator) for x in clean]
        return model, calibration, clean, drifted, {"window": 128, "false_alarm_every": 1000}
    # synthetic: random weights, inputs from a fixed distribution (only the cost is measured).
    # The head is scaled until the model is confident: a random model's samples all fail
    # the healer's reliability filter and it would take no step at all.
    model = (cnn() if name.startswith("cnn") else mlp()).to(device)
    shape = (3, 32, 32) if name.startswith("cnn") else (64,)
    reference = torch.randn(4096, *shape, generator=generator).to(device)
    with torch.no_grad():
        head = model[-1]
        for _ in range(20):
            entropy = sh.ops.softmax_entropy(model(reference[:512]))[0]
            if float((entropy < 0.2 * torch.log(torch.tensor(10.0))).float().mean()) > 0.8:
                break
            head.weight.mul_(2.0)
            head.bias.mul_(2.0)
    clean = [torch.randn(batch, *shape, generator=generator).to(device) for _ in range(POOL)]
    drifted = [x * 1.5 + 0.5 for x in clean]
    return model, list(reference.split(256)), clean, drifted, {"window": 512, "false_alarm_every": 1000}


def measure(name, batch, device, repeats, quick):
    model, calibration, clean, drifted, monitor_options = setups(name, batch, device, quick)
    monitor_model = copy.deepcopy(model)
    monitor = sh.DriftMonitor(monitor_model, **monitor_options)
    monitor.calibrate(calibration)
    sparse_options = dict(monitor_options, read_every=SPARSE,
                          false_alarm_every=monitor_options["false_alarm_every"] * SPARSE)
    sparse_monitor = sh.DriftMonitor(copy.deepcopy(model), **sparse_options)
    sparse_monitor.calibrate(calibration)
    dormant = sh.SelfHealer(copy.deepcopy(model), monitor_options=monitor_options)
    dormant.calibrate(calibration)
    sparse_dormant = sh.SelfHealer(copy.deepcopy(model), monitor_options=sparse_options)
    sparse_dormant.calibrate(calibration)
    healing = sh.SelfHealer(copy.deepcopy(model), monitor_options=monitor_options)
    healing.calibrate(calibration)
    directory = tempfile.mkdtemp(prefix="selfheal-overhead-")
    governed = sh.SelfHealer(copy.deepcopy(model), monitor_options=monitor_options,
                             audit=os.path.join(directory, "audit.db"), rules=[sh.rules.ClassRate(0, 0.0, 1.0)])
    governed.calibrate(calibration)
    for healer in (healing, governed):  # drive them into drift: adapters active
        for x in drifted[:8]:
            healer(x)
        if not healer.active:
            raise SystemExit(f"{name}: the healer did not activate on the drifted batch")

    def plain(x):
        with torch.no_grad():
            return model(x)

    def watched(function):
        def call(x):
            with torch.no_grad():
                return function(x)
        return call

    configurations = {
        "(a) plain model": (plain, clean),
        "(b) monitor only": (watched(monitor), clean),
        f"(b8) monitor, read_every={SPARSE}": (watched(sparse_monitor), clean),
        "(c) healer dormant": (dormant, clean),
        f"(c8) healer dormant, read_every={SPARSE}": (sparse_dormant, clean),
        "(d) healer healing": (healing, drifted),
        "(e) healing + audit + rule gate": (governed, drifted),
    }
    steps_before = {"(d) healer healing": healing.steps, "(e) healing + audit + rule gate": governed.steps}
    samples = interleaved(configurations, repeats, synchronize=lambda: synchronize(device))
    for key, healer in (("(d) healer healing", healing), ("(e) healing + audit + rule gate", governed)):
        taken = healer.steps - steps_before[key]
        if taken < repeats // 2:
            raise SystemExit(f"{name}: {key} took {taken} adaptation steps in {repeats} timed batches; "
                             "the timing would not include adaptation")
    if not healing.active or dormant.active or sparse_dormant.active:
        raise SystemExit(f"{name}: a healer changed state during timing (healing {healing.active}, "
                         f"dormant {dormant.active}, {sparse_dormant.active})")
    governed.audit.close()
    timed = {key: summary(values, SPARSE) for key, values in samples.items()}
    base = timed["(a) plain model"]["per_batch"]
    return {"model": name, "batch": batch, "device": str(device), "repeats": repeats,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rows": [{"configuration": key, "ms_per_batch": 1e3 * value["per_batch"],
                      "p95_ms": 1e3 * value["p95"], "ratio": value["per_batch"] / base,
                      "samples_per_s": batch / value["per_batch"]} for key, value in timed.items()]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 16 if args.quick else 64
    cases = [("digits-cnn", 64), ("cnn-3x32x32", 256), ("mlp-64-512-512-10", 256)]
    if args.quick:
        cases = cases[:1] + cases[2:]
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}\n")
    print("| model | batch | configuration | ms per batch | vs plain | p95 ms | samples/s |\n"
          "|---|---|---|---|---|---|---|")
    for name, batch in cases:
        result = measure(name, batch, device, repeats, args.quick)
        results.append(result)
        for row in result["rows"]:
            print(f"| {name} | {batch} | {row['configuration']} | {row['ms_per_batch']:.2f} | "
                  f"{row['ratio']:.2f}x | {row['p95_ms']:.2f} | {row['samples_per_s']:,.0f} |", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"results": results, "torch": torch.__version__, "threads": torch.get_num_threads()},
                      handle, indent=1)


if __name__ == "__main__":
    main()
