#!/usr/bin/env bash
# DDP scaling of the real training loop on a machine of several GPUs, in one device call: prepares a real-size run
# without downloads (benchmarks/prepare_gpu_run.py: 256 px images, random 32x16x16 latents, random-weight CLIP-L
# and DINOv2-B), then runs train.py through `accelerate launch` on 1 GPU and on each GPU count given, at
# BATCH_PER_GPU images per GPU (the global batch grows with the GPUs), DINOv2-B and CLIP-L computed in every step,
# and prints train.py's throughput lines (img/s over all GPUs, per 10-step window).
#
#   bash benchmarks/multi_gpu_gpu.sh OUTPUT_DIR TOKENIZER_DIR [GPU_COUNT ...]     # default count: 2
#
# TOKENIZER_DIR: any Hugging Face tokenizer folder (see prepare_gpu_run.py). Settings by environment: MODEL
# (SiT-B/1), BATCH_PER_GPU (256), STEPS (50), NUM images (2048), TRAIN_ARGS (appended to train.py's flags).
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/multi_gpu_gpu.sh OUTPUT_DIR TOKENIZER_DIR [GPU_COUNT ...]}
tokenizer=${2:?usage: bash benchmarks/multi_gpu_gpu.sh OUTPUT_DIR TOKENIZER_DIR [GPU_COUNT ...]}
shift 2
counts=${*:-2}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

python benchmarks/prepare_gpu_run.py --out "$out" --tokenizer-files "$tokenizer" --num "${NUM:-2048}" || exit 1
for n in 1 $counts; do
    launch=(accelerate launch --num_processes "$n")
    [ "$n" -gt 1 ] && launch+=(--multi_gpu)
    echo "== $n process(es), global batch $((${BATCH_PER_GPU:-256} * n))"
    start=$SECONDS
    "${launch[@]}" train.py --exp-name "ddp$n" --output-dir "$out/exps" --data-dir "$out/data" --use-json-dataset \
        --clip-model-id "$out/clip-l" --enc-weights "$out/dinov2-b.safetensors" --model "${MODEL:-SiT-B/1}" \
        --batch-size $((${BATCH_PER_GPU:-256} * n)) --max-train-steps "${STEPS:-50}" --mixed-precision bf16 \
        --allow-tf32 --num-workers 8 --log-every 10 --checkpointing-steps 100000 --compile-mode regional \
        ${TRAIN_ARGS:-} 2>&1 | grep -E "img/s|Error|error:" | grep -v Warning
    echo "   ($((SECONDS - start)) s)"
done
