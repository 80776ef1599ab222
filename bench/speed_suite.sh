#!/usr/bin/env bash
# The X2 speed and compile-time suite behind BENCHMARKS.md (Training, items 6-7, and the `:ref64` / default-run
# tables), one case after the other on one GPU (timings are only comparable when nothing else uses it).
#
#   bash bench/speed_suite.sh OUT_DIR [case ...]
#
# cases (default: all, in this order):
#   field        bench/field.py, 200k points, the time-plane line kernel's two variants (X2GS_LINE_KERNEL)
#   step         bench/train_speed.py x2 200k / 512²: today's defaults, the in-step cond (--no-static-phases),
#                the fused decoder heads (X2GS_DECODER=fused), the time lines materialised before their gathers
#                (X2GS_TIME_LINE_BARRIER=1), 150k / 96² (issue 18's second case), 200k / 256² (the default run's
#                detector), and XLA's
#                GEMM autotuning off (compile time against step time)
#   profile      bench/profile_step.py x2 200k / 512² (the default step), with the optimised HLO and the four
#                slowest fusions' bodies; the same with X2GS_TIME_LINE_BARRIER=1
#   ref64        train.py :ref64 + eval.py (bench/x2_runs.sh), then train.py alone with train.background_compile
#                and model.initial_capacity_factor=5.1 (one static-stage compilation less), and that once more on
#                the same compilation cache (the repeated run's compile time)
#   ref64bg      ref64's last two runs only
#   default      train.py (the default 128³ run) + eval.py
#   defaultbg    train.py (the default run) alone with train.background_compile and initial_capacity_factor=5.1
#   ref64plain   train.py :ref64 with the shipped defaults only (no buffer sizing flag), twice on one compilation
#                cache (cold, then repeated)
#   defaultplain train.py (the default run) with the shipped defaults only
#   trained      the fine step (periodic phase) on the trained Gaussians of defaultbg's run (or $TRAINED_EXPORT), timed
#                (today's defaults; the reference's 3σ tile rectangles, X2GS_PAIR_RECT=upstream) and profiled
# Environment variables pass through (e.g. X2GS_DECODER=fused bash bench/speed_suite.sh OUT ref64bg).
# H200 device time (2026-12-04 figures): field ~1 min, step ~6 min, profile ~2 min, ref64 ~8 min, ref64bg ~4 min,
# default ~8 min, defaultbg ~6.5 min, trained ~1.5 min,
# ref64plain ~4 min, defaultplain ~6.5 min.
# Every case gets its own empty compilation cache (X2GS_COMPILE_CACHE), so each first call compiles cold.
# Results: OUT_DIR/*.json, *.log and OUT_DIR/runs/<case>/ (bench/x2_runs.sh's copies).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/speed_suite.sh OUT_DIR [case ...]}
shift
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(field step profile ref64 default)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cc=$(mktemp -d)  # the per-case compilation caches
bc=${BENCH_CACHE:-runs/bench_cache}  # bench/train_speed.py's phantoms

ts() {  # name, env assignments..., -- train_speed.py arguments...
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env X2GS_COMPILE_CACHE="$cc/$name" "${envs[@]}" python bench/train_speed.py --model x2 --repeats 5 --cache "$bc" \
    --json "$out/ts_$name.json" "$@" > "$out/ts_$name.log" 2>&1 || echo "ts $name failed"
  python - "$out/ts_$name.json" "$name" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))[0]
print(f"{sys.argv[2]}: {r['ms_per_it']:.2f} ms/it, first call {r['first_call_s']:.1f} s, peak {r['peak_gib']:.2f} GiB")
PY
}

trainrun() {  # config variant ("" = default), name, cache name, extra train.py flags: one training run alone (its
  # own final evaluation gives PSNR3D)
  local v=${1:-default} w="runs/speed_${1:-default}_$2"
  rm -rf "$w"
  X2GS_COMPILE_CACHE="$cc/$3" python train.py --config=configs/x2_gaussian.py${1:+:$1} --workdir="$w" \
    $4 > "$out/${v}_$2.train.log" 2>&1 || echo "$v $2 failed"
  cp "$w/metrics.jsonl" "$out/${v}_$2.metrics.jsonl" 2>/dev/null
  grep -o "time per phase.*" "$out/${v}_$2.train.log"
}
r64() { trainrun ref64 "$@"; }
BG="--config.train.background_compile=true --config.model.initial_capacity_factor=5.1"

for c in "${cases[@]}"; do
  echo "== $c $(date +%T)"
  case $c in
    field)
      for lk in dot reduce; do
        X2GS_LINE_KERNEL=$lk python bench/field.py --gaussians 200000 --modes kernel --json "$out/field_$lk.json" \
          > "$out/field_$lk.log" 2>&1 || echo "field $lk failed"
        grep "fwd+bwd" "$out/field_$lk.log"
      done ;;
    step)
      ts default -- --gaussians 200000 --detector 512
      ts cond -- --gaussians 200000 --detector 512 --no-static-phases
      ts fused_decoder X2GS_DECODER=fused -- --gaussians 200000 --detector 512
      ts line_barrier X2GS_TIME_LINE_BARRIER=1 -- --gaussians 200000 --detector 512
      ts small96 -- --gaussians 150000 --detector 96
      ts d256 -- --gaussians 200000 --detector 256
      ts autotune0 XLA_FLAGS=--xla_gpu_autotune_level=0 -- --gaussians 200000 --detector 512 ;;
    trained)  # the fine step on the Gaussians of the defaultbg run (run that case first), timed and profiled
      ex=${TRAINED_EXPORT:-runs/speed_default_background_cap5/export}
      ts trained -- --trained "$ex" --gaussians 0
      ts trained_upstream_rect X2GS_PAIR_RECT=upstream -- --trained "$ex" --gaussians 0
      X2GS_COMPILE_CACHE="$cc/trained" python bench/profile_step.py --trained "$ex" --hlo auto \
        > "$out/profile_trained.log" 2>&1 || echo "profile (trained) failed"
      head -34 "$out/profile_trained.log" ;;
    profile)
      X2GS_COMPILE_CACHE="$cc/profile" python bench/profile_step.py --model x2 --gaussians 200000 --detector 512 \
        --size 128 --cache "$bc" --hlo auto --hlo-dump "$out/step.hlo" > "$out/profile.log" 2>&1 || echo "profile failed"
      head -20 "$out/profile.log"
      X2GS_TIME_LINE_BARRIER=1 X2GS_COMPILE_CACHE="$cc/profile_barrier" python bench/profile_step.py --model x2 \
        --gaussians 200000 --detector 512 --size 128 --cache "$bc" --hlo auto > "$out/profile_barrier.log" 2>&1 \
        || echo "profile (barrier) failed"
      head -12 "$out/profile_barrier.log" ;;
    ref64)  # eval.py on the first; then twice with both changes, the second on the first's compilation cache
      X2GS_COMPILE_CACHE="$cc/r64" bash bench/x2_runs.sh "$out/runs" ref64
      r64 background_cap5 bgcap "$BG"
      r64 background_cap5_repeat bgcap "$BG" ;;
    ref64bg)  # the last two of ref64 only
      r64 background_cap5 bgcap "$BG"
      r64 background_cap5_repeat bgcap "$BG" ;;
    default)
      X2GS_COMPILE_CACHE="$cc/default" bash bench/x2_runs.sh "$out/runs" default ;;
    defaultbg)  # the default run alone (train.py), background compile with the first buffers sized
      trainrun "" background_cap5 defbg "$BG" ;;
    ref64plain)  # what a user gets: no flags; the second run on the first's compilation cache
      r64 plain r64plain ""
      r64 plain_repeat r64plain "" ;;
    defaultplain)
      trainrun "" plain defplain "" ;;
    *) echo "unknown case $c" >&2 ;;
  esac
done
rm -rf "$cc"
echo "== done $(date +%T)"
