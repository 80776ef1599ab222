#!/usr/bin/env bash
# The X2 / PhysX end-to-end runs behind README "Measured results" and BENCHMARKS.md, one after the other (timings
# are only comparable when nothing else uses the GPU): train.py, then eval.py, for each named case.
#
#   bash bench/x2_runs.sh OUT_DIR [case ...]      cases: ref64 ref64_irregular default physx_ref64
#                                                 physx_ref64_irregular physx_default boosted_ref64
#                                                 boosted_ref64_irregular boosted_ref64_noise0.15
#                                                 boosted_ref64_sparse50 boosted_default ref64_noise0.15
#                                                 ref64_sparse50 (default: the first three); a suffix _s<N> sets
#                                                 config.seed=N (e.g. boosted_ref64_s1)
#   PARALLEL=1 bash bench/x2_runs.sh OUT_DIR ...  quality runs: every case at once on one GPU (timings not comparable)
#   GEN_ONLY=1 bash bench/x2_runs.sh OUT_DIR ...  only generate and cache the cases' phantoms and initial points
#   X2_FLAGS="--config.train.static_phases=true" bash bench/x2_runs.sh OUT_DIR ...   extra train.py flags, every case
#
# Each case writes runs/<case>/ (checkpoints, export, metrics.jsonl with the `timing` record) and copies
# metrics.jsonl, eval/metrics.json (with the phases of cycles 0, 5, 10 and 19), tidal.csv and the pictures to
# OUT_DIR/<case>/. The phantoms are generated first (cached; see configs/common.py data.cache_dir / $X2GS_CACHE),
# so data generation is not in the timings.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/x2_runs.sh OUT_DIR [case ...]}
shift
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(ref64 ref64_irregular default)
mkdir -p "$out"

robust_path() {  # the robustness pickle of a case (noise0.15 / sparse50 of the regular :ref64 phantom)
  local base
  base=$(python - --config=configs/x2_gaussian.py:ref64 <<'PY'
import sys
sys.path.insert(0, ".")
from ml_collections import config_flags
from absl import flags
from x2gs_jax import train_lib
cfg = config_flags.DEFINE_config_file("config")
flags.FLAGS(["gen"] + sys.argv[1:])
print(train_lib.resolve_case_path(cfg.value))
PY
)
  case $1 in
    *noise0.15*) echo "${base%.pickle}_noise0.15.pickle" ;;
    *sparse50*) echo "${base%.pickle}_sparse50.pickle" ;;
  esac
}

flags() {  # the train.py flags of a case (a trailing _s<N>: config.seed=N)
  local c=$1 seed=""
  if [[ $c =~ ^(.*)_s([0-9]+)$ ]]; then c=${BASH_REMATCH[1]}; seed=" --config.seed=${BASH_REMATCH[2]}"; fi
  echo "$(case_flags "$c")$seed${X2_FLAGS:+ $X2_FLAGS}"
}

case_flags() {
  case $1 in
    ref64) echo "--config=configs/x2_gaussian.py:ref64" ;;
    ref64_irregular) echo "--config=configs/x2_gaussian.py:ref64 --config.data.phantom.breathing=irregular" ;;
    default) echo "--config=configs/x2_gaussian.py" ;;
    physx_ref64) echo "--config=configs/physx.py:ref64" ;;
    physx_ref64_irregular) echo "--config=configs/physx.py:ref64 --config.data.phantom.breathing=irregular" ;;
    physx_default) echo "--config=configs/physx.py" ;;
    boosted_ref64) echo "--config=configs/physx_boosted.py:ref64" ;;
    boosted_ref64_irregular) echo "--config=configs/physx_boosted.py:ref64 --config.data.phantom.breathing=irregular" ;;
    boosted_default) echo "--config=configs/physx_boosted.py" ;;
    boosted_ref64_noise0.15|boosted_ref64_sparse50) echo "--config=configs/physx_boosted.py:ref64 --config.data.path=$(robust_path "$1")" ;;
    ref64_noise0.15|ref64_sparse50) echo "--config=configs/x2_gaussian.py:ref64 --config.data.path=$(robust_path "$1")" ;;
    *) echo "unknown case $1" >&2; return 1 ;;
  esac
}

for c in "${cases[@]}"; do  # the robustness sets of the :ref64 phantom (written once, with their init points)
  case $c in
    *noise0.15*|*sparse50*)
      p=$(robust_path "$c"); base=$(robust_path ref64_noise0.15); base=${base%_noise0.15.pickle}.pickle
      GEN_ONLY=1 bash "$0" "$out" ref64 > /dev/null || exit 1
      if [ ! -e "$p" ]; then
        if [[ $c == *noise0.15* ]]; then how="--phase_noise=0.15"; else how="--view_ratio=0.5"; fi
        python -m x2gs_jax.data.robustness --data="$base" $how --generate_init || exit 1
      fi ;;
  esac
done

for c in "${cases[@]}"; do  # generate (and cache) every phantom + initial point cloud before timing anything
  python - $(flags "$c") <<'PY' || exit 1
import sys
sys.path.insert(0, ".")
from ml_collections import config_flags
from absl import flags
from x2gs_jax import train_lib
from x2gs_jax.data.naf import load_case
cfg = config_flags.DEFINE_config_file("config")
flags.FLAGS(["gen"] + sys.argv[1:])
path = train_lib.resolve_case_path(cfg.value)
train_lib.initial_points(path, load_case(path), cfg.value)
print(path)
PY
done

[ -n "${GEN_ONLY:-}" ] && exit 0

run_case() {
  local c=$1
  rm -rf "runs/$c"
  echo "== $c: train $(date +%T)"
  python train.py --workdir="runs/$c" $(flags "$c") > "$out/$c.train.log" 2>&1 || { echo "$c: train.py failed"; return; }
  grep -o "time per phase.*" "$out/$c.train.log"
  echo "== $c: eval $(date +%T)"
  python eval.py --workdir="runs/$c" --cycles=0,5,10,19 > "$out/$c.eval.log" 2>&1 || echo "$c: eval.py failed"
  mkdir -p "$out/$c"
  cp "runs/$c/metrics.jsonl" "$out/$c/" 2>/dev/null
  cp runs/"$c"/eval/*.json runs/"$c"/eval/*.csv runs/"$c"/eval/*.png runs/"$c"/eval/*.gif "$out/$c/" 2>/dev/null
  echo "== $c: done $(date +%T)"
}

for c in "${cases[@]}"; do
  if [ -n "${PARALLEL:-}" ]; then run_case "$c" & else run_case "$c"; fi
done
wait
echo "== done $(date +%T)"
