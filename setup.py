"""Build of selfheal_ext: CPU kernels always, CUDA kernels when a CUDA build is
possible. Environment knobs: USE_CUDA=0 (CPU only), FORCE_CUDA=1 (CUDA even if
detection says no), CUDA_HOME (toolkit folder), TORCH_CUDA_ARCH_LIST (default
"8.0;9.0+PTX"), MAX_JOBS (parallel compiles, default 2)."""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# Commands that compile the extension, and so need torch. The others (sdist,
# egg_info, dist_info, --version, ...) only package the sources: a source
# distribution is built without torch and without a compiler.
COMPILING_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "install", "develop", "editable_wheel"}

try:
    import torch
except ImportError:
    torch = None
    if COMPILING_COMMANDS.intersection(sys.argv[1:]):
        sys.exit(
            "selfheal_ext: PyTorch must be installed before building, and the build must see it: "
            "`pip install torch`, then `pip install --no-build-isolation selfheal_ext` "
            "(or `pip install --no-build-isolation .` in the source tree)"
        )

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _nvcc_behind(path):
    """The real nvcc a wrapper script on PATH execs, or the path itself."""
    real = os.path.realpath(path)
    try:
        with open(real, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return real
    if not head.startswith(b"#!"):
        return real
    for match in re.finditer(rb"(/[^\s\"']+/bin/nvcc)\b", head):
        candidate = match.group(1).decode()
        if candidate != real and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return real


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return os.path.dirname(os.path.dirname(_nvcc_behind(nvcc)))


def nvcc_version(cuda_home):
    out = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def nvidia_wheel_dirs(kind):
    """include/ or lib/ folders of the nvidia-* wheels that a CUDA torch brings."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += glob.glob(os.path.join(root, kind))
        found += glob.glob(os.path.join(root, "*", kind))
    return sorted({d for d in found if os.path.isdir(d)})


def decide_cuda():
    if os.environ.get("USE_CUDA", "1") == "0":
        return None
    cuda_home = find_cuda_home()
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if not force and (torch.version.cuda is None or cuda_home is None):
        return None
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        sys.exit("selfheal_ext: FORCE_CUDA=1 but no nvcc was found; set CUDA_HOME")
    if torch.version.cuda is None:
        sys.exit(f"selfheal_ext: FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")
    found = nvcc_version(cuda_home)
    if found is None or found.split(".")[0] != torch.version.cuda.split(".")[0]:
        sys.exit(
            f"selfheal_ext: nvcc in {cuda_home} is CUDA {found}, but torch "
            f"{torch.__version__} was built with CUDA {torch.version.cuda}; the major "
            "versions must match (set CUDA_HOME to a matching toolkit, or USE_CUDA=0)"
        )
    return cuda_home, found


CUDA = decide_cuda() if torch is not None else None
if CUDA is not None:
    # cpp_extension reads these when it is imported.
    os.environ["CUDA_HOME"] = CUDA[0]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
os.environ.setdefault("MAX_JOBS", "2")

if torch is not None:
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
else:  # packaging only: nothing is compiled, the classes are never used
    BuildExtension = object


def compiler_description():
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, IndexError):
        return cxx


def build_config_text():
    info = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_compiled": CUDA is not None,
        "nvcc_version": CUDA[1] if CUDA else None,
        "cuda_home": CUDA[0] if CUDA else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if CUDA else None,
        "cxx_compiler": compiler_description(),
        "python_version": sys.version.split()[0],
    }
    return (
        '"""Written by setup.py when the extension was built; do not edit."""\n\n'
        f"BUILD_CONFIG = {info!r}\n"
    )


def check_shared_libstdcxx(paths):
    """Refuses an extension that carries its own static copy of libstdc++.

    Some images point CXX at a compiler that links libstdc++ statically. The
    extension then holds a second libstdc++ beside the shared one that torch
    loads; the dynamic linker binds part of it to torch's copy, and the first
    std::ostream use (building any error message) crashes. A shared libstdc++
    in the extension's NEEDED list rules that out. A refused build is deleted
    (in the package too, for in-place and editable builds), so it is never
    imported.
    """
    readelf = shutil.which("readelf")
    existing = [path for path in paths if os.path.isfile(path)]
    if not sys.platform.startswith("linux") or readelf is None or not existing:
        return
    result = subprocess.run([readelf, "-d", existing[0]], capture_output=True, text=True)
    if result.returncode != 0 or re.search(r"\(NEEDED\).*\[libstdc\+\+\.so", result.stdout):
        return
    for path in existing:
        os.remove(path)
    sys.exit(
        f"selfheal_ext: {os.path.basename(existing[0])} was linked with a static libstdc++ "
        f"(CXX={os.environ.get('CXX', 'c++')}), which crashes beside torch's shared one; it was "
        "deleted. Rebuild with a compiler that links libstdc++ dynamically, e.g. CC=gcc CXX=g++"
    )


class BuildWithConfig(BuildExtension):
    """Builds the extension and records what it was built against."""

    def run(self):
        # Recorded only once the build succeeded: a failed rebuild must not
        # make a stale _C look as if it matched the new torch.
        super().run()
        for ext in self.extensions:
            built = os.path.join(self.build_lib, *ext.name.split(".")[:-1],
                                 os.path.basename(self.get_ext_fullpath(ext.name)))
            check_shared_libstdcxx(list(dict.fromkeys([self.get_ext_fullpath(ext.name), built])))
        text = build_config_text()
        targets = [os.path.join(HERE, "selfheal_ext", "_build_config.py")]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, "selfheal_ext", "_build_config.py"))
        for target in targets:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as handle:
                handle.write(text)


def extension():
    sources = ["csrc/python_module.cpp", "csrc/registration.cpp", "csrc/checks.cpp"]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    # -fno-trapping-math: lets GCC if-convert and vectorise the float64 selects
    # of the histogram kernels (no kernel reads floating-point exception flags).
    cxx_flags = ["-O3", "-Wno-psabi", "-fno-trapping-math"]
    link_flags = []
    # at::parallel_for is header code that runs serially unless the extension
    # itself is compiled with OpenMP; linking -fopenmp names libgomp.so.1, which
    # resolves to the copy torch has already loaded (one OpenMP runtime).
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if CUDA is None:
        return CppExtension(
            "selfheal_ext._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += nvidia_wheel_dirs("include")
    return CUDAExtension(
        "selfheal_ext._C", sources, include_dirs=include_dirs,
        library_dirs=nvidia_wheel_dirs("lib"), extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags + ["-DSELFHEAL_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "-DSELFHEAL_WITH_CUDA"],
        },
    )


if torch is None:
    setup()
else:
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildWithConfig.with_options(use_ninja=True)},
    )
