"""Build lowrank_kernels: the pure-Python package, plus the CUDA C++ extension `lowrank_kernels._C` when it can.

Metadata lives in pyproject.toml; this file only adds the optional extension. It is built from csrc/*.cu and
csrc/*.cpp when all of these hold, and skipped with a one-line reason otherwise:
  - csrc/ holds at least one .cu or .cpp source,
  - nvcc is found ($CUDA_HOME/bin/nvcc, else nvcc on PATH, else /usr/local/cuda/bin/nvcc),
  - LOWRANK_KERNELS_SKIP_CUDA_BUILD is not "1".
Other settings: LOWRANK_KERNELS_CUDA_ARCHS (default "80;90", e.g. "80;90a;100"), MAX_JOBS (ninja's parallelism).

The extension takes raw device pointers and the cudaStream_t as integers (pybind11, no libtorch), so it does not
depend on torch's C++ ABI and builds without torch installed. nvcc compiles every source (it hands .cpp files to the
host compiler with the CUDA include path) and links the module with the CUDA runtime linked statically, so the .so
needs no libcudart at load time and imports even on a machine without a GPU. With ninja on PATH the build is
parallel and incremental (header dependencies tracked); without it the sources are compiled one by one.
Nothing is downloaded at build time.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
EXT_NAME = "lowrank_kernels._C"


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    if on_path := shutil.which("nvcc"):
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def gencode_flags(spec: str) -> list[str]:
    """Arch list "80;90" -> -gencode for sm_80 and sm_90, plus PTX of the newest plain arch so newer GPUs can JIT it."""
    archs = list(dict.fromkeys(a.strip().replace(".", "") for a in re.split(r"[;,\s]+", spec) if a.strip()))
    bad = [a for a in archs if not re.fullmatch(r"\d+[af]?", a)]
    if not archs or bad:
        sys.exit(f"lowrank_kernels: bad LOWRANK_KERNELS_CUDA_ARCHS={spec!r} (want e.g. '80;90' or '90a')")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    plain = [a for a in archs if a.isdigit()]  # PTX of an "a"/"f" arch runs only on that exact arch
    if plain:
        newest = max(plain, key=int)
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def cuda_extension() -> Extension | None:
    """The extension to build, or None after printing why it is skipped."""
    sources = sorted(p.relative_to(ROOT).as_posix() for p in [*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")])
    reason = None
    if os.environ.get("LOWRANK_KERNELS_SKIP_CUDA_BUILD") == "1":
        reason = "LOWRANK_KERNELS_SKIP_CUDA_BUILD=1"
    elif not sources:
        reason = "csrc/ has no .cu or .cpp sources"
    elif find_nvcc() is None:
        reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    else:
        try:
            import pybind11  # noqa: F401  (a build requirement; absent only with --no-build-isolation)
        except ImportError:
            reason = "pybind11 is not installed"
    if reason:
        print(f"lowrank_kernels: skipping the CUDA extension {EXT_NAME}: {reason}", file=sys.stderr)
        return None
    return Extension(EXT_NAME, sources)


class NvccBuildExt(build_ext):
    """Compiles and links an extension with nvcc, through ninja when it is on PATH."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        nvcc = find_nvcc()
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / ext.name
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)

        host = ["-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden"]  # hidden: pybind11's advice for modules
        if os.environ.get("CXX"):
            host.append(f"-ccbin={os.environ['CXX']}")
        common = ["-O3", "-std=c++17", "-DNDEBUG", f"-I{CSRC}", *host]
        archs = os.environ.get("LOWRANK_KERNELS_CUDA_ARCHS", "80;90")
        cu_flags = [*common, "-lineinfo", "--expt-relaxed-constexpr", *gencode_flags(archs)]
        cpp_flags = [*common, f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]

        steps = []  # (output, inputs, argv); compile steps write a make-style depfile next to their object
        for src in (ROOT / s for s in ext.sources):
            obj = tmp / f"{src.name}.o"
            flags = cu_flags if src.suffix == ".cu" else cpp_flags
            steps.append((obj, [src], [nvcc, *flags, "-MD", "-MF", f"{obj}.d", "-c", str(src), "-o", str(obj)]))
        objects = [str(obj) for obj, _, _ in steps]
        steps.append((out, objects, [nvcc, "-shared", "-cudart=static", *host, *objects, "-o", str(out)]))

        try:
            if shutil.which("ninja"):
                self._run_ninja(tmp, steps)
            else:
                for _, _, argv in steps:
                    print(shlex.join(argv))
                    subprocess.run(argv, check=True)
        except subprocess.CalledProcessError as e:
            sys.exit(f"lowrank_kernels: building {EXT_NAME} failed ({e}); LOWRANK_KERNELS_SKIP_CUDA_BUILD=1 skips it")

    @staticmethod
    def _run_ninja(tmp: Path, steps: list) -> None:
        def path(p) -> str:  # ninja's escapes for paths in build lines
            return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

        lines = [
            "ninja_required_version = 1.3",
            "rule compile\n  command = $cmd\n  depfile = $out.d\n  deps = gcc\n  description = nvcc $in",
            "rule link\n  command = $cmd\n  description = link $out",
        ]
        for i, (out, inputs, argv) in enumerate(steps):
            rule = "link" if i == len(steps) - 1 else "compile"
            cmd = shlex.join(argv).replace("$", "$$")
            lines.append(f"build {path(out)}: {rule} {' '.join(path(p) for p in inputs)}\n  cmd = {cmd}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = ["-j", os.environ["MAX_JOBS"]] if os.environ.get("MAX_JOBS") else []
        subprocess.run(["ninja", "-C", str(tmp), *jobs], check=True)


extension = cuda_extension()
setup(
    packages=find_packages(include=["lowrank_kernels", "lowrank_kernels.*"]),
    ext_modules=[extension] if extension else [],
    cmdclass={"build_ext": NvccBuildExt} if extension else {},
)
