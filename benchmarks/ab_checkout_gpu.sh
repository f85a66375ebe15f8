#!/usr/bin/env bash
# This checkout against an older one, alternated in one device call: the compiled SiT-B/1 training step
# (bench_gpu.py sit_step_compiled_model) and guided sampling (bench_guided_sampling.py, guidance high 1.0 and 0.85),
# each setting run as old, new, old, new so that a drift of the machine shows. The older checkout is a plain copy:
#
#   mkdir .ab_old && git archive REV | tar -x -C .ab_old     # .ab_old is listed in .git/info/exclude
#   bash benchmarks/ab_checkout_gpu.sh .ab_old [SECTION ...]    # sections: step guided-1.0 guided-0.85 (default all)
#
# The first run of each checkout fills its compile cache; a run that outlasts its time limit prints nothing.
set -u
cd "$(dirname "$0")/.."
old=${1:?usage: bash benchmarks/ab_checkout_gpu.sh OLD_CHECKOUT [SECTION ...]}
shift
sections=${*:-step guided-1.0 guided-0.85}
export PYTHONUNBUFFERED=1

timed() {  # LABEL LIMIT COMMAND...: the command's result lines and its wall time
    local label=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $label"
    timeout "$limit" "$@" 2>&1 | grep -E "^sit_step|^guided|Error"
    echo "   ($((SECONDS - start)) s)"
}

for section in $sections; do
    for checkout in "$old" . "$old" .; do
        case $section in
            step) timed "$checkout: training step" 180 \
                python "$checkout/benchmarks/bench_gpu.py" --only sit_step_compiled_model ;;
            guided-*) timed "$checkout: guided sampling, high ${section#guided-}" 120 \
                python "$checkout/benchmarks/bench_guided_sampling.py" --guidance-high "${section#guided-}" ;;
            *) echo "unknown section $section (step, guided-HIGH)"; exit 2 ;;
        esac
    done
done
