"""torch.compile for train.py and generate.py: regional compilation and a persistent compile cache.

Regional compilation compiles a network's repeated blocks one by one instead of the whole forward. Since torch 2.5
Dynamo treats a block's parameters as graph inputs (`inline_inbuilt_nn_modules`), so every block of one class and
input shape reuses the graph traced for the first: one block is compiled, not the whole unrolled network. The layers
between the blocks run eagerly.

The compile cache is Inductor's on-disk cache (FX graphs, AOT-autograd graphs, Triton kernels, autotuning), pointed
at a folder that outlives the process (`TORCHINDUCTOR_CACHE_DIR`, which also holds Triton's kernels), so that a
second launch reuses the first one's compiled code.

CUDA graphs (`cuda_graphs=True`, torch.compile's "reduce-overhead" mode) record each compiled region's kernels once
and replay them with one launch: for small models whose steps wait on the host's kernel launches rather than on the
GPU. A training loop using them marks each step's start (`mark_step`).
"""
import os
from pathlib import Path

import torch
import torch.nn as nn

COMPILE_MODES = ("regional", "model")
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_modules(modules, cuda_graphs=False):
    """torch.compile each module in place with static shapes (a new input shape gets its own graph rather than a
    dynamic-shape one, which would replace the static kernels of the shapes already seen); with `cuda_graphs`,
    replayed as CUDA graphs."""
    for module in modules:
        module.compile(dynamic=False, mode="reduce-overhead" if cuda_graphs else None)


def compile_backbone(backbone, mode: str, cuda_graphs=False):
    """Compile a backbone in place: its blocks one by one ('regional') or its whole forward ('model'; blocks one by
    one under gradient checkpointing, `Backbone.compile_regions`); with `cuda_graphs`, replayed as CUDA graphs."""
    compile_modules(backbone.compile_regions(regional=mode == "regional"), cuda_graphs)


def mark_step(cuda_graphs: bool):
    """Tell the CUDA graphs that a new training step begins (the previous step's graph outputs may be reused)."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def repeated_blocks(module: nn.Module) -> list:
    """The children of the longest nn.ModuleList or nn.Sequential in `module` whose children all share one class (a
    transformer's layers), or [module] itself when it has none."""
    candidates = [m for m in module.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1
                  and len({type(child) for child in m}) == 1]
    if not candidates:
        return [module]
    return list(max(candidates, key=len))


def compile_frozen(module: nn.Module, mode: str):
    """Compile a frozen network (text encoder, REPA encoder): its repeated blocks ('regional') or all of it. A timm
    model is called through `forward_features` (models/repa_encoders.py), which `module.compile()` would not
    reach: that method is compiled instead."""
    if mode == "regional":
        compile_modules(repeated_blocks(module))
    elif hasattr(module, "forward_features"):
        module.forward_features = torch.compile(module.forward_features, dynamic=False)
    else:
        compile_modules([module])


def use_compile_cache(folder) -> str | None:
    """Keep Inductor's compile cache in `folder` (created) for this process and the compile workers it starts;
    TORCHINDUCTOR_CACHE_DIR set in the environment wins. 'none' or None leaves torch's default (a folder under the
    system's temporary directory). Call before the first compilation; returns the folder in use, or None."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    if folder is None or str(folder) == "none":
        return None
    path = Path(folder).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"--compile-cache {folder}: cannot create the folder ({err}); pass another folder or "
                      f"--compile-cache none") from err
    os.environ[CACHE_ENV] = str(path)
    return str(path)


def compile_enabled(flag, device: torch.device) -> bool:
    """--compile / --no-compile, default on with CUDA and off elsewhere."""
    return flag if flag is not None else device.type == "cuda"
