"""The outer-step engine on its own (localsgd_comm/diloco/engine.py): what the modes built on it
rely on beyond what the DiLoCo and elastic tests check through the wrappers.

Two ranks run as two threads of this process, each with a "localsgd" backend made outside torch's
group registry (as elastic DiLoCo's groups are) over one HashStore: no process spawn. "bitwise"
means torch.equal on the raw values.
"""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
from torch import nn

from localsgd_comm import backend
from localsgd_comm.diloco.buffers import build_buffers
from localsgd_comm.diloco.collectives import BackendReducer, Reducer
from localsgd_comm.diloco.engine import OuterConfig, OuterEngine, Reduction

BLOCK = 64


def _params(seed: int):
    """A few parameters of odd sizes (so that padding and tails occur)."""
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(n, generator=g)) for n in (300, 7, 129)]


def _buffer(rank: int, fmt: str, momentum=True, residual=True):
    """One flat buffer, the same start on every rank, whose parameters then take an inner step of
    this rank's own (params != anchor, different per rank)."""
    ps = _params(0)
    f = build_buffers(ps, state_device=None, momentum=momentum, residual=residual,
                      align=BLOCK if fmt != "none" else 1)[0]
    with torch.no_grad():
        for p, q in zip(ps, _params(100 + rank)):
            p.add_(0.01 * q)  # the "inner steps"
    return f


def _on_two_ranks(fn, fmt: str):
    """fn(rank, reducer) on two threads, each with its own rank of one localsgd group."""
    store = torch.distributed.HashStore()
    opts = backend.BackendOptions(format=fmt, block_size=BLOCK, threshold_bytes=0, cuda_inner="gloo").resolved()
    out, errors = [None, None], []

    def run(rank):
        b = None
        try:
            b = backend.detached_backend(store, rank, 2, timedelta(seconds=30), opts)
            out[rank] = fn(rank, BackendReducer(b, 2))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            if b is not None:
                backend.release_detached_backend(b)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return out


def _state(f):
    return [t.clone() for t in (f.flat, f.anchor, f.momentum, f.residual) if t is not None]


CONFIGS = {"int8-ef": ("int8", True), "fp8": ("fp8", False), "none": ("none", False)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fragments_in_flight_equal_one_sync_of_the_whole_buffer(name):
    """A buffer synced as two block-aligned segments, both reduces in flight at once (what a
    streaming mode does), ends bitwise where one sync of the whole buffer ends: the arithmetic is
    per block and per element, so where the segments start must not matter."""
    fmt, ef = CONFIGS[name]
    engine = OuterEngine(OuterConfig(fmt, BLOCK, 0.7, 0.9, True))

    def fn(rank, reducer):
        whole = _buffer(rank, fmt, residual=ef)
        red = engine.start([whole.segment()], reducer, keep_backup=True)
        engine.apply(red)
        parts = _buffer(rank, fmt, residual=ef)
        cut = 5 * BLOCK if fmt != "none" else 301  # on a block boundary when quantizing
        a = engine.start([parts.segment(0, cut)], reducer, async_op=True)
        b = engine.start([parts.segment(cut)], reducer, async_op=True)
        for r in (a, b):
            r.wait()
            engine.apply(r)
        return _state(whole), _state(parts)

    (w0, p0), (w1, p1) = _on_two_ranks(fn, fmt)
    for x, y in zip(w0[:3], w1[:3]):  # params, anchor, momentum: the same on both replicas
        assert torch.equal(x, y)
    for whole, parts in ((w0, p0), (w1, p1)):
        assert all(torch.equal(x, y) for x, y in zip(whole, parts))


def test_a_reduction_in_flight_resumes_from_its_state():
    """Reduction.state() of a reduce in flight, restored onto another copy of the buffer, applies
    exactly what the original applies (a checkpoint with a fragment in flight resumes bitwise)."""
    engine = OuterEngine(OuterConfig("int4", BLOCK, 0.7, 0.9, True))

    def fn(rank, reducer):
        f, g = _buffer(rank, "int4"), _buffer(rank, "int4")
        red = engine.start([f.segment()], reducer, async_op=True)
        saved = red.state()
        engine.apply(red)
        engine.apply(Reduction.from_state(saved, [g.segment()], reducer.size))
        return _state(f), _state(g)

    for a, b in _on_two_ranks(fn, "int4"):
        # the residual: g's was never compressed into (its copy of the state starts at zero)
        assert all(torch.equal(x, y) for x, y in zip(a[:-1], b[:-1]))


class _Failing(Reducer):
    size = 2

    def all_reduce_compressed(self, *args):
        raise RuntimeError("peer gone")


def test_a_failed_start_leaves_the_residual_as_it_was():
    """A reduce that fails after the compression wrote the residual: the residual is restored
    before the error propagates, so a redo of the round starts from the same state."""
    engine = OuterEngine(OuterConfig("int8", BLOCK, 0.7, 0.9, True))
    f = _buffer(0, "int8")
    f.residual.copy_(torch.linspace(-1e-3, 1e-3, f.numel))
    before = f.residual.clone()
    with pytest.raises(RuntimeError, match="peer gone"):
        engine.start([f.segment()], _Failing(), keep_backup=True)
    assert torch.equal(f.residual, before)


class _Local(Reducer):
    """No communication: what a one-rank group returns."""
    size = 1

    class _Done:
        def wait(self):
            return True

    def all_reduce_compressed(self, *args):
        return self._Done()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_received_is_shaped_like_the_result(fmt):
    """The buffers a replica's other ranks receive into match the tensors the leader sends."""
    engine = OuterEngine(OuterConfig(fmt, BLOCK, 0.7, 0.9, True))
    f = _buffer(0, fmt)
    segs = [f.segment(0, 2 * BLOCK), f.segment(2 * BLOCK, 2 * BLOCK), f.segment(2 * BLOCK)]  # one empty
    sent = engine.start(segs, _Local()).tensors()
    got = engine.received(segs, 1).tensors()
    assert [(t.shape, t.dtype) for t in sent] == [(t.shape, t.dtype) for t in got]
