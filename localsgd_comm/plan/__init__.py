"""Planner: DDP or DiLoCo, how many workers, which H, format and fragments for a user's model,
tokens and links (``localsgd-plan``).

Two models, each from first principles or from published results, never from a fit of one
machine applied silently to another:

* **Communication** (:mod:`.comm`): the bytes each algorithm moves (ring, all-to-all +
  all-gather, hierarchical, streaming fragments) over the user's links, ``bytes / (efficiency x
  rate) + rounds x latency``, plus per-call and per-element costs only from a profile the
  user measured (:class:`Profile`, ``--profile``).
* **Convergence** (:mod:`.laws`): DiLoCo's loss gap to DDP from Charles et al. 2025's scaling
  laws (35M-10B parameters, M <= 8, H = 30) with the H dependence of Streaming DiLoCo (H 30-100),
  the quantization and overlap results of Streaming DiLoCo, Zhang et al. 2024's critical batch
  size and Hoffmann et al. 2022's data term to turn a gap into tokens. For models inside this
  project's own scaling study (0.09M-1.9M parameters) its measurements are used
  (:mod:`.project`). Outside both the plan says so and does not rank on the number.

:func:`recommend` predicts every candidate and picks the fastest to DDP's loss;
:func:`predict` predicts one. ``docs/planner.md`` lists every constant with its source.
"""
from .comm import FORMATS, IDEAL, LIBRARY_FORMATS, Profile, allreduce_time, load_profile, slow_link_bytes, wire_bytes
from .inputs import Candidate, Job, Network, Options
from .laws import Convergence
from .model import (Prediction, bandwidth_for_utilization, critical_batch, h_for_comm_share, learning_rates, memory,
                    predict)
from .project import CPU_PROFILE, FIT_PATH, PROJECT_STUDY, fit_convergence, fit_from_results, profile_from_collectives
from .recommend import Plan, recommend
from .cli import main

#: Earlier names of the fitted constants (the CPU profile and the project's study).
COMM_FIT = CPU_PROFILE
CONVERGENCE_FIT = PROJECT_STUDY

__all__ = ["Job", "Network", "Candidate", "Options", "Profile", "Prediction", "Plan", "Convergence", "predict",
           "recommend", "allreduce_time", "slow_link_bytes", "wire_bytes", "critical_batch",
           "bandwidth_for_utilization", "h_for_comm_share", "learning_rates", "memory", "load_profile",
           "profile_from_collectives", "fit_convergence", "fit_from_results", "FORMATS", "LIBRARY_FORMATS", "IDEAL",
           "CPU_PROFILE", "PROJECT_STUDY", "COMM_FIT", "CONVERGENCE_FIT", "FIT_PATH", "main"]
