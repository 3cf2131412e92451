"""ptxas resource usage of every CUDA C++ kernel in csrc/, per arch: registers, spills, stack, static shared memory.

    python scripts/cuda_resources.py [--archs "80;90"]

Compiles each csrc/*.cu with the build's own nvcc flags (setup.py's ``cu_flags``: SASS per arch, PTX of the newest,
``--resource-usage``) into a temporary directory, prints the table (markdown) and a summary line, and exits 1 if
any kernel spills. Needs nvcc only, no GPU. The build (setup.py) writes the same table to build/cuda_resources.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import setup as build  # noqa: E402  (setup.py's helpers; its setup() runs only as __main__)


def compile_report(source: Path, archs: str, out_dir: Path) -> str:
    """nvcc's output (ptxas's resource report) for one .cu source; raises with the compiler's message on failure."""
    argv = [build.find_nvcc(), *build.cu_flags(archs), "-c", str(source), "-o", str(out_dir / f"{source.name}.o")]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"nvcc failed on {source.name}:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80;90", help="as LOWRANK_KERNELS_CUDA_ARCHS (default: 80;90)")
    args = parser.parse_args()
    if build.find_nvcc() is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    sources = sorted(build.CSRC.glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=len(sources)) as pool:
        reports = list(pool.map(lambda s: compile_report(s, args.archs, Path(tmp)), sources))
    rows = build.parse_resource_usage("\n".join(reports))
    print(build.resource_table(rows))
    line, spills = build.resource_summary(rows)
    print(f"{line}; flags: {' '.join(build.gencode_flags(args.archs))}")
    if spills:
        print(f"kernels that spill: {', '.join(spills)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
