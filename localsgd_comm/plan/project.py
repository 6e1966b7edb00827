"""What this project measured itself: the CPU profile and the small-model scaling study.

Both are fitted from the committed results and stored in ``localsgd_comm/plan_fit.json``
(``python benchmarks/fit_plan.py`` rewrites it; a test checks it is the fit of the results):

* ``CPU_PROFILE``: the costs of gloo and the localsgd backend on this project's 2-core CPU
  machine over shaped 100 Mbit/s and 1 Gbit/s links (``localsgd-bench collectives``): a
  :class:`~localsgd_comm.plan.comm.Profile` named ``cpu-gloo``. It is applied only when the
  user passes ``--profile cpu-gloo`` (or a profile of their own); never to other links or
  devices by default.
* ``PROJECT_STUDY``: DiLoCo's loss gap and token efficiency against DDP for byte-level GPTs of
  0.09M-1.9M parameters, M = 2 and 4, H = 10 and 50, 600 steps (``localsgd-bench scaling``),
  and the critical batch size it measured. The planner uses it for models inside that range,
  where the published laws (35M-10B parameters) say nothing, and shows it next to them.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from . import laws
from .comm import Profile, slow_link_bytes, wire_bytes, HEADER_BYTES, allreduce_time

FIT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plan_fit.json")
with open(FIT_PATH) as _f:
    _FIT = json.load(_f)
CPU_PROFILE: Dict = _FIT["CPU_PROFILE"]
PROJECT_STUDY: Dict = _FIT["PROJECT_STUDY"]
STUDY = "this project's scaling study (benchmarks/results/scaling.json)"


def builtin_profiles() -> Dict[str, Profile]:
    return {CPU_PROFILE["name"]: Profile.from_dict(CPU_PROFILE)}


# ------------------------------------------------------------------------------------------
# the project's study as a convergence source (small models)
# ------------------------------------------------------------------------------------------
def _linear(model: dict, H: float, params: float, workers: int, fmt: str) -> float:
    f = model["format"].get(fmt, model["format"].get("int8", 0.0))
    return (model["intercept"] + model["log10_H"] * math.log10(H) + model["log10_params"] * math.log10(params)
            + model["workers"] * workers + f)


def in_study_range(params: float, study: Optional[dict] = None) -> bool:
    lo, hi = (study or PROJECT_STUDY)["fitted_params_range"]
    return lo <= params <= hi


def study_convergence(params: float, M: int, H: float, tokens: float, fmt: str,
                      study: Optional[dict] = None) -> laws.Convergence:
    """The study's fitted gap and token efficiency. Outside its range the value at the range's
    nearest edge is used and marked out of range."""
    s = study or PROJECT_STUDY
    notes, in_range = [], True
    lo, hi = s["fitted_params_range"]
    h_lo, h_hi = s["fitted_H"]
    m_lo, m_hi = s["fitted_workers"]
    if not (lo <= params <= hi):
        notes.append(f"model outside the study's {lo}-{hi} parameters")
    if not (h_lo <= H <= h_hi):
        notes.append(f"H={H:g} outside the study's {h_lo}-{h_hi}")
    if not (m_lo <= M <= m_hi):
        notes.append(f"{M} replicas outside the study's {m_lo}-{m_hi}")
    if tokens > 10 * s["fitted_tokens_max"]:
        notes.append(f"{tokens:.3g} tokens, over 10x the study's {s['fitted_tokens_max']:.3g}")
    in_range = not notes
    p, h = min(max(params, lo), hi), min(max(H, h_lo), h_hi)
    gap = max(0.0, _linear(s["gap_pct"], h, p, M, fmt))
    eff = min(1.0, math.exp(_linear(s["log_efficiency"], h, p, M, fmt)))
    return laws.Convergence(gap_pct=gap, sd_pct=s["gap_pct"]["residual_sd"], token_efficiency=eff,
                            in_range=in_range, bound=False, source=STUDY, notes=notes)


def study_critical_batch(tokens: float, params: Optional[float], study: Optional[dict] = None) -> Optional[float]:
    """The study's critical batch (tokens per step), within 10x of its tokens and parameter
    range; None elsewhere."""
    s = study or PROJECT_STUDY
    c = s["cbs"]
    if not c.get("points"):
        return None
    lo, hi = s["fitted_params_range"]
    if tokens > 10 * s["fitted_tokens_max"] or (params is not None and not (lo / 10 <= params <= 10 * hi)):
        return None
    return c["ref_batch_tokens"] * (tokens / c["ref_tokens"]) ** c["exponent"]


# ------------------------------------------------------------------------------------------
# fitting (from the committed results)
# ------------------------------------------------------------------------------------------
def _lstsq(rows: List[List[float]], ys: List[float]) -> List[float]:
    import torch
    A = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(A, y, driver="gelsd").solution[:, 0].tolist()


_KEY_OF = {"gloo-fp32": "ring", "localsgd-none": "none", "localsgd-int8": "int8", "localsgd-int4": "int4"}


def _point_args(r: dict, key: str):
    fmt = "none" if key == "ring" else key
    return fmt, ("ring" if key == "ring" else "a2a")


def profile_from_collectives(collectives: dict, name: str = "cpu-gloo") -> dict:
    """A profile from ``localsgd-bench collectives`` results: ``efficiency`` = the mean
    goodput/rate of its link checks; per method, the fixed and per-element cost by relative
    least squares on the shaped-link points (the wire time, exact from the bytes, taken off)."""
    pts = [r for r in collectives["results"] if r.get("rate_mbit")]
    if not pts:
        raise ValueError("profile: the collectives results hold no shaped-link points (they need root and "
                         "network namespaces)")
    checks = collectives.get("link_checks") or []
    eta = sum(c["fraction_of_rate"] for c in checks) / len(checks) if checks else 1.0
    fixed, per_el = {}, {}
    for method, key in _KEY_OF.items():
        rows, ys = [], []
        for r in pts:
            if r["method"] != method:
                continue
            fmt, algo = _point_args(r, key)
            size = wire_bytes(fmt, r["numel"]) + (0 if algo == "ring" else HEADER_BYTES * r["world"])
            t_wire = slow_link_bytes(algo, size, r["world"], 1) / (eta * r["rate_mbit"] * 1e6 / 8)
            w = 1.0 / r["time_s_median"]  # relative: small and large all-reduces count alike
            rows.append([w, w * float(r["numel"])])
            ys.append(w * (r["time_s_median"] - t_wire))
        if rows:
            a, k = _lstsq(rows, ys)
            fixed[key], per_el[key] = float(f"{max(0.0, a):.4g}"), float(f"{max(0.0, k):.4g}")
    prof = Profile(name=name, measured_on="", efficiency=round(eta, 4), fixed_s=fixed, per_element_s=per_el)
    errs = []
    for r in pts:
        key = _KEY_OF[r["method"]]
        fmt, algo = _point_args(r, key)
        pred = allreduce_time(fmt, r["numel"], r["world"], r["rate_mbit"], algorithm=algo, profile=prof)
        errs.append(abs(pred / r["time_s_median"] - 1))
    errs.sort()
    env = collectives.get("environment", {})
    m, v = env.get("machine", {}), env.get("versions", {})
    rates = sorted({r["rate_mbit"] for r in pts})
    worlds = sorted({r["world"] for r in pts})
    sizes = sorted({r["size_mb"] for r in pts})
    on = (f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, torch {v.get('torch', '?')}, gloo and the "
          f"localsgd backend on CPU tensors, shaped {rates[0]:g}-{rates[-1]:g} Mbit/s links (tc tbf), "
          f"{worlds[0]}-{worlds[-1]} ranks, {sizes[0]:g}-{sizes[-1]:g} MB")
    return {"name": name, "measured_on": on, "efficiency": prof.efficiency, "fixed_s": fixed,
            "per_element_s": per_el, "link_mbit_range": [rates[0], rates[-1]],
            "source": f"localsgd-bench collectives, commit {str(env.get('git_commit'))[:10]}",
            "rel_error_median": round(errs[len(errs) // 2], 4), "rel_error_max": round(errs[-1], 4),
            "points": len(errs)}


def profile_from_linkcheck(checks: List[dict], environment: dict, name: str = "linkcheck") -> dict:
    """A profile with only the links' efficiency (mean goodput/rate of ``localsgd-bench
    linkcheck``'s gloo send/recv checks) and no per-call or per-element cost."""
    if not checks:
        raise ValueError("profile: no link checks")
    m, v = environment.get("machine", {}), environment.get("versions", {})
    rates = sorted(c["rate_mbit"] for c in checks)
    eff = sum(c["mbit_s"] / c["rate_mbit"] for c in checks) / len(checks)
    return {"name": name, "efficiency": round(min(1.0, eff), 4), "fixed_s": {}, "per_element_s": {},
            "link_mbit_range": [rates[0], rates[-1]],
            "measured_on": f"{m.get('cpu_model', '?')}, torch {v.get('torch', '?')}, gloo send/recv on shaped "
                           f"{rates[0]:g}-{rates[-1]:g} Mbit/s links (tc tbf)",
            "source": f"localsgd-bench linkcheck, commit {str(environment.get('git_commit'))[:10]}"}


def write_profile(path: str, profile: dict) -> str:
    """Write ``profile`` as JSON for ``localsgd-plan --profile PATH``; returns the path."""
    Profile.from_dict(profile)  # refuse to write what the planner would not read
    with open(path, "w") as f:
        json.dump(profile, f, indent=1, sort_keys=True)
    return path


def _interp_tokens_for_loss(curve: List[dict], loss: float) -> Optional[float]:
    """Tokens at which a (decreasing) loss curve reaches ``loss``, linear in log tokens; None if
    the curve never gets that low."""
    pts = [(c["tokens"], c["val_loss"]) for c in curve]
    if loss >= pts[0][1]:
        return float(pts[0][0])
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if l0 >= loss >= l1 and l0 != l1:
            f = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return None


def fit_convergence(scaling: dict) -> dict:
    """The study's gap (%) and log token efficiency as linear functions of log10 H, log10
    params, the workers and the format; its critical batch at its two token budgets."""
    runs = {r["name"]: r for r in scaling["runs"]}
    fmts = ["none", "int8", "int4"]
    rows, gaps, effs, Hs, Ns, Ms = [], [], [], [], [], []
    for g in scaling["gaps"]:
        ddp = runs.get(f"{g['size']}-ddp-M{g['workers']}-s0")
        dil = next(r for r in scaling["runs"] if r["spec"]["kind"] == "diloco" and r["spec"]["size"] == g["size"]
                   and r["spec"]["workers"] == g["workers"] and r["spec"]["sync_every"] == g["H"]
                   and r["spec"]["format"] == g["format"])
        t = _interp_tokens_for_loss(ddp["val_curve"], g["diloco_loss"])
        eff = 1.0 if t is None else min(1.0, t / dil["tokens"])
        rows.append([1.0, math.log10(g["H"]), math.log10(g["n_params"]), float(g["workers"])] +
                    [1.0 if g["format"] == f else 0.0 for f in fmts[1:]])
        gaps.append(g["gap_pct"])
        effs.append(math.log(max(eff, 1e-3)))
        Hs.append(g["H"]), Ns.append(g["n_params"]), Ms.append(g["workers"])

    def model(ys):
        c = _lstsq(rows, ys)
        res = [y - sum(a * b for a, b in zip(c, r)) for r, y in zip(rows, ys)]
        sd = math.sqrt(sum(e * e for e in res) / max(1, len(ys) - len(c)))
        return {"intercept": round(c[0], 5), "log10_H": round(c[1], 5), "log10_params": round(c[2], 5),
                "workers": round(c[3], 5), "format": {"none": 0.0, "int8": round(c[4], 5), "int4": round(c[5], 5)},
                "residual_sd": round(sd, 5), "points": len(ys)}
    cb = [c for c in scaling["cbs"] if c["critical_batch_tokens"]]
    if len(cb) >= 2:
        (d0, b0), (d1, b1) = ((cb[0]["tokens"], cb[0]["critical_batch_tokens"]),
                              (cb[-1]["tokens"], cb[-1]["critical_batch_tokens"]))
        expo = math.log(b1 / b0) / math.log(d1 / d0)
        # Zhang et al. find growth with data; a fitted shrink (noise at one grid step) is not
        # extrapolated as shrinking: the exponent used is clipped at 0, the fitted one kept
        cbs = {"ref_tokens": d1, "ref_batch_tokens": round(b1, 1), "exponent": round(max(0.0, expo), 3),
               "fitted_exponent": round(expo, 3), "points": len(cb)}
    elif cb:
        cbs = {"ref_tokens": cb[0]["tokens"], "ref_batch_tokens": round(cb[0]["critical_batch_tokens"], 1),
               "exponent": 0.0, "points": 1}
    else:
        cbs = {"ref_tokens": 1.0, "ref_batch_tokens": 1.0, "exponent": 0.0, "points": 0}
    return {"source": "benchmarks/results/scaling.json", "gap_pct": model(gaps), "log_efficiency": model(effs),
            "cbs": cbs, "fitted_params_range": [min(Ns), max(Ns)],
            "fitted_tokens_max": max(r["tokens"] for r in scaling["runs"]), "fitted_H": [min(Hs), max(Hs)],
            "fitted_workers": [min(Ms), max(Ms)]}


def fit_from_results(results_dir: str) -> dict:
    with open(os.path.join(results_dir, "collectives.json")) as f:
        prof = profile_from_collectives(json.load(f))
    with open(os.path.join(results_dir, "scaling.json")) as f:
        study = fit_convergence(json.load(f))
    return {"CPU_PROFILE": prof, "PROJECT_STUDY": study}
