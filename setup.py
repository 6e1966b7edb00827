"""Build of localsgd_comm and its compiled module localsgd_comm._C.

Flag hierarchy (top wins):
    LOCALSGD_COMM_CUDA=0/1   force the CUDA kernels off / on (on: a CUDA toolkit must be found)
    torch.version.cuda and CUDA_HOME   CUDA kernels are built when torch is a CUDA build AND a
                                       toolkit is found. Never decided by a visible GPU: build
                                       machines often have none.
    (always)                 the C++ CPU kernels, the CPU op bindings and the c10d backend.

A native build failure is an install error; there is no pure-Python fallback package.
Install without build isolation (``pip install --no-build-isolation``): an isolated build env
would download a second, multi-GB torch.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - install-time message
    sys.exit(
        "localsgd-comm builds against the installed torch: install torch first "
        "(pip install torch==2.13.0) and build with pip install --no-build-isolation .\n"
        f"({exc})"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("LOCALSGD_COMM_CUDA")
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag is not None and flag.strip() not in ("0", "1"):
        sys.exit(f"LOCALSGD_COMM_CUDA must be 0 or 1, got {flag!r}")
    if flag == "1":
        if not have:
            sys.exit(
                "LOCALSGD_COMM_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    if flag == "0":
        return False
    return have


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


with_cuda = _want_cuda()
sources = (
    _rel("csrc/kernels/cpu/*.cpp")
    + _rel("csrc/bindings/module.cpp")
    + _rel("csrc/bindings/ops_cpu.cpp")
    + _rel("csrc/c10d/*.cpp")
)
# No FMA contraction and no fast-math anywhere: the wire format (format.h) fixes the fp32
# arithmetic so that every implementation produces the same bytes.
# -fno-trapping-math changes no value (FP exception flags are never read) but lets GCC
# if-convert float selects, without which the CPU quantize loops stay scalar (5-10x slower).
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden",
             "-fno-math-errno", "-fno-trapping-math"]
define_macros = [("TORCH_EXTENSION_NAME", "_C")]
ext_kwargs = dict(
    include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
    extra_link_args=["-fopenmp"],
)
if with_cuda:
    sources += _rel("csrc/kernels/cuda/*.cu") + _rel("csrc/bindings/ops_cuda.cpp")
    define_macros.append(("LOCALSGD_WITH_CUDA", "1"))
    nvcc_flags = ["-O3", "-std=c++20", "--fmad=false", "-lineinfo",
                  "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    ext = CUDAExtension("localsgd_comm._C", sources, define_macros=define_macros,
                        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **ext_kwargs)
else:
    ext = CppExtension("localsgd_comm._C", sources, define_macros=define_macros,
                       extra_compile_args={"cxx": cxx_flags}, **ext_kwargs)

if any(a in sys.argv for a in ("build_ext", "bdist_wheel", "editable_wheel", "develop", "install")):
    # pip shows this with -v; without it only "still running..." (measured: about 1.5 min for the
    # 7 CPU units with ninja on 2 idle cores; the CUDA units add their nvcc time)
    print(f"localsgd-comm: compiling {len(sources)} native source files ({'with' if with_cuda else 'without'} "
          "CUDA), about 1.5 minutes on 2 cores", file=sys.stderr, flush=True)

setup(
    name="localsgd-comm",
    version="0.1.0",
    description="Communication-efficient Local SGD / DiLoCo for PyTorch: compressed all-reduce "
    "backend, fused kernels and a drop-in DiLoCo optimizer wrapper",
    python_requires=">=3.9",
    packages=find_packages(include=["localsgd_comm", "localsgd_comm.*"]),
    package_data={"localsgd_comm": ["py.typed"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-benchmark", "expecttest"],
        "triton": ["triton"],
    },
    entry_points={
        "console_scripts": [
            "localsgd-train=localsgd_comm.train:main",
            "localsgd-bench=localsgd_comm.bench.cli:main",
        ]
    },
    zip_safe=False,
)
