"""Streaming DiLoCo (``DiLoCo(fragments=P, overlap_steps=TAU, mixing=ALPHA)``): the fragment rule,
the schedule, the merge against a float64 simulation, bitwise equality with plain and delayed
DiLoCo, replicas, error feedback per fragment, resume with fragments in flight, bad arguments.

Multi-process tests run 2 ranks on loopback through tests/_mp.py (with a timeout).
"bitwise" means torch.equal on the raw values; other tolerances are stated next to the asserts.
"""
import io
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from localsgd_comm import DiLoCo
from localsgd_comm.diloco.streaming import fragment_offsets, plan_fragments
from localsgd_comm.elastic import ElasticDiLoCo

from _mp import run_workers

TIMEOUT = 240  # s for the 2-rank suite (~15-25 s on the 2-core CI machine)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def batch(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 16, generator=g).to(dtype), torch.randn(8, 8, generator=g).to(dtype)


def train_steps(model, opt, rank, start, n, after_step=None):
    for s in range(start, start + n):
        x, y = batch(rank, s)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(s + 1)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


# ---- float64 simulation of the documented algorithm (the oracle) -------------------------------------
def simulate(world, steps, H, P, tau, mixing, ranges, lr=0.05, outer_lr=0.7, mu=0.9, cluster=1):
    """Streaming DiLoCo in float64 over flat parameter vectors: one replica per ``cluster``
    consecutive ranks (1: every rank; more: hierarchical mode), stepped with inner SGD(lr) on the
    mean of its members' gradients; fragment f = the element ranges ``ranges[f]`` of the flat
    vector, schedule, outer step and merge as documented across the replicas."""
    base = make_model().double()
    x0 = torch.cat([p.detach().reshape(-1) for p in base.parameters()])
    nr = world // cluster
    xs = [x0.clone() for _ in range(nr)]
    theta, buf = x0.clone(), torch.zeros_like(x0)
    offs = fragment_offsets(H, P)
    masks = []
    for rs in ranges:
        m = torch.zeros_like(x0, dtype=torch.bool)
        for lo, hi in rs:
            m[lo:hi] = True
        masks.append(m)
    in_flight = []

    def grad(x, rank, s):
        torch.nn.utils.vector_to_parameters(x, base.parameters())
        base.zero_grad()
        xb, yb = batch(rank, s, torch.float64)
        ((base(xb) - yb) ** 2).mean().backward()
        return torch.cat([p.grad.reshape(-1) for p in base.parameters()])

    for t in range(1, steps + 1):
        xs = [x - lr * sum(grad(x, c * cluster + j, t - 1) for j in range(cluster)) / cluster
              for c, x in enumerate(xs)]
        for f, s in enumerate(offs):
            if t % H == s % H:
                first = tau == H and not any(it[0] == f for it in in_flight)
                g = sum(theta - x for x in xs) / nr
                in_flight.append((f, t + tau, g))
                if first:  # tau = H: the first sync merges the unchanged anchor
                    m = masks[f]
                    for x in xs:
                        x[m] = mixing * x[m] + (1 - mixing) * theta[m]
        while in_flight and in_flight[0][1] <= t:
            f, _, g = in_flight.pop(0)
            m = masks[f]
            buf[m] = mu * buf[m] + g[m]
            theta[m] -= outer_lr * (g[m] + mu * buf[m])
            for x in xs:
                x[m] = mixing * x[m] + (1 - mixing) * theta[m]
    return theta, xs


def fragment_ranges(opt):
    return [[(s.lo, s.hi) for s in segs] for segs in opt._stream.segments]


# ---- single process (quick) ---------------------------------------------------------------------------
class Sizes(nn.Module):
    """One 1-D parameter per size, in order (the fragment rule only sees sizes and order)."""

    def __init__(self, sizes):
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in sizes])


def plan(sizes, P, block=64):
    m = Sizes(sizes)
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), sync_every=8, compression="int8", block_size=block,
                 fragments=P)
    return [[(s.lo, s.hi) for s in segs] for segs in opt._stream.segments], opt._stream.fragment_numels()


def check_partition(segs, total, block=64):
    covered = sorted(r for ss in segs for r in ss)
    assert covered[0][0] == 0 and covered[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # a partition of the flat buffer
    flat_order = [r for ss in segs for r in ss]
    assert flat_order == covered  # fragments in parameter order (contiguous runs)
    assert all(lo % block == 0 for lo, _ in covered)  # every piece starts on a quantization block


def test_fragment_rule_whole_parameters_when_balanced(single_group):
    # 8 parameters of 640 (block-aligned), P = 4: whole parameters give 4 x 1280, exactly total / P
    segs, sizes = plan([640] * 8, 4)
    assert segs == [[(0, 1280)], [(1280, 2560)], [(2560, 3840)], [(3840, 5120)]]
    # 640, 576, 512, 576 (2304), P = 2: 1216 | 1088 is 1.056x of 1152, within 1.1x: no parameter split
    segs, sizes = plan([640, 576, 512, 576], 2)
    assert segs == [[(0, 1216)], [(1216, 2304)]]
    # a parameter larger than a fragment is split into equal block-aligned pieces
    segs, sizes = plan([2048, 64, 64, 64, 64, 64, 64, 64, 64], 2)  # 2560 / 2 = 1280
    check_partition(segs, 2560)
    assert max(sizes) <= 1.1 * 2560 / 2, sizes


def test_fragment_rule_splits_straddling_parameters_when_whole_ones_unbalance(single_group):
    # 3 x 4096, P = 2: whole parameters give 8192 | 4096 (1.33x of 6144): pieces of at most
    # total / (16 P) = 384 -> 384-multiples; the cut lands inside the middle parameter
    segs, sizes = plan([4096, 4096, 4096], 2)
    check_partition(segs, 3 * 4096)
    assert max(sizes) <= 1.1 * 3 * 4096 / 2 and max(sizes) - min(sizes) <= 2 * 384, sizes
    cuts = [ss[-1][1] for ss in segs[:-1]]
    assert len(cuts) == 1 and 4096 < cuts[0] < 8192  # only the middle parameter straddles
    # the small GPT's shape at P = 4 (a 49K, 16K, 2 x 65K matrices per block, 4 blocks, embeddings):
    # whole parameters give 1.15x of total / 4; with pieces every fragment is within 1.1x
    from localsgd_comm.model import GPT, config_for
    m = GPT(config_for("small"))
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), sync_every=24, compression="int4", fragments=4)
    n = opt._stream.fragment_numels()
    assert max(n) <= 1.1 * sum(n) / 4, n
    # at most P - 1 parameters straddle a cut, each in two fragments
    (fb,) = opt._flats
    spans = [(fb.offsets[j], fb.offsets[j + 1] if j + 1 < len(fb.params) else fb.numel) for j in range(len(fb.params))]
    frags_of = [{f for f, segs in enumerate(opt._stream.segments) for sg in segs if sg.lo < hi and sg.hi > lo}
                for lo, hi in spans]
    assert all(1 <= len(x) <= 2 for x in frags_of) and 1 <= sum(len(x) == 2 for x in frags_of) <= 3
    # too small to split: a one-block bias is never cut
    segs, sizes = plan([512, 32, 256, 8], 2)
    check_partition(segs, 840)
    assert any(lo <= 512 and hi >= 576 for ss in segs for lo, hi in ss)


def test_min_max_cut_against_brute_force():
    import itertools
    import random

    from localsgd_comm.diloco.streaming import _min_max_cuts
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        parts = rng.randint(1, n)
        sizes = [rng.randint(1, 50) for _ in range(n)]
        b = _min_max_cuts(sizes, parts)
        assert len(b) == parts + 1 and b[0] == 0 and b[-1] == n and all(x < y for x, y in zip(b, b[1:]))
        got = max(sum(sizes[b[i]:b[i + 1]]) for i in range(parts))
        best = min(max(sum(sizes[c[i]:c[i + 1]]) for i in range(parts))
                   for c in ([0, *cuts, n] for cuts in itertools.combinations(range(1, n), parts - 1)))
        assert got == best, (sizes, parts, b)


def test_schedule_offsets():
    assert fragment_offsets(8, 1) == [8]
    assert fragment_offsets(8, 4) == [2, 4, 6, 8]
    assert fragment_offsets(10, 4) == [2, 5, 7, 10]  # gaps floor/ceil of H/P
    assert fragment_offsets(3, 3) == [1, 2, 3]


@pytest.mark.parametrize("compression,ef", [("int8", True), ("none", False)])
def test_one_fragment_no_overlap_is_plain_diloco_bitwise(single_group, compression, ef):
    runs = []
    for kw in ({}, {"fragments": 1, "overlap_steps": 0}):
        m = make_model()
        opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, compression=compression,
                     error_feedback=ef, **kw)
        train_steps(m, opt, 0, 0, 10)
        runs.append((flat_params(m), opt.anchors()[0], opt.sync_count, opt.stats["bytes_sent"]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2:] == runs[1][2:] == (3, 0)


def test_one_fragment_full_overlap_is_delayed_diloco_bitwise(single_group):
    """fragments=1, overlap_steps=H, mixing=0 is overlap=True (the delayed outer step), with a
    flush in the middle (the next sync then starts from the anchor, as after sync 1)."""
    runs = []
    for kw in ({"overlap": True}, {"fragments": 1, "overlap_steps": 3, "mixing": 0.0}):
        m = make_model()
        opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, compression="int8",
                     error_feedback=True, **kw)
        train_steps(m, opt, 0, 0, 7)
        opt.flush()
        train_steps(m, opt, 0, 7, 8)
        runs.append((flat_params(m), opt.anchors()[0], opt.stats["syncs"]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2] == 4  # applied: syncs 3 and 6 (flush), 9 and 12


@pytest.mark.parametrize("P,tau,mixing,H", [(2, 1, None, 4), (3, 3, 0.0, 5), (2, 0, 0.3, 4), (2, 4, 0.5, 4)])
def test_one_worker_matches_float64_simulation(single_group, P, tau, mixing, H):
    m = make_model()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=H, compression="none",
                 fragments=P, overlap_steps=tau, mixing=mixing)
    train_steps(m, opt, 0, 0, 13)
    alpha = opt._stream.mixing
    assert alpha == (0.5 if mixing is None and tau > 0 else (mixing or 0.0))
    theta, xs = simulate(1, 13, H, P, tau, alpha, fragment_ranges(opt))
    # fp32 run vs float64 oracle: ~13 inner + 6 outer fp32 roundings of O(1) values; 1e-5
    # absolute leaves a wide margin over the ~1e-6 accumulated error.
    torch.testing.assert_close(opt.anchors()[0].double(), theta, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat_params(m).double(), xs[0], atol=1e-5, rtol=0)


class Mixed(nn.Module):
    """fp32 and bf16 parameters interleaved (two flat buffers), a tied weight, a frozen one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16).to(torch.bfloat16)
        self.out = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)

    def forward(self, idx):
        h = self.mid(self.emb(idx).to(torch.bfloat16)).float()
        return self.head(torch.tanh(self.out(h)))


def _mixed_run(steps, **kw):
    m = Mixed()
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=4, compression="int8", **kw)
    for s in range(steps):
        idx = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(s))
        nn.functional.cross_entropy(m(idx).reshape(-1, 20), idx.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def test_mixed_dtypes_tied_frozen(single_group):
    """Two flat buffers (fp32, bf16): P=1/TAU=0 is still plain DiLoCo bit for bit; with P=3 every
    synced element belongs to exactly one fragment and bf16 parameters stay bf16."""
    a, oa = _mixed_run(9)
    b, ob = _mixed_run(9, fragments=1, overlap_steps=0)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(oa.anchors(), ob.anchors()))
    m, opt = _mixed_run(9, fragments=3, overlap_steps=1)
    assert len(opt._flats) == 2 and m.mid.weight.dtype == torch.bfloat16 and m.head.weight is m.emb.weight
    for fi, fb in enumerate(opt._flats):
        cover = sorted((s.lo, s.hi) for segs in opt._stream.segments for s in segs if s.buffer is fb)
        assert cover[0][0] == 0 and cover[-1][1] == fb.numel
        assert all(x[1] == y[0] for x, y in zip(cover, cover[1:]))
    assert opt.stats["syncs"] == 6 and all(torch.isfinite(x).all() for x in opt.anchors())


@pytest.mark.parametrize("tau", [0, 1, 4])
def test_model_averaging_fragments_match_simulation(single_group, tau):
    """outer_lr=1, outer_momentum=0, fp32 (the exact averaging path) with fragments: the same
    documented algorithm; TAU = H is the delayed step there (averaging off)."""
    m = make_model()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=4, outer_lr=1.0, outer_momentum=0.0,
                 compression="none", fragments=2, overlap_steps=tau)
    assert opt._engine.config.averaging == (tau < 4)
    train_steps(m, opt, 0, 0, 11)
    theta, xs = simulate(1, 11, 4, 2, tau, opt._stream.mixing, fragment_ranges(opt), outer_lr=1.0, mu=0.0)
    # fp32 vs float64: 1e-5 absolute, as above
    torch.testing.assert_close(opt.anchors()[0].double(), theta, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat_params(m).double(), xs[0], atol=1e-5, rtol=0)


def test_bad_streaming_arguments(single_group):
    m = make_model()
    inner = torch.optim.AdamW(m.parameters())
    cases = [
        (dict(fragments=0), ValueError, "fragments: expected an integer >= 1"),
        (dict(fragments=2.0), ValueError, "fragments: expected an integer"),
        (dict(fragments=5, sync_every=8), ValueError, "number of synced parameters \\(4\\)"),
        (dict(fragments=3, sync_every=2), ValueError, "at most sync_every=2"),
        (dict(fragments=2, overlap_steps=9, sync_every=8), ValueError, "overlap_steps: expected an integer in"),
        (dict(fragments=2, overlap_steps=-1), ValueError, "overlap_steps"),
        (dict(fragments=2, mixing=1.0), ValueError, "mixing: expected a number in \\[0, 1\\)"),
        (dict(overlap_steps=1), ValueError, "expected fragments=P"),
        (dict(fragments=1, overlap=True), ValueError, "overlap=True with fragments"),
        (dict(fragments=2, hierarchy=object()), TypeError, "hierarchy: expected HierarchicalGroups"),
    ]
    for kw, exc, msg in cases:
        kw.setdefault("sync_every", 4)
        with pytest.raises(exc, match=msg):
            DiLoCo(m, inner, **kw)
    # elastic streaming keeps one fragment round in flight at most: overlap_steps <= floor(H / P)
    with pytest.raises(ValueError, match="overlap_steps: expected at most 2 with sync_every=4, fragments=2"):
        ElasticDiLoCo(m, inner, coordinator="127.0.0.1:1", worker_id="w", sync_every=4, fragments=2, overlap_steps=3)
    opt = DiLoCo(m, inner, sync_every=4, fragments=2)
    with pytest.raises(RuntimeError, match="streaming mode"):
        opt.sync()
    state = opt.state_dict()
    m2 = make_model()
    other = DiLoCo(m2, torch.optim.AdamW(m2.parameters()), sync_every=4, fragments=2, overlap_steps=1)
    with pytest.raises(ValueError, match="overlap_steps=1 as constructed"):
        other.load_state_dict(state)
    m3 = make_model()
    nostream = DiLoCo(m3, torch.optim.AdamW(m3.parameters()), sync_every=4)
    with pytest.raises(ValueError, match="without fragments as constructed"):
        nostream.load_state_dict(state)


def test_nonfinite_fragment_is_skipped_alone(single_group):
    """A NaN in fragment 0's parameters at its sync: that fragment's outer step is skipped (anchor
    kept, parameters reset to it), fragment 1 syncs normally; "raise" raises after the reset."""
    for policy in ("skip", "raise"):
        m = make_model()
        opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=4, compression="int8",
                     error_feedback=True, fragments=2, on_nonfinite=policy)
        fb = opt._flats[0]  # padded layout: the segments' offsets index it
        anchor0 = fb.anchor.clone()
        (seg0,), (seg1,) = opt._stream.segments
        train_steps(m, opt, 0, 0, 1)
        x, y = batch(0, 1)
        ((m(x) - y) ** 2).mean().backward()
        m[0].weight.grad[0, 0] = float("nan")  # fragment 0 = the first weight
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="fragment 0"):
                opt.step()
        else:
            with pytest.warns(RuntimeWarning, match=r"sync 1 \(fragment 0\): non-finite"):
                opt.step()
        opt.zero_grad()
        assert torch.isfinite(flat_params(m)).all()
        assert torch.equal(fb.anchor, anchor0)  # nothing applied
        assert torch.equal(fb.flat[seg0.lo:seg0.hi], anchor0[seg0.lo:seg0.hi])  # reset
        assert torch.equal(fb.residual, torch.zeros_like(anchor0))  # restored
        if policy == "skip":
            train_steps(m, opt, 0, 2, 2)  # fragment 1 syncs after step 4
            assert opt.stats["skipped_syncs"] == 1 and opt.stats["syncs"] == 2
            a = fb.anchor
            assert torch.equal(a[seg0.lo:seg0.hi], anchor0[seg0.lo:seg0.hi])
            assert not torch.equal(a[seg1.lo:seg1.hi], anchor0[seg1.lo:seg1.hi])


# ---- two ranks ---------------------------------------------------------------------------------------
def _suite_worker(rank, world):
    out = {}
    # 1. fragments=1, overlap_steps=0 == plain DiLoCo; overlap_steps=H, mixing=0 == overlap=True
    for name, a, b in (("plain", {}, {"fragments": 1, "overlap_steps": 0}),
                       ("delayed", {"overlap": True}, {"fragments": 1, "overlap_steps": 3, "mixing": 0.0})):
        res = []
        for kw in (a, b):
            m = make_model(seed=rank)
            opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, compression="int8",
                         error_feedback=True, **kw)
            train_steps(m, opt, rank, 0, 10)
            opt.flush()
            res.append((flat_params(m), opt.anchors()[0].clone(), opt.stats["bytes_sent"]))
        out[name] = res
    # 2. the float64 simulation, two workers, several fragments in flight (tau > H/P)
    m = make_model(seed=rank)
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=5, compression="none", fragments=3,
                 overlap_steps=3, mixing=0.5)
    train_steps(m, opt, rank, 0, 13)
    out["sim"] = (opt.anchors()[0].clone(), flat_params(m), fragment_ranges(opt))
    # 3. int4 + error feedback per fragment: anchors identical at every step, residuals per fragment
    m = make_model(seed=rank)
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=6, compression="int4",
                 error_feedback=True, block_size=32, fragments=3, overlap_steps=1)
    anchors, residual_at_2 = [], []

    def after(t):
        anchors.append(opt.anchors()[0].clone())
        if t == 2:  # fragment 0 synced at step 2 (s_0 = 2): only its residual is non-zero
            res = opt._flats[0].residual
            residual_at_2.extend([bool(res[s.lo:s.hi].abs().sum() > 0) for ss in opt._stream.segments for s in ss])
    train_steps(m, opt, rank, 0, 19, after_step=after)
    out["int4"] = (anchors, residual_at_2, flat_params(m), opt.stats["bytes_sent"], opt.sync_count,
                   opt._stream.fragment_numels())
    m = make_model(seed=rank)
    plain = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=6, compression="int4",
                   error_feedback=True, block_size=32)
    train_steps(m, plain, rank, 0, 18)
    out["int4_plain_bytes"] = plain.stats["bytes_sent"]
    # 3b. a DDP-wrapped model: gradients stay local, so the same bits as without DDP
    res = []
    for ddp in (False, True):
        m = make_model(seed=rank)
        net = nn.parallel.DistributedDataParallel(m) if ddp else m
        opt = DiLoCo(net, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=4, compression="int8",
                     fragments=2, overlap_steps=2)
        train_steps(net, opt, rank, 0, 9)
        res.append((flat_params(m), opt.anchors()[0].clone(), opt.stats["foreign_bytes"], opt.stats["bytes_sent"],
                    opt.stats["ddp_hook_calls"]))
    out["ddp"] = res
    # 3c. the tripwire still sees the script's own traffic on the group between fragment syncs
    import warnings
    m = make_model(seed=rank)
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=4, compression="int8", fragments=2,
                 overlap_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(m, opt, rank, 0, 3)
        dist.all_reduce(torch.ones(1 << 18))  # 1 MiB of fp32 on DiLoCo's (quantizing) group
        train_steps(m, opt, rank, 3, 4)
    out["tripwire"] = (opt.stats["foreign_bytes"], [str(w.message) for w in caught if w.category is RuntimeWarning])
    # 4. resume with a fragment in flight: save after step 6 (fragment 0 started at 6, due 7)
    def make():
        m = make_model(seed=10 + rank)
        o = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=4, compression="int8",
                   error_feedback=True, stochastic_rounding=True, seed=3, fragments=2, overlap_steps=1)
        return m, o
    m, o = make()
    train_steps(m, o, rank, 0, 6)
    assert len(o._stream.in_flight) == 1
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    train_steps(m, o, rank, 6, 7)
    full = (flat_params(m), o.anchors()[0].clone())
    m2, o2 = make()
    o2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    train_steps(m2, o2, rank, 6, 7)
    out["resume"] = (full, (flat_params(m2), o2.anchors()[0].clone()))
    return out


@pytest.fixture(scope="module")
def suite2():
    return run_workers(_suite_worker, 2, backend="localsgd", timeout=TIMEOUT)


@pytest.mark.slow
def test_two_ranks_plain_and_delayed_equal_bitwise(suite2):
    for r in suite2:
        for name in ("plain", "delayed"):
            (pa, aa, ba), (pb, ab, bb) = r[name]
            assert torch.equal(pa, pb) and torch.equal(aa, ab) and ba == bb, name
    assert torch.equal(suite2[0]["plain"][1][1], suite2[1]["plain"][1][1])


@pytest.mark.slow
def test_two_ranks_match_float64_simulation(suite2):
    ranges = suite2[0]["sim"][2]
    theta, xs = simulate(2, 13, 5, 3, 3, 0.5, ranges)
    assert torch.equal(suite2[0]["sim"][0], suite2[1]["sim"][0])  # anchors identical on the ranks
    for r in (0, 1):
        # fp32 vs float64, as in the one-worker test: 1e-5 absolute
        torch.testing.assert_close(suite2[r]["sim"][0].double(), theta, atol=1e-5, rtol=0)
        torch.testing.assert_close(suite2[r]["sim"][1].double(), xs[r], atol=1e-5, rtol=0)
    assert not torch.equal(suite2[0]["sim"][1], suite2[1]["sim"][1])  # mixing 0.5: local parts stay


@pytest.mark.slow
def test_two_ranks_int4_error_feedback_per_fragment(suite2):
    a0, res0, p0, bytes0, n0, sizes = suite2[0]["int4"]
    a1, _, p1, bytes1, n1, _ = suite2[1]["int4"]
    assert n0 == n1 == 9  # syncs at 2, 4, 6, 8, ..., 18 -> 9 fragment syncs in 19 steps
    for x, y in zip(a0, a1):  # anchors identical on both ranks after every step, every cycle
        assert torch.equal(x, y)
    assert not torch.equal(a0[5], a0[11]) and not torch.equal(a0[11], a0[17])  # the cycles moved them
    segs_per_fragment = [1, 1, 1]
    assert len(res0) == sum(segs_per_fragment)
    assert res0 == [True, False, False]  # only fragment 0 had synced at step 2
    assert not torch.equal(p0, p1)  # mixing 0.5: local progress stays local
    # bytes over 3 full cycles vs plain DiLoCo's 3 syncs: the same elements, per-fragment rounding
    plain = suite2[0]["int4_plain_bytes"]
    assert plain <= bytes0 <= 1.05 * plain, (bytes0, plain)
    # the largest fragment (the peak per sync event) within 1.6x of model / P at this tiny size
    assert max(sizes) <= 1.6 * sum(sizes) / 3


@pytest.mark.slow
def test_two_ranks_resume_with_fragment_in_flight_bitwise(suite2):
    for r in suite2:
        (pf, af), (pr, ar) = r["resume"]
        assert torch.equal(pf, pr) and torch.equal(af, ar)


# ---- localsgd-train ----------------------------------------------------------------------------------
TINY = ["--model-size", "tiny", "--steps", "6", "--sync-every", "3", "--eval-every", "3", "--batch-size", "4",
        "--seq-len", "32", "--no-progress"]


@pytest.mark.parametrize("args,msg", [
    (["--fragments", "0"], "--fragments: expected an integer in [1, sync_every=3]"),
    (["--fragments", "4"], "--fragments: expected an integer in [1, sync_every=3]"),
    (["--overlap-steps", "1"], "--overlap-steps: expected --fragments with it"),
    (["--fragments", "2", "--overlap-steps", "4"], "--overlap-steps: expected an integer in [0, sync_every=3]"),
    (["--fragments", "2", "--overlap"], "--overlap / --fragments: expected one of the two"),
])
def test_train_cli_bad_streaming_flags(args, msg, capsys):
    from localsgd_comm.train import main
    assert main(TINY + args) == 2  # before any worker starts
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


@pytest.mark.slow
def test_train_streaming_run_merges_every_fragment_sync():
    """7 steps, H=4, 2 fragments (syncs after steps 2, 4, 6), overlap 1: the last sync (step 6)
    is merged by the closing flush, so every fragment sync started is applied."""
    from localsgd_comm.train import TrainConfig, run_modes
    cfg = TrainConfig(model_size="tiny", steps=7, sync_every=4, eval_every=7, batch_size=4, seq_len=32,
                      progress=False, warmup_steps=1, fragments=2, overlap_steps=1)
    (run,) = run_modes(cfg, ["diloco"])
    assert run["syncs"] == 3 and run["applied_syncs"] == 3
    assert math.isfinite(run["final_val_loss"])


@pytest.mark.slow
def test_two_ranks_ddp_wrapped_model_streams_with_local_gradients(suite2):
    for r in suite2:
        (p0, a0, foreign0, sent, _), (p1, a1, foreign1, _, hook_calls) = r["ddp"]
        assert torch.equal(p0, p1) and torch.equal(a0, a1) and hook_calls == 0
        # "foreign" bytes are the backend's count minus DiLoCo's estimate of its own reduces (the
        # ring volume 2(p-1)/p x encoded size; on these 2-6-block fragments the real exchange
        # differs by a few hundred bytes): the same with and without DDP, so none of it is DDP's
        assert foreign1 == foreign0 and sent > 0, (foreign0, foreign1, sent)


# ---- localsgd-bench streaming --------------------------------------------------------------------------
def test_bench_streaming_methods_and_flags(tmp_path, capsys):
    from localsgd_comm.bench import cli
    from localsgd_comm.bench.streaming import FULL_METHODS, QUICK_METHODS, parse_method
    assert parse_method("stream-int4-P4-T2") == {"kind": "diloco", "fmt": "int4", "fragments": 4,
                                                 "overlap_steps": 2}
    assert parse_method("diloco-int8")["fragments"] is None and parse_method("ddp") == {"kind": "ddp"}
    for m in FULL_METHODS + QUICK_METHODS:
        parse_method(m)
    with pytest.raises(ValueError, match="stream-<fmt>-P<p>-T<tau>"):
        parse_method("stream-int3-P2-T1")
    for argv, needle in ((["streaming", "--methods", "stream-int4-P2"], "--methods: streaming method"),
                         (["streaming", "--nets", "1gbit"], "--nets: unknown link")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv + ["--out", str(tmp_path / "x")])
        assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.slow
def test_bench_streaming_rank_side_on_loopback():
    """Two ranks of one streaming run (tiny GPT, 8 steps, H=4, 2 fragments, overlap 1): finite
    losses, every fragment sync merged, the peak event about half the whole model's bytes."""
    from localsgd_comm.bench import launch
    args = ["--worker", "--method", "stream-int4-P2-T1", "--model", "tiny", "--steps", "8", "--sync-every", "4"]
    r = launch.run_ranks(2, "localsgd_comm.bench.streaming", args, timeout_s=180)
    assert r["world"] == 2 and len(r["loss_mean"]) == 8 and all(math.isfinite(v) for v in r["loss_mean"])
    st = r["diloco_stats"]
    assert st["syncs"] == 4 and st["skipped_syncs"] == 0  # after steps 2, 4, 6, 8
    assert 0.4 < r["peak_event_bytes"] / r["whole_model_event_bytes"] < 0.75
    assert st["bytes_sent"] == pytest.approx(2 * r["whole_model_event_bytes"], rel=0.05)
    # the time blocked on in-flight reduces is measured per rank and is part of the time in sync
    assert len(r["reduce_wait_s_per_rank"]) == 2
    assert all(0 <= w <= s + 1e-3 for w, s in zip(r["reduce_wait_s_per_rank"], r["sync_s_per_rank"]))


@pytest.mark.slow
def test_two_ranks_tripwire_reports_foreign_traffic_between_fragment_syncs(suite2):
    for r in suite2:
        foreign, msgs = r["tripwire"]
        assert foreign > 200_000  # the script's int8 all-reduce of 2^18 elements (~0.26 MB per rank)
        assert any("bytes crossed the process group" in m for m in msgs), msgs
