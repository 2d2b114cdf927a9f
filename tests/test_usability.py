"""What a new user meets first: calibration data in the forms users hold it,
the window chosen from the amount of healthy data, the library's logger,
``--version``, and a source distribution that holds everything a build needs."""

import copy
import logging
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import selfheal_ext as sh
from selfheal_ext.batches import automatic_window, calibration_batches
from healing_data import Task, trained_model

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(false_alarm_every=200, bootstrap=400)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).eval()


def test_monitor_calibrates_on_one_tensor_split_into_batches():
    monitor = sh.DriftMonitor(_mlp(), **FAST)
    report = monitor.calibrate(torch.randn(1024, 8), progress=False)
    assert report.samples == 1024 and report.batch_size == 64
    assert report.window == 256 and report.window_chosen
    assert any("window of 256 samples chosen from 1024" in note for note in report.notes)
    monitor(torch.randn(64, 8))
    assert monitor.last_report.samples == 64


def test_300_healthy_samples_calibrate_with_an_automatic_window():
    monitor = sh.DriftMonitor(_mlp(), **FAST)
    report = monitor.calibrate(torch.randn(300, 8), batch_size=50, progress=False)
    assert report.window == 64 and report.window_chosen and monitor.config["window"] == 64
    assert report.samples == 300 and report.batch_size == 50
    for _ in range(3):
        monitor(torch.randn(50, 8))
    assert not monitor.last_report.warming_up  # 150 samples fill a 64-sample window


def test_a_fixed_window_is_kept_and_too_little_data_says_how_much_is_needed():
    monitor = sh.DriftMonitor(_mlp(), window=128, **FAST)
    report = monitor.calibrate(torch.randn(600, 8), progress=False)
    assert report.window == 128 and not report.window_chosen
    with pytest.raises(ValueError, match=r"at least 512 healthy samples .*got 300"):
        sh.DriftMonitor(_mlp(), window=128, **FAST).calibrate(torch.randn(300, 8), progress=False)
    fresh = sh.DriftMonitor(_mlp(), **FAST)
    with pytest.raises(ValueError, match=r"at least 128 healthy samples .*got 100"):
        fresh.calibrate(torch.randn(100, 8), progress=False)
    assert not fresh.calibrated and fresh.config["window"] is None


@pytest.mark.parametrize("samples, window", [(128, 32), (255, 32), (256, 64), (300, 64), (1024, 256),
                                             (2048, 512), (100_000, 512)])
def test_automatic_window_is_the_largest_power_of_two_filled_four_times(samples, window):
    assert automatic_window(samples) == window


def test_an_automatic_window_state_loads_into_an_automatic_monitor_only_if_the_window_fits():
    monitor = sh.DriftMonitor(_mlp(), **FAST)
    monitor.calibrate(torch.randn(300, 8), progress=False)
    state = monitor.state_dict()
    restored = sh.DriftMonitor(_mlp(), **FAST)
    restored.load_state_dict(state)
    assert restored.config["window"] == 64
    x = torch.randn(64, 8)
    assert monitor(x).equal(restored(x)) and monitor.last_report.score == restored.last_report.score
    with pytest.raises(ValueError, match="different configuration .*window"):
        sh.DriftMonitor(_mlp(), window=128, **FAST).load_state_dict(state)


def test_calibration_accepts_an_x_y_pair_and_a_dataloader_alike():
    x, y = torch.randn(1024, 8), torch.randint(0, 3, (1024,))
    pair = sh.DriftMonitor(_mlp(), **FAST).calibrate((x, y), progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    from_loader = sh.DriftMonitor(_mlp(), **FAST).calibrate(loader, progress=False)
    assert pair.reference_accuracy is not None
    assert pair.reference_accuracy == from_loader.reference_accuracy
    assert pair.temperature == from_loader.temperature and pair.window_threshold == from_loader.window_threshold


def test_calibration_input_errors_name_what_is_expected():
    with pytest.raises(ValueError, match=r"shape \(1024,\).*\[N, \.\.\.\].*x.split\(64\)"):
        calibration_batches(torch.randn(1024))
    with pytest.raises(TypeError, match="iterable of batches.*got int"):
        calibration_batches(3)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        calibration_batches(torch.randn(10, 2), 0)
    two_batches = [torch.randn(64, 8), torch.randn(64, 8)]
    assert calibration_batches(two_batches) is two_batches  # an iterable of batches is read as it is


def test_healer_calibrates_on_one_tensor_and_logs_what_it_decides(caplog):
    task = Task()
    model = trained_model(task)
    with caplog.at_level(logging.INFO, logger="selfheal_ext"):
        healer = sh.SelfHealer(copy.deepcopy(model), monitor_options=FAST)
    capabilities = [r.getMessage() for r in caplog.records if "SelfHealer on" in r.getMessage()]
    assert len(capabilities) == 1 and "norm" in capabilities[0] and "BatchNorm statistics" in capabilities[0]
    healthy = torch.cat([task.sample(64)[0] for _ in range(24)])
    report = healer.calibrate(healthy, progress=False)
    assert report.window == 256 and report.samples == healthy.shape[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="selfheal_ext"):
        for _ in range(30):
            healer(task.sample(64, corrupt=True)[0])
    assert healer.active
    logged = [r for r in caplog.records if r.name.startswith("selfheal_ext")]
    assert any(": activate " in r.getMessage() and r.levelno == logging.INFO for r in logged)
    assert not any(": step " in r.getMessage() for r in logged)  # every-batch events are DEBUG


def test_a_model_without_batchnorm_is_told_it_gets_no_statistics_healing(caplog):
    with caplog.at_level(logging.INFO, logger="selfheal_ext"):
        sh.SelfHealer(torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                          torch.nn.ReLU(), torch.nn.Linear(256, 3)))
    assert any("no BatchNorm layer, so no statistics healing" in r.getMessage() for r in caplog.records)


def test_version_on_the_command_line():
    result = subprocess.run([sys.executable, "-m", "selfheal_ext", "--version"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"selfheal {sh.__version__} (torch {torch.__version__}, ")


def _tracked_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return set(listed.stdout.split())


@pytest.mark.slow
def test_the_sdist_holds_every_file_the_build_needs(tmp_path):
    pytest.importorskip("build")
    result = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path),
                             str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in result.stdout + result.stderr
    (archive,) = tmp_path.glob("selfheal_ext-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {path for path in _tracked_files()
              if path.startswith(("csrc/", "cpp_test/", "docs/", "selfheal_ext/", "tests/"))
              or path in ("CMakeLists.txt", "setup.py", "pyproject.toml", "LICENSE", "CHANGELOG.md", "README.md")}
    assert {"csrc/include/selfheal/ops.h", "csrc/cpu/adapter_direct_cpu.h", "csrc/cuda/adapter_cuda.cu",
            "LICENSE", "selfheal_ext/py.typed"} <= needed
    assert needed - names == set()
    assert not any(name.endswith(".so") or name.endswith("_build_config.py") for name in names)


def test_the_readme_is_short_and_every_figure_in_it_is_in_the_benchmarks_page():
    readme = (ROOT / "README.md").read_text()
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    assert len(readme.splitlines()) < 250
    prose = "\n".join(part for index, part in enumerate(readme.split("```")) if index % 2 == 0)
    prose = re.sub(r"`[^`]*`", "", prose).replace("Apache-2.0", "")  # code and names, not figures

    def figures(text):
        return set(re.findall(r"(?<![\w.-])\d+\.\d+(?![\w.])", text))
    assert len(figures(prose)) > 20, "the README's figures were not found"
    missing = sorted(figures(prose) - figures(benchmarks))
    assert not missing, missing
