"""torch.compile(fullgraph=True) traces LoRALinear's forward and backward without graph breaks.

On CPU the reference backend runs inside the registered ops; on a GPU the same test runs the Triton kernels.
"""

import pytest
import torch
from helpers import DEVICE
from torch import nn

from lowrank_kernels import LoRALinear, lora_linear


def make_model(dropout: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).to(DEVICE)
    model[0] = LoRALinear.from_linear(model[0], 8, alpha=16.0, dropout=dropout)
    model[2] = LoRALinear.from_linear(model[2], 4, alpha=8.0, dropout=dropout)
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B.weight, std=0.3)
    return model


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_opcheck_lora_fwd():
    """torch.library's own consistency checks (schema, fake tensor, autograd registration) on the forward op."""
    x = torch.randn(5, 12, requires_grad=True)
    weight, bias = torch.randn(7, 12), torch.randn(7)
    A, B = torch.randn(4, 12, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    args = (x, weight, bias, A, B, None, 0.5, 3, 0, 0.0, None)
    torch.library.opcheck(torch.ops.lowrank_kernels.lora_fwd.default, args)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_compile_fullgraph_forward_backward(dropout):
    model = make_model(dropout)
    x = torch.randn(6, 32, device=DEVICE)
    model[0].set_rank(5)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(1)  # the dropout seeds are drawn from torch's generator, inside the graph
    out = compiled(x)
    out.square().sum().backward()
    compiled_grads = grads(model)
    model.zero_grad()

    torch.manual_seed(1)
    eager_out = model(x)
    eager_out.square().sum().backward()
    if dropout == 0.0:
        # inductor fuses and reorders the float32 elementwise work around the ops: 1e-5-level differences
        torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4)
        for g_c, g_e in zip(compiled_grads, grads(model), strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-4)
    else:  # inductor draws its own random seeds; check the shapes and that every adapter trained
        assert out.shape == eager_out.shape
        assert all(torch.count_nonzero(g) > 0 for g in compiled_grads)


def test_compile_functional_with_dynamic_rank():
    """Changing the active rank between calls gives the right answer under compile (a guard, not a stale graph)."""
    x, weight = torch.randn(4, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    A, B = torch.randn(6, 16, device=DEVICE), torch.randn(8, 6, device=DEVICE)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, b: lora_linear(x, weight, None, A, B, scale=0.5, rank=b), fullgraph=True)
    for b in (6, 2):
        torch.testing.assert_close(fn(x, b), lora_linear(x, weight, None, A, B, scale=0.5, rank=b))
