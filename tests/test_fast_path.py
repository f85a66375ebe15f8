"""The fast training path computes the same function as plain float32 eager: bf16 autocast and train.py's
torch.compile, checked on CPU with a tiny SiT (benchmarks/bench_gpu.py runs the same check at full size on a GPU)."""
import copy
import warnings

import torch
from torch._dynamo.utils import counters

from models.sit import RMSNorm
from test_sit import inputs, tiny_text_sit
from train import compile_for_training

BF16_TOLERANCE = 2e-2  # bf16 keeps 8 bits of mantissa: unit roundoff 3.9e-3, a few roundings deep here


def relative_error(fast, reference):
    return ((fast.float() - reference.float()).norm() / reference.float().norm()).item()


def velocity_and_gradients(model, x, t, y, bf16):
    """The velocity and the gradient of every parameter for a loss that touches both outputs."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        velocity, aux = model(x, t, y)
    loss = velocity.float().square().mean() + sum(z.float().square().mean() for z in aux["repa"])
    loss.backward()
    gradients = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return velocity.detach(), gradients


def deterministic_training_model():
    """A tiny text SiT in training mode with its random part (path drop) switched off."""
    model = tiny_text_sit().train()
    model.path_drop_prob = 0.0
    return model


def test_bf16_autocast_matches_float32():
    model = deterministic_training_model()
    x, t, y = inputs(model, batch=4)
    v32, g32 = velocity_and_gradients(model, x, t, y, bf16=False)
    v16, g16 = velocity_and_gradients(model, x, t, y, bf16=True)
    assert v16.dtype == torch.bfloat16  # autocast really ran the blocks in bf16
    assert 0 < relative_error(v16, v32) < BF16_TOLERANCE
    assert 0 < relative_error(g16, g32) < BF16_TOLERANCE


def test_rmsnorm_runs_in_the_activation_dtype():
    norm = RMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    reference = torch.nn.RMSNorm(64, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = norm(x)
    assert out.dtype == torch.bfloat16
    assert not [w for w in caught if "Mismatch dtype" in str(w.message)]  # took the fused kernel
    assert 0 < relative_error(out, reference(x.float())) < BF16_TOLERANCE
    torch.testing.assert_close(norm(x.float()), reference(x.float()), rtol=0, atol=0)


def test_compiled_training_model_matches_eager():
    eager = deterministic_training_model()
    compiled = copy.deepcopy(eager)
    compile_for_training(compiled, [])
    x, t, y = inputs(eager, batch=4)
    v_eager, g_eager = velocity_and_gradients(eager, x, t, y, bf16=False)
    counters.clear()
    v_compiled, g_compiled = velocity_and_gradients(compiled, x, t, y, bf16=False)
    assert counters["stats"]["unique_graphs"] > 0  # Dynamo really captured the model
    assert relative_error(v_compiled, v_eager) < 1e-5
    assert relative_error(g_compiled, g_eager) < 1e-5
    v_fast, g_fast = velocity_and_gradients(compiled, x, t, y, bf16=True)
    assert relative_error(v_fast, v_eager) < BF16_TOLERANCE
    assert relative_error(g_fast, g_eager) < BF16_TOLERANCE
    assert list(compiled.state_dict()) == list(eager.state_dict())
