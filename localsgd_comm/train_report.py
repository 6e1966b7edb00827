"""What ``localsgd-train`` writes: the summary table on stdout, ``metrics.json`` and ``loss.png``,
and the time a run's bytes would take on slower links (see :mod:`localsgd_comm.train`)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

__all__ = ["summary_table", "write_outputs", "link_estimates"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _ddp_bytes(r: dict) -> int:
    """Exactly what plain DDP sends per rank for this run's steps: one fp32 ring all-reduce of
    every gradient per step."""
    from .backend import ddp_bytes_per_rank
    return ddp_bytes_per_rank(r["params"], r["config"]["steps"], r["workers"])


def summary_table(results: List[dict]) -> str:
    head = f"{'':22}" + "".join(f"{r['mode']:>18}" for r in results)
    rows = [
        ("validation loss", lambda r: f"{r['final_val_loss']:.4f}"),
        ("tokens", lambda r: f"{r['tokens']:,}"),
        ("bytes sent / rank", lambda r: _fmt_bytes(r["bytes_sent_per_rank"])),
        ("plain DDP would send", lambda r: _fmt_bytes(_ddp_bytes(r))),
        ("  ratio", lambda r: f"{_ddp_bytes(r) / max(r['bytes_sent_per_rank'], 1):.1f}x less"
         if r["bytes_sent_per_rank"] < _ddp_bytes(r) else "1.0x"),
        ("wall time (train)", lambda r: f"{r['wall_s']:.1f} s"),
        ("syncs", lambda r: "-" if r["syncs"] is None else str(r["syncs"])),
    ]
    clustered = [r for r in results if r.get("topology", "flat") != "flat"]
    if clustered:
        # the slow link (across clusters) and the fast one (inside a cluster), after "bytes sent / rank"
        rows[3:3] = [
            ("  across clusters", lambda r: _fmt_bytes(r.get("cross_cluster_bytes_per_rank", r["bytes_sent_per_rank"]))),
            ("  inside clusters", lambda r: "-" if r.get("intra_cluster_bytes_per_rank") is None
             else _fmt_bytes(r["intra_cluster_bytes_per_rank"])),
        ]
    lines = [head] + [f"{name:22}" + "".join(f"{fn(r):>18}" for r in results) for name, fn in rows]
    srcs = sorted({r["bytes_source"] for r in results})
    lines.append(f"(bytes: {', '.join(srcs)}; params {results[0]['params']:,}, workers {results[0]['workers']})")
    for r in clustered:
        inside = "FSDP2 shards the model" if r["topology"] == "fsdp" else "DDP all-reduces fp32 gradients every step"
        lines.append(f"({r['mode']}: {r['clusters']} clusters of {r['cluster_size']} workers; inside a cluster "
                     f"{inside}, DiLoCo syncs across clusters)")
    return "\n".join(lines)


_COLORS = {"diloco": "tab:blue", "ddp": "tab:orange", "ddp-localsgd": "tab:green"}


def _describe(r: dict) -> str:
    c = r["config"]
    if r["mode"] == "diloco":
        topo = r.get("topology", "flat")
        where = "" if topo == "flat" else f", {r['clusters']}x{r['cluster_size']} {'FSDP2' if topo == 'fsdp' else 'DDP'}"
        return f"DiLoCo {c['compression']}, H={c['sync_every']}{where}"
    return "DDP fp32 (gloo)" if r["mode"] == "ddp" else "DDP over localsgd (compressed gradients)"


def write_outputs(results: List[dict], out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, "metrics.json")
    with open(jpath, "w") as f:
        json.dump({"runs": results}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for r in results:
        recs = r["records"]
        ev = [x for x in recs if "val_loss" in x]
        color = _COLORS.get(r["mode"], None)
        style = "-" if r["mode"] == "diloco" else "--"  # baselines dashed: the reference curves
        lab = _describe(r)
        for ax, key, scale in ((axes[0], "step", 1.0), (axes[1], "wall_s", 1.0), (axes[2], "bytes_sent", 2.0**-20)):
            # the log-scale bytes axis cannot show the steps before the first byte was sent
            rs = [x for x in recs if key != "bytes_sent" or x[key] > 0]
            es = [x for x in ev if key != "bytes_sent" or x[key] > 0]
            ax.plot([x[key] * scale for x in rs], [x["loss"] for x in rs], style, color=color, alpha=0.35, lw=1)
            ax.plot([x[key] * scale for x in es], [x["val_loss"] for x in es], "o" + style, color=color,
                    label=f"{lab} (validation)")
    c0 = results[0]["config"]
    fig.suptitle(f"localsgd-train: {results[0]['workers']} workers, {c0['model_size']} GPT "
                 f"({results[0]['params']:,} params), {c0['steps']} steps, batch {c0['batch_size']}x{c0['seq_len']} "
                 "per worker; faint lines: training loss per step", fontsize=10)
    titles = ("loss per step", "loss against training wall time (loopback: no network cost)",
              "loss against bytes sent per rank")
    for ax, title, xl in zip(axes, titles, ("step", "wall time (s)", "MiB sent per rank (log)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[2].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    ppath = os.path.join(out_dir, "loss.png")
    fig.savefig(ppath, dpi=90)
    plt.close(fig)
    return {"metrics": jpath, "plot": ppath}


def link_estimates(results: List[dict], rates_mbit=(10, 1000)) -> str:
    """What the measured bytes would cost on slower links: this run's training time plus its
    bytes at the link rate (an estimate; ``localsgd-bench time-to-loss`` measures it)."""
    lines = []
    for rate in rates_mbit:
        parts = []
        for r in results:
            # clustered runs: only the bytes across clusters take the slow link
            t = r["wall_s"] + r.get("cross_cluster_bytes_per_rank", r["bytes_sent_per_rank"]) * 8 / (rate * 1e6)
            parts.append(f"{r['mode']} ~{t:.0f} s")
            if r["mode"] == "diloco" and not any(x["mode"] == "ddp" for x in results):
                t_ddp = r["wall_s"] + _ddp_bytes(r) * 8 / (rate * 1e6)
                parts.append(f"plain DDP ~{t_ddp:.0f} s ({t_ddp / t:.1f}x longer)")
        label = f"{rate / 1000:g} Gbit/s" if rate >= 1000 else f"{rate} Mbit/s"
        lines.append(f"  on a {label} link: " + ", ".join(parts))
    slow = " (clusters: the bytes across clusters)" if any(r.get("topology", "flat") != "flat" for r in results) else ""
    return ("what these bytes would cost on real links (estimate: the measured training time plus the bytes "
            f"sent at the link rate{slow}):\n" + "\n".join(lines) +
            "\n  this run used loopback, which shows no network cost; `localsgd-bench time-to-loss` measures "
            "DiLoCo against DDP on shaped links")


# ---------------------------------------------------------------------------------------- CLI
