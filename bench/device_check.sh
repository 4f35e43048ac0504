#!/usr/bin/env bash
# The GPU checks, as one command for a session that is lent the device (its image has nvcc, torch with CUDA,
# pytest, hypothesis, numpy and tqdm, and no network): build with CUDA, install the carried peers, run the CUDA
# tests and the GPU benchmarks, and leave the logs and a tarball of the result tables in $OUT (8 files: what the
# device tool brings back at most).
#
#   run(command="bash bench/device_check.sh", carry=["bench/.peers"], timeout_s=600)
#
# bench/.peers (ignored) holds the peers' sources, fetched on a machine with network access:
#   traker-0.3.2.tar.gz (`pip download --no-deps traker==0.3.2 -d bench/.peers`) and fast_jl-0.1.3.tar.gz (its
#   sdist from PyPI; pip download cannot, since its metadata step needs CUDA torch). Steps have time limits that
#   add up to 9 minutes; a step that fails or times out is logged and the next one runs.
set -uo pipefail
OUT=${OUT:-/tmp/attrprims-device-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
STARTED=$(date +%s)
STAMP=$(mktemp)  # result tables written after this are the ones to bring back

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.log, a status line on stdout
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$(( $(date +%s) - STARTED )) s] $name: exit $rc in $(( SECONDS - t0 )) s"
  tail -n 4 "$OUT/$name.log"
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step build 150 env CUDAARCHS=90 ATTRPRIMS_CUDA=ON \
  python3 -m pip install --no-build-isolation --no-deps -e .
step traker 20 python3 -m pip install --no-build-isolation --no-deps bench/.peers/traker-0.3.2.tar.gz
step fast_jl 80 python3 -m pip install --no-build-isolation --no-deps bench/.peers/fast_jl-0.1.3.tar.gz
step pytest-cuda 110 python3 -m pytest -m cuda -q -p no:cacheprovider
step bench-projection 60 python3 bench/bench_projection.py --device cuda --quick
step bench-featurize 90 python3 bench/bench_featurize.py --device cuda --repeat 2
step bench-grads 30 python3 bench/bench_grads.py --device cuda --models cnn --variants bdef
tar czf "$OUT/results.tgz" $(find bench/results -type f -newer "$STAMP") 2>/dev/null
echo "done in $(( $(date +%s) - STARTED )) s; results: $(tar tzf "$OUT/results.tgz" 2>/dev/null | tr '\n' ' ')"
