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
NAME=${NAME:-eval-$(basename "$CKPT")-$MODE$STEPS-cfg$CFG-seed$SEED}
INCEPTION_WEIGHTS=${INCEPTION_WEIGHTS:-}
EXTRA=${EXTRA:-}

torchrun --standalone --nproc_per_node "$NUM_GPUS" generate.py \
    --ckpt "$CKPT" --prompts-file "$PROMPTS" --num-fid-samples "$NUM_SAMPLES" \
    --per-proc-batch-size "$BATCH" --mode "$MODE" --num-steps "$STEPS" --cfg-scale "$CFG" \
    --guidance-low "$GUIDANCE_LOW" --guidance-high "$GUIDANCE_HIGH" --global-seed "$SEED" \
    --sample-dir "$SAMPLE_DIR" --name "$NAME" $EXTRA

python evaluations/evaluator.py "$REF_BATCH" "$SAMPLE_DIR/$NAME.npz" \
    --save-path "$SAMPLE_DIR/$NAME.metrics.json" ${INCEPTION_WEIGHTS:+--inception-weights "$INCEPTION_WEIGHTS"}
