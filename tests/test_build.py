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


def test_import_refuses_a_build_for_another_torch(tmp_path):
    package = tmp_path / "selfheal_ext"
    shutil.copytree(Path(sh.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = package / "_build_config.py"
    text = config.read_text().replace(repr(torch.__version__), repr("1.0.0+other"))
    config.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", "import selfheal_ext"], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "compiled against torch 1.0.0+other" in result.stderr
    assert f"torch {torch.__version__} is installed" in result.stderr
    assert "undefined symbol" not in result.stderr


def test_setup_without_torch_says_what_to_install():
    # -S hides site-packages, so torch cannot be imported.
    result = subprocess.run([sys.executable, "-S", "setup.py", "--version"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "PyTorch must be installed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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
