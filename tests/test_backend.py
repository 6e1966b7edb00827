"""The "localsgd" c10d backend: quantized all-reduce vs oracles, pass-through, async, stats.

Multi-rank tests run 2-4 processes on loopback through tests/_dist.py (each run has a deadline).
Each worker does many checks so that process start-up is paid once per world size.
"""
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import localsgd_comm
from localsgd_comm import BackendOptions
from localsgd_comm.kernels.reference import ops as ref

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _dist import RankError, run_ranks  # noqa: E402

QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
# Sizes: 1 and 5 (below one block), a block +-1, primes (ragged last block and chunks that do
# not split evenly over p ranks), and enough blocks that every rank owns several.
SIZES = (1, 5, 127, 129, 1009, 4099, 40009)


def _inputs(p, n, dtype, seed, scale_by_rank=True):
    """Every rank's input, generated on every rank (so each can compute the oracle)."""
    xs = []
    for r in range(p):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        x = torch.randn(n, generator=g, dtype=torch.float64)
        # Heavy-ish tails and per-rank scale so blocks have different scales across ranks.
        x = x * (1.0 + r) * torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
        xs.append(x.to(dtype))
    return xs


def _expected_bytes(xs, fmt, block, average):
    """The pipeline of docs/design.md on the whole buffer with the reference ops. The backend cuts
    chunks on block boundaries and rounds to nearest, so it must reproduce these bits exactly."""
    p, n = len(xs), xs[0].numel()
    enc = [ref.quantize(x, fmt, block) for x in xs]
    q, s = ref.dequantize_reduce_requantize(torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc]),
                                            fmt, n, block, 1.0 / p if average else 1.0)
    return ref.dequantize(q, s, fmt, n, block, xs[0].dtype)


def _error_bound(xs, fmt, block, average):
    """Per-element bound of |result - exact| in float64 (two roundings, see format.h).

    Quantizing x_r: |x - x'| <= scale_r / 2 with scale_r = blockmax|x_r| / qmax for int8/int4;
    for fp8 (e4m3, 3 mantissa bits) <= 2^-4 |x| + 2^-10 scale_r. The fp32 sum of the p
    dequantized values adds <= p * 2^-24 sum|x'_r|. Requantizing the sum s' adds the same
    per-format term with blockmax|s'| <= blockmax|s| + err1. A bf16/fp16 output adds half an ulp
    (2^-8 / 2^-11 relative); fp32 output adds 2^-24 relative."""
    p, n = len(xs), xs[0].numel()
    f = 1.0 / p if average else 1.0
    X = torch.stack([x.double() for x in xs])
    pad = (-n) % block

    def blockmax(v):  # v [..., n] -> per-element max |v| over its block
        a = torch.nn.functional.pad(v.abs(), (0, pad)).view(*v.shape[:-1], -1, block).amax(-1)
        return a.repeat_interleave(block, dim=-1)[..., :n]

    q = QMAX[fmt]
    A = blockmax(X)
    if fmt == "fp8":
        e1 = f * (2.0 ** -4 * X.abs() + 2.0 ** -10 * A / q).sum(0)
    else:
        e1 = f * (A / (2 * q)).sum(0)
    e1 = e1 + p * 2.0 ** -24 * f * (X.abs() + A / q).sum(0)
    s = f * X.sum(0)
    S = blockmax(s) + blockmax(e1)
    e2 = (2.0 ** -4 * (s.abs() + e1) + 2.0 ** -10 * S / q) if fmt == "fp8" else S / (2 * q)
    out_rel = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[xs[0].dtype]
    return s, e1 + e2 + out_rel * (s.abs() + e1 + e2) + 1e-30


# ---- workers (module level: pickled into the ranks) ------------------------------------------------
def _w_oracle(rank, p, fmts, sizes, dtypes):
    """Results vs float64 exact sum within the bound, bit-exact vs the reference pipeline; returns
    raw bytes so the parent checks bitwise equality across ranks."""
    out = {}
    for fmt in fmts:
        g = dist.new_group(backend="localsgd", pg_options=BackendOptions(format=fmt, threshold_bytes=0))
        for dtype in dtypes:
            for n in sizes:
                for average in (False, True):
                    xs = _inputs(p, n, dtype, seed=n + 7 * average)
                    t = xs[rank].clone()
                    dist.all_reduce(t, op=dist.ReduceOp.AVG if average else dist.ReduceOp.SUM, group=g)
                    exact, bound = _error_bound(xs, fmt, 128, average)
                    err = (t.double() - exact).abs()
                    assert bool((err <= bound).all()), (
                        f"{fmt} {dtype} n={n} avg={average}: max err {err.max():.3g}, "
                        f"worst err/bound {(err / bound).max():.3g}")
                    want = _expected_bytes(xs, fmt, 128, average)
                    assert torch.equal(t.view(torch.uint8 if dtype != torch.float32 else torch.int32).view(-1),
                                       want.view(torch.uint8 if dtype != torch.float32 else torch.int32).view(-1)), \
                        f"{fmt} {dtype} n={n} avg={average}: bits differ from the reference pipeline"
                    out[(fmt, str(dtype), n, average)] = t.view(-1).view(torch.uint8).clone()
        st = localsgd_comm.get_backend_stats(g)
        assert st["format"] == fmt and st["last_path"] == "cpp" and st["passthrough_calls"] == 0, st
        dist.destroy_process_group(g)
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_allreduce_matches_oracle_and_is_bitwise_identical(world_size):
    fmts = ("int8", "int4", "fp8") if world_size != 4 else ("int8", "int4")
    sizes = SIZES if world_size == 3 else (1, 129, 4099)
    dtypes = (torch.float32,) if world_size != 2 else (torch.float32, torch.bfloat16, torch.float16)
    res = run_ranks(_w_oracle, world_size, fmts, sizes, dtypes, backend="gloo", timeout=150)
    for key, bits in res[0].items():
        for r in range(1, world_size):
            assert torch.equal(bits, res[r][key]), f"rank {r} differs from rank 0 for {key}"


# Sizes whose records span several pieces of the pipelined CPU path (csrc/c10d: 64 KiB - 1 MiB
# of payload per piece): p=2 int8 -> 8 pieces per record, p=3 int4 -> 3, the last piece short
# and the last rank's chunk ending inside a piece and inside a block. The bits must still be
# those of the whole-buffer reference pipeline.
@pytest.mark.parametrize("world_size,fmts", [(2, ("int8", "fp8")), (3, ("int4",))])
def test_pipelined_pieces_match_the_reference_pipeline(world_size, fmts):
    n = 1_000_003
    res = run_ranks(_w_oracle, world_size, fmts, (n,), (torch.float32,), backend="gloo", timeout=180)
    for key, bits in res[0].items():
        for r in range(1, world_size):
            assert torch.equal(bits, res[r][key]), f"rank {r} differs from rank 0 for {key}"


def _w_shapes_and_passthrough(rank, p):
    """Non-contiguous tensors, all_reduce_coalesced, and every pass-through collective (exact)."""
    opts = BackendOptions(format="int8", threshold_bytes=0)
    dist.init_process_group("localsgd", pg_options=opts, timeout=timedelta(seconds=30))
    # Non-contiguous: a strided view gives the same bits as its contiguous copy.
    base = torch.randn(64, 66, generator=torch.Generator().manual_seed(rank))
    view = base[:, ::3]
    dense = view.contiguous()
    dist.all_reduce(view)
    dist.all_reduce(dense)
    assert torch.equal(view, dense)
    assert torch.equal(base[:, 1::3], torch.randn(64, 66, generator=torch.Generator().manual_seed(rank))[:, 1::3])
    # Several tensors in one call: each is reduced on its own (== separate all_reduce calls).
    # (all_reduce_coalesced needs one dtype per call.)
    a = torch.randn(1000, generator=torch.Generator().manual_seed(10 + rank))
    b = torch.randn(77, generator=torch.Generator().manual_seed(20 + rank))
    a1, b1 = a.clone(), b.clone()
    dist.all_reduce(a1)
    dist.all_reduce(b1)
    dist.all_reduce_coalesced([a, b])
    assert torch.equal(a, a1) and torch.equal(b, b1)
    c, d = torch.arange(10) * (rank + 1), torch.arange(3) + rank
    dist.all_reduce_coalesced([c, d])  # integer: exact pass-through
    assert torch.equal(c, torch.arange(10) * sum(range(1, p + 1)))
    assert torch.equal(d, torch.arange(3) * p + sum(range(p)))
    localsgd_comm.get_backend_stats(reset=True)
    # Pass-through: integer-valued floats, so the exact answer does not depend on the order.
    v = torch.full((300,), float(rank + 1))
    x = v.clone(); dist.all_reduce(x, op=dist.ReduceOp.MAX); assert torch.equal(x, torch.full((300,), float(p)))
    x = v.clone(); dist.all_reduce(x, op=dist.ReduceOp.MIN); assert torch.equal(x, torch.ones(300))
    x = v.clone(); dist.all_reduce(x, op=dist.ReduceOp.PRODUCT)
    assert torch.equal(x, torch.full((300,), float(torch.arange(1, p + 1).prod())))
    x = torch.arange(7, dtype=torch.int32) + rank; dist.all_reduce(x)
    assert torch.equal(x, (torch.arange(7, dtype=torch.int32) * p + sum(range(p))).to(torch.int32))
    x = torch.full((5,), float(rank)); dist.broadcast(x, src=p - 1); assert torch.equal(x, torch.full((5,), p - 1.0))
    outs = [torch.empty(3) for _ in range(p)]
    dist.all_gather(outs, torch.full((3,), float(rank)))
    assert all(torch.equal(o, torch.full((3,), float(r))) for r, o in enumerate(outs))
    big = torch.empty(3 * p)
    dist.all_gather_into_tensor(big, torch.full((3,), float(rank)))
    assert torch.equal(big, torch.arange(p).repeat_interleave(3).float())
    rs = torch.empty(2)
    dist.reduce_scatter_tensor(rs, torch.arange(2 * p, dtype=torch.float32))
    assert torch.equal(rs, (torch.arange(2 * rank, 2 * rank + 2) * p).float())
    a2a = torch.empty(p)
    dist.all_to_all_single(a2a, torch.full((p,), float(rank)))
    assert torch.equal(a2a, torch.arange(p, dtype=torch.float32))
    lst = [torch.empty(1) for _ in range(p)]
    dist.all_to_all(lst, [torch.full((1,), float(rank * 10 + r)) for r in range(p)])
    assert [float(z) for z in lst] == [float(r * 10 + rank) for r in range(p)]
    if rank == 0:
        g = [torch.empty(2) for _ in range(p)]
        dist.gather(torch.full((2,), 0.0), gather_list=g, dst=0)
        assert all(torch.equal(t, torch.full((2,), float(r))) for r, t in enumerate(g))
    else:
        dist.gather(torch.full((2,), float(rank)), dst=0)
    sc = torch.empty(2)
    dist.scatter(sc, [torch.full((2,), float(r)) for r in range(p)] if rank == 0 else None, src=0)
    assert torch.equal(sc, torch.full((2,), float(rank)))
    red = torch.full((4,), 1.0); dist.reduce(red, dst=0)
    if rank == 0:
        assert torch.equal(red, torch.full((4,), float(p)))
    # Point to point in a ring (send/recv bypass the queue; isend/irecv avoid ordering deadlock).
    nxt, prv = (rank + 1) % p, (rank - 1) % p
    got = torch.empty(4)
    reqs = [dist.isend(torch.full((4,), float(rank)), nxt), dist.irecv(got, prv)]
    for r in reqs:
        r.wait()
    assert torch.equal(got, torch.full((4,), float(prv)))
    dist.barrier()
    st = localsgd_comm.get_backend_stats()
    assert st["compressed_calls"] == 0, st
    assert st["passthrough_reasons"] == {"op": 3, "dtype": 1}, st
    # format "none" and the size threshold: exact gloo sums, counted as pass-through.
    for o, reason in ((BackendOptions(format="none", threshold_bytes=0), "format_none"),
                      (BackendOptions(format="int8"), "small")):
        g = dist.new_group(backend="localsgd", pg_options=o)
        x = torch.full((1000,), float(rank + 1))
        dist.all_reduce(x, group=g)
        assert torch.equal(x, torch.full((1000,), float(p * (p + 1) // 2)))
        x = torch.full((1000,), float(rank + 1))
        dist.all_reduce(x, op=dist.ReduceOp.AVG, group=g)  # gloo has no AVG: summed, then / p
        assert torch.allclose(x, torch.full((1000,), (p + 1) / 2.0), rtol=1e-6, atol=0)
        st = localsgd_comm.get_backend_stats(g)
        assert st["passthrough_reasons"] == {reason: 2} and st["compressed_calls"] == 0, st
        dist.destroy_process_group(g)
    dist.destroy_process_group()
    return True


@pytest.mark.parametrize("world_size", [2, 3])
def test_noncontiguous_coalesced_and_passthrough_ops_exact(world_size):
    assert run_ranks(_w_shapes_and_passthrough, world_size, timeout=90) == [True] * world_size


def _w_stats(rank, p, n):
    dist.init_process_group("localsgd", pg_options=BackendOptions(format="int8"))
    localsgd_comm.get_backend_stats(reset=True)
    x = torch.randn(n)
    dist.all_reduce(x)
    st = localsgd_comm.get_backend_stats()
    dist.destroy_process_group()
    return st


@pytest.mark.parametrize("world_size", [2, 4])
def test_int8_bytes_within_2_percent_of_ideal(world_size):
    n = 1 << 20
    for st in run_ranks(_w_stats, world_size, n, timeout=90):
        ideal = 2 * (world_size - 1) / world_size * (n * 1 + 4 * n / 128)  # payload + fp32 scales
        for k in ("bytes_sent", "bytes_received"):
            assert abs(st[k] - ideal) <= 0.02 * ideal, (k, st[k], ideal)
        assert st["compressed_calls"] == 1 and st["cpp_calls"] == 1 and st["last_path"] == "cpp"


def _w_async(rank, p):
    dist.init_process_group("localsgd", pg_options=BackendOptions(format="int8", threshold_bytes=0))
    x = torch.randn(50000)
    y = x.clone()
    if rank == 1:
        time.sleep(1.5)  # the peer is late: an async call on rank 0 must return at once
    t0 = time.monotonic()
    w = dist.all_reduce(x, async_op=True)
    issued = time.monotonic() - t0
    done_at_issue = w.is_completed()
    fut = w.get_future()
    res = fut.wait()
    assert w.is_completed() and w.is_success()
    w.wait()  # after get_future().wait(): must not deadlock (docs/platform.md)
    assert res[0] is x or torch.equal(res[0], x)
    dist.all_reduce(y)
    assert torch.equal(x, y)
    # wait() first, then the future.
    w2 = dist.all_reduce(y, async_op=True)
    w2.wait()
    assert w2.get_future().done()
    # Errors propagate through both wait() and get_future().wait().
    bad = torch.randn(1000 + 128 * rank)
    w3 = dist.all_reduce(bad, async_op=True)
    errs = []
    for fn in (w3.wait, lambda: w3.get_future().wait()):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            errs.append(str(exc))
    dist.destroy_process_group()
    return issued, done_at_issue, errs


def test_async_op_returns_immediately_and_propagates_errors():
    res = run_ranks(_w_async, 2, timeout=60)
    issued, done, errs = res[0]
    assert issued < 0.5 and not done, f"async all_reduce blocked the caller for {issued:.2f} s"
    for _, _, e in res:
        assert len(e) == 2 and all("ranks disagree" in m and "numel" in m for m in e), e


def _w_compressed(rank, p, fmt, n, seed):
    """all_reduce_compressed on a localsgd group (C++) and a gloo group (Python): same bytes."""
    dist.init_process_group("localsgd", pg_options=BackendOptions(format=fmt, threshold_bytes=0))
    gl = dist.new_group(backend="gloo")
    x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
    payload, scales = localsgd_comm.functional.quantize(x, fmt)
    p1, s1 = payload.clone(), scales.clone()
    p2, s2 = payload.clone(), scales.clone()
    w = localsgd_comm.all_reduce_compressed(p1, s1, n, fmt, async_op=True, seed=seed)
    w.wait()
    assert localsgd_comm.get_backend_stats()["last_path"] == "cpp"
    assert localsgd_comm.all_reduce_compressed(p2, s2, n, fmt, group=gl, seed=seed) is None
    st = localsgd_comm.get_backend_stats(gl)
    assert st["last_path"] == "python" and st["python_calls"] == 1, st
    assert torch.equal(p1, p2) and torch.equal(s1.view(torch.int32), s2.view(torch.int32))
    # Same bytes as the plain all-reduce of the backend when the caller quantized the same way.
    if seed is None:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.AVG)
        assert torch.equal(y, localsgd_comm.functional.dequantize(p1, s1, fmt, n))
    dist.destroy_process_group()
    return p1, s1


@pytest.mark.parametrize("world_size,fmt,n,seed", [(2, "int4", 3001, None), (3, "int8", 129, None),
                                                   (3, "fp8", 10007, 1234), (4, "int8", 5, None),
                                                   # several pipelined pieces per record
                                                   (2, "int8", 1_000_003, 77), (3, "int4", 2_000_001, None)])
def test_all_reduce_compressed_cpp_and_python_paths_identical(world_size, fmt, n, seed):
    res = run_ranks(_w_compressed, world_size, fmt, n, seed, timeout=60)
    for p, s in res[1:]:
        assert torch.equal(p, res[0][0]) and torch.equal(s.view(torch.int32), res[0][1].view(torch.int32))


def _w_env_options(rank, p):
    dist.init_process_group("localsgd")  # env:// with LOCALSGD_COMM_* set by the parent
    st = localsgd_comm.get_backend_stats()
    g = dist.new_group(backend="localsgd", pg_options=BackendOptions(format="fp8", block_size=256))
    st2 = localsgd_comm.get_backend_stats(g)
    x = torch.randn(5000)
    dist.all_reduce(x)
    dist.destroy_process_group()
    return (st["format"], st["block_size"], st["threshold_bytes"]), (st2["format"], st2["block_size"])


def test_options_from_env_and_pg_options():
    env = {"LOCALSGD_COMM_FORMAT": "int4", "LOCALSGD_COMM_BLOCK_SIZE": "64", "LOCALSGD_COMM_THRESHOLD_BYTES": "0"}
    for env_opts, pg_opts in run_ranks(_w_env_options, 2, env=env, timeout=60):
        assert env_opts == ("int4", 64, 0)
        assert pg_opts == ("fp8", 256)  # explicit fields win over the environment


# ---- in-process (world size 1) ------------------------------------------------------------------
@pytest.fixture
def world1():
    def make(**kw):
        dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1,
                                pg_options=BackendOptions(**kw))
    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_world_size_1_runs_the_same_algorithm(world1, fmt):
    world1(format=fmt, threshold_bytes=0)
    x = torch.randn(1000, dtype=torch.float64).float()
    t = x.clone()
    dist.all_reduce(t)
    assert torch.equal(t, _expected_bytes([x], fmt, 128, False))
    exact, bound = _error_bound([x], fmt, 128, False)
    assert bool(((t.double() - exact).abs() <= bound).all())
    # all_reduce_compressed at p = 1: requantizing a dequantized block is the identity for
    # int8/int4 (every |q| <= qmax stays on the grid up to fp32 rounding): check it round-trips.
    payload, scales = localsgd_comm.functional.quantize(x, fmt)
    p2, s2 = payload.clone(), scales.clone()
    localsgd_comm.all_reduce_compressed(p2, s2, 1000, fmt, op=dist.ReduceOp.SUM)
    want_p, want_s = ref.dequantize_reduce_requantize(payload[None], scales[None], fmt, 1000, 128, 1.0)
    assert torch.equal(p2, want_p) and torch.equal(s2, want_s)


def test_bad_input_errors_name_the_problem(world1):
    world1(threshold_bytes=0)
    with pytest.raises(RuntimeError, match="AVG needs a floating tensor"):
        dist.all_reduce(torch.arange(4), op=dist.ReduceOp.AVG)
    p, s = localsgd_comm.functional.quantize(torch.randn(300), "int8")
    with pytest.raises(NotImplementedError, match="MAX"):
        localsgd_comm.all_reduce_compressed(p, s, 300, "int8", op=dist.ReduceOp.MAX)
    with pytest.raises(RuntimeError, match="payload must be 1-D with 300 bytes"):
        localsgd_comm.all_reduce_compressed(p[:-1], s, 300, "int8")
    with pytest.raises(RuntimeError, match="fmt must be one of"):
        localsgd_comm.all_reduce_compressed(p, s, 300, "int2")
    with pytest.raises(RuntimeError, match="block_size must be a power of two"):
        localsgd_comm.all_reduce_compressed(p, s, 300, "int8", block_size=100)
    # pass-through dtypes are exact (float64 is not a wire-format input, so it passes through)
    x = torch.arange(5, dtype=torch.float64)
    dist.all_reduce(x)
    assert torch.equal(x, torch.arange(5, dtype=torch.float64))
    assert localsgd_comm.get_backend_stats()["passthrough_reasons"] == {"dtype": 2}


def test_backend_options_validation(monkeypatch):
    with pytest.raises(ValueError, match="BackendOptions.format: expected one of"):
        BackendOptions(format="int3").resolved()
    with pytest.raises(RuntimeError, match="block_size must be a power of two"):
        BackendOptions(block_size=100).resolved()
    with pytest.raises(ValueError, match="cuda_inner"):
        BackendOptions(cuda_inner="mpi").resolved()
    with pytest.raises(ValueError, match="threshold_bytes"):
        BackendOptions(threshold_bytes=-1).resolved()
    monkeypatch.setenv("LOCALSGD_COMM_FORMAT", "fp4")
    with pytest.raises(ValueError, match="LOCALSGD_COMM_FORMAT: expected one of"):
        BackendOptions().resolved()
    monkeypatch.setenv("LOCALSGD_COMM_FORMAT", "INT4")
    monkeypatch.setenv("LOCALSGD_COMM_BLOCK_SIZE", "abc")
    with pytest.raises(ValueError, match="LOCALSGD_COMM_BLOCK_SIZE: expected an integer"):
        BackendOptions().resolved()
    monkeypatch.setenv("LOCALSGD_COMM_BLOCK_SIZE", "32")
    r = BackendOptions().resolved()
    assert (r.format, r.block_size, r.threshold_bytes) == ("int4", 32, localsgd_comm.backend.DEFAULT_THRESHOLD_BYTES)
    with pytest.raises(TypeError, match="must be localsgd_comm.BackendOptions, got dict"):
        dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1, pg_options={"format": "int8"})
    assert not dist.is_initialized()


def test_parameters_requiring_grad_are_reduced_in_place(world1):
    """Collectives write raw data (as gloo/NCCL do): an nn.Parameter must be reducible whether the
    backend writes it through a contiguous copy (non-contiguous, compressed path) or divides it
    after the inner SUM (AVG pass-through). The worker thread once ran with grad mode on and
    raised "a leaf Variable that requires grad is being used in an in-place operation"."""
    world1(format="int8", threshold_bytes=1024)
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(64, 64).t())  # 16 KiB, non-contiguous: compressed
    small = torch.nn.Parameter(torch.randn(10))         # 40 bytes: pass-through
    want_big, want_small = big.detach().clone(), small.detach().clone()
    dist.all_reduce(big, op=dist.ReduceOp.AVG)
    dist.all_reduce(small, op=dist.ReduceOp.AVG)
    # world size 1: pass-through AVG is x/1, exact; compressed is one int8 round trip
    # (requantizing the reduced chunk repeats the same rounding: x is already on the grid),
    # so |err| <= absmax/127/2 per 128-block
    assert torch.equal(small.detach(), want_small)
    bound = want_big.abs().max() / 127 / 2
    assert float((big.detach() - want_big).abs().max()) <= float(bound) * (1 + 1e-6)
    assert big.requires_grad and small.requires_grad


def test_negative_seeds_are_rejected(world1):
    """The C++ backend encodes "round to nearest" as seed -1: a negative seed used to be accepted
    and silently meant no stochastic rounding on a localsgd group, while the Python-composed
    path (other groups) rounded stochastically with it: different bytes for one call."""
    with pytest.raises(ValueError, match=r"seed: expected None or an int in \[0, 2\*\*63\)"):
        BackendOptions(seed=-1).resolved()
    world1(threshold_bytes=0)
    p, s = localsgd_comm.functional.quantize(torch.randn(300), "int8")
    with pytest.raises(RuntimeError, match=r"seed must be None or an int in \[0, 2\*\*63\), got -5"):
        localsgd_comm.all_reduce_compressed(p, s, 300, "int8", seed=-5)
    localsgd_comm.all_reduce_compressed(p, s, 300, "int8", seed=5)  # valid seeds still run


def test_coalesced_avg_of_integers_fails_before_issuing(world1):
    """all_reduce_coalesced with AVG on an integer tensor: a clear error at the call, as for
    all_reduce (it used to sum on the worker, then fail inside the division, the tensor left
    summed and the error only on wait())."""
    world1(threshold_bytes=0)
    with pytest.raises(RuntimeError, match="AVG needs floating tensors, got Long"):
        dist.all_reduce_coalesced([torch.arange(4)], op=dist.ReduceOp.AVG)
    st = localsgd_comm.get_backend_stats()
    assert st["passthrough_calls"] == 0 and st["compressed_calls"] == 0  # nothing was issued
