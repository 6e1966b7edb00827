"""Preflight of the GPU check (tools/gpu_check.sh): in a few seconds, what the CUDA build and the
GPU steps need, one line each, so that a missing piece is named before minutes go into a build.
Exit 1 when the CUDA build cannot work (the check then still runs the CPU build and Triton)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys


def main() -> int:
    problems, notes = [], []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # noqa: BLE001 - report anything that stops the import
        print(f"preflight: torch cannot be imported: {exc}")
        return 1
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    elif not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    else:
        notes.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
    nvcc = shutil.which("nvcc")
    if CUDA_HOME is None:
        problems.append(f"no CUDA toolkit found (CUDA_HOME unset; nvcc on PATH: {nvcc})")
    else:
        header = os.path.join(CUDA_HOME, "include", "cuda_runtime.h")
        if not os.path.isfile(header):
            problems.append(f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (nvcc on PATH: {nvcc})")
        else:
            notes.append(f"CUDA_HOME={CUDA_HOME}, nvcc {nvcc}")
    for mod, why, blocking in (("ninja", "parallel build", True), ("pytest", "the GPU tests", False),
                               ("xdist", "parallel GPU tests (-n 8)", False), ("triton", "the Triton kernels", False),
                               ("cupy", "the CuPy benchmark baseline", False), ("pytest_timeout", "test timeouts", False)):
        if importlib.util.find_spec(mod) is None:
            (problems if blocking else notes).append(f"{mod} missing ({why})")
    free = shutil.disk_usage(".").free / 2**30
    (problems if free < 2 else notes).append(f"{free:.0f} GiB free on disk")
    for n in notes:
        print(f"preflight: note: {n}")
    for p in problems:
        print(f"preflight: PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
