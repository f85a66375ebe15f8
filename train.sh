#!/usr/bin/env bash
# The original OmegaDiT recipe, setting for setting: SiT-B/1 on VA-VAE latents (256 px), CLIP-L captions, REPA on
# DINOv2-B, CFM, time shifting, and --recipe original (configs/original.yaml), which sets what the original's
# train.py did differently from our defaults:
#   1. learning rate 2e-5 decayed by a half cosine to 0.1x over the run, every step, no warm-up (--lr-schedule cosine)
#   2. no gradient clipping (--max-grad-norm 0) and no EMA (--no-ema): checkpoints hold the raw weights
#   7. seed 23 (+ the process rank), as its train.sh
# Our own recipe instead: RECIPE=omegadit (constant LR, clipping at 1.0, an EMA 0.9999 with warm-up); any flag can
# also be added at the end, e.g. sh train.sh --ema --max-grad-norm 1.0. README.md, "Differences from the original
# OmegaDiT", says what each changes. The latents should be encoded as the original did: encode-vavae's default
# --posterior sample (item 3).
# Every setting is an environment variable; extra flags are passed through: sh train.sh --resume latest
set -e
DATA_DIR=${DATA_DIR:-data/my_dataset}
EXP_NAME=${EXP_NAME:-omegadit-sit-b1}
NUM_GPUS=${NUM_GPUS:-1}
RECIPE=${RECIPE:-original}
accelerate launch --num_processes "$NUM_GPUS" train.py \
    --recipe "$RECIPE" \
    --use-json-dataset \
    --model "SiT-B/1" \
    --data-dir "$DATA_DIR" \
    --batch-size 256 \
    --learning-rate 2e-5 \
    --mixed-precision bf16 \
    --allow-tf32 \
    --enc-type dinov2-vit-b \
    --proj-coeff 0.5 \
    --cfm-coeff 0.05 \
    --cfm-weighting uniform \
    --time-shifting \
    --max-train-steps 400000 \
    --checkpointing-steps 10000 \
    --sample-every 10000 \
    --exp-name "$EXP_NAME" \
    "$@"
