#!/usr/bin/env bash
# Sample with generate.py on all GPUs, then score with the ADM evaluator. Every setting is an environment variable.
set -e
CKPT=${CKPT:-exps/omegadit-sit-b1/checkpoints/0400000}
PROMPTS=${PROMPTS:-data/my_dataset/labels.json}
REF_BATCH=${REF_BATCH:-VIRTUAL_imagenet256_labeled.npz}
NUM_GPUS=${NUM_GPUS:-1}
NUM_SAMPLES=${NUM_SAMPLES:-50000}
BATCH=${BATCH:-64}
MODE=${MODE:-sde}
STEPS=${STEPS:-50}
CFG=${CFG:-4.0}
GUIDANCE_LOW=${GUIDANCE_LOW:-0.0}
GUIDANCE_HIGH=${GUIDANCE_HIGH:-1.0}
SEED=${SEED:-0}
SAMPLE_DIR=${SAMPLE_DIR:-samples}
INCEPTION_WEIGHTS=${INCEPTION_WEIGHTS:-}
EXTRA=${EXTRA:-}

# 8 hex digits of the arguments: the default NAME carries a hash of every setting, so that runs with different
# settings never share a sample folder (generate.py also refuses a folder whose manifest.json differs).
settings_hash() {
    if command -v sha256sum > /dev/null; then printf '%s\n' "$@" | sha256sum; else printf '%s\n' "$@" | shasum -a 256; fi |
        cut -c1-8
}
case $CKPT in /*) CKPT_PATH=$CKPT ;; *) CKPT_PATH=$PWD/$CKPT ;; esac
NAME=${NAME:-eval-$(basename "$CKPT")-$MODE$STEPS-cfg$CFG-seed$SEED-$(settings_hash "$CKPT_PATH" "$PROMPTS" \
    "$NUM_SAMPLES" "$MODE" "$STEPS" "$CFG" "$GUIDANCE_LOW" "$GUIDANCE_HIGH" "$SEED" "$EXTRA")}

torchrun --standalone --nproc_per_node "$NUM_GPUS" generate.py \
    --ckpt "$CKPT" --prompts-file "$PROMPTS" --num-fid-samples "$NUM_SAMPLES" \
    --per-proc-batch-size "$BATCH" --mode "$MODE" --num-steps "$STEPS" --cfg-scale "$CFG" \
    --guidance-low "$GUIDANCE_LOW" --guidance-high "$GUIDANCE_HIGH" --global-seed "$SEED" \
    --sample-dir "$SAMPLE_DIR" --name "$NAME" $EXTRA

python evaluations/evaluator.py "$REF_BATCH" "$SAMPLE_DIR/$NAME.npz" \
    --save-path "$SAMPLE_DIR/$NAME.metrics.json" ${INCEPTION_WEIGHTS:+--inception-weights "$INCEPTION_WEIGHTS"}
