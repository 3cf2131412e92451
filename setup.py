"""Build lowrank_kernels: the pure-Python package, plus the CUDA C++ extension `lowrank_kernels._C` when it can.

Metadata lives in pyproject.toml; this file only adds the optional extension. It is built from csrc/*.cu and
csrc/*.cpp when all of these hold, and skipped otherwise, saying why once, when the build runs (also on the terminal
when pip hides the build's output, as `pip wheel`/`pip install` do without -v):
  - csrc/ holds at least one .cu or .cpp source,
  - nvcc is found ($CUDA_HOME/bin/nvcc, else nvcc on PATH, else /usr/local/cuda/bin/nvcc),
  - pybind11 is importable (a build requirement: `--no-build-isolation` needs it installed beside the build),
  - LOWRANK_KERNELS_SKIP_CUDA_BUILD is not "1".
Other settings: LOWRANK_KERNELS_CUDA_ARCHS (default "80;90", e.g. "80;90a;100"), MAX_JOBS (ninja's parallelism).

The extension takes raw device pointers and the cudaStream_t as integers (pybind11, no libtorch), so it does not
depend on torch's C++ ABI and builds without torch installed. nvcc compiles every source (it hands .cpp files to the
host compiler with the CUDA include path) and links the module with the CUDA runtime linked statically, so the .so
needs no libcudart at load time and imports even on a machine without a GPU. Each arch gets SASS, and the newest
plain arch also PTX, so newer GPUs JIT-compile it. ptxas reports every kernel's registers, spills and shared memory
(`--resource-usage`): the build writes the table to build/cuda_resources.md, prints a one-line summary, and fails
if any kernel spills. With ninja on PATH the build is parallel and incremental (header dependencies tracked);
without it the sources are compiled one by one. Nothing is downloaded at build time.
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
RESOURCE_TABLE = ROOT / "build" / "cuda_resources.md"
# setup.py runs several times per pip build (requirements, metadata, the build itself): say things in the build only.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def notice(message: str) -> None:
    """One line on stderr and, when pip captures stderr (it shows a build's output only with -v or on failure),
    also on the controlling terminal, so a skipped extension is never silent."""
    print(message, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            print(message, file=tty)
    except OSError:  # no terminal (CI): stderr is all there is
        pass


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    if on_path := shutil.which("nvcc"):
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def gencode_flags(spec: str) -> list[str]:
    """Arch list "80;90" -> SASS for sm_80 and sm_90, plus PTX of the newest plain arch (code=compute_90) so newer
    GPUs can JIT it."""
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


def host_flags() -> list[str]:
    flags = ["-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden"]  # hidden: pybind11's advice for modules
    if os.environ.get("CXX"):
        flags.append(f"-ccbin={os.environ['CXX']}")
    return flags


def common_flags() -> list[str]:
    return ["-O3", "-std=c++17", "-DNDEBUG", f"-I{CSRC}", *host_flags()]


def cu_flags(archs: str) -> list[str]:
    """nvcc flags of the .cu sources: every arch of ``archs``, and ptxas's resource usage of every kernel."""
    return [*common_flags(), "-lineinfo", "--expt-relaxed-constexpr", "--resource-usage", *gencode_flags(archs)]


# ---- ptxas's resource usage ----------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_resource_usage(text: str) -> list[dict]:
    """ptxas's ``--resource-usage`` lines -> one row per (kernel, arch): registers, spill bytes, stack, smem."""
    rows, row = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            row = dict(kernel=m.group(1), arch=m.group(2), registers=0, spill_stores=0, spill_loads=0, stack=0, smem=0)
            rows.append(row)
        elif row is not None and (m := _FRAME.search(line)):
            row.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif row is not None and (m := _USED.search(line)):
            row.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
            row = None  # the entry's report is complete
    names = demangle([r["kernel"] for r in rows])
    for r, name in zip(rows, names, strict=True):
        r["kernel"] = name
    return rows


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names: ``gemm_kernel<__half, float, float>`` (c++filt when present, namespaces dropped)."""
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    readable = out.splitlines()
    if len(readable) != len(names):
        return names
    short = []
    for name in readable:
        name = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name)  # the parameter list
        name = re.sub(r"^void ", "", name)
        short.append(re.sub(r"lowrank::|\(anonymous namespace\)::", "", name))
    return short


def resource_table(rows: list[dict]) -> str:
    """Markdown table, one row per kernel and arch, sorted."""
    lines = ["| kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) | static smem (B) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"])):
        lines.append(f"| `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} "
                     f"| {r['stack']} | {r['smem']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def resource_summary(rows: list[dict]) -> tuple[str, list[str]]:
    """(one line about every kernel and arch, the kernels that spill)."""
    spills = [f"{r['kernel']} on {r['arch']}" for r in rows if r["spill_stores"] or r["spill_loads"]]
    archs = sorted({r["arch"] for r in rows})
    regs = [r["registers"] for r in rows]
    smem = max((r["smem"] for r in rows), default=0)
    spilled = f"{len(spills)} spill" if spills else "no spills"
    line = (f"{len({r['kernel'] for r in rows})} kernels on {', '.join(archs)}: {min(regs, default=0)}-"
            f"{max(regs, default=0)} registers, {spilled}, up to {smem} B static shared memory")  # fmt: skip
    return line, spills


# ---- the extension ---------------------------------------------------------------------------------------------


def cuda_extension() -> Extension | None:
    """The extension to build, or None after saying (in a build) why it is skipped."""
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
            reason = "pybind11 is not installed (with --no-build-isolation, `pip install pybind11` first)"
    if reason:
        if BUILD_COMMANDS & set(sys.argv[1:]):
            notice(f"lowrank_kernels: building WITHOUT the CUDA extension {EXT_NAME}: {reason}")
        return None
    return Extension(EXT_NAME, sources)


class NvccBuildExt(build_ext):
    """Compiles and links an extension with nvcc, through ninja when it is on PATH; reports ptxas's resource usage."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        nvcc = find_nvcc()
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / ext.name
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)

        archs = os.environ.get("LOWRANK_KERNELS_CUDA_ARCHS", "80;90")
        cpp_flags = [*common_flags(), f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]

        steps = []  # (output, inputs, argv); compiles write a make-style depfile and their output beside the object
        for src in (ROOT / s for s in ext.sources):
            obj = tmp / f"{src.name}.o"
            flags = cu_flags(archs) if src.suffix == ".cu" else cpp_flags
            steps.append((obj, [src], [nvcc, *flags, "-MD", "-MF", f"{obj}.d", "-c", str(src), "-o", str(obj)]))
        objects = [str(obj) for obj, _, _ in steps]
        steps.append((out, objects, [nvcc, "-shared", "-cudart=static", *host_flags(), *objects, "-o", str(out)]))

        try:
            if shutil.which("ninja"):
                self._run_ninja(tmp, steps)
            else:
                for obj, _, argv in steps:
                    print(shlex.join(argv))
                    result = subprocess.run(argv, capture_output=True, text=True)
                    Path(f"{obj}.log").write_text(result.stdout + result.stderr)
                    if result.returncode:
                        sys.stderr.write(result.stdout + result.stderr)
                        raise subprocess.CalledProcessError(result.returncode, argv)
        except subprocess.CalledProcessError as e:
            sys.exit(f"lowrank_kernels: building {EXT_NAME} failed ({e}); LOWRANK_KERNELS_SKIP_CUDA_BUILD=1 skips it")
        self._report_resources([Path(f"{obj}.log") for obj, _, _ in steps[:-1]])

    @staticmethod
    def _report_resources(logs: list[Path]) -> None:
        """ptxas's table into build/cuda_resources.md, one summary line; a kernel that spills fails the build."""
        rows = parse_resource_usage("\n".join(log.read_text() for log in logs if log.is_file()))
        RESOURCE_TABLE.parent.mkdir(parents=True, exist_ok=True)
        RESOURCE_TABLE.write_text(resource_table(rows))
        line, spills = resource_summary(rows)
        print(f"lowrank_kernels: {EXT_NAME}: {line} (ptxas table: {RESOURCE_TABLE})", file=sys.stderr, flush=True)
        if spills:
            sys.exit(f"lowrank_kernels: CUDA kernels spill registers: {', '.join(spills)}")

    @staticmethod
    def _run_ninja(tmp: Path, steps: list) -> None:
        def path(p) -> str:  # ninja's escapes for paths in build lines
            return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

        # A compile's output (ptxas's resource report) goes to $out.log, shown whole when the compile fails.
        lines = [
            "ninja_required_version = 1.3",
            "rule compile\n  command = $cmd > $out.log 2>&1 || { cat $out.log; exit 1; }\n  depfile = $out.d\n"
            "  deps = gcc\n  description = nvcc $in",
            "rule link\n  command = $cmd\n  description = link $out",
        ]
        for i, (out, inputs, argv) in enumerate(steps):
            rule = "link" if i == len(steps) - 1 else "compile"
            cmd = shlex.join(argv).replace("$", "$$")
            lines.append(f"build {path(out)}: {rule} {' '.join(path(p) for p in inputs)}\n  cmd = {cmd}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = ["-j", os.environ["MAX_JOBS"]] if os.environ.get("MAX_JOBS") else []
        subprocess.run(["ninja", "-C", str(tmp), *jobs], check=True)


if __name__ == "__main__":  # pip and `python setup.py` run this file as __main__; scripts/ import its helpers
    extension = cuda_extension()
    setup(
        packages=find_packages(include=["lowrank_kernels", "lowrank_kernels.*"]),
        ext_modules=[extension] if extension else [],
        cmdclass={"build_ext": NvccBuildExt} if extension else {},
    )
