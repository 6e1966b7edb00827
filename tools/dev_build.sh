#!/usr/bin/env bash
# Developer build: compiles localsgd_comm._C in place (incremental, ninja). Serialized with a
# lock so that several shells can call it at once. Usage: tools/dev_build.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
exec flock /tmp/localsgd_comm_build.lock env MAX_JOBS=2 "$PY" setup.py -q build_ext --inplace
