"""Every Triton kernel compiles to an sm_90 cubin without a GPU, and its PTX keeps the
arithmetic format.h requires:

* no ``fma.rn.f32``: launches pass ``enable_fp_fusion=False`` (an FMA rounds once where the
  format rounds twice, so the bytes would differ from the CPU's);
* no ``.ftz`` (flush-to-zero) instruction: subnormal inputs and scales are part of the format;
* no approximate fp32 division (``div.full.f32`` / ``div.approx.f32``): the kernels that
  compute scales use ``div.rn.f32`` (tl.math.div_rn).

The compilation runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest.py without a
GPU) ``@triton.jit`` yields interpreter functions that cannot be compiled.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")


def _configs():
    """(module, kernel, signature, constexprs, needs_div) for each kernel variant we ship."""
    fmt = [(1, 127.0), (2, 7.0), (3, 448.0)]
    out = []
    for code, qm in fmt:
        for stoch in (False, True):
            out.append(("quantize", "_quantize_kernel",
                        {"x_ptr": "*fp32", "pay_ptr": "*u8", "scale_ptr": "*fp32", "n": "i64", "nblocks": "i64",
                         "index_offset": "i64", "key": "i32"},
                        {"FMT": code, "QM": qm, "KIND": 0, "STOCH": stoch, "R": 32, "B": 128}, True))
        out.append(("quantize", "_dequantize_kernel",
                    {"pay_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*i16", "n": "i64", "nblocks": "i64"},
                    {"FMT": code, "KIND": 1, "R": 32, "B": 128}, False))
        out.append(("compress_delta", "_compress_delta_kernel",
                    {"anchor_ptr": "*fp32", "params_ptr": "*i16", "res_ptr": "*fp32", "pay_ptr": "*u8",
                     "scale_ptr": "*fp32", "n": "i64", "nblocks": "i64", "key": "i32"},
                    {"FMT": code, "QM": qm, "KIND": 1, "HAS_RES": True, "STOCH": False, "R": 32, "B": 128}, True))
        out.append(("reduce", "_dequantize_reduce_kernel",
                    {"pay_ptr": "*u8", "pay_stride": "i64", "scale_ptr": "*fp32", "scale_stride": "i64", "p": "i32",
                     "n": "i64", "nblocks": "i64", "factor": "fp32", "out_ptr": "*fp32", "opay_ptr": "*u8",
                     "oscale_ptr": "*fp32", "index_offset": "i64", "key": "i32"},
                    {"FMT": code, "QM": qm, "WRITE_SUM": True, "REQUANT": True, "STOCH": False, "R": 32, "B": 128},
                    True))
        out.append(("outer", "_outer_nesterov_step_kernel",
                    {"anchor_ptr": "*fp32", "mom_ptr": "*fp32", "params_ptr": "*fp16", "grad_ptr": "*fp32",
                     "pay_ptr": "*u8", "scale_ptr": "*fp32", "n": "i64", "nblocks": "i64", "grad_factor": "fp32",
                     "lr": "fp32", "mu": "fp32"},
                    {"COMPRESSED": True, "FMT": code, "HAS_MOM": True, "NESTEROV": True, "HAS_PARAMS": True,
                     "KIND": 2, "R": 32, "B": 128}, False))
    out.append(("outer", "_outer_nesterov_step_kernel",
                {"anchor_ptr": "*fp32", "mom_ptr": "*fp32", "params_ptr": "*i16", "grad_ptr": "*fp32",
                 "pay_ptr": "*u8", "scale_ptr": "*fp32", "n": "i64", "nblocks": "i64", "grad_factor": "fp32",
                 "lr": "fp32", "mu": "fp32"},
                {"COMPRESSED": False, "FMT": 1, "HAS_MOM": True, "NESTEROV": True, "HAS_PARAMS": True,
                 "KIND": 1, "R": 4, "B": 1024}, False))
    return out


def _compile_all() -> list[dict]:  # runs in the subprocess
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from localsgd_comm.kernels.triton._common import LAUNCH_OPTS

    results = []
    for module, kernel, sig, consts, needs_div in _configs():
        fn = getattr(importlib.import_module(f"localsgd_comm.kernels.triton.{module}"), kernel)
        signature = dict(sig, **{k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=signature, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(LAUNCH_OPTS, num_warps=4))
        ptx = compiled.asm["ptx"]
        results.append({
            "kernel": f"{kernel}{consts}",
            "cubin_bytes": len(compiled.asm["cubin"]),
            "fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
            "approx_div": len(re.findall(r"\bdiv\.(full|approx)\.f32\b", ptx)),
            "div_rn": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
            "ftz": sorted(set(re.findall(r"\b[a-z]+\.[a-z0-9.]*\.ftz\b[a-z0-9.]*", ptx))),
            "needs_div": needs_div,
        })
    return results


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"compilation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_to_sm90(compiled):
    assert len(compiled) == len(_configs())
    for r in compiled:
        assert r["cubin_bytes"] > 0, r["kernel"]


def test_no_fma_contraction(compiled):
    for r in compiled:
        assert r["fma"] == 0, f"{r['kernel']}: {r['fma']} fma.rn.f32 in the PTX"


def test_no_flush_to_zero(compiled):
    for r in compiled:
        assert not r["ftz"], f"{r['kernel']}: flush-to-zero instructions {r['ftz']}"


def test_divisions_are_ieee(compiled):
    for r in compiled:
        assert r["approx_div"] == 0, f"{r['kernel']}: approximate fp32 division in the PTX"
        if r["needs_div"]:
            assert r["div_rn"] > 0, f"{r['kernel']}: expected div.rn.f32 for the scale"


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    import localsgd_comm  # noqa: F401

    print(json.dumps(_compile_all()))


# ---- the CUDA side of the C++ extension, compiled on a machine without a GPU --------------------
def _cuda_headers():
    """The CUDA toolkit's include directory (None without a toolkit or g++)."""
    import shutil
    nvcc = shutil.which("nvcc")
    if nvcc is None or shutil.which("g++") is None:
        return None
    roots = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    with open(nvcc, "rb") as f:  # nvcc may be a wrapper script that execs the real one
        m = re.search(rb"exec (\S+)/bin/nvcc", f.read(4096))
    if m:
        roots.append(m.group(1).decode())
    for root in roots:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


def _backend_units_with_cuda_branches():
    """The backend's source files (csrc/c10d/*.cpp) with LOCALSGD_WITH_CUDA code in them or in a
    csrc/c10d header they include, directly or not."""
    d = os.path.join(ROOT, "csrc", "c10d")

    def has_cuda(name, seen):
        if name in seen or not os.path.isfile(os.path.join(d, name)):
            return False
        seen.add(name)
        with open(os.path.join(d, name)) as f:
            text = f.read()
        return "LOCALSGD_WITH_CUDA" in text or any(has_cuda(h, seen) for h in re.findall(r'#include "([^"/]+)"', text))

    return [f"csrc/c10d/{n}" for n in sorted(os.listdir(d)) if n.endswith(".cpp") and has_cuda(n, set())]


@pytest.mark.slow
@pytest.mark.parametrize("source", _backend_units_with_cuda_branches() + ["csrc/bindings/ops_cuda.cpp",
                                                                           "csrc/bindings/module.cpp"])
def test_cuda_branches_of_the_extension_compile(source, tmp_path):
    """The backend's and the bindings' LOCALSGD_WITH_CUDA code (streams, guards, CUDA launches)
    is compiled (-fsyntax-only: full semantic analysis, no code generation) against this torch's
    c10/cuda headers and the CUDA toolkit's, so that a CUDA compile error fails CI on a machine
    without a GPU. A CPU wheel of torch lacks one generated header, c10/cuda/impl/
    cuda_cmake_macros.h (it only defines build macros); an empty stand-in takes its place."""
    import sysconfig

    import torch
    cuda_inc = _cuda_headers()
    if cuda_inc is None:
        pytest.skip("no CUDA toolkit headers (nvcc) or no g++ on this machine")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    if not os.path.isfile(os.path.join(tinc, "c10", "cuda", "CUDAStream.h")):
        pytest.skip("this torch ships no c10/cuda headers")
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    if not os.path.isfile(os.path.join(tinc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-fsyntax-only", "-std=c++20", "-fopenmp", "-DLOCALSGD_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{tmp_path}", f"-I{ROOT}/csrc/include", f"-I{ROOT}/csrc",
           f"-I{tinc}", f"-I{tinc}/torch/csrc/api/include", f"-I{cuda_inc}",
           f"-I{sysconfig.get_paths()['include']}", os.path.join(ROOT, source)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-6000:]
