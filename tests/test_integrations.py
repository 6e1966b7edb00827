"""localsgd_comm.integrations: Hugging Face Trainer, accelerate loops, Lightning.

Each end-to-end test launches a real training script (tests/scripts/{hf_trainer,accelerate,
lightning}_train.py) on 2 CPU processes, torchrun-style, as plain DDP and as DiLoCo, and
reads what rank 0 reports (the localsgd backend's byte counters, DiLoCo's stats, the validation
loss) and the final parameters of every rank. The runs: a 120K-parameter GPT (GPT-2 built from
a config for the Trainer, localsgd_comm.model's tiny GPT for the others), seq 64, batch 8 per
rank, 24 optimizer steps, lr 2e-3 with warm-up and cosine decay, DiLoCo int8, H = 8 (3 syncs),
outer momentum 0.9 for the Trainer, 0.6 for the others (see SHORT_RUN).

What must hold (issue 24):
* bytes: what a DiLoCo rank sent apart from the construction broadcasts is within 1.1x of the
  ideal ``syncs x params x bytes/element x 2 (p-1)/p`` (1 + 4/128 B/element for int8: the block
  padding of each tensor and 64-byte call headers are the excess, ~2% here); the construction
  broadcasts (DDP's and DiLoCo's) are at most two fp32 model copies plus 64 KiB;
* replicas identical after the last sync (bitwise);
* validation loss within 3% of plain DDP's on the same script (DiLoCo <= 1.03 x DDP);
* a run resumed from a checkpoint in the middle of a round ends bitwise equal, on every rank,
  to the uninterrupted run.
End-to-end tests and the multi-process or Trainer-building ones are marked slow (each launch
takes ~10-60 s on 2 busy cores); the import, argument and example-diff tests run in the README's
test command. Tests needing a library skip without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import localsgd_comm

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "scripts"))
from launch_script import WORLD, launch  # noqa: E402

from _mp import run_workers  # noqa: E402

SCRIPTS = os.path.join(HERE, "scripts")
INT8_BPE = 1.0 + 4.0 / localsgd_comm.DEFAULT_BLOCK_SIZE
#: 3 outer steps: outer momentum 0.6, as localsgd-train uses for short runs (README: with 0.9 the
#: byte-level GPT's Lightning run reached 4.96 against DDP's 3.62, with 0.6 3.40)
SHORT_RUN = ["--outer-momentum", "0.6"]


def _run_py(code: str, timeout: float = 120.0, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True,
                          timeout=timeout)


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_diloco_run(report, params, ddp_report):
    b, d, p, n = report["backend"], report["diloco"], report["world"], report["numel"]
    assert b["backend"] == "localsgd" and d["syncs"] >= 2 and d["ddp_hook_calls"] == 0, (b, d)
    ideal = d["syncs"] * n * INT8_BPE * 2 * (p - 1) / p
    broadcasts = b["op_bytes_sent"].get("broadcast", 0)
    assert ideal <= b["bytes_sent"] - broadcasts <= 1.1 * ideal, (b["bytes_sent"], broadcasts, ideal)
    assert broadcasts <= 2 * 4 * n + 65536, (broadcasts, n)
    assert _same(params[0], params[1]), "replicas differ after the last sync"
    assert report["val_loss"] <= 1.03 * ddp_report["val_loss"], (report["val_loss"], ddp_report["val_loss"])


# ------------------------------------------------------------------ quick: imports and bad input
def test_localsgd_comm_imports_without_the_extras_and_integrations_name_them():
    r = _run_py("""
        import importlib, sys
        for m in ("transformers", "accelerate", "lightning", "pytorch_lightning"):
            sys.modules[m] = None            # as if not installed
        import localsgd_comm
        for mod, extra in (("transformers", "hf"), ("accelerate", "hf"), ("lightning", "lightning")):
            try:
                importlib.import_module("localsgd_comm.integrations." + mod)
            except ImportError as exc:
                assert f'pip install "localsgd-comm[{extra}]"' in str(exc), str(exc)
            else:
                raise AssertionError(mod + " imported without its library")
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    r = _run_py("import sys, localsgd_comm; print(sorted(m for m in ('transformers', 'accelerate', 'lightning') "
                "if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_prepare_diloco_bad_arguments():
    pytest.importorskip("accelerate")
    from localsgd_comm.integrations.accelerate import prepare_diloco
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="AcceleratedOptimizer"):
        prepare_diloco(model, opt, sync_every=4)
    with pytest.raises(TypeError, match="sync_every"):
        prepare_diloco(model, opt)
    with pytest.raises(TypeError, match="unexpected DiLoCo argument"):
        prepare_diloco(model, opt, sync_every=4, fragmentz=2)


@pytest.mark.parametrize("kind,word", [("DEEPSPEED", "DeepSpeed"), ("FSDP", "FSDP"), ("MEGATRON_LM", "Megatron")])
def test_accelerate_sharded_modes_are_refused(monkeypatch, kind, word):
    """An accelerate state of DeepSpeed / FSDP / Megatron (set here without building one: their
    plugins need GPUs or libraries) is refused before DiLoCo is built."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from localsgd_comm.integrations.accelerate import check_distributed_type
    monkeypatch.setattr(AcceleratorState, "_shared_state", {})
    monkeypatch.setattr(PartialState, "_shared_state", {"distributed_type": getattr(DistributedType, kind)})
    with pytest.raises(ValueError, match=f"expected plain data parallelism.*{word}"):
        check_distributed_type()
    monkeypatch.setattr(PartialState, "_shared_state", {"distributed_type": DistributedType.MULTI_CPU})
    check_distributed_type()


def test_diloco_strategy_bad_arguments():
    pytest.importorskip("lightning")
    from localsgd_comm.integrations.lightning import DiLoCoStrategy
    with pytest.raises(ValueError, match="sync_every"):
        DiLoCoStrategy(sync_every=0)
    with pytest.raises(ValueError, match="compression"):
        DiLoCoStrategy(sync_every=4, compression="int3")
    with pytest.raises(ValueError, match="ddp_comm_hook"):
        DiLoCoStrategy(sync_every=4, ddp_comm_hook=lambda *a: None)
    with pytest.raises(ValueError, match="model_averaging_period"):
        DiLoCoStrategy(sync_every=4, model_averaging_period=4)
    s = DiLoCoStrategy(sync_every=4)
    assert s.process_group_backend == "localsgd"


@pytest.mark.slow  # imports transformers and builds two Trainers in a subprocess: ~10 s
def test_diloco_trainer_refuses_a_missing_process_group_fsdp_and_deepspeed(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    r = _run_py(f"""
        import types, warnings, torch, torch.distributed as dist
        from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
        from localsgd_comm.integrations import transformers as lt
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        args = TrainingArguments(output_dir={str(tmp_path)!r}, use_cpu=True, report_to="none")
        try:
            lt.DiLoCoTrainer(model=model, args=args, sync_every=4)
        except RuntimeError as exc:
            assert "expected an initialized torch.distributed process group" in str(exc), exc
            assert 'init_process_group("localsgd")' in str(exc), exc
        else:
            raise AssertionError("no error without a process group")
        for bad, word in ((dict(deepspeed="ds.json", fsdp=[]), "DeepSpeed"),
                          (dict(deepspeed=None, fsdp=["full_shard"]), "FSDP")):
            try:
                lt._check_training_args(types.SimpleNamespace(**bad))
            except ValueError as exc:
                assert word in str(exc), exc
            else:
                raise AssertionError(word + " accepted")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            lt.DiLoCoTrainer(model=model, args=args, sync_every=4)
        assert any("not 'localsgd'" in str(x.message) for x in w), [str(x.message) for x in w]
        print("ok")
    """, timeout=180)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def _synced_params_worker(rank, world):
    from localsgd_comm.integrations._common import finish_round, synced_params
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = localsgd_comm.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=3)
    out = {}
    for step in range(4):  # one sync at step 3, then one local step: mid-round
        torch.manual_seed(100 * rank + step)
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    local = [p.detach().clone() for p in model.parameters()]
    with synced_params(opt):
        out["inside"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    out["anchor"] = torch.cat(opt.anchors())
    out["restored"] = all(torch.equal(a, p) for a, p in zip(local, model.parameters()))
    out["synced"] = finish_round(opt)
    out["after_end"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    # per-rank checkpoint files: a missing one and one from another world size are named errors
    import tempfile
    from localsgd_comm.integrations._common import load_rank_state, save_rank_state
    with tempfile.TemporaryDirectory() as d:
        path = save_rank_state(opt, os.path.join(d, f"r{rank}.pt"))
        load_rank_state(opt, path, d, "test")
        out["reloaded"] = torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), out["after_end"])
        try:
            load_rank_state(opt, os.path.join(d, "missing.pt"), d, "test")
        except FileNotFoundError as exc:
            out["missing"] = str(exc)
        blob = torch.load(path, weights_only=False)
        blob["world_size"] = 3
        torch.save(blob, path)
        try:
            load_rank_state(opt, path, d, "test")
        except ValueError as exc:
            out["world"] = str(exc)
    return out


@pytest.mark.slow  # 2 spawned ranks: over 5 s on 2 busy cores
def test_evaluation_sees_the_anchor_and_the_local_parameters_come_back():
    """synced_params (what the Trainer's evaluate and Lightning's validation use): inside, the
    parameters are the anchor of the last sync, bitwise the same on both ranks; after, each
    rank's own parameters, bitwise; finish_round syncs the partial round at the end."""
    outs = run_workers(_synced_params_worker, 2, backend="localsgd", timeout=120)
    for o in outs:
        assert torch.equal(o["inside"], o["anchor"]) and o["restored"] and o["synced"]
    assert torch.equal(outs[0]["inside"], outs[1]["inside"])
    assert torch.equal(outs[0]["after_end"], outs[1]["after_end"])
    assert not torch.equal(outs[0]["after_end"], outs[0]["inside"])
    for o in outs:
        assert o["reloaded"]
        assert "has no DiLoCo state for rank" in o["missing"] and "missing.pt" in o["missing"]
        assert "saved by 3 ranks, this run has 2" in o["world"]


# ------------------------------------------------------------------ end to end: 2 ranks, DDP vs DiLoCo
def _runs(tmp_path_factory, script, ddp_args, diloco_args, resume_args, env=None):
    d = tmp_path_factory.mktemp(os.path.splitext(script)[0])
    path = os.path.join(SCRIPTS, script)
    ddp = launch(d, "ddp", *ddp_args, script=path, timeout=400, env=env)
    full = launch(d, "diloco", "--diloco", *diloco_args, script=path, timeout=400, env=env)
    resumed = launch(d, "resumed", "--diloco", *resume_args, script=path, timeout=400, env=env)
    return ddp, full, resumed


@pytest.mark.slow
def test_hf_trainer_ddp_vs_diloco_and_exact_resume(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ddp, full, resumed = _runs(
        tmp_path_factory, "hf_trainer_train.py", [],
        ["--save-steps", "12", "--output-dir", "out"],                       # H = 8: step 12 is mid-round
        ["--output-dir", "out", "--resume", "out/checkpoint-12"])
    assert_diloco_run(full[0], full[2], ddp[0])
    assert full[0]["diloco"]["syncs"] == 3 and full[0]["global_step"] == 24
    logged = [e for e in full[0]["log_history"] if "diloco_syncs" in e]
    assert logged and logged[-1]["diloco_bytes_sent"] == full[0]["diloco"]["bytes_sent"]
    for r in range(WORLD):
        assert _same(resumed[2][r], full[2][r]), f"rank {r}: resumed run differs from the uninterrupted one"


@pytest.mark.slow
def test_lightning_ddp_vs_diloco_and_exact_resume(tmp_path_factory):
    pytest.importorskip("lightning")
    ddp, full, resumed = _runs(
        tmp_path_factory, "lightning_train.py", ["--ckpt-dir", "ck_ddp"], ["--ckpt-dir", "ck", *SHORT_RUN],
        ["--ckpt-dir", "ck_resumed", "--resume", "ck/epoch=1-step=12.ckpt", *SHORT_RUN])  # H = 8: mid-round
    assert_diloco_run(full[0], full[2], ddp[0])
    assert full[0]["diloco"]["syncs"] == 3 and full[0]["global_step"] == 24
    assert full[0]["logged"]["diloco_syncs"] == 3
    assert "epoch=1-step=12.ckpt.diloco_rank1.pt" in full[0]["ckpts"]
    for r in range(WORLD):
        assert _same(resumed[2][r], full[2][r]), f"rank {r}: resumed run differs from the uninterrupted one"


@pytest.mark.slow
def test_accelerate_loop_ddp_vs_diloco_and_exact_resume(tmp_path_factory):
    pytest.importorskip("accelerate")
    ddp, full, resumed = _runs(
        tmp_path_factory, "accelerate_train.py", [], ["--save-at", "12", "--ckpt-dir", "ck", *SHORT_RUN],
        ["--resume", "ck", "--ckpt-dir", "ck2", *SHORT_RUN])                            # H = 8: step 12 is mid-round
    assert_diloco_run(full[0], full[2], ddp[0])
    # 24 optimizer steps of 2 micro-steps each: syncs count optimizer steps, not micro-steps
    assert full[0]["diloco"]["syncs"] == 3
    assert full[0]["lr"] == ddp[0]["lr"]
    for r in range(WORLD):
        assert _same(resumed[2][r], full[2][r]), f"rank {r}: resumed run differs from the uninterrupted one"


# ------------------------------------------------------------------ examples: the README's diffs, and they run
EX = os.path.join(REPO, "examples")


def _changed_lines(a: str, b: str):
    import difflib
    with open(os.path.join(EX, a)) as f, open(os.path.join(EX, b)) as g:
        diff = list(difflib.unified_diff(f.read().splitlines(), g.read().splitlines(), lineterm="", n=0))
    removed = [l for l in diff if l.startswith("-") and not l.startswith("---")]
    added = [l for l in diff if l.startswith("+") and not l.startswith("+++")]
    return removed, added


@pytest.mark.parametrize("ddp,diloco,most,name", [
    ("hf_trainer_ddp.py", "hf_trainer_diloco.py", 3, "DiLoCoTrainer"),
    ("lightning_ddp.py", "lightning_diloco.py", 2, "DiLoCoStrategy")])
def test_integration_examples_differ_by_few_lines(ddp, diloco, most, name):
    removed, added = _changed_lines(ddp, diloco)
    assert 0 < max(len(removed), len(added)) <= most, (removed, added)
    assert any(name in l for l in added)


@pytest.mark.slow
@pytest.mark.parametrize("script,label,lib", [
    ("hf_trainer_ddp.py", "Trainer", "transformers"), ("hf_trainer_diloco.py", "DiLoCoTrainer", "transformers"),
    ("lightning_ddp.py", "DDPStrategy", "lightning"), ("lightning_diloco.py", "DiLoCoStrategy", "lightning")])
def test_integration_example_runs(script, label, lib):
    pytest.importorskip(lib)
    import re
    env = dict(os.environ, OMP_NUM_THREADS="1", EXAMPLE_STEPS="20")  # 20 steps = one DiLoCo sync
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, os.path.join(EX, script)], env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(rf"^{label}: validation loss (\S+)", r.stdout, re.M)
    assert m, r.stdout[-3000:]
    assert float(m.group(1)) < 5.0  # ln(256) = 5.55 at init: 20 steps must have learned something
