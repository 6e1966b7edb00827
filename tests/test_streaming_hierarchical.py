"""Hierarchical streaming DiLoCo (``DiLoCo(hierarchy=..., fragments=P, overlap_steps=TAU)``): fp32
gradient averaging inside each cluster every step, the cross-cluster sync streamed by fragments.

4-rank runs (2 clusters of 2, gloo inside a cluster, the "localsgd" backend across, through
tests/_mp.py with a timeout): a quick one (not slow, ~10 s) for P=1/TAU=0 bitwise equal to
hierarchical DiLoCo and the per-cluster non-finite decision (without it the ranks' collectives
no longer match and the run hangs into the timeout); a longer one (slow) for anchors identical
on all ranks after every step (so after every cycle of fragments), the result against a float64
simulation, int4 with error feedback, DDP over the cluster, resume with a fragment in flight.
"bitwise" means torch.equal on the raw values; other tolerances are stated next to the asserts.
"""
import io

import pytest
import torch
from torch import nn

from localsgd_comm import DiLoCo
from localsgd_comm.diloco import HierarchicalGroups, new_hierarchical_groups
from localsgd_comm.diloco.streaming import fragment_offsets

from _mp import run_workers
from test_streaming import batch, flat_params, make_model, simulate, train_steps  # the same model, data, loop, oracle

TIMEOUT = 240  # s for the slow 4-rank suite (~30-100 s on the loaded 2-core machine)
CLUSTER = 2


# ---- the 4-rank suite ----------------------------------------------------------------------------------
SIM_CASES = [(2, 0), (2, 1), (4, 0), (4, 1), (2, 4)]  # (P, TAU), H = 4, 10 steps, fp32 across clusters
SIM_STEPS, SIM_H = 10, 4


def _quick_worker(rank, world):
    """The not-slow part (~10 s): P=1/TAU=0 against hierarchical DiLoCo, the per-cluster decision."""
    h = new_hierarchical_groups(CLUSTER)
    out = {}
    # (a) P=1, TAU=0 against hierarchical DiLoCo: int8 + error feedback + stochastic rounding (with a
    # layout whose owned shards hold several blocks), and fp32 model averaging (the exact path)
    for name, kw in (("int8", dict(compression="int8", error_feedback=True, stochastic_rounding=True,
                                   block_size=32, seed=7)),
                     ("avg", dict(compression="none", outer_lr=1.0, outer_momentum=0.0))):
        res = []
        for extra in ({}, {"fragments": 1, "overlap_steps": 0}):
            m = make_model(seed=rank)
            opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, hierarchy=h, **kw, **extra)
            train_steps(m, opt, rank, 0, 10)
            f = opt._flats[0]
            res.append((flat_params(m), f.anchor.clone(), None if f.momentum is None else f.momentum.clone(),
                        None if f.residual is None else f.residual.clone(), opt.sync_count,
                        {k: opt.stats[k] for k in ("syncs", "bytes_sent", "intra_bytes_sent")}))
        out[("plain", name)] = res
    # a non-finite gradient on rank 0 only, at fragment 0's sync (step 2): it reaches cluster 0's
    # parameters through the gradient average, then member 0's owned piece of fragment 0 in both
    # clusters through the cross reduce; member 1's piece is finite, so only the per-cluster
    # decision makes all four ranks skip (and issue the same collectives after)
    import warnings
    m = make_model(seed=rank)
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=4, compression="int8",
                 error_feedback=True, hierarchy=h, fragments=2, overlap_steps=0)
    seg0 = opt._stream.segments[0][0]
    anchor0 = opt._flats[0].anchor[seg0.lo:seg0.hi].clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(9):
            x, y = batch(rank, s)
            ((m(x) - y) ** 2).mean().backward()
            if s == 1 and rank == 0:
                m[0].weight.grad[0, 0] = float("nan")
            opt.step()
            opt.zero_grad()
            if s == 1:
                fb = opt._flats[0]
                after_skip = (fb.anchor[seg0.lo:seg0.hi].clone(), fb.flat[seg0.lo:seg0.hi].clone())
    out["nonfinite"] = (anchor0, after_skip, opt.anchors()[0].clone(), flat_params(m), dict(opt.stats),
                        [str(w.message) for w in caught if w.category is RuntimeWarning],
                        (seg0.lo, seg0.hi), [(s.lo, s.hi) for s in opt._stream.owned[0]])
    return out


def _suite_worker(rank, world):
    h = new_hierarchical_groups(CLUSTER)
    out = {}
    # (b) P in {2, 4}, TAU in {0, 1}: anchors after every step, params, fragments' ranges
    for P, tau in SIM_CASES:
        m = make_model(seed=rank)
        opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=SIM_H, compression="none",
                     hierarchy=h, fragments=P, overlap_steps=tau)
        anchors = []
        train_steps(m, opt, rank, 0, SIM_STEPS, after_step=lambda t: anchors.append(opt.anchors()[0].clone()))
        out[("sim", P, tau)] = (anchors, flat_params(m), [[(s.lo, s.hi) for s in ss] for ss in opt._stream.segments],
                                opt._stream.mixing, dict(opt.stats))
    # int4 + error feedback, P=4, TAU=1 (several blocks per owned piece): anchors after every step
    m = make_model(seed=rank)
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=4, compression="int4", block_size=32,
                 error_feedback=True, hierarchy=h, fragments=4, overlap_steps=1)
    anchors = []
    train_steps(m, opt, rank, 0, 13, after_step=lambda t: anchors.append(opt.anchors()[0].clone()))
    out["int4"] = (anchors, flat_params(m), opt.sync_count, dict(opt.stats))
    # a DDP-wrapped model (DDP over hierarchy.intra averages the gradients), int8, P=2, TAU=1
    m = make_model(seed=rank)
    net = nn.parallel.DistributedDataParallel(m, process_group=h.intra)
    opt = DiLoCo(net, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=4, compression="int8", hierarchy=h,
                 fragments=2, overlap_steps=1)
    anchors = []
    train_steps(net, opt, rank, 0, 9, after_step=lambda t: anchors.append(opt.anchors()[0].clone()))
    out["ddp"] = (anchors, flat_params(m), dict(opt.stats))
    # resume with a fragment in flight: save after step 6 (fragment 1 of 2 started at 4, merged at 5;
    # fragment 0 started at 6, due at 7)
    def make():
        m = make_model(seed=10 + rank)
        return m, DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=4, compression="int8",
                         block_size=32, error_feedback=True, stochastic_rounding=True, seed=3, hierarchy=h,
                         fragments=2, overlap_steps=1)
    m, o = make()
    train_steps(m, o, rank, 0, 6)
    in_flight = len(o._stream.in_flight)
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    train_steps(m, o, rank, 6, 7)
    full = (flat_params(m), o.anchors()[0].clone())
    m2, o2 = make()
    o2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    train_steps(m2, o2, rank, 6, 7)
    out["resume"] = (in_flight, full, (flat_params(m2), o2.anchors()[0].clone()))
    return out


@pytest.fixture(scope="module")
def quick4():
    return run_workers(_quick_worker, 4, backend="localsgd", timeout=120)


@pytest.fixture(scope="module")
def suite4():
    return run_workers(_suite_worker, 4, backend="localsgd", timeout=TIMEOUT)


@pytest.mark.parametrize("name", ["int8", "avg"])
def test_one_fragment_no_overlap_is_hierarchical_diloco_bitwise(quick4, name):
    for r in quick4:
        (pa, aa, ma, ra, na, sa), (pb, ab, mb, rb, nb, sb) = r[("plain", name)]
        assert torch.equal(pa, pb) and torch.equal(aa, ab)
        assert (ma is None) == (mb is None) and (ma is None or torch.equal(ma, mb))
        assert (ra is None) == (rb is None) and (ra is None or torch.equal(ra, rb))
        assert na == nb == 3 and sa == sb and sa["syncs"] == 3 and sa["intra_bytes_sent"] > 0
    # hierarchical DiLoCo's own property, kept: the whole model identical on every rank after a sync
    # (the run ends 1 step after sync 3: compare the anchors)
    for r in quick4[1:]:
        assert torch.equal(r[("plain", name)][1][1], quick4[0][("plain", name)][1][1])


@pytest.mark.slow
@pytest.mark.parametrize("P,tau", SIM_CASES)
def test_fragments_across_clusters_match_float64_simulation(suite4, P, tau):
    anchors0, _, ranges, mixing, stats = suite4[0][("sim", P, tau)]
    assert mixing == (0.5 if tau else 0.0)  # the default
    # anchors identical on all 4 ranks after every step, hence after every full cycle of fragments
    for r in suite4[1:]:
        for a, b in zip(anchors0, r[("sim", P, tau)][0]):
            assert torch.equal(a, b)
    assert len(anchors0) == SIM_STEPS and not torch.equal(anchors0[SIM_H - 1], anchors0[2 * SIM_H - 1])
    # live parameters identical inside a cluster; across clusters only with mixing = 0 (after a merge
    # they equal the anchor there, but the run ends mid-cycle, so they differ anyway)
    params = [r[("sim", P, tau)][1] for r in suite4]
    assert torch.equal(params[0], params[1]) and torch.equal(params[2], params[3])
    assert not torch.equal(params[0], params[2])
    # every fragment sync of the 10 steps that is due by step 10 merged (started at t, due at t + TAU)
    started = [t for t in range(1, SIM_STEPS + 1) for s in fragment_offsets(SIM_H, P) if t % SIM_H == s % SIM_H]
    assert stats["syncs"] == sum(t + tau <= SIM_STEPS for t in started) and stats["skipped_syncs"] == 0
    theta, xs = simulate(4, SIM_STEPS, SIM_H, P, tau, mixing, ranges, cluster=CLUSTER)
    for r, out in enumerate(suite4):
        # fp32 run vs float64 oracle: ~10 inner + 5 outer fp32 roundings of O(1) values, and the
        # cluster's gradient mean summed in another order; 1e-5 absolute leaves a wide margin over
        # the ~1e-6 accumulated error
        torch.testing.assert_close(out[("sim", P, tau)][0][-1].double(), theta, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[("sim", P, tau)][1].double(), xs[r // CLUSTER], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_int4_error_feedback_fragments_keep_anchors_identical(suite4):
    anchors0, p0, n, stats = suite4[0]["int4"]
    assert n == 13 and stats["syncs"] == 12 and stats["skipped_syncs"] == 0  # one fragment sync per step
    for r in suite4[1:]:
        for a, b in zip(anchors0, r["int4"][0]):
            assert torch.equal(a, b)
    assert torch.equal(p0, suite4[1]["int4"][1]) and torch.equal(suite4[2]["int4"][1], suite4[3]["int4"][1])
    assert all(torch.isfinite(a).all() for a in anchors0) and not torch.equal(anchors0[3], anchors0[7])


@pytest.mark.slow
def test_ddp_over_the_cluster_streams_across_clusters(suite4):
    anchors0, p0, st = suite4[0]["ddp"]
    assert st["syncs"] == 4 and st["skipped_syncs"] == 0 and st["ddp_hook_calls"] == 0  # merged at 3, 5, 7, 9
    for r in suite4[1:]:
        for a, b in zip(anchors0, r["ddp"][0]):
            assert torch.equal(a, b)
    assert torch.equal(p0, suite4[1]["ddp"][1]) and torch.equal(suite4[2]["ddp"][1], suite4[3]["ddp"][1])
    assert not torch.equal(anchors0[0], anchors0[-1])


@pytest.mark.slow
def test_resume_with_fragment_in_flight_bitwise(suite4):
    for r in suite4:
        in_flight, (pf, af), (pr, ar) = r["resume"]
        assert in_flight == 1
        assert torch.equal(pf, pr) and torch.equal(af, ar)


def test_nonfinite_piece_is_skipped_by_every_rank(quick4):
    stats = [r["nonfinite"][4] for r in quick4]
    lo, hi = quick4[0]["nonfinite"][6]
    # the poisoned element (0) is in member 0's piece only; member 1 owns a finite piece
    assert quick4[0]["nonfinite"][7][0][0] == lo == 0 and quick4[1]["nonfinite"][7][0][0] > 0
    for r in quick4:
        anchor0, (anchor_after, params_after), anchor_end, params_end, st, msgs, _, _ = r["nonfinite"]
        assert torch.equal(anchor_after, anchor0)                      # nothing applied
        assert torch.equal(params_after, anchor0)                      # fragment reset to its anchor
        assert st["skipped_syncs"] == 1 and st["syncs"] == 4           # syncs after steps 2, 4, 6, 8
        assert any("sync 1 (fragment 0): non-finite" in m for m in msgs), msgs
        assert torch.isfinite(params_end).all() and torch.equal(anchor_end, quick4[0]["nonfinite"][2])
    # members of a cluster reduce pieces of different sizes: bytes differ, decisions do not
    assert len({(st["syncs"], st["skipped_syncs"]) for st in stats}) == 1


# ---- construction errors (single process) ------------------------------------------------------------
def test_bad_combinations_with_hierarchy(single_group):
    m = make_model()
    inner = torch.optim.SGD(m.parameters(), lr=0.1)
    h = HierarchicalGroups(intra=None, cross=None, cluster_size=1, num_clusters=1, cluster_index=0, local_index=0)
    cases = [
        (dict(fragments=2, overlap=True), "overlap=True with hierarchy"),
        (dict(fragments=5, sync_every=8), "number of synced parameters \\(4\\)"),
        (dict(fragments=3, sync_every=2), "at most sync_every=2"),
        (dict(fragments=2, overlap_steps=5), "overlap_steps: expected an integer in \\[0, sync_every=4\\]"),
        (dict(overlap_steps=1), "expected fragments=P"),
    ]
    for kw, msg in cases:
        kw.setdefault("sync_every", 4)
        with pytest.raises(ValueError, match=msg):
            DiLoCo(m, inner, hierarchy=h, **kw)
    with pytest.raises(TypeError, match="hierarchy: expected HierarchicalGroups"):
        DiLoCo(m, inner, sync_every=4, fragments=2, hierarchy=object())
