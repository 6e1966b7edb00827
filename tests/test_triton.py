"""Triton kernels against the C++ CPU ops (byte for byte) and a float64 oracle.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and the kernels run on CPU tensors in
Triton's interpreter (~1 ms per program instance: sizes stay <= ~40K elements). With a GPU
(and no TRITON_INTERPRET) the same tests run the kernels on CUDA tensors and compare with the
CPU ops on copies.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

import localsgd_comm  # noqa: F401  (declares the ops, loads the CPU kernels)
from localsgd_comm.kernels import triton as T

CPU = torch.ops.localsgd_comm
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEV == "cuda" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

FMTS = ("int8", "int4", "fp8")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


def dev(t):
    return None if t is None else t.to(DEV)


def host(t):
    return t.cpu()


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    """Exact equality; NaNs must sit at the same places (their payload bits may differ by device)."""
    a, b = host(a), host(b)
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)
    else:
        assert torch.equal(a, b), f"{what}: {(a != b).nonzero()[:8].flatten().tolist()}"


def make(kind: str, n: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "heavy":  # log-normal magnitudes over ~10 decades, random signs
        x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    elif kind == "zero":
        x = torch.zeros(n)
    elif kind == "constant":
        x = torch.full((n,), -0.3)
    elif kind == "denormal":  # fp32 subnormals: scale < FLT_MIN, the division branch of format.h
        x = torch.randn(n, generator=g) * 1e-39
    elif kind == "huge":
        x = (torch.randn(n, generator=g) * 3e37).clamp(-3.3e38, 3.3e38)  # finite, near FLT_MAX
    else:
        raise ValueError(kind)
    return x.to(dtype)


CASES = [("normal", 4099, 128), ("heavy", 2053, 64), ("zero", 300, 128), ("constant", 257, 16),
         ("denormal", 513, 32), ("huge", 1000, 256), ("normal", 1, 128), ("normal", 0, 128),
         ("normal", 9000, 8192)]


# ---- quantize / dequantize ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,n,block", CASES)
def test_quantize_dequantize_match_cpu(fmt, dtype, kind, n, block):
    x = make(kind, n, dtype)
    if dtype != torch.float32 and kind in ("denormal", "huge"):
        x = make(kind, n, torch.float32).clamp(-6e4, 6e4).to(dtype)  # stay finite in fp16
    p, s = T.quantize(dev(x), fmt, block)
    p_ref, s_ref = CPU.quantize(x, fmt, block)
    assert_bits_equal(p, p_ref, "payload")
    assert_bits_equal(s.view(torch.int32), s_ref.view(torch.int32), "scales")
    for out_dtype in DTYPES:
        y = T.dequantize(p, s, fmt, n, block, out_dtype)
        assert_bits_equal(y, CPU.dequantize(p_ref, s_ref, fmt, n, block, out_dtype), f"dequantize {out_dtype}")


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", ["normal", "heavy", "denormal", "huge"])
def test_round_to_nearest_error_bound(fmt, kind):
    """float64 oracle: |x - x'| within the format.h bound for every element."""
    n, block = 3001, 128
    x = make(kind, n)
    p, s = T.quantize(dev(x), fmt, block)
    y = host(T.dequantize(p, s, fmt, n, block, torch.float32)).double()
    scale = host(s).double().repeat_interleave(block)[:n]
    err = (x.double() - y).abs()
    if fmt == "fp8":
        # half an e4m3 ulp of v times scale: 2^-4 |x| in the normal range, 2^-10 * scale below
        # it; plus one fp32 rounding of the multiply (2^-24 |x'|).
        bound = torch.maximum(x.double().abs() * 2.0**-4, scale * 2.0**-10) + y.abs() * 2.0**-24
    else:
        # half a quantization step (scale/2) plus one fp32 rounding of q * scale (2^-24 |x'|);
        # for subnormal scales the product itself is exact or flushes below 2^-149.
        bound = scale / 2 + y.abs() * 2.0**-24 + 2.0**-149
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("fmt", FMTS)
def test_nan_inf_contract(fmt):
    """A block with NaN or Inf: NaN scale, zero payload bytes, NaN after dequantize; others intact."""
    n, block = 700, 128
    x = make("normal", n)
    x[5] = float("nan")
    x[300] = float("inf")
    x[699] = float("-inf")  # in the short tail block
    p, s = T.quantize(dev(x), fmt, block)
    s = host(s)
    bad = torch.tensor([0, 2, 5])
    assert torch.isnan(s[bad]).all() and torch.isfinite(s[[1, 3, 4]]).all()
    p_ref, s_ref = CPU.quantize(x, fmt, block)
    assert_bits_equal(p, p_ref, "payload")
    y = host(T.dequantize(dev(p_ref), dev(s_ref), fmt, n, block, torch.float32))
    nan_rows = torch.zeros(n, dtype=torch.bool)
    for b in bad.tolist():
        nan_rows[b * block:(b + 1) * block] = True
    assert torch.isnan(y[nan_rows]).all() and torch.isfinite(y[~nan_rows]).all()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_rounding_reproducible_and_matches_cpu(fmt, dtype):
    x = make("heavy", 1531, dtype)
    a = T.quantize(dev(x), fmt, 64, seed=1234)
    b = T.quantize(dev(x), fmt, 64, seed=1234)
    c = T.quantize(dev(x), fmt, 64, seed=1235)
    ref = CPU.quantize(x, fmt, 64, 1234)
    assert_bits_equal(a[0], b[0], "same seed")
    assert_bits_equal(a[0], ref[0], "cpu bytes, same seed")
    assert not torch.equal(host(a[0]), host(c[0])), "another seed must draw other bits"
    # A slice quantized with index_offset draws the numbers of the whole-buffer call.
    part = T.quantize(dev(x[640:]), fmt, 64, seed=1234, index_offset=640)
    start = 640 // 2 if fmt == "int4" else 640
    assert_bits_equal(part[0], host(a[0])[start:], "index_offset")


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_unbiased(fmt):
    n, block, draws = 256, 128, 64
    x = make("normal", n, seed=3)
    acc = torch.zeros(n, dtype=torch.float64)
    for k in range(draws):
        p, s = T.quantize(dev(x), fmt, block, seed=k)
        acc += host(T.dequantize(p, s, fmt, n, block, torch.float32)).double()
    mean_err = acc / draws - x.double()
    scale = (x.abs().reshape(-1, block).amax(1) / QMAX[fmt]).double().repeat_interleave(block)
    # Each draw's error is within one step (scale for int, an e4m3 ulp * scale <= 2^-3 |x| +
    # 2^-9 scale for fp8) with mean 0: the mean over 64 draws has std <= step / (2 * 8); 6 sigma
    # per element, and the average over all elements must be ~0 (std <= step / (16 * 16)).
    step = scale if fmt != "fp8" else x.abs().double() * 2.0**-3 + scale * 2.0**-9
    assert bool((mean_err.abs() <= 6 * step / 16 + 1e-12).all())
    assert abs((mean_err / step.clamp_min(1e-30)).mean().item()) < 6 / 256


# ---- compress_delta ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("seed", [None, 7])
def test_compress_delta_matches_cpu(fmt, dtype, residual, seed):
    n, block = 2049, 128
    anchor = make("normal", n, seed=1)
    params = (anchor + 0.01 * make("heavy", n, seed=2)).to(dtype)
    res = 1e-3 * make("normal", n, seed=3) if residual else None
    res_t = dev(res.clone()) if residual else None
    p, s = T.compress_delta(dev(anchor), dev(params), res_t, fmt, block, seed)
    res_c = res.clone() if residual else None
    p_ref, s_ref = CPU.compress_delta(anchor, params, res_c, fmt, block, seed)
    assert_bits_equal(p, p_ref, "payload")
    assert_bits_equal(s, s_ref, "scales")
    if residual:
        assert_bits_equal(res_t, res_c, "residual")
        # error feedback: residual = v - deQ(q) is one fp32 rounding (<= 2^-24 of the larger
        # operand) and so is adding deQ(q) back: within 2^-23 (|v| + |deQ|) of v.
        v = (anchor - params.float() + res).double()
        y = host(T.dequantize(p, s, fmt, n, block, torch.float32)).double()
        back = host(res_t).double() + y
        assert bool(((back - v).abs() <= 2.0**-23 * (v.abs() + y.abs())).all())


# ---- dequantize_reduce(_requantize) ---------------------------------------------------------------
def _chunks(fmt, p, n, block, strided=False):
    xs = [make("heavy" if r % 2 else "normal", n, seed=10 + r) for r in range(p)]
    enc = [CPU.quantize(x, fmt, block) for x in xs]
    pay = torch.stack([e[0] for e in enc])
    sc = torch.stack([e[1] for e in enc])
    if strided:  # rows of a wider receive buffer: stride(0) > row length
        big_p = torch.zeros(p, pay.shape[1] + 5, dtype=torch.uint8)
        big_s = torch.zeros(p, sc.shape[1] + 3)
        big_p[:, :pay.shape[1]] = pay
        big_s[:, :sc.shape[1]] = sc
        pay, sc = big_p[:, :pay.shape[1]], big_s[:, :sc.shape[1]]
    return pay, sc


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("p,n,block,strided", [(1, 1, 16, False), (3, 1001, 128, False), (4, 4097, 64, True),
                                               (2, 0, 128, False)])
def test_dequantize_reduce_matches_cpu(fmt, p, n, block, strided):
    pay, sc = _chunks(fmt, p, n, block, strided)
    out = T.dequantize_reduce(dev(pay), dev(sc), fmt, n, block, 1.0 / p)
    ref = CPU.dequantize_reduce(pay, sc, fmt, n, block, 1.0 / p)
    assert_bits_equal(out, ref, "sum")
    # float64 oracle: the fp32 sum of p products carries at most ~p roundings of 2^-24.
    want = sum(CPU.dequantize(pay[r].contiguous(), sc[r].contiguous(), fmt, n, block, torch.float32).double()
               for r in range(p)) / p if n else torch.zeros(0, dtype=torch.float64)
    mag = sum(CPU.dequantize(pay[r].contiguous(), sc[r].contiguous(), fmt, n, block, torch.float32).double().abs()
              for r in range(p)) / p if n else torch.zeros(0, dtype=torch.float64)
    assert bool(((host(out).double() - want).abs() <= (p + 1) * 2.0**-24 * mag + 1e-45).all())
    for seed in (None, 99):
        q, s = T.dequantize_reduce_requantize(dev(pay), dev(sc), fmt, n, block, 1.0 / p, seed, 2 * block)
        q_ref, s_ref = CPU.dequantize_reduce_requantize(pay, sc, fmt, n, block, 1.0 / p, seed, 2 * block)
        assert_bits_equal(q, q_ref, f"requantized payload seed={seed}")
        assert_bits_equal(s, s_ref, f"requantized scales seed={seed}")


def test_dequantize_reduce_nan_scale_propagates():
    pay, sc = _chunks("int8", 2, 300, 128)
    sc[1, 1] = float("nan")
    out = host(T.dequantize_reduce(dev(pay), dev(sc), "int8", 300, 128, 1.0))
    assert torch.isnan(out[128:256]).all() and torch.isfinite(out[:128]).all() and torch.isfinite(out[256:]).all()
    q, s = T.dequantize_reduce_requantize(dev(pay), dev(sc), "int8", 300, 128, 1.0)
    assert torch.isnan(host(s)[1]) and torch.isfinite(host(s)[[0, 2]]).all()


# ---- outer Nesterov step ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mu,nesterov,with_params", [(0.9, True, True), (0.9, False, True), (0.0, True, True),
                                                     (0.9, True, False)])
def test_outer_nesterov_step_matches_cpu_and_sgd(dtype, mu, nesterov, with_params):
    n = 3001
    anchor, mom, grad = make("normal", n, seed=1), make("normal", n, seed=2), 0.1 * make("heavy", n, seed=3)
    a_t, m_t = dev(anchor.clone()), dev(mom.clone()) if mu else None
    p_t = dev(torch.empty(n, dtype=dtype)) if with_params else None
    T.outer_nesterov_step(a_t, m_t, p_t, dev(grad), 0.7, mu, nesterov)
    a_c, m_c = anchor.clone(), mom.clone() if mu else None
    p_c = torch.empty(n, dtype=dtype) if with_params else None
    CPU.outer_nesterov_step(a_c, m_c, p_c, grad, 0.7, mu, nesterov)
    assert_bits_equal(a_t, a_c, "anchor")
    if mu:
        assert_bits_equal(m_t, m_c, "momentum")
    if with_params:
        assert_bits_equal(p_t, p_c, "params")
        assert_bits_equal(p_t, a_c.to(dtype), "params == cast(anchor)")
    # torch.optim.SGD: its CPU kernels may fuse a*b+c into an FMA, ours never do (format.h):
    # one rounding apart per op, 3 ops -> a few ulps of the largest term.
    w = torch.nn.Parameter(anchor.clone())
    opt = torch.optim.SGD([w], lr=0.7, momentum=mu, nesterov=nesterov and mu > 0)
    if mu:
        opt.state[w]["momentum_buffer"] = mom.clone()
    w.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(host(a_t), w.detach(), rtol=4 * 2**-24, atol=4 * 2**-24)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outer_nesterov_step_compressed_matches_cpu(fmt, dtype):
    n, block = 2500, 128
    pay, sc = CPU.quantize(make("heavy", n, seed=5), fmt, block)
    anchor, mom = make("normal", n, seed=1), make("normal", n, seed=2)
    a_t, m_t, p_t = dev(anchor.clone()), dev(mom.clone()), dev(torch.empty(n, dtype=dtype))
    T.outer_nesterov_step_compressed(a_t, m_t, p_t, dev(pay), dev(sc), fmt, block, 0.5, 0.7, 0.9, True)
    a_c, m_c, p_c = anchor.clone(), mom.clone(), torch.empty(n, dtype=dtype)
    CPU.outer_nesterov_step_compressed(a_c, m_c, p_c, pay, sc, fmt, block, 0.5, 0.7, 0.9, True)
    assert_bits_equal(a_t, a_c, "anchor")
    assert_bits_equal(m_t, m_c, "momentum")
    assert_bits_equal(p_t, p_c, "params")


# ---- output rounding and argument errors --------------------------------------------------------------
def test_half_outputs_round_like_torch():
    """bf16 (integer RNE) and fp16 stores equal torch's round-to-nearest-even casts, NaN/Inf too."""
    vals = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 65519.0, 65520.0, 1e-8, -2**-24 * 1.5, 3.4e38,
                         float("inf"), float("-inf"), 0.0, -0.0], dtype=torch.float32)
    n = vals.numel()
    grad = torch.zeros(n)
    for dtype in (torch.bfloat16, torch.float16):
        a, p = dev(vals.clone()), dev(torch.empty(n, dtype=dtype))
        T.outer_nesterov_step(a, None, p, dev(grad), 0.7, 0.0, True)
        assert_bits_equal(p.view(torch.int16), vals.to(dtype).view(torch.int16), str(dtype))
    a, p = dev(torch.tensor([float("nan")])), dev(torch.empty(1, dtype=torch.bfloat16))
    T.outer_nesterov_step(a, None, p, dev(torch.zeros(1)), 0.7, 0.0, True)
    assert torch.isnan(host(p)).all()


def test_bad_arguments_raise_clear_errors():
    x = dev(torch.randn(100))
    with pytest.raises(RuntimeError, match="unknown compression format"):
        T.quantize(x, "int3", 128)
    with pytest.raises(RuntimeError, match="block_size must be a power of two"):
        T.quantize(x, "int8", 100)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        T.quantize(dev(torch.arange(100)), "int8", 128)
    res = dev(torch.zeros(200))[::2]
    with pytest.raises(RuntimeError, match="residual is updated in place and must be contiguous"):
        T.compress_delta(x, x, res, "int8", 128)
    with pytest.raises(RuntimeError, match="momentum buffer is required"):
        T.outer_nesterov_step(x.clone(), None, None, x, 0.7, 0.9, True)
    p, s = T.quantize(x, "int8", 128)
    with pytest.raises(RuntimeError, match="payload shape must be"):
        T.dequantize(p[:-1], s, "int8", 100, 128, torch.float32)


def test_every_op_has_a_triton_implementation():
    ops_module = importlib.import_module("localsgd_comm._ops")
    assert set(T.OPS) == {name.split("(")[0] for name in ops_module._SCHEMAS}


def test_every_launcher_runs_with_its_tensors_device_current(monkeypatch):
    """A Triton launch goes to the current device: each launcher makes its first tensor's CUDA
    device current first (a tensor on cuda:1 while cuda:0 is current would otherwise run on
    device 0). No GPU here: the guard's choice is checked with a recording stand-in."""
    from localsgd_comm.kernels import triton as triton_impl
    from localsgd_comm.kernels.triton import _host

    assert all(getattr(fn, "on_tensor_device", False) for fn in triton_impl.OPS.values())
    entered = []

    class Recorder:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    seen = []
    launcher = _host.on_tensor_device(lambda *a, **k: seen.append((a, k)) or "ran")
    assert launcher(torch.zeros(3), "int8") == "ran" and entered == []  # CPU: no guard
    monkeypatch.setattr(_host, "tensor_device", lambda args, kwargs: torch.device("cuda", 1))
    assert launcher(torch.zeros(3), fmt="int8") == "ran"
    assert entered == [torch.device("cuda", 1)] and len(seen) == 2
    assert _host.tensor_device.__name__ == "<lambda>"
    monkeypatch.undo()
    assert _host.tensor_device((1, "x"), {"y": torch.zeros(1, dtype=torch.int8)}) == torch.device("cpu")
    assert _host.tensor_device((1,), {}) is None
