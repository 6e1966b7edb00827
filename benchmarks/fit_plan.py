"""Refit the planner's constants from the committed results and write localsgd_comm/plan_fit.json.

    python benchmarks/fit_plan.py            # fit, write, print
    python benchmarks/fit_plan.py --check    # exit 1 when plan_fit.json is not the current fit

Communication: benchmarks/results/collectives.json (``localsgd-bench collectives``).
Convergence: benchmarks/results/scaling.json (``localsgd-bench scaling``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare only; write nothing")
    a = ap.parse_args()
    from localsgd_comm import plan
    fit = plan.fit_from_results(os.path.join(ROOT, "benchmarks", "results"))
    text = json.dumps(fit, indent=1, sort_keys=True) + "\n"
    if a.check:
        with open(plan._FIT_PATH) as f:
            same = json.load(f) == fit
        print("plan_fit.json is the fit of benchmarks/results" if same else "plan_fit.json is out of date")
        return 0 if same else 1
    with open(plan._FIT_PATH, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
