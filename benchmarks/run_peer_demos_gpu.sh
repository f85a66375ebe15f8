#!/usr/bin/env bash
# The GPU demo presets of the peer systems, one after the other, within one 10-minute device call:
#
#   bash benchmarks/run_peer_demos_gpu.sh OUTPUT_DIR [PRESET ...]
#
# PRESETs default to dit-gpu lightningdit-gpu uvit-gpu uvit-text-gpu ddpm-gpu ldm-gpu, each sized to about 1.5
# minutes on one H100 (demo/run.py). Each runs `python -m demo.run --preset P --workdir OUTPUT_DIR/P`; as it ends
# its scores and wall time are printed, and at the end one table of all (also OUTPUT_DIR/summary.txt).
# BUDGET_S (default 570) bounds the whole script: a preset still running at the budget is stopped and the rest are
# skipped, so that the call returns with what finished. After each preset its dataset and checkpoints are deleted
# (KEEP_RUNS=1 keeps them); the logs, sample grids, samples (.npz) and demo_results.json stay.
# DEMO_ARGS adds demo.run flags to every preset (e.g. DEMO_ARGS="--steps 300"; on a CPU, to check the script:
# DEMO_ARGS="--steps 2 --num-images 240 --resolution 32 --batch-size 8 --sample-steps 2 --images-per-prompt 1
# --num-prompts 2 --num-workers 0 --mixed-precision no").
# The U-Net presets need diffusers: when it is missing, DIFFUSERS_WHEEL=path/to/diffusers-*.whl is installed
# (pip --no-deps), else they are skipped. The DiT, LightningDiT and U-ViT presets do not import diffusers.
set -u
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/run_peer_demos_gpu.sh OUTPUT_DIR [PRESET ...]" >&2
    exit 2
fi
out=$1
shift
presets=${*:-dit-gpu lightningdit-gpu uvit-gpu uvit-text-gpu ddpm-gpu ldm-gpu}
budget=${BUDGET_S:-570}
mkdir -p "$out"

if ! python -c "import diffusers" 2>/dev/null && [ -n "${DIFFUSERS_WHEEL:-}" ]; then
    python -m pip install --quiet --no-deps "$DIFFUSERS_WHEEL" || echo "could not install $DIFFUSERS_WHEEL"
fi
has_diffusers=$(python -c "import diffusers" 2>/dev/null && echo yes || echo no)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'

start=$SECONDS
ran=""
for preset in $presets; do
    case $preset in
        ddpm-*|ldm-*) if [ "$has_diffusers" = no ]; then
                          echo "== $preset: skipped (diffusers is not installed; set DIFFUSERS_WHEEL)"; continue
                      fi ;;
    esac
    left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
        echo "== $preset: skipped (${left}s of the ${budget}s budget left)"
        continue
    fi
    echo "== $preset: started at +$((SECONDS - start))s (at most ${left}s)"
    began=$SECONDS
    # shellcheck disable=SC2086  # DEMO_ARGS is a list of flags
    timeout --kill-after=10 "$left" python -m demo.run --preset "$preset" --workdir "$out/$preset" --overwrite \
        ${DEMO_ARGS:-} > "$out/$preset.log" 2>&1
    status=$?
    echo "== $preset: exit code $status after $((SECONDS - began))s"
    if [ "$status" -eq 0 ]; then
        sed -n '/^Caption alignment/,$p' "$out/$preset.log"
        ran="$ran $preset"
    else
        tail -n 15 "$out/$preset.log"
    fi
    if [ "${KEEP_RUNS:-0}" != 1 ]; then
        rm -rf "$out/$preset/data" "$out/$preset/exps"
    fi
done

echo "== total $((SECONDS - start))s"
python - "$out" $ran <<'EOF' | tee "$out/summary.txt"
import json
import sys
from pathlib import Path

out, presets = Path(sys.argv[1]), sys.argv[2:]
print(f"{'preset':<18} {'wall':>7} {'train':>7} {'steps':>6} {'colour':>7} {'shape':>7} {'size':>7} {'position':>8} "
      f"{'all':>7}")
for preset in presets:
    result = json.loads((out / preset / "demo_results.json").read_text())
    scores, seconds = result["scores"]["all"], result["stage_seconds"]
    cells = [f"{scores[k]:.0%}" if scores.get(k) is not None else "-"
             for k in ("colour", "shape", "size", "position", "all_attributes")]
    print(f"{preset:<18} {result['wall_seconds']:>6.0f}s {seconds['train']:>6.0f}s {result['settings']['steps']:>6} "
          f"{cells[0]:>7} {cells[1]:>7} {cells[2]:>7} {cells[3]:>8} {cells[4]:>7}")
EOF
