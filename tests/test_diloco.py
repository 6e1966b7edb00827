"""localsgd_comm.DiLoCo: outer step, replica identity, resume, overlap, hierarchical, edge cases.

Multi-process tests run 2-4 ranks on loopback through tests/_mp.py (each with a timeout).
Tolerances are stated next to the asserts; "bitwise" means torch.equal on the raw values.
"""
import io
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import localsgd_comm
from localsgd_comm import DiLoCo
from localsgd_comm.diloco import new_hierarchical_groups

from _mp import run_workers

TIMEOUT = 120  # s per multi-process test: each runs in ~5-15 s on the 2-core CI machine


# ---- shared model / data --------------------------------------------------------------------------
def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(dtype)


def batch(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 16, generator=g).to(dtype)
    y = torch.randn(8, 8, generator=g).to(dtype)
    return x, y


def train_steps(model, opt, rank, start, n, dtype=torch.float32, after_step=None):
    for s in range(start, start + n):
        x, y = batch(rank, s, dtype)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(s)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


# ---- single process ---------------------------------------------------------------------------------
def test_one_worker_local_sgd_equals_plain_training(single_group):
    """sync_every=1, outer_lr=1, outer_momentum=0, fp32: model averaging over one worker is the
    identity, so the run must equal plain AdamW training bit for bit."""
    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    train_steps(ref, ref_opt, 0, 0, 12)

    m = make_model()
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=1, outer_lr=1.0,
                 outer_momentum=0.0, compression="none")
    train_steps(m, opt, 0, 0, 12)
    assert opt.sync_count == 12
    for a, b in zip(ref.parameters(), m.parameters()):
        assert torch.equal(a, b)


def test_parameters_start_on_block_boundaries(single_group):
    """Each parameter starts a quantization block, so a small tensor is never quantized with a
    large neighbour's scale. Linear(7, 9): the 63-element weight would share its block with the
    bias if packed tightly; the bias delta (1e-4 scale) must keep int8 precision of its own."""
    torch.manual_seed(0)
    m = nn.Linear(7, 9)
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=1.0), sync_every=1, outer_lr=1.0,
                 outer_momentum=0.0, compression="int8", block_size=64)
    for p in m.parameters():
        assert p.data.storage_offset() % 64 == 0
    before = [p.detach().clone() for p in m.parameters()]
    g_w, g_b = torch.randn(9, 7), torch.randn(9) * 1e-4
    m.weight.grad, m.bias.grad = g_w.clone(), g_b.clone()
    opt.step()  # inner SGD step (params -= grad), then the sync: anchor -= Q(delta) = Q(grad)
    assert opt.sync_count == 1
    for p, b, g in zip(m.parameters(), before, (g_w, g_b)):
        applied = (b - p.detach()).double()
        # int8 round to nearest: half a step of the tensor's own scale, absmax/127/2, plus fp32
        # rounding of the anchor update (|b| <= 1: 2^-24 per op) -> 1e-6 slack.
        bound = g.abs().max().double() / 127 / 2 + 1e-6 * max(1.0, float(b.abs().max()))
        assert float((applied - g.double()).abs().max()) <= bound


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_matches_torch_sgd(single_group, nesterov):
    """The anchor follows torch.optim.SGD(lr, momentum, nesterov) fed with g = anchor - params."""
    m = make_model()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=3, outer_lr=0.7,
                 outer_momentum=0.9, nesterov=nesterov, compression="none")
    anchor_ref = flat_params(m).double().clone().requires_grad_(True)
    sgd = torch.optim.SGD([anchor_ref], lr=0.7, momentum=0.9, nesterov=nesterov)
    step = 0
    for _ in range(4):  # 4 outer steps: the momentum buffer matters from the 2nd on
        train_steps(m, opt.inner_optimizer, 0, step, 3)  # inner steps only, no sync
        step += 3
        pre = flat_params(m).double()
        anchor_ref.grad = anchor_ref.detach() - pre
        sgd.step()
        opt.sync()
        # fp32 state vs the float64 oracle: a few fp32 roundings per step on values of O(1);
        # 1e-5 absolute leaves ~50x margin over the accumulated 4 x ~4 x 6e-8 error.
        torch.testing.assert_close(opt.anchors()[0].double(), anchor_ref.detach(), atol=1e-5, rtol=0)
        assert torch.equal(flat_params(m), opt.anchors()[0])  # params reset to the anchor


def test_bad_arguments(single_group):
    m = make_model()
    inner = torch.optim.AdamW(m.parameters())
    with pytest.raises(ValueError, match="sync_every"):
        DiLoCo(m, inner, sync_every=0)
    with pytest.raises(ValueError, match="sync_every"):
        DiLoCo(m, inner, sync_every=2.5)
    with pytest.raises(ValueError, match="compression"):
        DiLoCo(m, inner, sync_every=2, compression="int3")
    with pytest.raises(ValueError, match="outer_lr"):
        DiLoCo(m, inner, sync_every=2, outer_lr=0.0)
    with pytest.raises(ValueError, match="outer_lr"):
        DiLoCo(m, inner, sync_every=2, outer_lr=float("nan"))
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCo(m, inner, sync_every=2, outer_momentum=1.0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        DiLoCo(m, inner, sync_every=2, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="error_feedback"):
        DiLoCo(m, inner, sync_every=2, compression="none", error_feedback=True)
    with pytest.raises(RuntimeError, match="block_size"):
        DiLoCo(m, inner, sync_every=2, block_size=100)
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        DiLoCo(m, torch.optim.SGD(other.parameters(), lr=0.1), sync_every=2)
    with pytest.raises(TypeError, match="Optimizer"):
        DiLoCo(m, "adam", sync_every=2)
    frozen = make_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        DiLoCo(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1), sync_every=2)


def test_needs_process_group():
    m = make_model()
    with pytest.raises(RuntimeError, match="process group"):
        DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), sync_every=2)


# ---- replicas ----------------------------------------------------------------------------------------
def _replicas_worker(rank, world, compression, ddp, ef, sr, group):
    m = make_model(seed=rank)  # different init per rank: the construction broadcast must fix it
    if ddp:
        m = nn.parallel.DistributedDataParallel(m)
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, compression=compression,
                 error_feedback=ef, stochastic_rounding=sr, seed=7, group=group)
    snaps = []
    train_steps(m, opt, rank, 0, 1)
    snaps.append(flat_params(m))                      # after one local step: differs across ranks
    train_steps(m, opt, rank, 1, 2)                   # step 3 -> sync 1
    snaps.append(flat_params(m))
    train_steps(m, opt, rank, 3, 6)                   # syncs 2 and 3
    snaps.append(flat_params(m))
    snaps.append(opt.anchors()[0].clone())
    return snaps, opt.sync_count


REPLICA_CASES = {  # name: (world, compression, ddp, ef, sr, sync group)
    "2-int8-ddp-localsgd": (2, "int8", True, False, False, "default"),
    "2-none-localsgd": (2, "none", False, False, False, "default"),   # fp32 path on a quantizing group
    "4-int4-ef-sr-gloo": (4, "int4", False, True, True, "gloo"),      # Python-composed compressed all-reduce
    "4-fp8-ddp-localsgd": (4, "fp8", True, False, False, "default"),
}


@pytest.mark.parametrize("case", list(REPLICA_CASES))
def test_replicas_identical_after_every_sync(case, suite2, suite4):
    world = REPLICA_CASES[case][0]
    out = [r["replicas"][case] for r in (suite2 if world == 2 else suite4)]
    assert all(n == 3 for _, n in out)
    # local steps really are local (DDP's gradient all-reduce is off): replicas differ after 1 step
    assert not torch.equal(out[0][0][0], out[1][0][0])
    for snaps, _ in out[1:]:
        for i in (1, 2, 3):  # after syncs 1 and 3, and the anchor: bitwise identical
            assert torch.equal(snaps[i], out[0][0][i])
    assert torch.equal(out[0][0][2], out[0][0][3])  # params == anchor right after a sync


# ---- special parameters ------------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight          # tied
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)
        self.unused = nn.Parameter(torch.randn(7))  # never receives a gradient

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))) + self.frozen.sum() * 0)


def _special_worker(rank, world):
    torch.manual_seed(rank)
    m = Tied().to(torch.bfloat16)
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0), sync_every=2,
                 compression="int8")
    frozen0, unused0 = m.frozen.detach().clone(), m.unused.detach().clone()
    for s in range(4):
        g = torch.Generator().manual_seed(100 * rank + s)
        idx = torch.randint(0, 20, (4, 6), generator=g)
        loss = nn.functional.cross_entropy(m(idx).float().reshape(-1, 20), idx.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert m.head.weight is m.emb.weight
    assert m.emb.weight.dtype == torch.bfloat16 and opt.anchors()[0].dtype == torch.float32
    return (flat_params(m), torch.equal(m.frozen, frozen0), torch.equal(m.unused, unused0),
            len(opt.anchors()[0]))


def test_bf16_tied_frozen_unused_parameters(suite2):
    out = [r["special"] for r in suite2]
    assert torch.equal(out[0][0], out[1][0])
    for _, frozen_same, unused_same, n in out:
        assert frozen_same        # frozen: not synced, unchanged
        assert unused_same        # delta 0 and momentum 0 -> unchanged
        assert n == 20 * 16 + 16 * 16 + 16 + 7  # tied weight counted once, frozen excluded


# ---- non-finite --------------------------------------------------------------------------------------
def _nonfinite_worker(rank, world, compression, policy):
    m = make_model()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=2, compression=compression,
                 on_nonfinite=policy)
    train_steps(m, opt, rank, 0, 2)   # sync 1: fine
    anchor1 = opt.anchors()[0].clone()
    train_steps(m, opt, rank, 2, 1)
    if rank == world - 1:
        with torch.no_grad():
            m[0].weight[0, 0] = float("nan")  # poison one rank's local progress
    raised = False
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            train_steps(m, opt, rank, 3, 1)   # sync 2: must be skipped on every rank
        except FloatingPointError:
            raised = True
    warned = any("non-finite" in str(x.message) for x in w)
    after = (flat_params(m), opt.anchors()[0].clone(), torch.equal(opt.anchors()[0], anchor1))
    if not raised:
        train_steps(m, opt, rank, 4, 2)   # sync 3: training goes on normally
    return raised, warned, after, flat_params(m), opt.stats["skipped_syncs"]


NONFINITE_CASES = [("int8", "skip"), ("none", "skip"), ("int4", "raise")]


@pytest.mark.parametrize("compression,policy", NONFINITE_CASES)
def test_nonfinite_same_decision_everywhere(compression, policy, suite2):
    out = [r["nonfinite"][(compression, policy)] for r in suite2]
    for raised, warned, (params, anchor, anchor_kept), final, skipped in out:
        assert raised == (policy == "raise")
        assert warned == (policy == "skip")
        assert anchor_kept                    # no rank applied the outer step
        assert torch.equal(params, anchor)    # local progress discarded: params reset to anchor
        assert torch.isfinite(final).all()
        assert skipped == 1
    assert torch.equal(out[0][2][0], out[1][2][0])
    assert torch.equal(out[0][3], out[1][3])


# ---- resume ------------------------------------------------------------------------------------------
RESUME_KW = [
    dict(compression="int8", error_feedback=True, stochastic_rounding=True, seed=3),
    dict(compression="int4", overlap=True),
]


def _resume_worker(rank, world, kw, phase, path):
    m = make_model(seed=11)
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, **kw)
    if phase == "full":
        train_steps(m, opt, rank, 0, 5)                      # stops mid-round (after sync 1)
        torch.save(opt.state_dict(), os.path.join(path, f"ckpt{rank}.pt"))
        train_steps(m, opt, rank, 5, 10)                     # syncs 2..5
        return flat_params(m), opt.anchors()[0].clone()
    m2 = make_model(seed=99)                                 # different init: all must come from the checkpoint
    opt = DiLoCo(m2, torch.optim.AdamW(m2.parameters(), lr=1e-2), sync_every=3, **kw)
    state = torch.load(os.path.join(path, f"ckpt{rank}.pt"), weights_only=False)
    opt.load_state_dict(state)
    train_steps(m2, opt, rank, 5, 10)
    return flat_params(m2), opt.anchors()[0].clone()


@pytest.mark.parametrize("i", range(len(RESUME_KW)), ids=["int8-ef-sr", "int4-overlap"])
def test_resume_bitwise_in_fresh_processes(i, suite2, resumed):
    for r, res in zip(suite2, resumed):
        pf, af = r["resume"][i]
        pr, ar = res[i]
        assert torch.equal(pf, pr)
        assert torch.equal(af, ar)


# ---- overlap -----------------------------------------------------------------------------------------
H, K, LR_IN, OLR, MU = 3, 4, 0.05, 0.7, 0.9


def _overlap_worker(rank, world, overlap):
    m = make_model(seed=5)
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=LR_IN), sync_every=H, outer_lr=OLR,
                 outer_momentum=MU, compression="none", overlap=overlap)
    anchors = []
    for k in range(K):
        train_steps(m, opt, rank, k * H, H)
        anchors.append(opt.anchors()[0].clone())
        assert torch.equal(flat_params(m), anchors[-1])  # every round starts from the anchor
    if overlap:
        opt.flush()
        anchors.append(opt.anchors()[0].clone())
    return anchors


def _simulate_overlap(world, overlap):
    """Single-process float64 simulation of the documented semantics."""
    base = make_model(seed=5).double()
    theta = flat_params(base).double()
    buf = torch.zeros_like(theta)
    pending, anchors = None, []

    def outer(theta, buf, g):
        buf = MU * buf + g
        return theta - OLR * (g + MU * buf), buf

    for k in range(K):
        deltas = []
        for r in range(world):
            m = make_model(seed=5).double()
            torch.nn.utils.vector_to_parameters(theta.clone(), m.parameters())
            sgd = torch.optim.SGD(m.parameters(), lr=LR_IN)
            train_steps(m, sgd, r, k * H, H, dtype=torch.float64)
            deltas.append(theta - torch.nn.utils.parameters_to_vector(m.parameters()).detach())
        g = torch.stack(deltas).mean(0)
        if not overlap:
            theta, buf = outer(theta, buf, g)
        else:
            if pending is not None:
                theta, buf = outer(theta, buf, pending)
            pending = g
        anchors.append(theta.clone())
    if overlap:
        theta, buf = outer(theta, buf, pending)
        anchors.append(theta.clone())
    return anchors


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_semantics_match_simulation(overlap, suite4):
    out = [r["overlap"][overlap] for r in suite4]
    for o in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, out[0]))
    sim = _simulate_overlap(4, overlap)
    assert len(sim) == len(out[0])
    for got, want in zip(out[0], sim):
        # fp32 run vs float64 simulation: ~K*H fp32 roundings of O(1) values -> 1e-5 absolute
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    if overlap:  # sync 1 applies nothing
        torch.testing.assert_close(sim[0], flat_params(make_model(seed=5)).double(), atol=0, rtol=0)


# ---- hierarchical ------------------------------------------------------------------------------------
def _hier_worker(rank, world, compression, use_ddp, h):
    m = make_model(seed=rank)
    if use_ddp:
        m = nn.parallel.DistributedDataParallel(m, process_group=h.intra)
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=100, outer_lr=0.7,
                 outer_momentum=0.9, compression=compression, hierarchy=h)
    anchor0 = opt.anchors()[0].clone()
    # ranks of a cluster see different data but average gradients: identical inside the cluster
    train_steps(m, opt, rank, 0, 3)
    pre = flat_params(m)
    opt.sync()
    return pre, anchor0, opt.anchors()[0].clone(), flat_params(m), h.cluster_index


HIER_CASES = [("none", False), ("int8", True)]


@pytest.mark.parametrize("compression,use_ddp", HIER_CASES)
def test_hierarchical_four_ranks(compression, use_ddp, suite4):
    out = [r["hier"][(compression, use_ddp)] for r in suite4]
    pre = [o[0] for o in out]
    assert torch.equal(pre[0], pre[1]) and torch.equal(pre[2], pre[3])   # same inside a cluster
    assert not torch.equal(pre[0], pre[2])                                # local across clusters
    for o in out[1:]:
        assert torch.equal(o[2], out[0][2]) and torch.equal(o[3], out[0][3])  # all identical after sync
    anchor0 = out[0][1].double()
    g = ((anchor0 - pre[0].double()) + (anchor0 - pre[2].double())) / 2
    want = anchor0 - 0.7 * (g + 0.9 * g)   # first outer step: buf = g
    # fp32 "none": ~1e-7 relative; int8: two roundings of half a step absmax/127 per block,
    # here |delta| <= ~0.1 -> 2 x 0.5 x 0.1/127 x 0.7 x 1.9 ~ 1e-3 bound.
    atol = 1e-5 if compression == "none" else 2e-3
    torch.testing.assert_close(out[0][2].double(), want, atol=atol, rtol=0)


# ---- the multi-process runs: spawning is the expensive part (~3-5 s per process on 2 cores), so
# each world size is spawned once per session and every multi-process test reads its results.
def _suite_worker(rank, world, path):
    gloo = dist.new_group(backend="gloo")
    out = {"replicas": {}}
    for name, (w, comp, ddp, ef, sr, grp) in REPLICA_CASES.items():
        if w == world:
            out["replicas"][name] = _replicas_worker(rank, world, comp, ddp, ef, sr, gloo if grp == "gloo" else None)
    if world == 2:
        out["special"] = _special_worker(rank, world)
        out["nonfinite"] = {c: _nonfinite_worker(rank, world, *c) for c in NONFINITE_CASES}
        out["resume"] = [_resume_worker(rank, world, kw, "full", os.path.join(path, str(i)))
                         for i, kw in enumerate(RESUME_KW)]
    else:
        out["overlap"] = {ov: _overlap_worker(rank, world, ov) for ov in (True, False)}
        h = new_hierarchical_groups(2)
        out["hier"] = {c: _hier_worker(rank, world, *c, h) for c in HIER_CASES}
    return out


def _resume_phase_worker(rank, world, path):
    return [_resume_worker(rank, world, kw, "resume", os.path.join(path, str(i))) for i, kw in enumerate(RESUME_KW)]


@pytest.fixture(scope="module")
def ckpt_dir():
    with tempfile.TemporaryDirectory() as d:
        for i in range(len(RESUME_KW)):
            os.makedirs(os.path.join(d, str(i)))
        yield d


@pytest.fixture(scope="module")
def suite2(ckpt_dir):
    return run_workers(_suite_worker, 2, ckpt_dir, backend="localsgd", timeout=240)


@pytest.fixture(scope="module")
def suite4():
    return run_workers(_suite_worker, 4, "", backend="localsgd", timeout=240)


@pytest.fixture(scope="module")
def resumed(suite2, ckpt_dir):
    return run_workers(_resume_phase_worker, 2, ckpt_dir, backend="localsgd", timeout=TIMEOUT)



@pytest.mark.parametrize("outer_lr", [1.0, 0.5])
def test_overlap_model_averaging_follows_the_delayed_outer_step(single_group, outer_lr):
    """overlap=True, compression="none", outer_momentum=0: the anchor follows the documented
    delayed step theta <- theta - outer_lr * g_{k-1}, g_{k-1} = theta_{k-1} - avg(params).
    outer_lr=1 (plain averaging) must not be special-cased into theta <- avg(params of round
    k-1), which drops the update applied in between (outer_lr=0.5 is the control)."""
    m = make_model()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.05), sync_every=2, outer_lr=outer_lr,
                 outer_momentum=0.0, compression="none", overlap=True)
    theta = flat_params(m).double()
    pending = None
    for k in range(4):
        train_steps(m, opt.inner_optimizer, 0, 2 * k, 2)  # inner steps only
        g = theta - flat_params(m).double()  # one worker: the average is this worker
        if pending is not None:
            theta = theta - outer_lr * pending
        pending = g
        opt.sync()
        # fp32 run vs float64 oracle: a few fp32 roundings of O(1) values per sync -> 1e-5
        torch.testing.assert_close(opt.anchors()[0].double(), theta, atol=1e-5, rtol=0)
        assert torch.equal(flat_params(m), opt.anchors()[0])


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, use_b):
        return self.a(x) + (self.b(x) if use_b else 0.0)


def _hier_unused_worker(rank, world):
    h = new_hierarchical_groups(2)
    m = _TwoBranch()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), sync_every=100, compression="none", hierarchy=h)
    for s in range(2):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * rank + s))
        m(x, use_b=(rank == 0)).pow(2).mean().backward()  # branch b gets a gradient on rank 0 only
        opt.step()
        opt.zero_grad()
    return flat_params(m)


def test_hierarchical_gradient_on_some_members_only_keeps_cluster_identical():
    """Inside a cluster (no DDP) the averaged gradient of a parameter used by one member only
    must reach every member: before, the member without a gradient skipped it and diverged."""
    out = run_workers(_hier_unused_worker, 2, timeout=TIMEOUT)
    assert torch.equal(out[0], out[1])


def test_load_state_dict_with_other_buffers_names_them(single_group):
    """A state saved without error feedback (or outer momentum) loaded into a DiLoCo that has
    them used to fail inside Tensor.copy_(None); it must name the mismatch, before changing
    anything."""
    m = make_model()
    plain = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), sync_every=2, compression="int8")
    state = plain.state_dict()
    m2 = make_model()
    ef = DiLoCo(m2, torch.optim.SGD(m2.parameters(), lr=0.1), sync_every=2, compression="int8",
                error_feedback=True)
    before = flat_params(m2)
    with pytest.raises(ValueError, match=r"residual buffers \[True\] \(error_feedback as constructed\), got \[False\]"):
        ef.load_state_dict(state)
    assert torch.equal(flat_params(m2), before)
    m3 = make_model()
    nomom = DiLoCo(m3, torch.optim.SGD(m3.parameters(), lr=0.1), sync_every=2, compression="int8",
                   outer_momentum=0.0)
    with pytest.raises(ValueError, match=r"momentum buffers \[False\]"):
        nomom.load_state_dict(state)


def _hier_closure_worker(rank, world):
    h = new_hierarchical_groups(2)
    m = make_model()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), sync_every=100, compression="none", hierarchy=h)
    for s in range(2):
        x, y = batch(rank, s)  # different data per member

        def closure():
            opt.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            return loss
        opt.step(closure)
    return flat_params(m)


def test_hierarchical_step_with_closure_averages_the_closures_gradients():
    """step(closure) in hierarchical mode without DDP: the gradients the closure computes are the
    ones averaged inside the cluster (they used to be averaged before the closure ran, i.e. the
    previous step's, and members diverged)."""
    out = run_workers(_hier_closure_worker, 2, timeout=TIMEOUT)
    assert torch.equal(out[0], out[1])


# ---- outer state on another device than a group can carry ---------------------------------------
def _staged_worker(rank, world, staged):
    """state_device='cpu' over a group that (pretends it) cannot carry CPU tensors: the sync's
    collectives go through copies on the stage device and back (on a GPU: the parameters' device
    for an NCCL group). Here the stage device is the CPU too, so the bytes must not change."""
    from localsgd_comm.diloco import collectives
    out = {}
    for comp, ef in (("int8", True), ("none", False)):
        m = make_model()
        opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, compression=comp,
                     error_feedback=ef, state_device="cpu")
        if staged:
            opt._reducer.stage_device = torch.device("cpu")
            collectives.carries = lambda group, device: False  # noqa: E731  (this process only)
        train_steps(m, opt, rank, 0, 9)
        out[comp] = flat_params(m)
    return out


def test_outer_state_travels_through_the_stage_device_when_the_group_cannot_carry_it():
    plain = run_workers(_staged_worker, 2, False, backend="localsgd", timeout=TIMEOUT)
    staged = run_workers(_staged_worker, 2, True, backend="localsgd", timeout=TIMEOUT)
    for comp in ("int8", "none"):
        assert torch.equal(plain[0][comp], plain[1][comp])
        assert torch.equal(staged[0][comp], plain[0][comp]), comp
