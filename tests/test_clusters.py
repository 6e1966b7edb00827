"""Two clusters launched with one torchrun each: hierarchical DiLoCo's bytes on the slow link.

The claim of hierarchical mode is that each pseudo-gradient byte crosses the slow link once
(member j of each cluster syncs shard j). Here the bytes are counted where they really cross:
the tx counters of each cluster namespace's uplink, for a run with 5 syncs and one with 1 sync
(everything else equal: start-up broadcast, rendezvous, result gathering), so the difference
is the bytes of 4 syncs. The planner's count of those bytes (``plan.predict``) must match it
within 10% (TCP/IP headers add ~3% at this size).
"""
from __future__ import annotations

import pytest

from localsgd_comm import plan
from localsgd_comm.bench import clusters, netns

NETNS_WHY = netns.availability()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(NETNS_WHY is not None, reason=f"shaped links unavailable: {NETNS_WHY}")
def test_hierarchical_sync_bytes_on_the_slow_link_match_the_planner():
    cfg = dict(clusters.config(quick=True), sync_every=5, timeout=120)
    out = {}
    with netns.ShapedNetwork(2, 200) as net:
        for steps in (5, 25):
            r = clusters.run_torchrun_clusters(net, 2, 2, clusters._args(cfg, "hier-diloco", steps, net.ifname),
                                               timeout_s=180)
            assert len(r["uplink_tx_bytes"]) == 2  # one reading per cluster namespace
            out[steps] = r
    measured = [b - a for a, b in zip(out[5]["uplink_tx_bytes"], out[25]["uplink_tx_bytes"])]
    r = out[25]
    job = plan.Job(params=r["n_params"], tokens=1e6, tokens_per_step=512, workers=4, clusters=2, step_time_s=0.05)
    p = plan.predict(job, plan.Network(inter_mbit=200), plan.Candidate("hierarchical", 4, 5, "int8"))
    expected = 4 * p.slow_link_bytes_per_round
    for m in measured:
        assert m == pytest.approx(expected, rel=0.10), (measured, expected)
    assert r["loss_mean"][-1] < r["loss_mean"][0]
