"""The ``localsgd_comm`` ops on CPU: every implementation against a float64 oracle.

Implementations under test (``impl`` fixture): the C++ kernels through the dispatcher
(``torch.ops.localsgd_comm.*`` on CPU tensors) and the pure-PyTorch reference
(``localsgd_comm.kernels.reference.ops``). Bounds come from csrc/include/localsgd/format.h
and are derived next to the helper that applies them; the implementations must also agree
with each other byte for byte (round to nearest, and stochastic rounding with one seed).
"""
from __future__ import annotations

import math

import pytest
import torch

import localsgd_comm  # noqa: F401  (declares the ops, loads the C++ kernels)
from localsgd_comm import functional as F
from localsgd_comm.kernels.reference import ops as R

FORMATS = ("int8", "int4", "fp8")
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
U = 2.0 ** -24          # unit roundoff of fp32 (round to nearest)
SUB_ULP = 2.0 ** -149   # spacing of fp32 subnormals
FLT_MIN = 2.0 ** -126
CPP = torch.ops.localsgd_comm
IMPLS = {"cpp": CPP, "reference": R}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


# ---- inputs -------------------------------------------------------------------------------------
CASES = ("normal", "heavy", "zeros", "constant", "denormal", "huge", "layers")
LENGTHS = (0, 1, 7, 333, 2053)  # empty, one element, shorter than a block, odd tails


def make_input(case: str, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    tiny, big = (1e-6, 2e4) if dtype == torch.float16 else (1e-40, 1e38)
    if case == "normal":
        x = z
    elif case == "heavy":  # student-t, 3 degrees of freedom: z / sqrt(chi2_3 / 3)
        chi2 = torch.randn(3, n, generator=g, dtype=torch.float64).pow(2).sum(0)
        x = z / (chi2 / 3).sqrt()
    elif case == "zeros":
        x = torch.zeros(n, dtype=torch.float64)
    elif case == "constant":
        x = torch.full((n,), -0.3, dtype=torch.float64)
    elif case == "denormal":  # fp32/bf16: subnormal inputs (subnormal scales); fp16: its subnormals
        x = z * tiny
    elif case == "huge":  # within 3.4e38 (fp32/bf16) or 65504 (fp16); |z| <= 3 keeps it finite
        x = z.clamp(-3, 3) * big
    else:  # "layers": a flat parameter buffer, runs of 50 elements 10^-6 .. 10^3 apart in scale
        mag = torch.randint(-6, 4, ((n + 49) // 50,), generator=g).repeat_interleave(50)[:n]
        x = z * torch.pow(10.0, mag.double())
    return x.to(dtype)


# ---- oracle -------------------------------------------------------------------------------------
def blocks64(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as float64 [num_blocks, block], tail padded with zeros (zeros change no absmax)."""
    xd = x.reshape(-1).double()
    nb = (xd.numel() + block - 1) // block
    return torch.nn.functional.pad(xd, (0, nb * block - xd.numel())).view(nb, block)


def expected_scales(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """format.h: scale = absmax / qmax, one correctly rounded fp32 division; NaN for a block
    with NaN/Inf; 0 for an all-zero block. Dividing in float64 and rounding to fp32 gives the
    correctly rounded fp32 quotient (double rounding is innocuous for / when 53 >= 2*24 + 2)."""
    b = blocks64(x, block)
    absmax = b.abs().amax(dim=1) if b.numel() else b.sum(dim=1)
    s = (absmax / QMAX[fmt]).float()
    # ... unless qmax * s overflows fp32 (int8 at absmax = FLT_MAX): then one ulp toward zero.
    over = torch.isinf(s * torch.full_like(s, QMAX[fmt]))  # the fp32 product, as format.h tests it
    s = torch.where(over & torch.isfinite(s), (s.view(torch.int32) - 1).view(torch.float32), s)
    return torch.where(torch.isfinite(b).all(dim=1), s, torch.full_like(s, float("nan")))


def e4m3_half_ulp(v: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing around |v| (float64): 2^-10 below 2^-6, else 2^(floor(log2|v|) - 4).
    |v| is taken a little larger (x 2^-21) so a computed v that crossed into the next binade is
    covered."""
    a = v.abs() * (1 + 2.0 ** -21)
    e = torch.floor(torch.log2(a.clamp_min(2.0 ** -6)))
    return torch.pow(2.0, e - 4)


def quant_bound(x64: torch.Tensor, scale_e: torch.Tensor, deq: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-element bound on |x - deQ(Q(x))| for round to nearest (format.h "Error bound").

    With s the stored fp32 scale and v = x / s:
    * rounding v to the grid: s/2 (int8/int4) or s * half an e4m3 ulp of v (fp8);
    * computing v: v = x * fl(1/s) is two fp32 roundings and s itself is a rounded absmax/qmax,
      so |v - x/s| <= 3 * 2^-24 * qmax < qmax * 2^-22; times s;
    * the dequantize multiply float(q) * s: one fp32 rounding, 2^-24 |x'|;
    * a subnormal s is exact only to 2^-150 absolutely, which q (<= qmax) multiplies, and the
      subnormal product adds up to 2^-150 more: (qmax + 1) * 2^-150.
    """
    qmax = QMAX[fmt]
    grid = scale_e / 2 if fmt != "fp8" else scale_e * e4m3_half_ulp(x64 / scale_e.clamp_min(1e-300))
    sub = torch.where(scale_e < FLT_MIN, (qmax + 1) * SUB_ULP / 2, 0.0)
    return grid + scale_e * qmax * 2.0 ** -22 + U * deq.abs() + sub


def check_payload_range(payload: torch.Tensor, fmt: str, n: int) -> None:
    if fmt == "int8":
        if n:
            assert int(payload.view(torch.int8).min()) >= -127, "int8 -128 is never produced"
    elif fmt == "int4":
        q = R.unpack_int4(payload, 2 * payload.numel())
        assert bool((q.abs() <= 7).all()), "int4 nibble outside [-7, 7]"
        if n % 2:
            assert int(payload[-1]) >> 4 == 0, "odd n: the last high nibble must be 0"
    else:
        assert not bool(((payload & 0x7F) == 0x7F).any()), "fp8 NaN code produced"


def check_against_oracle(impl, x: torch.Tensor, fmt: str, block: int, payload, scales) -> torch.Tensor:
    n = x.numel()
    assert payload.dtype == torch.uint8 and payload.shape == (F.payload_bytes(fmt, n),)
    assert scales.dtype == torch.float32 and scales.shape == (F.num_blocks(n, block),)
    # scales are one fp32 division of an exact absmax: exact, not approximately equal
    torch.testing.assert_close(scales, expected_scales(x, fmt, block), rtol=0, atol=0, equal_nan=True)
    check_payload_range(payload, fmt, n)
    deq = impl.dequantize(payload, scales, fmt, n, block, torch.float32)
    assert deq.dtype == torch.float32 and deq.shape == (n,)
    x64 = x.reshape(-1).double()
    scale_e = scales.double().repeat_interleave(block)[:n]
    err = (deq.double() - x64).abs()
    bound = quant_bound(x64, scale_e, deq.double(), fmt)
    bad = ~(err <= bound)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} elements beyond the format.h bound, e.g. x={x64[bad][:3].tolist()} "
        f"deq={deq[bad][:3].tolist()} bound={bound[bad][:3].tolist()}")
    return deq


# ---- quantize / dequantize vs the oracle ---------------------------------------------------------
@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_matches_oracle(impl, fmt, dtype, case, block):
    for n in LENGTHS:
        x = make_input(case, n, dtype, seed=n)
        payload, scales = impl.quantize(x, fmt, block, None, 0)
        deq = check_against_oracle(impl, x, fmt, block, payload, scales)
        if dtype != torch.float32:
            # format.h: the fp32 product is cast once, round to nearest even, to the output dtype
            out = impl.dequantize(payload, scales, fmt, n, block, dtype)
            assert out.dtype == dtype
            assert torch.equal(out, deq.to(dtype))


@pytest.mark.parametrize("block", [16, 1024])
@pytest.mark.parametrize("fmt", FORMATS)
def test_large_blocks_and_multi_block_tails(impl, fmt, block):
    for n in (block - 1, block, block + 1, 3 * block + 5):
        x = make_input("heavy", n, torch.float32, seed=n)
        payload, scales = impl.quantize(x, fmt, block, None, 0)
        check_against_oracle(impl, x, fmt, block, payload, scales)


@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_underflow_block(impl, fmt):
    """absmax < ~qmax/2 * 2^-149 (a few smallest subnormals): absmax / qmax rounds to a zero scale
    although the block is not all zero. format.h makes that an all-zero block (scale 0, every
    payload byte 0), so no x / 0 reaches the encoder and every platform writes the same bytes.
    Every element dequantizes to 0: error <= |x| <= (qmax + 1) * 2^-150, inside quant_bound."""
    tiny = 2.0 ** -149
    x = torch.tensor([0.0, 3 * tiny, -5 * tiny, 40 * tiny, -0.0] + [0.0] * 11 + [2 * tiny] * 16)
    payload, scales = impl.quantize(x, fmt, 16, None, 0)
    assert scales.tolist()[1] == 0.0
    per_block = F.payload_bytes(fmt, 16)
    assert bool((payload[per_block:] == 0).all()), "underflowed-scale block must be all-zero bytes"
    deq = check_against_oracle(impl, x, fmt, 16, payload, scales)
    assert bool((deq[16:] == 0).all())
    for seed in (None, 1):
        assert torch.equal(CPP.quantize(x, fmt, 16, seed, 0)[0], R.quantize(x, fmt, 16, seed, 0)[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_finite_input_at_float_max_dequantizes_finite(impl, fmt):
    """format.h: when qmax * fl(absmax / qmax) overflows (int8 at absmax = FLT_MAX), the scale
    steps one ulp toward zero, so a finite block always dequantizes finite and within bound."""
    fmax = torch.finfo(torch.float32).max
    x = torch.tensor([fmax, 1.0, -fmax, fmax / 3])
    payload, scales = impl.quantize(x, fmt, 16, None, 0)
    assert F.is_finite(scales)
    assert float(scales[0]) * _ops_qmax(fmt) <= fmax
    deq = impl.dequantize(payload, scales, fmt, 4, 16, torch.float32)
    assert bool(torch.isfinite(deq).all())
    check_against_oracle(impl, x, fmt, 16, payload, scales)
    assert torch.equal(CPP.quantize(x, fmt, 16, None, 0)[0], R.quantize(x, fmt, 16, None, 0)[0])
    assert torch.equal(CPP.quantize(x, fmt, 16, None, 0)[1], R.quantize(x, fmt, 16, None, 0)[1])


def _ops_qmax(fmt):
    return {"int8": 127.0, "int4": 7.0, "fp8": 448.0}[fmt]


def test_round_half_even_on_exact_ties(impl):
    # absmax 127 gives scale 1 and inv 1: v = x exactly, so ties are real ties.
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49999], dtype=torch.float32)
    payload, _ = impl.quantize(x, "int8", 16, None, 0)
    assert payload.view(torch.int8).tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126, 3]


def test_e4m3_encode_matches_torch_float8():
    """format.h's integer-op e4m3 rounding equals torch's float -> float8_e4m3fn cast."""
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(torch.float8_e4m3fn).float()
    finite = ~torch.isnan(ref)
    assert torch.equal(R.e4m3_decode(codes)[finite], ref[finite])
    grid = ref[finite].unique().sort().values
    g = torch.Generator().manual_seed(1)
    v = torch.cat([
        grid,
        ((grid[1:].double() + grid[:-1].double()) / 2).float(),  # every exact tie
        torch.nextafter(grid, torch.full_like(grid, 1000.0)),  # just above / below each code
        torch.nextafter(grid, torch.full_like(grid, -1000.0)),
        torch.empty(100000).uniform_(-448, 448, generator=g),
        torch.empty(100000).uniform_(-0.02, 0.02, generator=g),  # subnormal range and its edge
    ]).clamp(-448, 448)
    assert torch.equal(R.e4m3_encode(v), v.to(torch.float8_e4m3fn).view(torch.uint8))


def test_fp8_codes_equal_torch_cast_of_scaled_value(impl):
    """fp8 payload == torch's e4m3 cast of v = x * (1/scale) (normal scales)."""
    x = make_input("heavy", 4096, torch.float32)
    payload, scales = impl.quantize(x, "fp8", 128, None, 0)
    inv = (torch.ones_like(scales) / scales).repeat_interleave(128)
    v = (x * inv).clamp(-448, 448)
    assert torch.equal(payload, v.to(torch.float8_e4m3fn).view(torch.uint8))


# ---- implementations agree byte for byte --------------------------------------------------------
@pytest.mark.parametrize("seed", [None, 0, 2 ** 40 + 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpp_matches_reference_bytes(fmt, dtype, seed):
    for case in CASES:
        for n, block in ((2053, 128), (333, 16), (1, 64)):
            x = make_input(case, n, dtype, seed=n)
            p_c, s_c = CPP.quantize(x, fmt, block, seed, 0)
            p_r, s_r = R.quantize(x, fmt, block, seed, 0)
            assert torch.equal(p_c, p_r), f"{case} n={n}: payload bytes differ"
            torch.testing.assert_close(s_c, s_r, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(CPP.dequantize(p_c, s_c, fmt, n, block, dtype),
                               R.dequantize(p_r, s_r, fmt, n, block, dtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_index_offset_slices_draw_like_the_whole_buffer(impl, fmt):
    """Stochastic rounding of a slice with index_offset = its start gives the whole-buffer bytes."""
    x, block = make_input("normal", 1024, torch.float32), 64
    whole_p, whole_s = impl.quantize(x, fmt, block, 7, 0)
    per_byte = 2 if fmt == "int4" else 1
    for start in (0, 256, 512):
        p, s = impl.quantize(x[start:start + 512], fmt, block, 7, start)
        assert torch.equal(p, whole_p[start // per_byte:(start + 512) // per_byte])
        assert torch.equal(s, whole_s[start // block:(start + 512) // block])


# ---- stochastic rounding ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_reproducible(impl, fmt):
    x = make_input("normal", 1000, torch.float32)
    a = impl.quantize(x, fmt, 128, 42, 0)
    b = impl.quantize(x, fmt, 128, 42, 0)
    c = impl.quantize(x, fmt, 128, 43, 0)
    rn = impl.quantize(x, fmt, 128, None, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # another seed changes a large share of the bytes (each element with a non-integer v flips
    # with probability ~1/2 between its two neighbours); scales never depend on the seed
    assert (a[0] != c[0]).float().mean() > 0.2
    assert (a[0] != rn[0]).float().mean() > 0.2
    assert torch.equal(a[1], rn[1])
    check_against_oracle_sr(impl, x, fmt, 128, *a)


def check_against_oracle_sr(impl, x, fmt, block, payload, scales):
    """Stochastic rounding picks one of the two neighbours of v: error < one grid step (s, or an
    e4m3 ulp = 2 half-ulps, times s) plus the same computation terms as round to nearest."""
    n = x.numel()
    deq = impl.dequantize(payload, scales, fmt, n, block, torch.float32).double()
    x64 = x.double()
    s = scales.double().repeat_interleave(block)[:n]
    rn_bound = quant_bound(x64, s, deq, fmt)
    grid = s / 2 if fmt != "fp8" else s * e4m3_half_ulp(x64 / s.clamp_min(1e-300))
    assert bool(((deq - x64).abs() <= rn_bound + grid).all())


def _draws(impl, x, fmt, block, k):
    """k stochastic quantizations (seeds 0..k-1) of x, dequantized: [k, n] float64."""
    out = []
    for seed in range(k):
        p, s = impl.quantize(x, fmt, block, seed, 0)
        out.append(impl.dequantize(p, s, fmt, x.numel(), block, torch.float32).double())
    return torch.stack(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_unbiased(impl, fmt):
    """Mean error over K seeds is ~0 per element, while round to nearest is biased.

    Construction: each block of 32 starts with +qmax, so absmax = qmax, scale = 1 and v = x
    exactly; the other elements sit at k + 0.35 (int) or in [64, 128) where e4m3 spacing is 8
    (fp8). Per draw the error of an element lies in an interval of width w (= 1 or 8) and draws
    are independent (different seeds), so Hoeffding gives P(|mean of K| >= c*w) <= 2 exp(-2 K c^2).
    With K = 256 and n = 1024 elements, c = 0.21 makes the chance of any false failure
    <= 1024 * 2 exp(-22.6) < 1e-6. Round to nearest has error -0.35 w on the int grid and a
    deterministic error on the fp8 one: it must (and does) fail the same check.
    """
    k, n, block = 256, 1024, 32
    g = torch.Generator().manual_seed(5)
    qmax = QMAX[fmt]
    if fmt == "fp8":
        x, w = torch.empty(n).uniform_(64, 128, generator=g), 8.0
    else:
        x = torch.randint(-int(qmax), int(qmax), (n,), generator=g).float() + 0.35
        w = 1.0
    x[::block] = qmax
    mean_err = (_draws(impl, x, fmt, block, k) - x.double()).mean(dim=0)
    c = 0.21
    assert float(mean_err.abs().max()) <= c * w, float(mean_err.abs().max())
    # all elements together (n*K independent draws): Hoeffding with c' = sqrt(ln(2e6)/(2nK)) ~ 0.005
    assert abs(float(mean_err.mean())) <= 0.005 * w
    p, s = impl.quantize(x, fmt, block, None, 0)
    rn_err = impl.dequantize(p, s, fmt, n, block, torch.float32).double() - x.double()
    assert float(rn_err.abs().max()) > c * w, "the check above could not tell biased rounding apart"


# ---- NaN / Inf contract -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_nonfinite_blocks(impl, fmt, dtype):
    """format.h: a block holding NaN/Inf gets scale NaN and zero payload; only that block
    dequantizes to NaN (all of it); the others are unaffected; functional.is_finite sees it."""
    block, n = 16, 16 * 5 + 3  # 6 blocks, the last one short
    x = make_input("normal", n, dtype)
    x[16 + 3] = float("nan")
    x[48] = float("inf")
    x[n - 1] = float("-inf")  # in the short tail block
    payload, scales = impl.quantize(x, fmt, block, None, 0)
    bad_blocks = torch.tensor([False, True, False, True, False, True])
    assert torch.equal(torch.isnan(scales), bad_blocks)
    assert not F.is_finite(scales)
    per_elem_bad = bad_blocks.repeat_interleave(block)[:n]
    q = R.decode_q(payload, fmt, n)
    assert bool((q[per_elem_bad] == 0).all()), "payload of a non-finite block must be 0"
    deq = impl.dequantize(payload, scales, fmt, n, block, dtype)
    assert torch.equal(torch.isnan(deq), per_elem_bad)
    # the finite blocks are exactly what quantizing them alone gives
    good = impl.quantize(x[:16], fmt, block, None, 0)
    assert torch.equal(good[1], scales[:1])
    clean = impl.quantize(make_input("normal", n, dtype), fmt, block, None, 0)
    assert F.is_finite(clean[1])


# ---- dequantize_reduce (+ requantize) -----------------------------------------------------------
def _chunks(impl, p, n, fmt, block, seed=0):
    xs = [make_input("layers" if r % 2 else "normal", n, torch.float32, seed=seed + r) for r in range(p)]
    enc = [impl.quantize(x, fmt, block, None, 0) for x in xs]
    return torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc])


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_reduce_matches_oracle(impl, fmt, p):
    n, block = 1000, 128
    payloads, scales = _chunks(impl, p, n, fmt, block)
    terms = torch.stack([R.decode_q(payloads[r], fmt, n).double() * scales[r].double().repeat_interleave(block)[:n]
                         for r in range(p)])  # exact: float(q) * s in float64 (24 x 4 bits)
    for factor in (1.0, 1.0 / p):
        out = impl.dequantize_reduce(payloads, scales, fmt, n, block, factor)
        assert out.dtype == torch.float32 and out.shape == (n,)
        exact = terms.sum(0) * factor
        # p fp32 products + (p - 1) sums + the factor multiply + rounding factor to fp32: at
        # most 2p + 1 roundings of quantities bounded by sum|terms| * factor (gamma_n, n=2p+1)
        bound = (2 * p + 1) * U / (1 - (2 * p + 1) * U) * terms.abs().sum(0) * factor
        assert bool(((out.double() - exact).abs() <= bound).all())
        # requantize fused == quantize(reduced) with the same arithmetic, byte for byte
        for seed in (None, 9):
            rp, rs = impl.dequantize_reduce_requantize(payloads, scales, fmt, n, block, factor, seed, 0)
            qp, qs = impl.quantize(out, fmt, block, seed, 0)
            assert torch.equal(rp, qp) and torch.equal(rs, qs)
        check_against_oracle(impl, out, fmt, block, *impl.dequantize_reduce_requantize(
            payloads, scales, fmt, n, block, factor, None, 0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_reduce_cpp_matches_reference(fmt):
    for p, n, block in ((3, 1000, 128), (4, 77, 16), (2, 0, 32)):
        payloads, scales = _chunks(R, p, n, fmt, block, seed=3)
        for factor in (1.0, 1.0 / p):
            assert torch.equal(CPP.dequantize_reduce(payloads, scales, fmt, n, block, factor),
                               R.dequantize_reduce(payloads, scales, fmt, n, block, factor))
            for seed in (None, 11):
                a = CPP.dequantize_reduce_requantize(payloads, scales, fmt, n, block, factor, seed, 2 * block)
                b = R.dequantize_reduce_requantize(payloads, scales, fmt, n, block, factor, seed, 2 * block)
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_reduce_nan_propagates(impl, fmt):
    payloads, scales = _chunks(impl, 3, 64, fmt, 16)
    scales[1, 2] = float("nan")  # rank 1's block 2 was non-finite
    out = impl.dequantize_reduce(payloads, scales, fmt, 64, 16, 1.0)
    assert torch.equal(torch.isnan(out), torch.arange(64) // 16 == 2)
    _, rs = impl.dequantize_reduce_requantize(payloads, scales, fmt, 64, 16, 1.0, None, 0)
    assert torch.equal(torch.isnan(rs), torch.tensor([False, False, True, False]))


# ---- compress_delta -----------------------------------------------------------------------------
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("pdtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_compress_delta(impl, fmt, pdtype, with_residual):
    n, block = 2053, 128
    anchor = make_input("normal", n, torch.float32, seed=1)
    params = (anchor + 1e-2 * make_input("heavy", n, torch.float32, seed=2)).to(pdtype)
    residual = 1e-3 * make_input("normal", n, torch.float32, seed=3) if with_residual else None
    res_in = residual.clone() if with_residual else None
    for seed in (None, 5):
        if with_residual:
            residual.copy_(res_in)
        payload, scales = impl.compress_delta(anchor, params, residual, fmt, block, seed)
        # v in fp32 exactly as format/kernels.h: delta = anchor - float(params); v = delta + e
        v = anchor - params.float()
        if with_residual:
            v = v + res_in
        qp, qs = impl.quantize(v, fmt, block, seed, 0)
        assert torch.equal(payload, qp) and torch.equal(scales, qs), "fused != quantize(v)"
        if seed is None:
            check_against_oracle(impl, v, fmt, block, payload, scales)
        deq = impl.dequantize(payload, scales, fmt, n, block, torch.float32)
        if with_residual:
            # error feedback: residual <- v - deQ(Q(v)), one fp32 subtraction, in place
            assert torch.equal(residual, v - deq)
    # the float64 delta vs fp32 v: two fp32 roundings (2^-24 |v| each), on top of quantization
    v64 = anchor.double() - params.double() + (res_in.double() if with_residual else 0.0)
    assert bool(((v.double() - v64).abs() <= 2 * U * v.double().abs() * (1 + 4 * U) + 1e-45).all())


def test_compress_delta_cpp_matches_reference():
    n = 999
    anchor = make_input("layers", n, torch.float32, seed=1)
    for pdtype in DTYPES:
        params = (anchor * 0.99).to(pdtype)
        for fmt in FORMATS:
            for seed in (None, 3):
                r1 = make_input("normal", n, torch.float32, seed=4) * 1e-3
                r2 = r1.clone()
                a = CPP.compress_delta(anchor, params, r1, fmt, 64, seed)
                b = R.compress_delta(anchor, params, r2, fmt, 64, seed)
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(r1, r2)


# ---- outer Nesterov step ------------------------------------------------------------------------
def _sgd_reference(anchor, grads, lr, mu, nesterov):
    p = anchor.clone()
    opt = torch.optim.SGD([p], lr=lr, momentum=mu, nesterov=nesterov)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p


def _oracle64(anchor, grads, lr, mu, nesterov):
    """The recurrence in float64 plus a per-element magnitude for the rounding bound."""
    a, buf = anchor.double(), torch.zeros_like(anchor, dtype=torch.float64)
    mag = torch.zeros_like(a)
    for g in grads:
        g = g.double()
        if mu != 0:
            buf = mu * buf + g
            d = g + mu * buf if nesterov else buf
        else:
            d = g
        mag = torch.maximum(mag, a.abs() + lr * (g.abs() + 2 * mu * buf.abs()) + (lr * d).abs())
        a = a - lr * d
    return a, mag


@pytest.mark.parametrize("pdtype", DTYPES, ids=str)
@pytest.mark.parametrize("mu,nesterov", [(0.9, True), (0.9, False), (0.0, False), (0.5, True)])
def test_outer_step_equals_torch_sgd(impl, mu, nesterov, pdtype):
    """K consecutive steps vs torch.optim.SGD(lr, momentum=mu, nesterov) on the anchor.

    Not bitwise: torch's CPU SGD computes ``buf*mu + g`` and ``p - lr*d`` with add(alpha=...),
    which runs as a fused multiply-add in its vectorized path, while format.h forbids FMA
    (measured: ~25-35% of elements differ in the last bits). So both are held to a float64 run
    of the same recurrence: each step rounds at most 6 times (2 for buf, 2 for d, 2 for the
    anchor update), each by <= 2^-24 of a quantity bounded by ``mag`` (the largest |anchor| +
    lr*(|g| + 2 mu |buf|) + |lr*d| seen); momentum errors are damped by mu < 1 and amplified by
    at most (1 + mu) lr <= 2 when they reach the anchor, so after K steps the error is
    <= 12 K 2^-24 mag; ours vs torch: twice that.
    """
    n, k, lr = 1000, 5, 0.7
    anchor0 = make_input("normal", n, torch.float32, seed=1)
    grads = [0.1 * make_input("heavy" if i % 2 else "normal", n, torch.float32, seed=10 + i) for i in range(k)]
    anchor, momentum = anchor0.clone(), torch.zeros(n) if mu != 0 else None
    params = torch.empty(n, dtype=pdtype)
    for g in grads:
        impl.outer_nesterov_step(anchor, momentum, params, g, lr, mu, nesterov)
        # params hold the anchor cast (round to nearest even) to their dtype, after every step
        assert torch.equal(params, anchor.to(pdtype))
    exact, mag = _oracle64(anchor0, grads, lr, mu, nesterov)
    tol = 12 * k * U * mag
    assert bool(((anchor.double() - exact).abs() <= tol).all())
    torch_p = _sgd_reference(anchor0, grads, lr, mu, nesterov)
    assert bool(((torch_p.double() - exact).abs() <= tol).all())  # the oracle itself is SGD
    assert bool(((anchor.double() - torch_p.double()).abs() <= 2 * tol).all())
    if mu == 0:
        # plain SGD (mu = 0) needs no momentum buffer; one step is a single rounding pair
        a = anchor0.clone()
        impl.outer_nesterov_step(a, None, None, grads[0], 1.0, 0.0, False)
        assert torch.equal(a, anchor0 - grads[0])  # lr = 1: model averaging, exact fp32 subtraction


def test_outer_step_cpp_matches_reference_bitwise():
    """Both follow the no-FMA formula of kernels.h, so they agree bit for bit."""
    n = 1027
    for mu, nesterov in ((0.9, True), (0.9, False), (0.0, False)):
        for pdtype in DTYPES:
            states = []
            for impl in (CPP, R):
                a = make_input("layers", n, torch.float32, seed=1)
                m = torch.zeros(n)
                p = torch.empty(n, dtype=pdtype)
                for i in range(3):
                    impl.outer_nesterov_step(a, m, p, make_input("normal", n, torch.float32, seed=i), 0.7, mu, nesterov)
                states.append((a, m, p))
            for x, y in zip(*states):
                assert torch.equal(x, y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_outer_step_compressed_equals_fp32_step(impl, fmt):
    """Compressed variant == fp32 variant fed g = (float(q) * scale) * grad_factor, bitwise."""
    n, block, factor = 777, 64, 1.0 / 3
    anchor0 = make_input("normal", n, torch.float32, seed=1)
    a1, m1, p1 = anchor0.clone(), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
    a2, m2, p2 = anchor0.clone(), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
    for i in range(3):
        payload, scales = impl.quantize(make_input("heavy", n, torch.float32, seed=i), fmt, block, None, 0)
        g = impl.dequantize(payload, scales, fmt, n, block, torch.float32) * torch.tensor(factor, dtype=torch.float32)
        impl.outer_nesterov_step_compressed(a1, m1, p1, payload, scales, fmt, block, factor, 0.7, 0.9, True)
        impl.outer_nesterov_step(a2, m2, p2, g, 0.7, 0.9, True)
        assert torch.equal(a1, a2) and torch.equal(m1, m2) and torch.equal(p1, p2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_outer_step_compressed_cpp_matches_reference(fmt):
    n, block, factor = 777, 64, 1.0 / 3
    anchor0 = make_input("normal", n, torch.float32, seed=1)
    a3, m3 = anchor0.clone(), torch.zeros(n)
    a4, m4 = anchor0.clone(), torch.zeros(n)
    payload, scales = R.quantize(make_input("heavy", n, torch.float32), fmt, block, None, 0)
    CPP.outer_nesterov_step_compressed(a3, m3, None, payload, scales, fmt, block, factor, 0.7, 0.9, True)
    R.outer_nesterov_step_compressed(a4, m4, None, payload, scales, fmt, block, factor, 0.7, 0.9, True)
    assert torch.equal(a3, a4) and torch.equal(m3, m4)


# ---- opcheck ------------------------------------------------------------------------------------
def _opcheck_cases():
    x = make_input("normal", 300, torch.float32)
    xb = make_input("normal", 300, torch.bfloat16)
    cases = []
    for fmt in FORMATS:
        p, s = R.quantize(x, fmt, 64, None, 0)
        pp, ss = torch.stack([p, p]), torch.stack([s, s])
        cases += [
            ("quantize", (x, fmt, 64, None, 0)),
            ("quantize", (xb, fmt, 64, 3, 128)),
            ("dequantize", (p, s, fmt, 300, 64, torch.bfloat16)),
            ("compress_delta", (x, xb, torch.zeros(300), fmt, 64, None)),
            ("compress_delta", (x, x * 0.5, None, fmt, 64, 1)),
            ("dequantize_reduce", (pp, ss, fmt, 300, 64, 0.5)),
            ("dequantize_reduce_requantize", (pp, ss, fmt, 300, 64, 0.5, 2, 0)),
            ("outer_nesterov_step_compressed",
             (x.clone(), torch.zeros(300), torch.empty(300, dtype=torch.float16), p, s, fmt, 64, 0.5, 0.7, 0.9, True)),
        ]
    cases += [
        ("outer_nesterov_step", (x.clone(), torch.zeros(300), torch.empty(300, dtype=torch.bfloat16), x * 0.1, 0.7, 0.9, True)),
        ("outer_nesterov_step", (x.clone(), None, None, x * 0.1, 1.0, 0.0, False)),
    ]
    return cases


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(CPP, name).default, args)


# ---- bad input -> clear errors -------------------------------------------------------------------
def _bad_calls():
    x = torch.randn(100)
    p, s = R.quantize(x, "int8", 32, None, 0)
    p4, s4 = R.quantize(x, "int4", 32, None, 0)
    return [
        ("int dtype x", lambda o: o.quantize(torch.ones(10, dtype=torch.int32), "int8", 32, None, 0), r"float32, bfloat16 or float16.*(int32|Int)"),
        ("float64 x", lambda o: o.quantize(x.double(), "int8", 32, None, 0), r"float32, bfloat16 or float16"),
        ("unknown fmt", lambda o: o.quantize(x, "int3", 32, None, 0), r"int3"),
        ("block not pow2", lambda o: o.quantize(x, "int8", 100, None, 0), r"block_size"),
        ("block too small", lambda o: o.quantize(x, "int8", 8, None, 0), r"block_size"),
        ("block too big", lambda o: o.quantize(x, "int8", 16384, None, 0), r"block_size"),
        ("bad index_offset", lambda o: o.quantize(x, "int8", 32, 1, 5), r"index_offset"),
        ("payload wrong dtype", lambda o: o.dequantize(p.float(), s, "int8", 100, 32, torch.float32), r"payload"),
        ("payload wrong size", lambda o: o.dequantize(p[:50], s, "int8", 100, 32, torch.float32), r"payload"),
        ("int4 payload sized for int8", lambda o: o.dequantize(p, s4, "int4", 100, 32, torch.float32), r"payload"),
        ("scales wrong size", lambda o: o.dequantize(p, s[:2], "int8", 100, 32, torch.float32), r"scales"),
        ("scales wrong dtype", lambda o: o.dequantize(p, s.double(), "int8", 100, 32, torch.float32), r"scales"),
        ("dequantize to int", lambda o: o.dequantize(p, s, "int8", 100, 32, torch.int32), r"dtype"),
        ("anchor not fp32", lambda o: o.compress_delta(x.half(), x, None, "int8", 32, None), r"anchor"),
        ("mismatched params", lambda o: o.compress_delta(x, x[:99], None, "int8", 32, None), r"params"),
        ("mismatched residual", lambda o: o.compress_delta(x, x, torch.zeros(99), "int8", 32, None), r"residual"),
        ("residual not fp32", lambda o: o.compress_delta(x, x, torch.zeros(100, dtype=torch.bfloat16), "int8", 32, None), r"residual"),
        ("payloads 1-D", lambda o: o.dequantize_reduce(p, s, "int8", 100, 32, 1.0), r"payloads"),
        ("scales rows != p", lambda o: o.dequantize_reduce(torch.stack([p, p]), s[None], "int8", 100, 32, 1.0), r"scales"),
        ("grad mismatched", lambda o: o.outer_nesterov_step(x.clone(), torch.zeros(100), None, x[:90], 0.7, 0.9, True), r"grad|gradient"),
        ("momentum missing", lambda o: o.outer_nesterov_step(x.clone(), None, None, x, 0.7, 0.9, True), r"momentum"),
        ("momentum not fp32", lambda o: o.outer_nesterov_step(x.clone(), torch.zeros(100).half(), None, x, 0.7, 0.9, True), r"momentum"),
        ("params mismatched", lambda o: o.outer_nesterov_step(x.clone(), torch.zeros(100), torch.zeros(7), x, 0.7, 0.9, True), r"params"),
        ("compressed grad wrong size", lambda o: o.outer_nesterov_step_compressed(
            torch.zeros(90), torch.zeros(90), None, p, s, "int8", 32, 1.0, 0.7, 0.9, True), r"payload|scales"),
    ]


@pytest.mark.parametrize("what,call,pattern", _bad_calls(), ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_bad_input_raises_clear_error(impl, what, call, pattern):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=f"(?i){pattern}"):
        call(impl)


# ---- non-contiguous inputs ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_inputs(impl, fmt):
    base = make_input("normal", 64 * 40, torch.float32).view(64, 40)
    xs = [base[:, ::2], base.t(), base[3:50, 5:30]]
    for x in xs:
        assert not x.is_contiguous()
        got = impl.quantize(x, fmt, 32, 1, 0)
        want = impl.quantize(x.contiguous(), fmt, 32, 1, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        params = (x * 0.9).to(torch.bfloat16)
        got = impl.compress_delta(x, params, None, fmt, 32, None)
        want = impl.compress_delta(x.contiguous(), params.contiguous(), None, fmt, 32, None)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # strided encoded inputs: rows of a larger [p, bytes] buffer viewed with a column slice
    p, s = R.quantize(base.reshape(-1), fmt, 32, None, 0)
    wide_p = torch.stack([p, p, p], dim=1).t()  # [3, bytes], non-contiguous
    wide_s = torch.stack([s, s, s], dim=1).t()
    n = base.numel()
    got = impl.dequantize_reduce(wide_p, wide_s, fmt, n, 32, 1.0)
    want = impl.dequantize_reduce(wide_p.contiguous(), wide_s.contiguous(), fmt, n, 32, 1.0)
    assert torch.equal(got, want)
    grad = base.t()  # non-contiguous gradient for the outer step
    a1, a2 = torch.zeros(n), torch.zeros(n)
    impl.outer_nesterov_step(a1, None, None, grad, 0.7, 0.0, False)
    impl.outer_nesterov_step(a2, None, None, grad.contiguous(), 0.7, 0.0, False)
    assert torch.equal(a1, a2)


def test_non_contiguous_state_buffers(impl):
    """In-place buffers that are strided views: updated correctly, or refused with a clear error
    (never a silently half-written buffer)."""
    n = 200
    anchor = make_input("normal", 2 * n, torch.float32)[::2]
    anchor_c = anchor.contiguous()
    grad = make_input("normal", n, torch.float32, seed=2)
    try:
        impl.outer_nesterov_step(anchor, None, None, grad, 0.7, 0.0, False)
    except RuntimeError as exc:
        assert "contiguous" in str(exc)
        assert torch.equal(anchor, anchor_c), "refused, yet the buffer was modified"
    else:
        impl.outer_nesterov_step(anchor_c, None, None, grad, 0.7, 0.0, False)
        assert torch.equal(anchor, anchor_c)
    residual = (1e-3 * make_input("normal", 2 * n, torch.float32, seed=3))[::2]
    residual_c = residual.contiguous()
    params = anchor_c * 0.5
    try:
        got = impl.compress_delta(anchor_c, params, residual, "int8", 32, None)
    except RuntimeError as exc:
        assert "contiguous" in str(exc)
        assert torch.equal(residual, residual_c), "refused, yet the buffer was modified"
    else:
        want = impl.compress_delta(anchor_c, params, residual_c, "int8", 32, None)
        assert torch.equal(got[0], want[0]) and torch.equal(residual, residual_c)


# ---- the C++ baseline (non-AVX2) loops ----------------------------------------------------------
_BASELINE_CHECK = r"""
import torch, localsgd_comm
from localsgd_comm.kernels.reference import ops as R
torch.set_num_threads(1)
C = torch.ops.localsgd_comm
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = (torch.randn(3001, generator=g) * torch.logspace(-3, 3, 3001)).to(dtype)
    x[7] = 0.5 * 2 ** -126  # one subnormal input value
    for fmt in ("int8", "int4", "fp8"):
        for seed in (None, 5):
            a, b = C.quantize(x, fmt, 64, seed, 0), R.quantize(x, fmt, 64, seed, 0)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (dtype, fmt, seed)
            assert torch.equal(C.dequantize(*a, fmt, 3001, 64, dtype), R.dequantize(*b, fmt, 3001, 64, dtype))
            r1, r2 = torch.zeros(3001), torch.zeros(3001)
            a = C.compress_delta(x.float(), x * 0.5, r1, fmt, 64, seed)
            b = R.compress_delta(x.float(), x * 0.5, r2, fmt, 64, seed)
            assert torch.equal(a[0], b[0]) and torch.equal(r1, r2), (dtype, fmt, seed, "compress")
            pp, ss = torch.stack([a[0], a[0]]), torch.stack([a[1], a[1]])
            assert torch.equal(C.dequantize_reduce_requantize(pp, ss, fmt, 3001, 64, 0.5, seed, 0)[0],
                               R.dequantize_reduce_requantize(pp, ss, fmt, 3001, 64, 0.5, seed, 0)[0])
print("OK")
"""


def test_cpp_baseline_isa_matches_reference():
    """LOCALSGD_CPU_ISA=baseline selects the portable (non-AVX2) C++ loops, read once per
    process; machines without AVX2 run those, so they must produce the same bytes too."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LOCALSGD_CPU_ISA="baseline", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    p = subprocess.run([sys.executable, "-c", _BASELINE_CHECK], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]
