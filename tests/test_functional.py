"""The public stateless API ``localsgd_comm.functional``: any-shape inputs, defaults,
``fmt="none"`` pass-through, byte budgets, and agreement with the ops it wraps."""
from __future__ import annotations

import pytest
import torch

import localsgd_comm
from localsgd_comm import functional as F
from localsgd_comm.kernels.reference import ops as R

FORMATS = ("int8", "int4", "fp8")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Issue budgets: bytes per element (payload + fp32 scales) at the default block size.
BUDGET = {"int8": 1.04, "int4": 0.54, "fp8": 1.04}


def _x(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def test_default_block_size_is_shared():
    assert localsgd_comm.DEFAULT_BLOCK_SIZE == 128
    _, s = F.quantize(_x(1000))
    assert s.shape == (8,)  # ceil(1000 / 128)


@pytest.mark.parametrize("shape", [(), (1,), (5, 7), (3, 4, 130), (2, 0, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_any_shape_roundtrip(fmt, dtype, shape):
    x = _x(shape, dtype)
    payload, scales = F.quantize(x, fmt)
    # an N-d tensor is its flat buffer: identical bytes to quantizing x.reshape(-1)
    p_flat, s_flat = F.quantize(x.reshape(-1), fmt)
    assert torch.equal(payload, p_flat) and torch.equal(scales, s_flat)
    assert payload.numel() + 4 * scales.numel() == F.compressed_nbytes(fmt, x.numel())
    out = F.dequantize(payload, scales, fmt, x.numel(), dtype=dtype)
    assert out.shape == (x.numel(),) and out.dtype == dtype
    # same bytes and values as the reference op on the flat buffer
    rp, rs = R.quantize(x.reshape(-1), fmt, 128, None, 0)
    assert torch.equal(payload, rp) and torch.equal(scales, rs)
    # round-trip error: <= half a step of the block's scale (int) or 2^-4 |x| + 2^-10 scale (fp8),
    # plus the output cast (half an ulp of dtype, relative eps/2) -- format.h "Error bound"
    s = scales.double().repeat_interleave(128)[: x.numel()]
    xd = x.reshape(-1).double()
    eps = torch.finfo(dtype).eps
    if fmt == "fp8":
        bound = 2.0 ** -4 * xd.abs() * (1 + 2.0 ** -20) + 2.0 ** -10 * s
    else:
        bound = s * (0.5 + 2.0 ** -15)
    bound = bound * (1 + eps) + eps / 2 * xd.abs() * 1.01
    assert bool(((out.double() - xd).abs() <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_none_format_is_exact_pass_through(dtype):
    x = _x((4, 33), dtype)
    payload, scales = F.quantize(x, "none")
    assert scales.numel() == 0 and payload.dtype == dtype
    assert torch.equal(payload, x.reshape(-1))
    assert torch.equal(F.dequantize(payload, scales, "none", x.numel(), dtype=dtype), x.reshape(-1))
    # to another dtype: one cast, exactly torch's
    assert torch.equal(F.dequantize(payload, scales, "none", x.numel(), dtype=torch.float32),
                       x.reshape(-1).float())
    assert F.compressed_nbytes("none", 132) == 4 * 132
    # non-contiguous input: the flat copy, values unchanged
    xt = x.t()
    assert torch.equal(F.quantize(xt, "none")[0], xt.reshape(-1))
    with pytest.raises(RuntimeError, match="elements"):
        F.dequantize(payload, scales, "none", x.numel() + 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_byte_budget_at_default_block(fmt):
    """payload + fp32 scales per element <= the issue budget, for flat buffers of any length
    from ~1000 elements up (a 1-element tensor still pays one 4-byte scale: 5 B/elem for int8,
    unavoidable; the budget is about real parameter buffers), multiples of the block or not."""
    for n in (1000, 1001, 4097, 128 * 1000 + 1, 10 ** 7 + 3):
        bpe = F.compressed_nbytes(fmt, n) / n
        assert bpe <= BUDGET[fmt], (n, bpe)
    # the actual tensors have those sizes
    payload, scales = F.quantize(_x(4097), fmt)
    assert payload.numel() + 4 * scales.numel() == F.compressed_nbytes(fmt, 4097)


def test_unknown_format_and_block_size_errors():
    x = _x(100)
    with pytest.raises(RuntimeError, match="int3"):
        F.quantize(x, "int3")
    with pytest.raises(RuntimeError, match="block_size"):
        F.quantize(x, "int8", block_size=96)
    with pytest.raises(RuntimeError, match="block_size"):
        F.compressed_nbytes("int8", 100, block_size=4)
    with pytest.raises(RuntimeError, match="format"):
        F.compress_delta(x, x, fmt="none")  # "none" never reaches an op: callers send x itself


def test_seeded_stochastic_rounding_through_the_api():
    x = _x(5000)
    a = F.quantize(x, "int4", seed=1)
    assert torch.equal(a[0], F.quantize(x, "int4", seed=1)[0])
    assert not torch.equal(a[0], F.quantize(x, "int4", seed=2)[0])
    assert torch.equal(a[0], R.quantize(x, "int4", 128, 1, 0)[0])


def test_is_finite():
    x = _x(300)
    assert F.is_finite(F.quantize(x)[1])
    x[260] = float("nan")  # block 2 (the 44-element tail)
    payload, scales = F.quantize(x)
    assert not F.is_finite(scales)
    assert torch.isnan(scales).tolist() == [False, False, True]
    assert F.is_finite(torch.empty(0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_compress_delta_on_shaped_parameters(fmt):
    anchor = _x((16, 33))
    params = (anchor - 0.01 * _x((16, 33), seed=1)).to(torch.bfloat16)
    residual = torch.zeros(16 * 33)
    payload, scales = F.compress_delta(anchor, params, residual, fmt)
    v = (anchor - params.float()).reshape(-1)
    assert torch.equal(payload, F.quantize(v, fmt)[0])
    assert torch.equal(residual, v - F.dequantize(payload, scales, fmt, v.numel()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_reduce_and_outer_step_through_the_api(fmt):
    n, p = 1000, 3
    enc = [F.quantize(_x(n, seed=r), fmt) for r in range(p)]
    payloads, scales = torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc])
    avg = F.dequantize_reduce(payloads, scales, fmt, n, factor=1.0 / p)
    assert torch.equal(avg, R.dequantize_reduce(payloads, scales, fmt, n, 128, 1.0 / p))
    rp, rs = F.dequantize_reduce_requantize(payloads, scales, fmt, n, factor=1.0 / p)
    assert torch.equal(rp, F.quantize(avg, fmt)[0]) and torch.equal(rs, F.quantize(avg, fmt)[1])
    # outer step from the compressed average == from its fp32 value (grad_factor 1)
    a1, m1 = _x(n, seed=9), torch.zeros(n)
    a2, m2 = a1.clone(), torch.zeros(n)
    params = torch.empty(n, dtype=torch.float16)
    F.outer_nesterov_step_compressed(a1, m1, params, rp, rs, fmt)
    F.outer_nesterov_step(a2, m2, None, F.dequantize(rp, rs, fmt, n), lr=0.7, mu=0.9)
    assert torch.equal(a1, a2) and torch.equal(m1, m2) and torch.equal(params, a1.half())
