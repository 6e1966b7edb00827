"""The published laws the planner's convergence model uses, each constant with its source.

Every number in this file is copied from a paper's table or text, named next to it; nothing
here is fitted by this project. Where a paper gives a quantity only as a figure, the file says
so and uses no number for it.

* Charles et al. 2025, "Communication-Efficient Language Model Training Scales Reliably and
  Robustly: Scaling Laws for DiLoCo", arXiv 2503.09799v1 (C4, Chinchilla-style decoder-only
  transformers of 35M-2.4B parameters with full sweeps, 4B and 10B to validate, D = 20 N
  tokens, H = 30, AdamW inner and Nesterov outer optimizer, bf16 weights and gradients).
* Douillard et al. 2025, "Streaming DiLoCo with overlapping communication: Towards a
  Distributed Free Lunch", arXiv 2501.18512v1 (C4, 35M-4B, Chinchilla tokens, M = 2 and 4).
* Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
  Models", arXiv 2311.08105v3 (C4, 60M-400M, 8 workers, H = 500).
* Zhang et al. 2024, "How Does Critical Batch Size Scale in Pre-training?", arXiv 2410.21676
  (ICLR 2025; C4, 85M-1.2B, context 512, batch sizes in sequences).
* Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", arXiv 2203.15556
  (the parametric loss fit of its Approach 3).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

CHARLES = "Charles et al. 2025 (arXiv 2503.09799)"
STREAMING = "Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512)"
DILOCO = "DiLoCo (Douillard et al. 2023, arXiv 2311.08105)"
ZHANG = "Zhang et al. 2024 (arXiv 2410.21676)"
HOFFMANN = "Hoffmann et al. 2022 (arXiv 2203.15556)"

# ------------------------------------------------------------------------------------------
# Charles et al. 2025
# ------------------------------------------------------------------------------------------
#: Table 4: evaluation loss of data-parallel training (DP) and DiLoCo with M replicas, H = 30,
#: D = 20 N tokens, each cell at its best hyperparameters. {N: (DP, {M: DiLoCo})}.
TABLE4: Dict[float, Tuple[float, Dict[int, float]]] = {
    35e6: (3.485, {1: 3.482, 2: 3.508, 4: 3.554, 8: 3.621}),
    90e6: (3.167, {1: 3.162, 2: 3.182, 4: 3.213, 8: 3.265}),
    180e6: (2.950, {1: 2.943, 2: 2.957, 4: 2.981, 8: 3.019}),
    335e6: (2.784, {1: 2.777, 2: 2.788, 4: 2.808, 8: 2.841}),
    550e6: (2.653, {1: 2.645, 2: 2.657, 4: 2.673, 8: 2.698}),
    1.3e9: (2.460, {1: 2.451, 2: 2.464, 4: 2.472, 8: 2.493}),
    2.4e9: (2.326, {1: 2.317, 2: 2.323, 4: 2.332, 8: 2.351}),
}
#: Table 5: the 4B and 10B runs with hyperparameters from the scaling laws (M <= 4 only).
TABLE5: Dict[float, Tuple[float, Dict[int, float]]] = {
    4e9: (2.224, {1: 2.219, 2: 2.220, 4: 2.230}),
    10e9: (2.090, {1: 2.086, 2: 2.086, 4: 2.096}),
}
#: Table 7: independent power laws L(N) = A N^alpha for DP ("ddp") and DiLoCo with M replicas.
LOSS_LAW: Dict[object, Tuple[float, float]] = {
    "ddp": (18.129, -0.0953), 1: (18.363, -0.0961), 2: (18.768, -0.0969), 4: (19.762, -0.0992),
    8: (21.051, -0.1018)}
#: Table 8: inner learning rate gamma(N) = A N^alpha for DP; Table 10: joint DiLoCo law
#: gamma(N, M) = A N^alpha M^beta (the paper recommends the joint fit for hyperparameters).
INNER_LR_DP = (16319.2, -0.819)
INNER_LR_JOINT = (22256.0, -0.8827, 0.2929)
#: Table 9: optimal global batch B(N) = A N^alpha. The table does not state the unit (the values
#: are consistent with sequences of 2,048 tokens), so only ratios DiLoCo / DP are used.
BATCH_LAW: Dict[object, Tuple[float, float]] = {
    "ddp": (0.22592, 0.281), 1: (0.01361, 0.435), 2: (0.00769, 0.479), 4: (0.00535, 0.510),
    8: (0.01859, 0.455)}
#: Table 6: Gbit/s to reach a compute utilisation of 50/80/90/95/99%, 10B Chinchilla model, step
#: 0.8 s (the simulator of Streaming DiLoCo; rates on a grid 1.21x apart). Used to check the
#: planner's communication model, not by it.
TABLE6_10B = {"ddp": (104.8, 184.2, 222.3, 222.3, 390.7), 10: (16.0, 49.4, 86.8, 152.6, 222.3),
              50: (3.0, 11.0, 23.3, 41.0, 126.5), 100: (1.4, 6.2, 13.3, 23.3, 86.8), 300: (0.5, 2.0, 4.3, 9.1, 41.0)}
UTILIZATION_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)
#: Figure 7: best outer learning rate (Nesterov, momentum 0.9) at H = 30 from the grid
#: {0.2, ..., 1.0}, the same for every N >= 335M (read from the figure's annotated cells).
#: Figure 8: it grows with H and M (no numbers published).
OUTER_LR_H30 = {1: 0.4, 2: 0.6, 4: 0.6, 8: 0.8}
#: The range the laws were fitted on (Table 3: 35M-2.4B swept; 4B and 10B validated, M <= 4).
N_SWEPT = (35e6, 2.4e9)
N_VALIDATED = (35e6, 10e9)
M_FITTED = (1, 2, 4, 8)
H_LAW = 30
TOKENS_PER_PARAM = 20.0  # D = 20 N (Section 3.1)

# ------------------------------------------------------------------------------------------
# Streaming DiLoCo (Douillard et al. 2025)
# ------------------------------------------------------------------------------------------
#: Table 6: C4 eval loss of Streaming DiLoCo (overlapped FP4 communication, Chinchilla tokens)
#: at (M, H) in {2, 4} x {30, 100}. The planner's H dependence between 30 and 100 comes from it.
STREAMING_TABLE6: Dict[float, Dict[Tuple[int, int], float]] = {
    35e6: {(2, 30): 3.53, (4, 30): 3.60, (2, 100): 3.56, (4, 100): 3.64},
    100e6: {(2, 30): 3.21, (4, 30): 3.25, (2, 100): 3.22, (4, 100): 3.29},
    200e6: {(2, 30): 2.98, (4, 30): 3.02, (2, 100): 3.00, (4, 100): 3.05},
    300e6: {(2, 30): 2.81, (4, 30): 2.84, (2, 100): 2.83, (4, 100): 2.87},
    500e6: {(2, 30): 2.67, (4, 30): 2.70, (2, 100): 2.69, (4, 100): 2.73},
    1e9: {(2, 30): 2.48, (4, 30): 2.50, (2, 100): 2.50, (4, 100): 2.53},
}
#: Table 4: Gbit/s for 50/80/90/95/99% compute utilisation at H = 100, fragments of 3 layers,
#: {(params, layers, step s): {method: rates}} (methods: data-parallel, vanilla DiLoCo,
#: streaming, streaming with overlapped communication, and with overlapped FP4 communication).
#: Used to check the planner's communication model, not by it.
STREAMING_TABLE4 = {
    (1e9, 24, 0.1): {"ddp": (86.8, 152.6, 184.2, 222.3, 569.0), "vanilla": (1.4, 6.2, 13.3, 23.3, 86.8),
                     "streaming": (1.4, 5.2, 9.1, 16.0, 28.1), "overlapped": (1.4, 4.3, 6.2, 9.1, 11.0),
                     "fp4": (0.4, 0.9, 1.7, 2.0, 3.0)},
    (10e9, 48, 0.8): {"ddp": (104.8, 222.3, 222.3, 268.3, 471.5), "vanilla": (1.7, 7.5, 16.0, 33.9, 104.8),
                      "streaming": (1.7, 5.2, 9.1, 13.3, 19.3), "overlapped": (1.7, 3.6, 5.2, 6.2, 7.5),
                      "fp4": (0.4, 0.9, 1.4, 1.4, 1.7)},
    (100e9, 108, 4.9): {"ddp": (184.2, 323.8, 390.7, 390.7, 471.5), "vanilla": (3.0, 11.0, 23.3, 49.4, 184.2),
                        "streaming": (2.4, 6.2, 9.1, 11.0, 19.3), "overlapped": (1.7, 3.6, 4.3, 5.2, 5.2),
                        "fp4": (0.5, 0.9, 1.1, 1.1, 1.4)},
}
#: Section 3.3.2 / Figure 8: overlapping the sync with tau inner steps costs < 0.2% eval loss up
#: to tau = 10 (500M model); the authors advise tau <= 5.
TAU_NO_LOSS = 10
#: Section 2.4 / 3.3.3 / Figure 11: outer gradients down to 4 bits (E3M0) show no regression
#: ("even at the billion scale"); accumulation stays fp32.

# ------------------------------------------------------------------------------------------
# Zhang et al. 2024: critical batch size
# ------------------------------------------------------------------------------------------
#: Section 3.2 / Figure 1: in Chinchilla-optimal training B* = 93.20 N^0.47, N in millions of
#: parameters, B* in sequences of 512 tokens; Section 3.3: at fixed data B* = 621.341 N^0.087,
#: so the growth is attributed to the data (their conclusion). Their Chinchilla token count
#: is 3.072B tokens for the 151M model, 20.3 tokens per parameter.
CBS_COEF_SEQ = 93.20
CBS_EXPONENT = 0.47
CBS_SEQ_TOKENS = 512
CBS_TOKENS_PER_PARAM = 3.072e9 / 151e6
#: Definition 1: B* is the batch with 20% more steps than linear scaling from B_opt (256
#: sequences in their runs). Read through McCandlish et al. (2018)'s S = S_min (1 + B_noise/B),
#: that gives B_noise = 5 B* - 6 B_opt (an assumption of this planner, not the paper's).
CBS_OVERHEAD = 0.2
CBS_B_OPT_TOKENS = 256 * 512
#: Models 85M-1.2B at Chinchilla tokens: 20.3 x 85M .. 20.3 x 1.2B tokens.
CBS_TOKENS_RANGE = (85e6 * 3.072e9 / 151e6, 1.2e9 * 3.072e9 / 151e6)

# ------------------------------------------------------------------------------------------
# Hoffmann et al. 2022: L(N, D) = E + A / N^alpha + B / D^beta (Approach 3)
# ------------------------------------------------------------------------------------------
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


# ------------------------------------------------------------------------------------------
# derived quantities
# ------------------------------------------------------------------------------------------
def _law_gap(N: float, M: int) -> float:
    """Table 7: DiLoCo's loss over DP's, in %, for a fitted M."""
    a, al = LOSS_LAW[M]
    d, dl = LOSS_LAW["ddp"]
    return 100.0 * (a * N ** al / (d * N ** dl) - 1.0)


def _interp_log2(M: float, f) -> float:
    """f at M, linear in log2 M between the fitted replica counts (extrapolated past them)."""
    ms = [m for m in M_FITTED if m >= 2]
    if M in ms:
        return f(M)
    lo = max([m for m in ms if m <= M] or [ms[0]])
    hi = min([m for m in ms if m > lo] or [ms[-1]])
    if lo == hi:
        lo, hi = ms[-2], ms[-1]
    t = (math.log2(M) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return f(lo) + t * (f(hi) - f(lo))


def gap_at_h30(N: float, M: int) -> float:
    """DiLoCo's final-loss gap to DP in % at H = 30 and D = 20 N (Table 7's laws; M between the
    fitted 2, 4, 8 interpolated in log2 M)."""
    if M == 1:
        return _law_gap(N, 1)
    return _interp_log2(M, lambda m: _law_gap(N, m))


def _h_slope(M: int) -> float:
    """% of loss per decade of H between H = 30 and 100: Streaming DiLoCo Table 6, mean over its
    six model sizes."""
    vals = [100.0 * (t[(M, 100)] / t[(M, 30)] - 1.0) for t in STREAMING_TABLE6.values()]
    return sum(vals) / len(vals) / math.log10(100 / 30)


H_SLOPE = {2: _h_slope(2), 4: _h_slope(4)}


def h_slope(M: int) -> float:
    """The H slope for M replicas: Table 6's M = 2 and 4 (M = 3 interpolated in log2 M). Other M
    have no published number: M = 4's is used and the caller marks it extrapolated."""
    if M <= 2:
        return H_SLOPE[2]
    if M >= 4:
        return H_SLOPE[4]
    t = math.log2(M) - 1.0
    return H_SLOPE[2] + t * (H_SLOPE[4] - H_SLOPE[2])


def _table4_residual_sd() -> float:
    res = [gap_at_h30(N, M) - 100.0 * (d[M] / dp - 1.0) for N, (dp, d) in TABLE4.items() for M in (2, 4, 8)]
    return math.sqrt(sum(r * r for r in res) / len(res))


#: RMS difference (percentage points) between the laws' gaps and Table 4's measured ones.
GAP_SD = _table4_residual_sd()


@dataclasses.dataclass
class Convergence:
    """DiLoCo against DDP at equal tokens. ``gap_pct``: final-loss gap in % of DDP's (positive:
    DiLoCo worse); ``bound``: the value is an upper bound (H below 30, or more tokens than the
    law's); ``in_range``: inside the published numbers (otherwise an extrapolation, never
    ranked on); ``token_efficiency``: the fraction of DiLoCo's tokens with which DDP reaches
    DiLoCo's loss."""
    gap_pct: float
    sd_pct: Optional[float]
    token_efficiency: float
    in_range: bool
    bound: bool
    source: str
    notes: List[str] = dataclasses.field(default_factory=list)


def chinchilla_loss(N: float, D: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / N ** c["alpha"] + c["B"] / D ** c["beta"]


def efficiency_from_gap(gap_pct: float, N: float, D: float) -> float:
    """Tokens DDP needs to reach a loss ``gap_pct`` % above its own at ``D`` tokens, over ``D``:
    the data term of Hoffmann et al.'s fit, scaled to the relative gap (loss levels differ
    between their data and C4; only the local slope in D is used). Above 1 for a negative gap."""
    c = CHINCHILLA
    dterm = c["B"] / D ** c["beta"]
    target = dterm + gap_pct / 100.0 * chinchilla_loss(N, D)
    if target <= 0:  # DiLoCo better than DDP could ever get with more data: cap
        return 10.0
    return (c["B"] / target) ** (1.0 / c["beta"]) / D


def published(N: float, M: int, H: float, tokens: float, overlap_steps: float = 0.0) -> Convergence:
    """The published laws for DiLoCo with ``M`` replicas (the quantization format changes
    nothing measurable: Streaming DiLoCo Section 2.4, down to 4 bits)."""
    notes, in_range, bound = [], True, False
    src = [f"{CHARLES} Table 7 (H=30)"]
    hi = N_VALIDATED[1] if M <= 4 else N_SWEPT[1]
    if not (N_SWEPT[0] <= N <= hi):
        in_range = False
        notes.append(f"model of {N:.3g} parameters outside the laws' {N_SWEPT[0]:.3g}-{hi:.3g}")
    if M > 8:
        in_range = False
        notes.append(f"{M} replicas: the laws stop at 8")
    gap = gap_at_h30(N, M)
    if H < 5:
        in_range = False
        notes.append(f"H={H:g}: below the H sweep's numbers (H=1 is the worst there, Charles Fig. 9)")
    elif H < H_LAW:
        bound = True
        notes.append(f"H={H:g} < 30: loss grows with H (Charles Fig. 9), so H=30's gap bounds it")
    elif H > H_LAW:
        gap += h_slope(M) * math.log10(H / H_LAW)
        src.append(f"{STREAMING} Table 6 (H 30-100)")
        if H > 100 or M > 4:
            in_range = False
            notes.append(f"H={H:g} with M={M}: the published H dependence covers H 30-100 at M 2-4")
    d0 = TOKENS_PER_PARAM * N
    if tokens > d0:
        bound = True
        notes.append("more tokens than the laws' 20 per parameter: the gap does not grow with "
                     "overtraining (Charles Fig. 11, Streaming DiLoCo Table 7), so it is a bound")
    elif tokens < d0 / 2:
        in_range = False
        notes.append(f"{tokens / N:.2g} tokens per parameter, under half the laws' 20 (undertrained)")
    if overlap_steps > TAU_NO_LOSS:
        in_range = False
        notes.append(f"sync overlapped with {overlap_steps:g} steps: published up to {TAU_NO_LOSS} "
                     "(Streaming DiLoCo Fig. 8)")
    eff = efficiency_from_gap(gap, N, tokens)
    return Convergence(gap_pct=gap, sd_pct=GAP_SD, token_efficiency=eff, in_range=in_range, bound=bound,
                       source="; ".join(src), notes=notes)


def critical_batch_tokens(tokens: float) -> float:
    """Zhang et al.'s critical batch size in tokens after ``tokens`` tokens of training, with
    the Chinchilla fit's growth attributed to data (their Section 3.3)."""
    n_equiv_millions = tokens / CBS_TOKENS_PER_PARAM / 1e6
    return CBS_SEQ_TOKENS * CBS_COEF_SEQ * n_equiv_millions ** CBS_EXPONENT


def noise_batch_tokens(critical: float) -> float:
    """B_noise of McCandlish et al.'s form from a critical batch defined by a 20% step overhead
    over linear scaling from B_opt (see CBS_OVERHEAD): B_noise = 5 B* - 6 B_opt, or 5 B* where
    B* is not above 1.2 B_opt (outside Zhang et al.'s runs)."""
    k = 1.0 / CBS_OVERHEAD
    b = k * critical - (k + 1.0) * CBS_B_OPT_TOKENS
    return b if b > 0 else k * critical


def batch_ratio(N: float, M: int) -> Optional[float]:
    """DiLoCo's optimal global batch over DP's (Charles Table 9), or None outside the laws
    (35M-10B parameters, M <= 8)."""
    if not (N_VALIDATED[0] <= N <= N_VALIDATED[1]) or M > 8:
        return None

    def ratio(m):
        a, al = BATCH_LAW[m]
        d, dl = BATCH_LAW["ddp"]
        return a * N ** al / (d * N ** dl)
    return ratio(1) if M == 1 else _interp_log2(M, ratio)


def inner_lr(N: float, M: Optional[int]) -> float:
    """Inner AdamW learning rate: Charles Table 8 for DP (``M`` None), Table 10's joint law for
    DiLoCo. Their setup: AdamW (0.9, 0.99), 1000 warm-up steps, cosine decay to 5%, the
    optimal batch, sequences of 2,048 tokens."""
    if M is None:
        a, al = INNER_LR_DP
        return a * N ** al
    a, al, be = INNER_LR_JOINT
    return a * N ** al * M ** be


def outer_lr(M: int) -> Tuple[float, str]:
    """Outer Nesterov learning rate at H = 30 (Charles Fig. 7) and how it was read."""
    if M in OUTER_LR_H30:
        return OUTER_LR_H30[M], f"{CHARLES} Fig. 7 (M={M}, H=30)"
    lower = max(m for m in OUTER_LR_H30 if m <= M)
    return OUTER_LR_H30[lower], f"{CHARLES} Fig. 7 at M={lower}; larger M wants a larger one (no number)"
