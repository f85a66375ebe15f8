#!/usr/bin/env bash
# Sample with generate.py on all GPUs, then score with the ADM evaluator. Every setting is an environment variable.
# By default this is the original OmegaDiT's eval.sh, setting for setting (--recipe original, configs/original.yaml):
#   8. path drop in the unconditional branch of guidance
#   9. Euler-Maruyama (sde), 250 steps, guidance 2.5 for t in [0, 0.85], float32 model calls (TF32 matmuls),
#      50000 images of the original's 10 evaluation prompts (configs/original_prompts.txt)
# A checkpoint trained without EMA (train.sh's default) is sampled with its raw weights, as the original did.
# Our own settings instead: RECIPE=omegadit (the checkpoint's sampling defaults: 50 steps, guidance 4.0 on [0, 1],
# bf16, no path drop) and PROMPTS=<data>/labels.json (the training captions). STEPS, CFG, GUIDANCE_LOW,
# GUIDANCE_HIGH and MODE override either recipe when set.
set -e
CKPT=${CKPT:-exps/omegadit-sit-b1/checkpoints/0400000}
RECIPE=${RECIPE:-original}
PROMPTS=${PROMPTS:-configs/original_prompts.txt}
REF_BATCH=${REF_BATCH:-VIRTUAL_imagenet256_labeled.npz}
NUM_GPUS=${NUM_GPUS:-1}
NUM_SAMPLES=${NUM_SAMPLES:-50000}
BATCH=${BATCH:-64}
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
NAME=${NAME:-eval-$(basename "$CKPT")-$RECIPE${STEPS:+-steps$STEPS}${CFG:+-cfg$CFG}-seed$SEED-$(settings_hash \
    "$CKPT_PATH" "$RECIPE" "$PROMPTS" "$NUM_SAMPLES" "$MODE" "$STEPS" "$CFG" "$GUIDANCE_LOW" "$GUIDANCE_HIGH" "$SEED" \
    "$EXTRA")}

torchrun --standalone --nproc_per_node "$NUM_GPUS" generate.py \
    --ckpt "$CKPT" --recipe "$RECIPE" --prompts-file "$PROMPTS" --num-fid-samples "$NUM_SAMPLES" \
    --per-proc-batch-size "$BATCH" --global-seed "$SEED" --sample-dir "$SAMPLE_DIR" --name "$NAME" \
    ${MODE:+--mode "$MODE"} ${STEPS:+--num-steps "$STEPS"} ${CFG:+--cfg-scale "$CFG"} \
    ${GUIDANCE_LOW:+--guidance-low "$GUIDANCE_LOW"} ${GUIDANCE_HIGH:+--guidance-high "$GUIDANCE_HIGH"} $EXTRA

python evaluations/evaluator.py "$REF_BATCH" "$SAMPLE_DIR/$NAME.npz" \
    --save-path "$SAMPLE_DIR/$NAME.metrics.json" ${INCEPTION_WEIGHTS:+--inception-weights "$INCEPTION_WEIGHTS"}
