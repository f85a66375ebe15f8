#!/usr/bin/env bash
# Where the wall time of a GPU demo preset goes, in one device call:
#
#   bash benchmarks/demo_breakdown_gpu.sh OUTPUT_DIR [PRESET] [TRAIN_STEPS]
#
# 1. `python -m demo.run --preset PRESET` (default gpu) with every output line timed from launch
#    (OUTPUT_DIR/demo.log; its results, training and sampling logs are copied beside it);
# 2. generate.py again on the demo's checkpoint with the demo's own flags plus --no-compile (sample_eager.log);
# 3. train.py again with the demo's own flags for TRAIN_STEPS steps (default 300), compiled as the preset compiles
#    (train_compiled.log) and with --no-compile (train_eager.log), every line timed: start-up and step time.
# Each step is bounded by what is left of BUDGET_S (default 560); the demo's work folder is OUTPUT_DIR/work.
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/demo_breakdown_gpu.sh OUTPUT_DIR [PRESET] [TRAIN_STEPS]}
preset=${2:-gpu}
steps=${3:-300}
budget=${BUDGET_S:-560}
work=$out/work
mkdir -p "$out"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
timed() { local log=$1; shift; timeout --kill-after=5 "$(left)" python benchmarks/timed_lines.py -- "$@" > "$log" 2>&1;
          echo "== $(basename "$log"): exit $? at +$((SECONDS - start))s"; }
# The command a demo log starts with ("$ cd REPO && OMP_NUM_THREADS=1 python ..."), without the cd and the variable.
logged_command() { head -n 1 "$1" | sed -e 's/^\$ cd [^&]*&& //' -e 's/^OMP_NUM_THREADS=[0-9]* //'; }

timed "$out/demo.log" python -m demo.run --preset "$preset" --workdir "$work" --overwrite
grep -E "done in|wall time|^\[.*\] (all|seen|held_out) " "$out/demo.log" | sed 's/^/   /'
cp "$work/demo_results.json" "$work/logs/train.log" "$work/logs/sample_all.log" "$out/" 2>/dev/null

ckpt=$(ls -d "$work"/exps/shapes/checkpoints/[0-9]* 2>/dev/null | tail -n 1)
if [ -n "$ckpt" ]; then
    eval "set -- $(logged_command "$work/logs/sample_all.log")"
    timed "$out/sample_eager.log" "$@" --name all_eager --no-compile
    grep -E "wrote|exit code" "$out/sample_eager.log" | sed 's/^/   /'
fi
if [ -f "$work/logs/train.log" ]; then
    eval "set -- $(logged_command "$work/logs/train.log")"
    common=("$@" --max-train-steps "$steps" --checkpointing-steps "$steps" --log-every 50)
    timed "$out/train_compiled.log" "${common[@]}" --exp-name timed_compiled
    timed "$out/train_eager.log" "${common[@]}" --exp-name timed_eager --no-compile
    grep -hE "parameters|^\[ *[0-9.]+s\] step [0-9]+:|done at" "$out/train_compiled.log" "$out/train_eager.log" \
        | cut -c1-160 | sed 's/^/   /'
fi
echo "== total $((SECONDS - start))s"
