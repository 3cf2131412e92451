"""Backend choice: automatic, by environment, by context manager; clear errors; no fallback past a launched kernel."""

import pytest
import torch
from helpers import DEVICE, HAS_CUDA, HAS_TRITON, make_lora_inputs

from lowrank_kernels import BackendUnavailableError, available_backends, lora_linear, use_backend
from lowrank_kernels import backend as backend_mod


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    assert backend_mod.requested_backend() is None
    with use_backend("torch"):
        assert backend_mod.requested_backend() == "torch"
        with use_backend("triton"):
            assert backend_mod.requested_backend() == "triton"
        assert backend_mod.requested_backend() == "torch"
    assert backend_mod.requested_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backend_mod.ENV_VAR, "torch")
    assert backend_mod.requested_backend() == "torch"
    with use_backend("triton"):  # the context manager wins over the environment
        assert backend_mod.requested_backend() == "triton"
    monkeypatch.setenv(backend_mod.ENV_VAR, "auto")
    assert backend_mod.requested_backend() is None
    monkeypatch.setenv(backend_mod.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=backend_mod.ENV_VAR):
        backend_mod.requested_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("numpy"):
            pass


def test_requested_cuda_extension_unavailable_raises():
    """The csrc extension runs on CUDA tensors only: asked for by name on CPU it says why, never falls back."""
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float32, device="cpu")
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="'cuda' was requested.*CUDA tensors"):
        lora_linear(x, weight, bias, A, B, scale=1.0)


def _pretend_gpu(monkeypatch, unavailable=()):
    """Make ``availability`` say every backend but ``unavailable`` can run on CUDA tensors."""
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    monkeypatch.delenv(backend_mod.STRICT_ENV_VAR, raising=False)
    monkeypatch.setattr(backend_mod, "availability", lambda name, device: "absent" if name in unavailable else None)


def test_auto_choice_order_on_cuda_skips_only_unavailable_backends(monkeypatch):
    """On CUDA tensors the automatic order is Triton, the CUDA extension, then the reference: a backend is skipped
    only when it is unavailable (decided before launching), and float64 goes to the reference by its dtype."""
    gpu, half, f64 = torch.device("cuda"), torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float64)
    _pretend_gpu(monkeypatch)
    assert backend_mod.choose("op", gpu, [half, None]) == "triton"
    assert backend_mod.choose("op", gpu, [f64]) == "torch"
    _pretend_gpu(monkeypatch, unavailable=("triton",))
    assert backend_mod.choose("op", gpu, [half]) == "cuda"
    _pretend_gpu(monkeypatch, unavailable=("triton", "cuda"))
    assert backend_mod.choose("op", gpu, [half]) == "torch"
    assert backend_mod.choose("op", torch.device("cpu"), [half]) == "torch"


def test_strict_mode_never_falls_back(monkeypatch):
    """LOWRANK_KERNELS_STRICT=1 (CI, the GPU run): an unavailable first choice raises instead of moving on."""
    _pretend_gpu(monkeypatch, unavailable=("triton",))
    monkeypatch.setenv(backend_mod.STRICT_ENV_VAR, "1")
    with pytest.raises(BackendUnavailableError, match="STRICT=1 and op cannot run on triton: absent"):
        backend_mod.choose("op", torch.device("cuda"), [torch.zeros(2, dtype=torch.float16)])
    assert backend_mod.choose("op", torch.device("cuda"), [torch.zeros(2, dtype=torch.float64)]) == "torch"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed")
def test_a_failing_kernel_propagates_and_is_never_retried_elsewhere(monkeypatch):
    """An exception raised by a launched kernel on valid inputs propagates, with the automatic choice too: a kernel
    bug must not turn into a silent slowdown on another backend."""
    from lowrank_kernels.ops.lora import op

    calls = []

    def broken(*args, **kwargs):
        calls.append("triton")
        raise RuntimeError("PTX compile failed")

    class BrokenTriton:
        shrink = lowrank_matmul = weight_grad = fused_forward = staticmethod(broken)

    real = op.implementation
    monkeypatch.setattr(op, "implementation", lambda name: BrokenTriton if name == "triton" else real(name))
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float32, device=DEVICE)
    with use_backend("triton"), pytest.raises(RuntimeError, match="PTX compile failed"):
        lora_linear(x, weight, bias, A, B, scale=1.0)
    monkeypatch.setattr(backend_mod, "choose", lambda *a: "triton")  # the automatic choice picked Triton
    with pytest.raises(RuntimeError, match="PTX compile failed"):
        lora_linear(x, weight, bias, A, B, scale=1.0)
    assert calls == ["triton", "triton"]


def test_no_gpu_lists_only_the_reference():
    """On a machine without a GPU only torch can run CUDA tensors' ops: Triton and the extension are not listed."""
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    assert available_backends("cuda") == ["torch"]
    assert "no CUDA device" in backend_mod.availability("triton", "cuda")


def test_requested_triton_without_gpu_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float32, device="cpu")
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="Triton needs CUDA tensors"):
        lora_linear(x, weight, bias, A, B, scale=1.0)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed")
def test_requested_triton_rejects_float64():
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float64, device=DEVICE)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="float16/bfloat16/float32"):
        lora_linear(x, weight, bias, A, B, scale=1.0)


def test_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    assert available_backends("cpu")[0] == "torch"
    assert backend_mod.choose("op", torch.device("cpu"), [torch.zeros(2)]) == "torch"


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and Triton")
def test_auto_on_cuda_prefers_triton():
    assert available_backends("cuda")[:1] == ["triton"]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed")
def test_backward_uses_the_forward_backend(monkeypatch):
    """Autograd may run the backward on another thread (CUDA), outside the forward's use_backend context."""
    from lowrank_kernels.ops.lora import op

    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    calls = []
    real = op.lora_backward

    def recording(impl, *args, **kwargs):
        calls.append(impl.__name__.rsplit(".", 1)[-1])
        return real(impl, *args, **kwargs)

    monkeypatch.setattr(op, "lora_backward", recording)
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float32, device=DEVICE)
    A.requires_grad_()
    with use_backend("triton"):
        y = lora_linear(x, weight, bias, A, B, scale=1.0)
    y.sum().backward()  # outside the context: the automatic choice on CPU would be torch
    assert calls == ["triton"]
