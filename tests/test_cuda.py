"""Ops on CUDA tensors, both implementations (CUDA C++ "native" and Triton), against the C++
CPU ops byte for byte (round to nearest and seeded stochastic rounding), and on the caller's
current stream. Skipped without a GPU (marker ``gpu``).

The default matrix is representative, not exhaustive: every format meets every dtype, every
size and block size and both rounding modes appear, but not every combination (each Triton
specialisation is a first-time compile of a second or more; the full product is ~250 of them).
``LOCALSGD_GPU_FULL=1`` runs the full product.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import localsgd_comm
from localsgd_comm.kernels import cuda as cuda_impl


OPS = torch.ops.localsgd_comm  # CPU or CUDA kernels, by the tensors' device
FMTS = ("int8", "int4", "fp8")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _available():
    impls = []
    if getattr(localsgd_comm._C, "with_cuda", False):
        impls.append("native")
    if os.environ.get("TRITON_INTERPRET") != "1":
        try:
            import triton  # noqa: F401

            impls.append("triton")
        except ImportError:
            pass
    return impls


@pytest.fixture(params=["native", "triton"])
def impl(request, monkeypatch):
    if request.param not in _available():
        pytest.skip(f"{request.param} implementation not available in this build")
    monkeypatch.setenv(cuda_impl.ENV_VAR, request.param)
    cuda_impl._reset_for_tests()
    assert cuda_impl.active_implementation() == request.param
    yield request.param
    cuda_impl._reset_for_tests()


def assert_same(a, b, what):
    a = a.cpu()
    if a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)
    else:
        assert torch.equal(a, b), f"{what}: first differences at {(a != b).nonzero()[:8].flatten().tolist()}"


def make(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))).to(dtype)


SIZES = [(0, 128), (1, 16), (4099, 128), (100_003, 64), (20_000, 8192), (1 << 20, 128), (1 << 16, 32)]
FULL = os.environ.get("LOCALSGD_GPU_FULL") == "1"


def matrix(*axes):
    """The full product of ``axes`` under LOCALSGD_GPU_FULL=1; otherwise a covering subset: row i
    takes element i mod len(axis) of every axis, for as many rows as the longest axis has, plus
    every pair of the first two axes (so every format meets every dtype)."""
    if FULL:
        return list(itertools.product(*axes))
    rows = {tuple(ax[i % len(ax)] for ax in axes) for i in range(max(len(ax) for ax in axes))}
    if len(axes) >= 2:
        for k, (a, b) in enumerate(itertools.product(axes[0], axes[1])):
            rows.add((a, b) + tuple(ax[(k + 1) % len(ax)] for ax in axes[2:]))
    return sorted(rows, key=repr)


def _flat(rows):
    # (fmt, dtype, (n, block), seed) -> (fmt, dtype, n, block, seed)
    return [(f, d, nb[0], nb[1], s) for f, d, nb, s in rows]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype,n,block,seed", _flat(matrix(FMTS, DTYPES, SIZES, [None, 42])))
def test_quantize_dequantize(impl, fmt, dtype, n, block, seed):
    x = make(n, dtype)
    if n > 10:
        x[7] = float("nan")  # NaN/Inf contract: block 0 gets a NaN scale
    off = 3 * block if seed is not None else 0
    p, s = OPS.quantize(x, fmt, block, seed, off)
    pc, sc = OPS.quantize(x.cuda(), fmt, block, seed, off)
    assert_same(pc, p, "payload")
    assert_same(sc.view(torch.int32), s.view(torch.int32), "scales")
    for out in (DTYPES if FULL else {torch.float32, dtype}):
        assert_same(OPS.dequantize(pc, sc, fmt, n, block, out), OPS.dequantize(p, s, fmt, n, block, out), str(out))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype,seed", matrix(FMTS, DTYPES, [None, 5]))
def test_quantize_unaligned_views(impl, fmt, dtype, seed):
    """Storage offsets that break 16-byte alignment take the scalar paths; same bytes."""
    base = make(5003, dtype)
    x = base[3:]
    p, s = OPS.quantize(x, fmt, 32, seed)
    pc, sc = OPS.quantize(base.cuda()[3:], fmt, 32, seed)
    assert_same(pc, p, "payload")
    assert_same(sc, s, "scales")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype,seed", matrix(FMTS, DTYPES, [None, 9]))
def test_compress_delta(impl, fmt, dtype, seed):
    n, block = 70_001, 128
    anchor = make(n, seed=1)
    params = (anchor + 0.01 * make(n, seed=2)).to(dtype)
    res = 1e-3 * make(n, seed=3)
    res_c = res.cuda()
    p, s = OPS.compress_delta(anchor, params, res, fmt, block, seed)
    pc, sc = OPS.compress_delta(anchor.cuda(), params.cuda(), res_c, fmt, block, seed)
    assert_same(pc, p, "payload")
    assert_same(sc, s, "scales")
    assert_same(res_c, res, "residual")
    pn, sn = OPS.compress_delta(anchor.cuda(), params.cuda(), None, fmt, block, seed)
    assert_same(pn, OPS.compress_delta(anchor, params, None, fmt, block, seed)[0], "payload without residual")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,pnb,seed", matrix(FMTS, [(1, 1, 16), (4, 100_001, 128), (8, 33_333, 64), (3, 0, 128)],
                                                [None, 3]))
def test_dequantize_reduce(impl, fmt, pnb, seed):
    p, n, block = pnb
    enc = [OPS.quantize(make(n, seed=r), fmt, block) for r in range(p)]
    pay = torch.stack([e[0] for e in enc])
    sc = torch.stack([e[1] for e in enc])
    # strided rows: views into a wider buffer, as the backend's receive buffers are
    big = torch.zeros(p, pay.shape[1] + 16, dtype=torch.uint8, device="cuda")
    big[:, :pay.shape[1]] = pay.cuda()
    pay_c = big[:, :pay.shape[1]]
    assert_same(OPS.dequantize_reduce(pay_c, sc.cuda(), fmt, n, block, 1.0 / p),
                OPS.dequantize_reduce(pay, sc, fmt, n, block, 1.0 / p), "sum")
    q, s = OPS.dequantize_reduce_requantize(pay, sc, fmt, n, block, 1.0 / p, seed, block)
    qc, scc = OPS.dequantize_reduce_requantize(pay_c, sc.cuda(), fmt, n, block, 1.0 / p, seed, block)
    assert_same(qc, q, "requantized payload")
    assert_same(scc, s, "requantized scales")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,grad_fmt,mun", matrix(DTYPES, [None, *FMTS], [(0.9, True), (0.9, False), (0.0, True)]))
def test_outer_nesterov_step(impl, dtype, grad_fmt, mun):
    mu, nesterov = mun
    n, block = 50_001, 128
    anchor, mom, grad = make(n, seed=1), make(n, seed=2), 0.1 * make(n, seed=3)
    a, m, prm = anchor.clone(), mom.clone(), torch.empty(n, dtype=dtype)
    ac, mc, pc = anchor.cuda(), mom.cuda(), torch.empty(n, dtype=dtype, device="cuda")
    if grad_fmt is None:
        OPS.outer_nesterov_step(a, m if mu else None, prm, grad, 0.7, mu, nesterov)
        OPS.outer_nesterov_step(ac, mc if mu else None, pc, grad.cuda(), 0.7, mu, nesterov)
    else:
        pay, sc = OPS.quantize(grad, grad_fmt, block)
        OPS.outer_nesterov_step_compressed(a, m if mu else None, prm, pay, sc, grad_fmt, block, 0.5, 0.7, mu, nesterov)
        OPS.outer_nesterov_step_compressed(ac, mc if mu else None, pc, pay.cuda(), sc.cuda(), grad_fmt, block, 0.5,
                                           0.7, mu, nesterov)
    assert_same(ac, a, "anchor")
    assert_same(mc, m, "momentum")
    assert_same(pc, prm, "params")


@pytest.mark.gpu
def test_kernels_run_on_the_current_stream(impl):
    """The ops queue on the caller's current stream: on a side stream, after a GPU sleep that
    precedes an in-place fill, they must see the filled values. Had they used stream 0, they
    would run during the sleep and read the old values (other scales, other bytes)."""
    n, block = 1 << 20, 128
    x = torch.randn(n, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of ms of GPU time ahead of the fill
        x.fill_(0.5)
        p, s = OPS.quantize(x, "int8", block)
        y = OPS.dequantize(p, s, "int8", n, block, torch.float32)
    side.synchronize()
    p_ref, s_ref = OPS.quantize(torch.full((n,), 0.5), "int8", block)
    assert_same(s, s_ref, "scales")
    assert_same(p, p_ref, "payload")
    assert_same(y, torch.full((n,), 0.5), "dequantized")


@pytest.mark.gpu
def test_errors_are_clear(impl):
    x = torch.randn(100, device="cuda")
    with pytest.raises(RuntimeError, match="block_size must be a power of two"):
        OPS.quantize(x, "int8", 100)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        OPS.compress_delta(x, x, torch.zeros(200, device="cuda")[::2], "int8", 128)
    with pytest.raises(RuntimeError, match="momentum buffer is required"):
        OPS.outer_nesterov_step(x.clone(), None, None, x, 0.7, 0.9, True)


@pytest.mark.gpu
def test_bad_env_value_is_an_error(monkeypatch):
    monkeypatch.setenv(cuda_impl.ENV_VAR, "cupy")
    cuda_impl._reset_for_tests()
    try:
        with pytest.raises(ValueError, match="LOCALSGD_COMM_CUDA_IMPL must be one of"):
            OPS.quantize(torch.randn(10, device="cuda"), "int8", 16)
    finally:
        monkeypatch.delenv(cuda_impl.ENV_VAR)
        cuda_impl._reset_for_tests()


# ---- implementation choice (no GPU needed) ----------------------------------------------------------
def test_choice_without_the_requested_implementation_is_a_clear_error(monkeypatch):
    """No silent fallback: asking for an implementation this build lacks makes CUDA calls fail
    with the reason, and active_implementation() says "none"."""
    want = "native" if not getattr(localsgd_comm._C, "with_cuda", False) else None
    if want is None:
        pytest.skip("this build has the native CUDA kernels")
    monkeypatch.setenv(cuda_impl.ENV_VAR, want)
    cuda_impl._reset_for_tests()
    try:
        assert cuda_impl.active_implementation() == "none"
        assert localsgd_comm.cuda_implementation() == "none"
        with pytest.raises(RuntimeError, match="built without CUDA kernels"):
            cuda_impl._implementations()
    finally:
        monkeypatch.delenv(cuda_impl.ENV_VAR)
        cuda_impl._reset_for_tests()


def test_default_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.delenv(cuda_impl.ENV_VAR, raising=False)
    cuda_impl._reset_for_tests()
    with caplog.at_level("INFO", logger="localsgd_comm"):
        first = cuda_impl.active_implementation()
        assert cuda_impl.active_implementation() == first
    assert first in ("native", "triton", "none")
    assert sum("localsgd_comm CUDA ops" in r.getMessage() for r in caplog.records) == 1
    cuda_impl._reset_for_tests()


def test_cuda_implementation_is_none_without_a_cuda_device():
    """No CUDA device, no CUDA implementation serving anything: "none", whatever is installed."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert localsgd_comm.cuda_implementation() == "none"


def test_the_default_matrix_covers_every_pair_of_its_first_two_axes():
    rows = matrix(FMTS, DTYPES, SIZES, [None, 42])
    assert {(r[0], r[1]) for r in rows} == set(itertools.product(FMTS, DTYPES))
    assert {r[2] for r in rows} == set(SIZES) and {r[3] for r in rows} == {None, 42}
    if not FULL:
        assert len(rows) < len(FMTS) * len(DTYPES) * len(SIZES) * 2 // 3


@pytest.mark.parametrize("archs,cap,ok", [
    ("8.0;9.0+PTX", (8, 0), True),
    ("8.0;9.0+PTX", (8, 6), True),    # sm_80 machine code runs on 8.x, x >= 0
    ("8.0;9.0+PTX", (9, 0), True),
    ("8.0;9.0+PTX", (10, 0), True),   # compute_90 PTX, compiled by the driver
    ("8.0;9.0+PTX", (12, 0), True),
    ("8.0;9.0+PTX", (7, 5), False),   # older than every architecture built
    ("8.0;9.0", (10, 0), False),      # no PTX: "no kernel image is available"
    ("9.0", (8, 0), False),
    ("7.5 8.6+PTX", (8, 9), True),
])
def test_which_gpus_a_build_runs_on(archs, cap, ok):
    assert cuda_impl.arch_supported(archs, cap) is ok


@pytest.mark.gpu
def test_an_earlier_cuda_error_is_not_blamed_on_our_kernel(monkeypatch):
    """CUDA keeps the last error of any runtime call until it is read: the native launchers read
    it before launching and report it as earlier work's, not as their kernel's failure."""
    if "native" not in _available():
        pytest.skip("native implementation not available in this build")
    monkeypatch.setenv(cuda_impl.ENV_VAR, "native")
    cuda_impl._reset_for_tests()
    try:
        x = torch.randn(1000, device="cuda")
        err = torch.cuda.cudart().cudaHostRegister(0, 16, 0)  # an invalid pointer: a (non-sticky) error
        assert int(err) != 0
        with pytest.raises(RuntimeError, match="from earlier work"):
            OPS.quantize(x, "int8", 128)
        p, s = OPS.quantize(x, "int8", 128)  # read once: the next call is clean
        assert_same(p, OPS.quantize(x.cpu(), "int8", 128)[0], "payload")
    finally:
        cuda_impl._reset_for_tests()
