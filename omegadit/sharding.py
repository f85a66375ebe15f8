"""FSDP2 for train.py --fsdp: torch's `fully_shard` per backbone block, and sharded checkpoints through
torch.distributed.checkpoint (DCP) in safetensors files.

Every process holds 1/N of the weights, the gradients, the Adam moments and the EMA; a block's full weights exist
only while it runs. The EMA is a second sharded module with the same layout, so its update is local to each
process. Checkpoints are written by all processes at once with DCP's safetensors writer (one file per process,
`<checkpoint>/sharded/shard-*.safetensors`, every tensor's offset in its metadata) and read back with DCP's
safetensors reader, which re-cuts the shards for any number of processes. Nothing in them is pickled: loading
reads safetensors headers (JSON) and raw tensor bytes only.
"""
import warnings
from pathlib import Path

import torch

from omegadit.checkpoint import SHARDED_DIR

MIN_TORCH = (2, 9)  # fully_shard, and DCP's safetensors storage written by every process
if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH:
    raise ImportError(f"--fsdp and sharded checkpoints need torch >= {'.'.join(map(str, MIN_TORCH))}; this is "
                      f"torch {torch.__version__}")

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

PARAM_DTYPES = {"no": None, "bf16": torch.bfloat16}


def check_mixed_precision(mixed_precision: str):
    """FSDP here trains in float32 or bf16; fp16 would need a gradient scaler that sees every shard."""
    if mixed_precision not in PARAM_DTYPES:
        raise ValueError(f"--fsdp trains with --mixed-precision bf16 or no, not {mixed_precision} (fp16 needs a "
                         f"sharded gradient scaler); pass --mixed-precision bf16")


def device_mesh(device: torch.device, shard_size: int = 0):
    """The processes as a device mesh: 1-D (shard over all), or 2-D (replicate, shard) when `shard_size` divides
    the world size (HSDP: shard within groups of `shard_size`, e.g. one node, replicate across them). A single
    process started without a launcher gets a one-process group of its own."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if not shard_size or shard_size == world:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    if world % shard_size:
        raise ValueError(f"--fsdp-shard-size {shard_size} does not divide the {world} processes")
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def shard(module, units, mesh, param_dtype=None, reshard_after_forward=True):
    """fully_shard each of `units` (the backbone's blocks), then the rest of `module` as the root; in place.
    `param_dtype` (e.g. bf16) is what weights are gathered and computed in; gradients are reduced in float32.
    Inputs keep their dtype (the diffusion times stay float32): autocast, under which train.py runs the forward,
    casts per operation as it does without FSDP."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                  cast_forward_inputs=False)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return module


def load_full_state_dict(module, state_dict: dict):
    """Give a sharded module the full `state_dict` of the main process (ignored elsewhere), broadcast shard by
    shard: every process starts from the main process's weights, as DDP does."""
    is_main = dist.get_rank() == 0
    set_model_state_dict(module, dict(state_dict) if is_main else {},  # it replaces the dict's values
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_state_dict(module) -> dict:
    """The full weights of a sharded module, on the CPU of the main process ({} elsewhere). Collective."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _state(model, ema, optimizer) -> tuple:
    """The tensors a sharded checkpoint holds, as DCP names them ('model.<fqn>', 'ema.<fqn>',
    'optimizer.<fqn>.exp_avg', ...), and the optimizer's param groups (plain values, kept beside)."""
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    state = {"model": get_model_state_dict(model), "optimizer": optimizer_state["state"]}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    return state, optimizer_state["param_groups"]


def save(directory, model, ema, optimizer) -> list:
    """Write the shards of model, EMA and optimizer state under directory/sharded (collective); returns the
    optimizer's param groups, which the caller stores with the rest of the training state."""
    state, param_groups = _state(model, ema, optimizer)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(Path(directory) / SHARDED_DIR),
                                                            save_distributed=True))
    return param_groups


def saved_parts(directory) -> set:
    """Which of model, ema, optimizer a sharded checkpoint holds."""
    names = HuggingFaceStorageReader(str(Path(directory) / SHARDED_DIR)).read_metadata().state_dict_metadata
    return {name.split(".", 1)[0] for name in names}


def load(directory, model, ema, optimizer, param_groups: list):
    """Restore what `save` wrote into sharded modules and their optimizer, for any number of processes; an EMA
    missing from the checkpoint starts from the model's weights."""
    state, _ = _state(model, ema, optimizer)
    if ema is not None and "ema" not in saved_parts(directory):
        del state["ema"]
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(Path(directory) / SHARDED_DIR)))
    set_model_state_dict(model, state["model"])
    if ema is not None:
        set_model_state_dict(ema, state.get("ema", state["model"]))
    set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"], "param_groups": param_groups})


def read_full(directory, part: str = "ema") -> dict:
    """The full tensors of one part ('model' or 'ema') of a sharded checkpoint, in one process on the CPU."""
    shards = str(Path(directory) / SHARDED_DIR)
    metadata = HuggingFaceStorageReader(shards).read_metadata().state_dict_metadata
    prefix = f"{part}."
    state = {name: torch.empty(m.size, dtype=m.properties.dtype) for name, m in metadata.items()
             if name.startswith(prefix)}
    if not state:
        raise ValueError(f"{shards} holds no '{part}' weights (parts: {sorted(saved_parts(directory))})")
    with warnings.catch_warnings():  # that no_dist means a single process is what is wanted here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=HuggingFaceStorageReader(shards), no_dist=True)
    return {name[len(prefix):]: tensor for name, tensor in state.items()}
