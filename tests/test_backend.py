"""Backend choice: automatic, by environment, by context manager; clear errors; fallback of an automatic choice."""

import warnings

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


def test_kernel_impls_share_the_dtype_rule():
    """triton_impl and cuda_impl refuse float64 alike (UnsupportedInputError, so an automatic choice moves on),
    without importing their kernel module; integer metadata passes the rule."""
    for impl, label in ((backend_mod.triton_impl, "Triton"), (backend_mod.cuda_impl, "CUDA extension")):
        run = impl("no_such_module", "f")
        with pytest.raises(backend_mod.UnsupportedInputError, match=f"{label} kernels take float16/bfloat16/float32"):
            run(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.int32))
        with pytest.raises(ModuleNotFoundError):  # a supported dtype reaches the (lazy) import
            run(torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.int32))


def test_auto_choice_falls_back_from_triton_to_cuda(monkeypatch):
    """On CUDA tensors the automatic order is Triton, the CUDA extension, then the reference."""
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(backend_mod, "availability", lambda name, device: None)

    def broken():
        raise RuntimeError("Triton compile failed")

    impls = {"triton": broken, "cuda": lambda: "cuda", "torch": lambda: "reference"}
    with pytest.warns(RuntimeWarning, match="triton backend failed for cuda_fallback_op"):
        assert backend_mod.dispatch("cuda_fallback_op", impls, torch.device("cuda")) == "cuda"


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
    calls = []
    impls = {"torch": lambda: calls.append("torch") or "ref", "triton": lambda: calls.append("triton")}
    assert backend_mod.dispatch("op", impls, torch.device("cpu")) == "ref"
    assert calls == ["torch"]


def test_auto_choice_that_fails_falls_back_with_one_warning(monkeypatch):
    """Pretend to be on a GPU where Triton is available but broken: the reference answers, with one warning."""
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(backend_mod, "availability", lambda name, device: None if name != "cuda" else "absent")

    def broken():
        raise RuntimeError("PTX compile failed")

    impls = {"triton": broken, "torch": lambda: "reference"}
    fake_gpu = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="triton backend failed for fallback_op"):
        assert backend_mod.dispatch("fallback_op", impls, fake_gpu) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every call
        assert backend_mod.dispatch("fallback_op", impls, fake_gpu) == "reference"
    # Asked for by name, the same failure propagates.
    with use_backend("triton"), pytest.raises(RuntimeError, match="PTX compile failed"):
        backend_mod.dispatch("fallback_op", impls, fake_gpu)


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and Triton")
def test_auto_on_cuda_prefers_triton():
    assert available_backends("cuda")[:1] == ["triton"]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed")
def test_backward_uses_the_forward_backend(monkeypatch):
    """Autograd may run the backward on another thread (CUDA), outside the forward's use_backend context."""
    from lowrank_kernels.ops import lora as lora_ops

    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    calls = []

    def recording(name, impl):
        def run(*args, **kwargs):
            calls.append(name)
            return impl(*args, **kwargs)

        return run

    for name, impl in list(lora_ops._BACKWARD_IMPLS.items()):
        monkeypatch.setitem(lora_ops._BACKWARD_IMPLS, name, recording(name, impl))
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float32, device=DEVICE)
    A.requires_grad_()
    with use_backend("triton"):
        y = lora_linear(x, weight, bias, A, B, scale=1.0)
    y.sum().backward()  # outside the context: the automatic choice on CPU would be torch
    assert calls == ["triton"]
