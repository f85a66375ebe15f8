#!/usr/bin/env bash
# The OmegaDiT recipe: SiT-B/1 on VA-VAE latents (256 px), CLIP-L captions, REPA on DINOv2-B, CFM, time shifting.
# Every setting is an environment variable; extra flags are passed through: sh train.sh --resume latest
set -e
DATA_DIR=${DATA_DIR:-data/my_dataset}
EXP_NAME=${EXP_NAME:-omegadit-sit-b1}
NUM_GPUS=${NUM_GPUS:-1}
accelerate launch --num_processes "$NUM_GPUS" train.py \
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
    --ema-decay 0.9999 \
    --max-train-steps 400000 \
    --checkpointing-steps 10000 \
    --sample-every 10000 \
    --exp-name "$EXP_NAME" \
    "$@"
