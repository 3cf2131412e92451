"""torch.compile(fullgraph=True) traces LoRALinear's forward and backward without graph breaks.

On CPU the reference backend runs inside the registered ops; on a GPU the same test runs the Triton kernels.
"""

import pytest
import torch
from helpers import DEVICE, tiny_llama
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


# ---- a real architecture: a 2-layer Llama from transformers (random weights, nothing downloaded) -----------------


def llama_with_adapters(method: str, **inject_kwargs):
    pytest.importorskip("transformers")
    from lowrank_kernels.models.inject import inject_adapters

    model = tiny_llama().to(DEVICE)
    inject_adapters(model, "all-linear", method=method, **inject_kwargs)
    for name, p in model.named_parameters():  # LoRA's B = 0 / AdaLoRA's lambda = 0 would hide a dropped term
        if "lora_B" in name or "lora_E" in name:
            nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_compile_fullgraph_llama_forward_backward(method):
    """torch.compile(model, fullgraph=True) of a transformers Llama with adapters on every linear layer: no graph
    break, and the logits and every adapter gradient match eager execution."""
    model = llama_with_adapters(method, r=4, alpha=8.0)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    logits = compiled(ids, use_cache=False).logits
    logits.square().mean().backward()
    compiled_grads = grads(model)
    model.zero_grad()
    eager = model(ids, use_cache=False).logits
    eager.square().mean().backward()
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-5)
    assert len(compiled_grads) == 14 * (3 if method != "lora" else 2)  # every adapter tensor of the 14 layers
    for g_c, g_e in zip(compiled_grads, grads(model), strict=True):
        assert torch.count_nonzero(g_e) > 0
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")
def test_gpu_cuda_graph_llama_decode_step_with_mixed_adapters():
    """A decode step of a Llama whose linear layers are MultiLoRALinear (4 requests, one token each) is captured in a
    CUDA graph once and replayed with new tokens and new adapter ids; every replay equals eager execution."""
    from lowrank_kernels import serve_batch, use_backend
    from lowrank_kernels.models.inject import inject_multi_lora

    pytest.importorskip("transformers")
    model = tiny_llama().to(DEVICE, torch.bfloat16).eval()
    names = inject_multi_lora(model, "all-linear", capacity=3, max_rank=8)
    g = torch.Generator().manual_seed(3)
    for i, r in enumerate((8, 4, 2)):
        for name in names:
            layer = model.get_submodule(name)
            A = torch.randn(r, layer.in_features, generator=g) * layer.in_features**-0.5
            B = torch.randn(layer.out_features, r, generator=g) * r**-0.5
            layer.add_adapter(f"a{i}", A.to(DEVICE, torch.bfloat16), B.to(DEVICE, torch.bfloat16), alpha=2.0 * r)
    tokens = torch.randint(0, 64, (4, 1), device=DEVICE)

    def eager(ids):
        with serve_batch(model, ids):
            return model(tokens, use_cache=False).logits.float()

    with torch.no_grad(), use_backend("triton"), serve_batch(model, ["a0", "a1", "a2", None]) as state:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(tokens, use_cache=False)  # builds the batch metadata and compiles the kernels before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(tokens, use_cache=False).logits
        for ids in (["a2", "a2", "a0", "a1"], [None, "a1", None, "a0"], ["a0", "a0", "a0", "a0"]):
            tokens.copy_(torch.randint(0, 64, (4, 1), device=DEVICE))
            state.update_(ids)
            graph.replay()
            expected = eager(ids)
            base = eager([None] * 4)
            assert (expected - base).norm() > 0.05 * base.norm()  # the adapters change the logits measurably
            torch.testing.assert_close(static_logits.float(), expected, rtol=2e-2, atol=2e-2)
