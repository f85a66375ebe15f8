#!/usr/bin/env bash
# What holds the gpu demo's training loop above its GPU-only step time (bench_issue19.py demo_step), in one device
# call: the demo's data (10000 shapes at 64 px, pixel:4 latents, MiniLM caption embeddings), then STEPS steps
# (default 300) of the demo's train.py command in variants, each line timed from launch:
#   base      the demo's command (captions tokenized and encoded in every step, 8 loader workers, OMP 1)
#   cached    --text-emb-dir: caption embeddings cached by `dataset_tools.py encode-text`
#   workers16 16 loader workers
#   omp       OMP_NUM_THREADS unset
#   graphs    --cuda-graphs (the compiled blocks replayed as CUDA graphs)
#   model     --compile-mode model (the whole forward compiled)
#   model-graphs  --compile-mode model --cuda-graphs
#   profile   base under cProfile (OUTPUT_DIR/train.prof): where the host's time goes in the loop
#
#   bash benchmarks/demo_loop_gpu.sh OUTPUT_DIR [STEPS] [VARIANT ...]
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/demo_loop_gpu.sh OUTPUT_DIR [STEPS] [VARIANT ...]}
steps=${2:-300}
shift $(($# < 2 ? $# : 2))
variants=${*:-base cached workers16 omp}
data=$out/data
mkdir -p "$out"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t() { python benchmarks/timed_lines.py -- "$@"; }
t python -m demo.shapes --out "$data" --num 10000 --resolution 64 --seed 0 --holdout "red triangle" | tail -n 2
t python preprocessing/dataset_tools.py encode-vavae --tokenizer pixel:4 --source "$data/images" --dest "$data/vae-in" \
    --gpus 0 | tail -n 2
t python preprocessing/dataset_tools.py encode-text --data-dir "$data" --text-encoder minilm --text-len 16 | tail -n 2
train=(train.py --output-dir "$out/exps" --data-dir "$data" --use-json-dataset --text-encoder minilm --text-len 16
       --shift-base 1024 --compile-mode regional --tokenizer pixel:4 --enc-type none --model SiT-B/2
       --batch-size 256 --max-train-steps "$steps" --checkpointing-steps "$steps" --log-every 50
       --learning-rate 0.0005 --lr-schedule cosine --lr-warmup-steps 100 --ema-decay 0.998 --mixed-precision bf16
       --cfg-prob 0.1 --seed 0 --num-workers 8)
for variant in $variants; do
    case $variant in
        base) t python "${train[@]}" --exp-name base ;;
        cached) t python "${train[@]}" --exp-name cached --text-emb-dir "$data/text-emb" ;;
        workers16) t python "${train[@]}" --exp-name workers16 --num-workers 16 ;;
        omp) env -u OMP_NUM_THREADS python benchmarks/timed_lines.py -- python "${train[@]}" --exp-name omp ;;
        graphs) t python "${train[@]}" --exp-name graphs --cuda-graphs ;;
        model) t python "${train[@]}" --exp-name model --compile-mode model ;;
        model-graphs) t python "${train[@]}" --exp-name model-graphs --compile-mode model --cuda-graphs ;;
        profile) t python -m cProfile -o "$out/train.prof" "${train[@]}" --exp-name profile ;;
        *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac > "$out/$variant.log" 2>&1
    echo "== $variant"
    grep -E "parameters|step [0-9]+:|done at|exit code" "$out/$variant.log" | cut -c1-150
done
