"""Streaming DiLoCo over FSDP2-sharded replicas (``DiLoCo(fsdp_model, ..., fragments=P,
overlap_steps=TAU, mixing=...)``, localsgd_comm.diloco.sharded.ShardedStreamingSync).

Real processes on CPU: 4 ranks on a 2-D mesh ("replicate", "shard") = 2 replicas x 2 shards, the
small GPT of tests/test_fsdp.py, the default group "localsgd" (gloo inside). The reference is
today's unsharded streaming DiLoCo on 2 ranks with the same per-replica data. Both shard ranks of a
replica take the replica's whole batch: FSDP's gradient is then the average of two equal halves'
sums, ``(g + g) / 2 = g`` exactly, so the sharded run is elementwise the same arithmetic as the
unsharded one. With ``compression="none"`` (fp32: every outer-step operation is elementwise) and
the same fragment cuts the two runs are compared bit for bit. With int8 the quantization blocks
differ (each local shard starts on a block, the unsharded buffer blocks whole parameters), so
int8 is compared within a written-down tolerance.

"bitwise" means torch.equal.
"""
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist

import localsgd_comm
from localsgd_comm.diloco.sharded import plan_sharded_fragments

from _dist import run_ranks
from test_fsdp import B, EVAL, LR, full_params, lm_loss, make_gpt, mesh22, shard_model, tokens

TIMEOUT = 240  # s per multi-process run (4 ranks on 2 shared cores)


def _names_by_fragment(opt, module):
    """The parameter names in each fragment (from the segments' parameter index ranges)."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = []
    for segs in opt._stream.segments:
        out.append([names[id(p)] for s in segs for p in s.buffer.params[s.j0:s.j1]])
    return out


def _unsharded_fragment_names(opt, module):
    names = {id(p): n for n, p in module.named_parameters()}
    out = []
    for segs in opt._stream.segments:
        got = []
        for s in segs:
            fb = s.buffer
            for j, p in enumerate(fb.params):
                if s.lo <= fb.offsets[j] < s.hi:
                    got.append(names[id(p)])
        out.append(got)
    return out


# ---- workers ---------------------------------------------------------------------------------------------------
def _sharded_run(rank, mesh, steps, diloco, whole_batch=True, record_every_step=False):
    replica, shard = rank // 2, rank % 2
    model = shard_model(make_gpt(), mesh)
    opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=LR),
                               group=mesh.get_group("replicate"), **diloco)
    per_step = []
    for s in range(steps):
        seq = tokens(replica, s) if whole_batch else tokens(replica, s)[shard * B // 2:(shard + 1) * B // 2]
        lm_loss(model, seq).backward()
        opt.step()
        opt.zero_grad()
        if record_every_step:
            per_step.append(full_params(model))
    in_flight = 0 if opt._stream is None else len(opt._stream.in_flight)
    opt.flush()
    with torch.no_grad():
        ev = float(lm_loss(model, tokens(7, EVAL, 16)))
    return {"full": full_params(model), "per_step": per_step, "eval": ev, "stats": dict(opt.stats),
            "anchors": [f.anchor.clone() for f in opt._flats], "in_flight_at_end": in_flight,
            "fragments": None if opt._stream is None else _names_by_fragment(opt, model),
            "full_numels": None if opt._stream is None else opt._stream.fragment_full_numels(),
            "local_numels": None if opt._stream is None else opt._stream.fragment_numels(),
            "sync_count": opt.sync_count}


def _p1_worker(rank, world_size, steps, common):
    mesh = mesh22()
    today = _sharded_run(rank, mesh, steps, dict(common), whole_batch=False, record_every_step=True)
    p1 = _sharded_run(rank, mesh, steps, dict(common, fragments=1, overlap_steps=0), whole_batch=False,
                      record_every_step=True)
    return today, p1


def _streaming_worker(rank, world_size, steps, configs):
    mesh = mesh22()
    return [_sharded_run(rank, mesh, steps, cfg) for cfg in configs]


def _unsharded_worker(rank, world_size, steps, configs):
    out = []
    for cfg in configs:
        model = make_gpt()
        opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=LR), **cfg)
        for s in range(steps):
            lm_loss(model, tokens(rank, s)).backward()
            opt.step()
            opt.zero_grad()
        opt.flush()
        with torch.no_grad():
            ev = float(lm_loss(model, tokens(7, EVAL, 16)))
        out.append({"full": {n: p.detach().clone() for n, p in model.named_parameters()}, "eval": ev,
                    "fragments": _unsharded_fragment_names(opt, model), "stats": dict(opt.stats)})
    return out


# ---- (a) fragments=1, overlap_steps=0 is today's ShardedDiLoCo, bit for bit ---------------------------------------
@pytest.mark.slow
def test_one_fragment_no_overlap_is_todays_sharded_diloco_bitwise():
    """int8 with error feedback, H=3, 7 steps, half batches per shard rank: the full parameters after
    every step (and the anchors, counters and bytes) equal today's ShardedDiLoCo's on every rank."""
    common = {"sync_every": 3, "compression": "int8", "error_feedback": True}
    out = run_ranks(_p1_worker, 4, 7, common, backend="localsgd", timeout=TIMEOUT)
    for r, (today, p1) in enumerate(out):
        assert p1["fragments"] is not None and today["fragments"] is None
        assert p1["stats"]["syncs"] == today["stats"]["syncs"] == 2
        assert p1["stats"]["bytes_sent"] == today["stats"]["bytes_sent"] > 0
        assert p1["sync_count"] == today["sync_count"] == 2
        for s, (a, b) in enumerate(zip(today["per_step"], p1["per_step"])):
            for n, t in a.items():
                assert torch.equal(t, b[n]), (r, s, n)
        for a, b in zip(today["anchors"], p1["anchors"]):
            assert torch.equal(a, b), r
    # the comparison can fail: the model moved and the replicas synced to one value
    assert any(not torch.equal(out[0][0]["per_step"][0][n], out[0][0]["per_step"][-1][n]) for n in out[0][0]["full"])
    for n, t in out[0][1]["per_step"][5].items():  # after the sync at step 6 (step 7 is local again)
        assert torch.equal(t, out[2][1]["per_step"][5][n])


def _delayed_worker(rank, world_size, steps, common):
    mesh = mesh22()
    today = _sharded_run(rank, mesh, steps, dict(common, overlap=True), whole_batch=False, record_every_step=True)
    full = _sharded_run(rank, mesh, steps, dict(common, fragments=1, overlap_steps=common["sync_every"], mixing=0.0),
                        whole_batch=False, record_every_step=True)
    return today, full


@pytest.mark.slow
def test_one_fragment_full_overlap_is_todays_delayed_sharded_diloco_bitwise():
    """fragments=1, overlap_steps=H, mixing=0 is the sharded overlap=True (the delayed outer step),
    bit for bit after every step and after the final flush (int4, H=3, 7 steps)."""
    common = {"sync_every": 3, "compression": "int4"}
    out = run_ranks(_delayed_worker, 4, 7, common, backend="localsgd", timeout=TIMEOUT)
    for r, (today, full) in enumerate(out):
        assert full["stats"]["syncs"] == today["stats"]["syncs"] == 2  # the second sync's reduce merged by flush
        assert full["stats"]["bytes_sent"] == today["stats"]["bytes_sent"] > 0
        for s, (a, b) in enumerate(zip(today["per_step"], full["per_step"])):
            for n, t in a.items():
                assert torch.equal(t, b[n]), (r, s, n)
        for n, t in today["full"].items():
            assert torch.equal(t, full["full"][n]), (r, n)
    assert any(not torch.equal(out[0][0]["per_step"][2][n], out[0][0]["per_step"][5][n]) for n in out[0][0]["full"])


# ---- (b) P=2, TAU in {0, 1}: the sharded run equals the unsharded streaming run ------------------------------------
STREAM_CFGS = [
    {"sync_every": 4, "compression": "none", "fragments": 2, "overlap_steps": 0},
    {"sync_every": 4, "compression": "none", "fragments": 2, "overlap_steps": 1},
    {"sync_every": 4, "compression": "int8", "error_feedback": True, "fragments": 2, "overlap_steps": 1},
]


@pytest.mark.slow
def test_two_fragments_match_unsharded_streaming():
    """P=2, H=4, 10 steps (the run ends with fragment 0 in flight for TAU=1; flush merges it):
    the fragment cuts are the unsharded plan's (the same parameter names); fp32 with TAU 0 and 1
    (mixing 0 and the default 0.5) bitwise equal to unsharded DiLoCo(fragments=2, overlap_steps=TAU)
    on every rank; int8 + error feedback with TAU=1 within 1e-3 absolute of it per element (the
    quantization blocks differ; measured max 1.13e-4, parameters up to 1.03 in magnitude) and the
    evaluation loss within 0.1% (measured 2e-6 relative). Balance: fragments of 71168 and 82240
    full elements (1.07x total/2), each shard rank holding exactly half of each.
    Replicas' anchors bitwise identical (ranks holding the same shard), every fragment merged
    5 times."""
    sh = run_ranks(_streaming_worker, 4, 10, STREAM_CFGS, backend="localsgd", timeout=TIMEOUT)
    ref = run_ranks(_unsharded_worker, 2, 10, STREAM_CFGS, backend="localsgd", timeout=TIMEOUT)
    for c, cfg in enumerate(STREAM_CFGS):
        for r in range(4):
            got, want = sh[r][c], ref[r // 2][c]
            assert got["fragments"] == want["fragments"], (c, r)
            assert got["stats"]["syncs"] == want["stats"]["syncs"] == 5, (c, r)
            if cfg["overlap_steps"]:
                assert got["in_flight_at_end"] == 1
            for n, t in want["full"].items():
                if cfg["compression"] == "none":
                    assert torch.equal(got["full"][n], t), (c, r, n)
                else:
                    err = (got["full"][n] - t).abs().max().item()
                    assert err <= 1e-3, (c, r, n, err)
            if cfg["compression"] != "none":
                assert abs(got["eval"] - want["eval"]) <= 0.001 * want["eval"], (c, got["eval"], want["eval"])
        # replicas' anchors identical: the ranks holding the same shard (0 & 2, 1 & 3)
        for r in (0, 1):
            for a, b in zip(sh[r][c]["anchors"], sh[r + 2][c]["anchors"]):
                assert torch.equal(a, b), (c, r)
        if cfg["overlap_steps"]:
            # mixing 0.5 keeps local progress: the replicas' live parameters differ (the bitwise
            # comparison above covers each replica separately)
            assert any(not torch.equal(t, sh[2][c]["full"][n]) for n, t in sh[0][c]["full"].items())
        # the fragments are balanced on full sizes; each rank holds about half of each
        full, local = sh[0][c]["full_numels"], sh[0][c]["local_numels"]
        assert max(full) <= 1.2 * sum(full) / 2, full
        for f in range(2):
            both = sh[0][c]["local_numels"][f] + sh[1][c]["local_numels"][f]
            assert 0.45 * both <= local[f] <= 0.55 * both, (f, local)


# ---- a non-finite fragment: skipped by every shard and replica together, the other fragment unaffected -------------
def _nonfinite_worker(rank, world_size):
    mesh = mesh22()
    replica, shard = rank // 2, rank % 2
    model = shard_model(make_gpt(), mesh)
    opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=LR), sync_every=4,
                               compression="int8", error_feedback=True, fragments=2, overlap_steps=0,
                               group=mesh.get_group("replicate"))
    frags = _names_by_fragment(opt, model)
    init = full_params(model)
    snaps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(8):
            lm_loss(model, tokens(replica, s)[shard * 4:(shard + 1) * 4]).backward()
            if s == 1 and rank == 0:  # one shard of one replica, a parameter of fragment 0, after its gradient
                with torch.no_grad():
                    next(iter(model.parameters())).to_local()[0].fill_(float("nan"))
            opt.step()
            opt.zero_grad()
            snaps.append((dict(opt.stats), full_params(model)))
    return {"frags": frags, "init": init, "snaps": snaps, "warnings": [str(w.message) for w in caught
                                                                      if issubclass(w.category, RuntimeWarning)]}


@pytest.mark.slow
def test_nonfinite_fragment_skips_on_every_shard_and_replica():
    """int8 + error feedback, P=2, TAU=0, H=4: a NaN in rank 0's shard of a fragment-0 parameter before
    fragment 0's sync (after step 2): all 4 ranks skip that merge (shard 1's groups saw finite bytes:
    the shard group's MIN makes them skip too), fragment 0 is back at its anchor (the initial
    parameters) on every rank, bitwise; fragment 1's sync after step 4 and the next round go through;
    everything finite at the end, fragment 1 identical on every rank after its merge at step 8."""
    out = run_ranks(_nonfinite_worker, 4, backend="localsgd", timeout=TIMEOUT)
    frag0 = out[0]["frags"][0]
    assert "emb.weight" in frag0
    for r in range(4):
        assert any("fragment 0" in w and "non-finite" in w for w in out[r]["warnings"]), (r, out[r]["warnings"])
    for r in range(4):
        stats, after2 = out[r]["snaps"][1]
        assert stats["syncs"] == 1 and stats["skipped_syncs"] == 1, (r, stats)
        for n in frag0:
            assert torch.equal(after2[n], out[0]["init"][n]), (r, n)
        for n in out[0]["frags"][1]:
            assert not torch.equal(after2[n], out[0]["init"][n]), (r, n)  # fragment 1: local progress kept
        stats, end = out[r]["snaps"][-1]
        assert stats["syncs"] == 4 and stats["skipped_syncs"] == 1, (r, stats)
        assert all(torch.isfinite(t).all() for t in end.values()), r
        for n in out[0]["frags"][1]:  # merged after step 8 (fragment 0 after step 6, then 2 local steps)
            assert torch.equal(end[n], out[0]["snaps"][-1][1][n]), (r, n)


# ---- resume with fragments in flight: DCP, fresh processes, bitwise ---------------------------------------------------
CKPT = {"sync_every": 4, "compression": "int8", "error_feedback": True, "fragments": 2, "overlap_steps": 1}


def _ckpt_worker(rank, world_size, path, steps, save_at, resume):
    import torch.distributed.checkpoint as dcp
    mesh = mesh22()
    replica, shard = rank // 2, rank % 2
    model = shard_model(make_gpt(), mesh)
    opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=LR),
                               group=mesh.get_group("replicate"), **CKPT)
    start = 0
    if resume:
        sd = {"diloco": opt.state_dict()}
        dcp.load(sd, checkpoint_id=path)
        opt.load_state_dict(sd["diloco"])
        start = opt.local_step
    in_flight_at_save = None
    for s in range(start, steps):
        if not resume and s == save_at:
            in_flight_at_save = [it.fragment for it in opt._stream.in_flight]
            dcp.save({"diloco": opt.state_dict()}, checkpoint_id=path)
        lm_loss(model, tokens(replica, s)[shard * 4:(shard + 1) * 4]).backward()
        opt.step()
        opt.zero_grad()
    opt.flush()
    return {"full": full_params(model), "start": start, "stats": dict(opt.stats), "in_flight": in_flight_at_save,
            "anchors": [f.anchor.clone() for f in opt._flats]}


@pytest.mark.slow
def test_dcp_resume_with_fragment_in_flight_is_bitwise():
    """int8 + error feedback, P=2, TAU=1, H=4: saved with dcp.save after step 6 (fragment 0's reduce
    in flight, started after step 6, due after step 7), resumed in fresh processes with dcp.load:
    final parameters, anchors and counters bitwise equal to the uninterrupted run on every rank."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt")
        a = run_ranks(_ckpt_worker, 4, path, 11, 6, False, backend="localsgd", timeout=TIMEOUT)
        b = run_ranks(_ckpt_worker, 4, path, 11, 6, True, backend="localsgd", timeout=TIMEOUT)
    assert a[0]["in_flight"] == [0]
    assert b[0]["start"] == 6

    def counters(x):
        return {k: v for k, v in x["stats"].items() if k != "foreign_bytes"}
    for r in range(4):
        assert counters(a[r]) == counters(b[r]), r
        for n, t in a[r]["full"].items():
            assert torch.equal(t, b[r]["full"][n]), (r, n)
        for x, y in zip(a[r]["anchors"], b[r]["anchors"]):
            assert torch.equal(x, y), r


# ---- (c) bad values: a clear error at construction ------------------------------------------------------------------
@pytest.fixture
def world1():
    """A world-size-1 "localsgd" group in this process, and a (1, 1) mesh on it."""
    dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_gpt():
    from torch.distributed.device_mesh import init_device_mesh
    m2 = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    return shard_model(make_gpt(), m2)


@pytest.mark.parametrize("kwargs, msg", [
    ({"fragments": 0}, r"fragments: expected an integer >= 1, got 0"),
    ({"fragments": 2.0}, r"fragments: expected an integer >= 1"),
    ({"fragments": 9}, r"fragments: expected at most sync_every=8"),
    ({"fragments": 2, "overlap_steps": 9}, r"overlap_steps: expected an integer in \[0, sync_every=8\]"),
    ({"fragments": 2, "overlap_steps": -1}, r"overlap_steps: expected an integer in \[0, sync_every=8\]"),
    ({"fragments": 2, "mixing": 1.0}, r"mixing: expected a number in \[0, 1\)"),
    ({"overlap_steps": 1}, r"expected fragments=P to be set"),
    ({"fragments": 2, "overlap": True}, r"overlap=True with fragments: expected one of the two"),
])
def test_bad_streaming_arguments_are_clear_errors(world1, kwargs, msg):
    model = _sharded_gpt()
    with pytest.raises(ValueError, match=msg):
        localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters()), sync_every=8, **kwargs)


def test_more_fragments_than_parameters_is_a_clear_error(world1):
    model = _sharded_gpt()
    n = len({id(p) for p in model.parameters()})  # tied embedding counted once
    with pytest.raises(ValueError, match=rf"fragments: expected at most the number of synced parameters \({n}\), "
                                         rf"got {n + 1}"):
        localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters()), sync_every=64, fragments=n + 1)


def test_sync_is_refused_in_streaming_mode_and_fragment_plan(world1):
    """One process (1 x 1 mesh): the plan cuts between whole parameters in model order, covers every
    parameter once, the largest fragment as small as the whole-parameter sizes allow (checked against
    every contiguous cut); sync() in streaming mode is refused with a message naming flush()."""
    from localsgd_comm.diloco.streaming import _min_max_cuts
    model = _sharded_gpt()
    opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters()), sync_every=8, fragments=3,
                               compression="int8")
    names = _names_by_fragment(opt, model)
    order = [n for n, _ in model.named_parameters()]
    assert [n for f in names for n in f] == order and all(names)
    sizes = opt._stream.fragment_full_numels()
    # brute force over every 3-way cut of the padded sizes
    psz = []
    params = list(model.parameters())
    for i, p in enumerate(params):
        psz.append(p.numel() if i == len(params) - 1 else -(-p.numel() // 128) * 128)
    best = min(max(sum(psz[:i]), sum(psz[i:j]), sum(psz[j:])) for i in range(1, len(psz)) for j in range(i + 1, len(psz)))
    assert max(sizes) == best and sum(sizes) == sum(psz)
    assert _min_max_cuts(psz, 3) is not None
    lm_loss(model, tokens(0, 0)).backward()
    with pytest.raises(RuntimeError, match=r"streaming mode .* call flush\(\)"):
        opt.sync()
    assert "fragments=3" in repr(opt)
    # plan_sharded_fragments itself: the same check on its own
    with pytest.raises(ValueError, match="fragments: expected an integer >= 1"):
        plan_sharded_fragments(opt._flats, params, 0, 128)
