"""train.py --cuda-graphs: refused where CUDA graphs cannot replay the step, and on a GPU the same training as the
plain compiled step."""
import copy

import pytest
import torch

import train
from loss import TrainingLoss
from omegadit.objectives.flow import FlowMatching
from test_sit import inputs, tiny_text_sit

BASE_ARGV = ["--exp-name", "x", "--data-dir", "d", "--cuda-graphs"]


def usage_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(BASE_ARGV + argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_cuda_graphs_need_a_gpu_and_compilation(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU and compilation" in usage_error([], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "needs a CUDA GPU and compilation" in usage_error(["--no-compile"], capsys)
    assert train.parse_args(BASE_ARGV).cuda_graphs


@pytest.mark.parametrize("argv, named", [(["--gradient-accumulation-steps", "2"], "--gradient-accumulation-steps"),
                                         (["--fsdp"], "--fsdp"),
                                         (["--gradient-checkpointing"], "--gradient-checkpointing")])
def test_cuda_graphs_refuse_what_they_cannot_replay(argv, named, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert f"--cuda-graphs with {named}" in usage_error(argv, capsys)


def test_cuda_graphs_refuse_several_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = train.parse_args(BASE_ARGV)

    class TwoProcesses:
        num_processes = 2

        def __init__(self, **_):
            pass

    monkeypatch.setattr(train, "Accelerator", TwoProcesses)
    with pytest.raises(SystemExit, match="measured on one GPU only; with 2 processes"):
        train.main(args)


def train_steps(model, cuda_graphs, steps=4):
    """Losses and final weights of `steps` training steps (train.py's forward_backward + optimizer_step) of a
    compiled copy of `model` in float32 on the GPU, with or without CUDA graphs."""
    from accelerate import Accelerator
    from argparse import Namespace

    from omegadit.compilation import mark_step
    from train import compile_for_training, forward_backward, optimizer_step

    model = copy.deepcopy(model).cuda().train()
    compile_for_training(model, [], "model", cuda_graphs)
    accelerator = Accelerator(mixed_precision="no")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    recipe = Namespace(gradient_accumulation_steps=1, max_grad_norm=1.0, ema_decay=0.9, ema_warmup=False)
    loss_fn = TrainingLoss(FlowMatching(time_shifting=False), {})
    x, _, y = inputs(model, batch=4)
    losses = []
    torch.manual_seed(0)
    model.seed_training_rng(0)
    for step in range(steps):
        mark_step(cuda_graphs)
        parts = forward_backward(accelerator, model, loss_fn, x.cuda(), dict(y=y.cuda()), [], recipe)
        optimizer_step(accelerator, model, None, optimizer, scheduler, recipe, step)
        losses.append(parts[0].item())
    return losses, torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_steps_train_like_the_compiled_steps():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_text_sit(z_dims=[])
    model.path_drop_prob = 0.5  # both branches of the path drop are replayed
    plain_losses, plain_weights = train_steps(model, cuda_graphs=False)
    graph_losses, graph_weights = train_steps(model, cuda_graphs=True)
    assert plain_losses == pytest.approx(graph_losses, rel=1e-5)
    assert torch.allclose(plain_weights, graph_weights, rtol=1e-4, atol=1e-6)
    assert not torch.equal(plain_weights, torch.cat([p.detach().flatten().cuda() for p in model.parameters()]))
