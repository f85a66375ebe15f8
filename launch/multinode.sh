#!/usr/bin/env bash
# train.py on several nodes through `accelerate launch` (torchrun underneath). Run it on every node with the same
# settings except MACHINE_RANK; the flags after the script name go to train.py. For 2 nodes of 8 GPUs:
#
#   node 0:  NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 bash launch/multinode.sh \
#                --exp-name big --data-dir /shared/data --output-dir /shared/exps --fsdp --mixed-precision bf16
#   node 1:  the same with MACHINE_RANK=1
#
# NUM_MACHINES       nodes taking part
# MACHINE_RANK       this node's index, 0 .. NUM_MACHINES-1 (node 0 runs the main process and the rendezvous)
# MAIN_PROCESS_IP    an address of node 0 that every node can reach
# MAIN_PROCESS_PORT  a free TCP port on node 0 (default 29500)
# GPUS_PER_NODE      processes per node (default: the GPUs nvidia-smi lists)
# DRY_RUN=1          print the command instead of running it
#
# --data-dir and --output-dir must be on storage every node sees: every process writes its random state, and under
# --fsdp its shard, into each checkpoint. NCCL chooses the network itself; README.md, "Several nodes", lists the
# variables to set when it chooses wrong (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...).
set -euo pipefail
: "${NUM_MACHINES:?set NUM_MACHINES, the number of nodes}"
: "${MACHINE_RANK:?set MACHINE_RANK, the index of this node from 0}"
: "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP, the address of node 0}"
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$({ nvidia-smi --list-gpus 2>/dev/null || true; } | wc -l)}
if [ "$GPUS_PER_NODE" -lt 1 ]; then
    echo "no GPU found on $(hostname): set GPUS_PER_NODE" >&2
    exit 1
fi
cd "$(dirname "$0")/.."
command=(accelerate launch --multi_gpu --same_network --dynamo_backend no
         --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
         --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT"
         --num_processes "$((NUM_MACHINES * GPUS_PER_NODE))"
         train.py "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${command[@]}"
    echo
else
    exec "${command[@]}"
fi
