"""benchmarks/torchft_streaming.py, the parts that need no torchft: the fragment cut handed to
torchft (whole parameters, smallest largest fragment: checked against brute force), the method
names, the result analysis, and the import of our pure-Python modules without the compiled
extension (how the torchft environment's ranks use them)."""
import importlib.util
import itertools
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "torchft_streaming.py")


@pytest.fixture(scope="module")
def tfs():
    spec = importlib.util.spec_from_file_location("torchft_streaming_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _brute_best(sizes, parts):
    n = len(sizes)
    best = None
    for inner in itertools.combinations(range(1, n), parts - 1):
        cuts = (0,) + inner + (n,)
        worst = max(sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_fragment_bounds_minimise_the_largest_fragment(tfs):
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        sizes = [rng.choice([1, 2, 3, 5, 8, 100, 1000]) for _ in range(n)]
        parts = rng.randint(1, n)
        cuts = tfs.fragment_bounds(sizes, parts)
        assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == parts + 1, (sizes, parts, cuts)
        assert all(a < b for a, b in zip(cuts, cuts[1:])), (sizes, parts, cuts)  # none empty
        largest = max(sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:]))
        assert largest == _brute_best(sizes, parts), (sizes, parts, cuts)


def test_fragment_bounds_of_the_small_gpt(tfs):
    # the quick streaming recipe's model, P = 4: the fragments torchft got in the committed runs
    # (the same as our rule's when those runs were made; our rule may now also cut inside a
    # parameter that straddles two fragments, which torchft's module fragments cannot)
    import torch

    from localsgd_comm.model import GPT, config_for
    torch.manual_seed(0)
    sizes = [p.numel() for p in GPT(config_for("small", seq_len=64)).parameters()]
    cuts = tfs.fragment_bounds(sizes, 4)
    assert [sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:])] == [239104, 198656, 198272, 198272]


def test_fragment_bounds_bad_values(tfs):
    with pytest.raises(ValueError, match="fragments"):
        tfs.fragment_bounds([1, 2], 0)
    with pytest.raises(ValueError, match="fragments"):
        tfs.fragment_bounds([1, 2], 3)
    with pytest.raises(ValueError, match="sizes"):
        tfs.fragment_bounds([1, 0], 1)


def test_method_names(tfs):
    assert tfs.parse_torchft_method("torchft-fp32-P4-T1") == {"quantize": False, "fragments": 4, "delay": 1,
                                                              "triton": False}
    assert tfs.parse_torchft_method("torchft-quant-P2-T0-triton")["triton"] is True
    for bad in ("torchft-int4-P4-T1", "torchft-fp32-P4", "stream-none-P4-T1"):
        with pytest.raises(ValueError, match="torchft method"):
            tfs.parse_torchft_method(bad)


def _run(method, losses, tx, totals, **extra):
    r = {"net": "10mbit", "rate_mbit": 10.0, "method": method, "steps": len(losses), "loss_mean": losses,
         "tx_bytes_per_rank_mean": tx, "compute_s_per_rank": [0.1, 0.1, 0.2, 0.3],
         "total_s_per_rank": totals, "in_loop_compute_s_per_rank": [3.0, 3.0, 3.0, 3.0],
         "sync_s_per_rank": [0.5, 1.0, 0.5, 0.5]}
    r.update(extra)
    return r


def test_analyse_ratios_and_checks(tfs):
    ours = _run("stream-none-P4-T1", [4.0] * 5 + [2.0] * 5, [0.0] * 9 + [4e6], [5.0, 6.0, 5.0, 5.0],
                diloco_stats={"syncs": 12})
    ft = _run("torchft-fp32-P4-T1", [4.0] * 5 + [3.0] * 5, [0.0] * 9 + [6e6], [10.0, 10.0, 10.0, 10.0],
              tx_bytes_per_rank_final=[6.5e6, 6e6, 5.8e6, 5.7e6], torchft_commits_per_rank=[12, 12, 11, 12],
              global_params_checksum_per_rank=[1.5, 1.5, 1.5, 1.25], torchft_errors_per_rank=[0, 2, 0, 0])
    rows = {r["method"]: r for r in tfs.analyse([ours, ft], window=5)}
    o, t = rows["stream-none-P4-T1"], rows["torchft-fp32-P4-T1"]
    assert o["side"] == "localsgd-comm" and t["side"] == "torchft"
    assert o["final_loss"] == 2.0 and t["final_loss"] == 3.0 and t["loss_vs_ours_fp32"] == 1.5
    assert o["loss_vs_ours_fp32"] == 1.0
    assert t["tx_mb_per_rank"] == 6.0 and t["tx_mb_max_rank"] == 6.5 and t["tx_vs_ours_fp32"] == 1.5
    assert o["total_s"] == 6.0 and o["compute_step_s"] == 0.2  # slowest rank, median compute step
    assert abs(o["compute_util"] - 0.2 * 10 / 6.0) < 1e-12
    assert abs(o["loop_compute_util"] - 3.0 / 6.0) < 1e-12 and abs(o["sync_share"] - 1.0 / 6.0) < 1e-12  # the highest rank
    assert o["outer_updates"] == 12 and t["outer_updates"] == 11  # the rank with fewest commits
    assert o["replicas_agree"] is None and t["replicas_agree"] is False
    assert o["errors"] == 0 and t["errors"] == 2


def test_pure_modules_import_without_the_compiled_extension():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {SCRIPT!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "gpt = m._import_pure('model'); m._import_pure('data'); m._import_pure('bench.time_to_loss')\n"
            "m._import_pure('bench.netns'); m._import_pure('bench.launch')\n"
            "assert 'localsgd_comm._C' not in sys.modules and 'localsgd_comm.backend' not in sys.modules\n"
            "assert gpt.GPT(gpt.config_for('tiny', seq_len=16)) is not None\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_total_tx_counts_the_bytes_after_the_loop_when_recorded(tfs):
    # ours sends its last fragments in the closing flush, after the loop's last tx sample
    ours = _run("stream-none-P4-T1", [2.0] * 10, [0.0] * 9 + [4e6], [5.0] * 4,
                tx_bytes_per_rank_final=[5e6, 5e6, 4e6, 6e6], diloco_stats={"syncs": 12})
    loop_only = _run("torchft-fp32-P4-T1", [2.0] * 10, [0.0] * 9 + [6e6], [5.0] * 4)
    rows = {r["method"]: r for r in tfs.analyse([ours, loop_only], window=5)}
    assert rows["stream-none-P4-T1"]["tx_mb_per_rank"] == 5.0
    assert rows["torchft-fp32-P4-T1"]["tx_mb_per_rank"] == 6.0 and rows["torchft-fp32-P4-T1"]["tx_vs_ours_fp32"] == 1.2
