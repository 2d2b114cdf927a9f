import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfheal_ext as sh
from selfheal_ext._extension import OP_NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_describes_the_compiled_extension():
    info = sh.build_info()
    assert info["extension_loaded"], "the compiled extension is not loaded"
    assert info["torch_version"] == torch.__version__
    assert info["built_with_torch"] == torch.__version__
    assert info["torch_cuda_version"] == torch.version.cuda
    assert info["cxx_compiler"]
    for name in OP_NAMES:
        assert "cpu" in info["kernels"][name], name
    if info["cuda_compiled"]:
        assert info["nvcc_version"] and info["cuda_arch_list"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_build_info_cuda_kernels_present_when_a_gpu_is():
    info = sh.build_info()
    assert info["cuda_compiled"], "a GPU is present but the CUDA kernels were not compiled"
    for name in OP_NAMES:
        assert "cuda" in info["kernels"][name], name


def _package_copy(tmp_path, keep_build=True):
    """A copy of the package in tmp_path; without the compiled extension and
    its build record when keep_build is False."""
    package = tmp_path / "selfheal_ext"
    ignore = ["__pycache__"] + ([] if keep_build else ["_C*.so", "_C*.pyd", "_build_config.py"])
    shutil.copytree(Path(sh.__file__).parent, package, ignore=shutil.ignore_patterns(*ignore))
    return package


_FALLBACK_SCRIPT = """
import sys, warnings, torch
# an editable install of the source tree would supply the missing modules from there
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import selfheal_ext as sh
ours = [w for w in caught if issubclass(w.category, sh._extension.ExtensionFallbackWarning)]
print("WARNINGS", len(ours))
print("MESSAGE", ours[0].message if ours else "")
info = sh.build_info()
print("LOADED", info["extension_loaded"], "KERNELS", sum(len(v) for v in info["kernels"].values()))
print("REASON", info["fallback_reason"])
logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
entropy = sh.ops.softmax_entropy(logits)[0]
print("ENTROPY", round(float(entropy[0]), 4), round(float(entropy[1]), 4))
"""


def _run_fallback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())


def test_import_falls_back_to_the_reference_for_a_build_for_another_torch(tmp_path):
    package = _package_copy(tmp_path)
    config = package / "_build_config.py"
    if not config.exists():
        pytest.skip("no compiled build in this tree")
    config.write_text(config.read_text().replace(repr(torch.__version__), repr("1.0.0+other")))
    out = _run_fallback(tmp_path)
    assert out["WARNINGS"] == "1"
    assert "built against torch 1.0.0+other" in out["MESSAGE"]
    assert f"torch {torch.__version__} is installed" in out["MESSAGE"]
    assert "pip install --no-build-isolation" in out["MESSAGE"]
    assert out["LOADED"] == "False KERNELS 0"
    assert "1.0.0+other" in out["REASON"]
    assert out["ENTROPY"] == f"{math.log(2):.4f} 0.0"


def test_import_without_a_build_runs_on_the_reference_with_one_warning(tmp_path):
    _package_copy(tmp_path, keep_build=False)
    out = _run_fallback(tmp_path)
    assert out["WARNINGS"] == "1"
    assert "not built" in out["MESSAGE"] and "pip install --no-build-isolation" in out["MESSAGE"]
    assert out["LOADED"] == "False KERNELS 0"
    assert out["REASON"] == "the compiled extension was not built"
    assert out["ENTROPY"] == f"{math.log(2):.4f} 0.0"


def test_a_loaded_build_imports_without_a_warning():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", "import selfheal_ext"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sh.build_info()["fallback_reason"] is None


_WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py'] + sys.argv[1:]; " \
                 "__file__ = 'setup.py'; exec(compile(open('setup.py').read(), 'setup.py', 'exec'))"


def test_setup_without_torch_says_what_to_install_for_a_build():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "build_ext"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "PyTorch must be installed" in result.stderr and "--no-build-isolation" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_setup_without_torch_still_packages_the_sources():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "--version"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == sh.__version__


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_setup_follows_an_nvcc_wrapper_and_refuses_a_mismatched_toolkit(tmp_path):
    # A toolkit whose nvcc reports CUDA 1.2, reached through a wrapper script on
    # PATH (as on machines where nvcc is a shim): setup.py must find the real
    # toolkit behind the wrapper and refuse it, naming both versions.
    toolkit_bin = tmp_path / "cuda-1.2" / "bin"
    toolkit_bin.mkdir(parents=True)
    real_nvcc = toolkit_bin / "nvcc"
    real_nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 1.2, V1.2.3'\n")
    real_nvcc.chmod(0o755)
    wrapper_dir = tmp_path / "shims"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real_nvcc} "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "USE_CUDA")}
    env.update(PATH=f"{wrapper_dir}:{env['PATH']}", FORCE_CUDA="1")
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"{tmp_path / 'cuda-1.2'} is CUDA 1.2" in result.stderr
    assert f"built with CUDA {torch.version.cuda}" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None
                    or shutil.which("readelf") is None, reason="needs Linux, g++ and readelf")
def test_setup_refuses_and_deletes_an_extension_with_a_static_libstdcxx(tmp_path):
    # The GPU image's CXX linked libstdc++ statically and every CUDA call then
    # crashed inside std::ostream: setup.py must refuse such a build.
    source = tmp_path / "lib.cpp"
    source.write_text('#include <sstream>\nextern "C" int f(long v) { std::ostringstream s; s << v; '
                      'return (int)s.str().size(); }\n')
    shared, static = tmp_path / "shared.so", tmp_path / "static.so"
    for target, extra in ((shared, []), (static, ["-static-libstdc++"])):
        subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(target), *extra], check=True)
    text = (ROOT / "setup.py").read_text()
    function = text[text.index("def check_shared_libstdcxx"):text.index("class BuildWithConfig")]
    namespace = {"os": os, "re": __import__("re"), "sys": sys, "shutil": shutil, "subprocess": subprocess}
    exec(function, namespace)  # the function alone: importing setup.py would run setup()
    check = namespace["check_shared_libstdcxx"]
    check([str(shared)])
    assert shared.exists()
    copy = tmp_path / "copy.so"
    shutil.copy(static, copy)
    with pytest.raises(SystemExit, match="static libstdc"):
        check([str(static), str(copy)])
    assert not static.exists() and not copy.exists()
