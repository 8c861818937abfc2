"""Build dmax_ext: setup.py only drives CMake (CMakeLists.txt) and installs python/dmax_ext.

Build switches (environment variables):
  DMAX_BUILD_CUDA   auto (default) | on | off. auto = on when torch is a CUDA build and nvcc is
                    found; decided from torch.version.cuda and CUDA_HOME, never from a visible GPU.
  DMAX_CUDA_ARCHS   CUDA architectures, e.g. "80;90a" (default set in cmake/cuda.cmake).
  DMAX_BUILD_SIMT   1 (default) | 0: the test-only library running the CUDA kernels on the CPU
                    emulation (torch.ops.dmax_simt.*).
  DMAX_BUILD_SIMT_ASAN  1 | 0 (default): its AddressSanitizer + UBSan variant.
  MAX_JOBS          parallel compile jobs (default: the number of cores).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = ROOT / "python" / "dmax_ext"
BUILD_DIR = ROOT / "build" / "cmake"  # persistent, so rebuilds are incremental


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = Path(home) / "bin" / "nvcc"
    return home if nvcc.exists() else None


def _want_cuda(torch) -> bool:
    choice = _flag("DMAX_BUILD_CUDA", "auto")
    if choice in ("0", "off", "false", "no"):
        return False
    available = torch.version.cuda is not None and _cuda_home() is not None
    if choice in ("1", "on", "true", "yes") and not available:
        raise RuntimeError(
            "DMAX_BUILD_CUDA=on but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc under CUDA_HOME={_cuda_home()!r}")
    return available


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname):
        # CMake names the library _C.so (no ABI tag): tell setuptools, whose editable and wheel
        # builds look for the extension under this name.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext):
        import torch

        build_cuda = _want_cuda(torch)
        on = lambda b: "ON" if b else "OFF"  # noqa: E731
        args = [
            "-G", "Ninja",
            f"-DTORCH_PY_DIR={os.path.dirname(torch.__file__)}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DDMAX_BUILD_CUDA={on(build_cuda)}",
            f"-DDMAX_BUILD_SIMT={on(_flag('DMAX_BUILD_SIMT', '1') in ('1', 'on', 'true'))}",
            f"-DDMAX_BUILD_SIMT_ASAN={on(_flag('DMAX_BUILD_SIMT_ASAN', '0') in ('1', 'on', 'true'))}",
            f"-DDMAX_OUTPUT_DIR={PACKAGE_DIR}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if build_cuda:
            home = _cuda_home()
            args += [f"-DCMAKE_CUDA_COMPILER={home}/bin/nvcc", f"-DCUDAToolkit_ROOT={home}"]
            if os.environ.get("DMAX_CUDA_ARCHS"):
                args.append(f"-DDMAX_CUDA_ARCHS={os.environ['DMAX_CUDA_ARCHS']}")
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), *args])
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(BUILD_DIR), "--parallel", jobs])
        _write_build_info(build_cuda)
        # Non-editable installs copy the package tree after this step; editable ones use it in place.
        if not self.inplace:
            dest = Path(self.build_lib) / "dmax_ext"
            dest.mkdir(parents=True, exist_ok=True)
            for lib in PACKAGE_DIR.glob("_*.so"):
                shutil.copy2(lib, dest / lib.name)
            shutil.copy2(PACKAGE_DIR / "_build_info.py", dest / "_build_info.py")


def _write_build_info(build_cuda: bool):
    text = (
        '"""Written by setup.py at build time: what the native build contains."""\n'
        f"BUILT_CUDA = {build_cuda!r}\n"
        f"CMAKE_BUILD_DIR = {str(BUILD_DIR)!r}\n"
    )
    (PACKAGE_DIR / "_build_info.py").write_text(text)


setup(
    name="dmax_ext",
    version="0.1.0",
    description="DMax (soft parallel decoding + on-policy uniform training) for LLaDA2-MoE diffusion LMs",
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"dmax_ext": ["*.so", "assets/**/*"]},
    ext_modules=[Extension("dmax_ext._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "safetensors", "tqdm", "numpy"],
    extras_require={
        "tokenizer": ["transformers", "tokenizers", "jinja2"],
        "test": ["pytest", "hypothesis", "matplotlib"],
    },
    entry_points={"console_scripts": ["dmax=dmax_ext.cli:main"]},
)
