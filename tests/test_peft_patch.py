"""patch_peft_model: a peft model, patched in place, gives peft's numbers (float64, so exactness is claimed: 1e-10
relative) in every direction and state — logits, every adapter gradient, several adapters, disable, merge, mixed
batches, transformers' Trainer, AdaLoRA's allocator loop, save and reload in plain peft — while the fused ops run."""

import copy

import pytest
import torch
from helpers import REL_TOL, rel_err, tiny_llama
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank_kernels  # noqa: E402
from lowrank_kernels.models import peft_patch  # noqa: E402
from lowrank_kernels.models.peft_patch import patch_peft_model, unpatch_peft_model  # noqa: E402

# float64 end to end: the fused ops and peft differ only in summation order, ~1e-16 per op; a few dozen optimizer
# steps amplify that to well under 1e-10. A dropped or mis-scaled adapter term moves results by > 1e-3.
TOL = 1e-10
VOCAB = 64
NUM_LAYERS_ALL_LINEAR = 14  # 2 Llama layers x (q, k, v, o, gate, up, down)


def lora_config(kind: str, **overrides):
    if kind == "adalora":
        # total_step only matters to the allocator schedule; update_and_allocate runs in the AdaLoRA loop test
        base = dict(init_r=4, target_r=2, lora_alpha=8, target_modules="all-linear", total_step=20)
        return peft.AdaLoraConfig(**{**base, **overrides})
    base = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    base.update(use_rslora=kind == "rslora", use_dora=kind == "dora")
    return peft.LoraConfig(**{**base, **overrides})


def peft_llama(kind: str = "lora", **overrides):
    """A float64 tiny Llama under peft with non-zero adapters (same seed, same weights on every call)."""
    model = peft.get_peft_model(tiny_llama(VOCAB).double(), lora_config(kind, **overrides))
    if kind == "adalora":  # peft starts lambda (lora_E) at zero: make the adapter's term non-zero
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_E" in name:
                    p.copy_(torch.randn(p.shape, dtype=p.dtype))
    return model


def token_batch(batch=3, seq=7, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, ids, run=None, **kwargs):
    """Logits and the gradient of every trainable parameter (by name) for a fixed random cotangent; ``run``: what
    computes the logits (default: ``model`` itself, e.g. its ``torch.compile``)."""
    model.zero_grad(set_to_none=True)
    logits = (model if run is None else run)(ids, **kwargs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = weights.to(logits.dtype)
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def assert_same(actual, expected, tol=TOL):
    (logits, grads), (ref_logits, ref_grads) = actual, expected
    assert rel_err(logits, ref_logits) < tol
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < tol, name


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused op calls the patched layers make, so a test cannot pass on peft's forward alone."""
    calls = {"lora": 0, "dora": 0, "multi": 0, "weight_ptrs": []}  # weight_ptrs: each call's base weight storage

    def counting(kind, op):
        def call(*args, **kwargs):
            calls[kind] += 1
            calls["weight_ptrs"].append(args[1].data_ptr())
            return op(*args, **kwargs)

        return call

    monkeypatch.setattr(peft_patch, "lora_linear", counting("lora", peft_patch.lora_linear))
    monkeypatch.setattr(peft_patch, "dora_linear", counting("dora", peft_patch.dora_linear))
    monkeypatch.setattr(peft_patch, "multi_lora_linear", counting("multi", peft_patch.multi_lora_linear))
    return calls


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "adalora"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_logits_and_every_adapter_grad_equal_peft(kind, train, fused_calls):
    model = peft_llama(kind)
    model.train(train)
    ids = token_batch()
    expected = logits_and_grads(model, ids)
    report = patch_peft_model(model)
    assert len(report.patched) == NUM_LAYERS_ALL_LINEAR and not report.unpatched
    assert set(report.patched.values()) == {kind}
    assert_same(logits_and_grads(model, ids), expected)
    assert fused_calls["dora" if kind == "dora" else "lora"] == NUM_LAYERS_ALL_LINEAR


def test_exported_from_the_package():
    assert lowrank_kernels.patch_peft_model is patch_peft_model
    assert lowrank_kernels.unpatch_peft_model is unpatch_peft_model


def test_two_adapters_set_adapter_and_both_active(fused_calls):
    model = peft_llama()
    model.add_adapter("other", lora_config("lora", r=2, lora_alpha=3, init_lora_weights=False))
    ids = token_batch()
    expected = {}
    for active in ("other", "default", ["default", "other"]):
        model.base_model.set_adapter(active)
        expected[str(active)] = logits_and_grads(model, ids)
    patch_peft_model(model)
    for active in ("other", "default", ["default", "other"]):
        model.base_model.set_adapter(active)
        fused_calls["lora"] = 0
        assert_same(logits_and_grads(model, ids), expected[str(active)])
        assert fused_calls["lora"] == NUM_LAYERS_ALL_LINEAR  # both active: one fused call on the stacked ranks
    # the two-adapter sum has both adapters' gradients, the single ones only their own
    assert any(".other." in n for n in expected["['default', 'other']"][1])
    assert any(".default." in n for n in expected["['default', 'other']"][1])


def test_two_active_adapters_with_dora_run_on_peft(fused_calls):
    """peft feeds a second DoRA adapter the first one's output: that combination stays on peft's forward."""
    model = peft_llama("dora")
    model.add_adapter("other", lora_config("lora", r=2, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    ids = token_batch()
    expected = logits_and_grads(model, ids)
    patch_peft_model(model)
    assert_same(logits_and_grads(model, ids), expected)
    assert fused_calls["lora"] + fused_calls["dora"] == 0


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_disable_adapter_and_merge_and_unload_after_patch(kind, fused_calls):
    model = peft_llama(kind)
    model.eval()
    ids = token_batch()
    with model.disable_adapter():
        base_logits = model(ids).logits.detach()
    adapted = logits_and_grads(model, ids)[0]
    patch_peft_model(model)
    with model.disable_adapter():
        assert rel_err(model(ids).logits, base_logits) < TOL
    assert fused_calls["lora"] + fused_calls["dora"] == 0
    with torch.no_grad():
        assert rel_err(model(ids).logits, adapted) < TOL
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    with torch.no_grad():
        assert rel_err(merged(ids).logits, adapted) < TOL


def test_merged_layers_run_on_peft(fused_calls):
    model = peft_llama()
    model.eval()
    ids = token_batch()
    expected = model(ids).logits.detach()
    patch_peft_model(model)
    model.base_model.merge_adapter()
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) < TOL
    assert fused_calls["lora"] == 0  # merged: the adapter is in W0, peft runs the base layer alone
    model.base_model.unmerge_adapter()
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) < TOL
    assert fused_calls["lora"] == NUM_LAYERS_ALL_LINEAR


def test_adapter_names_mixed_batch_equals_peft(fused_calls):
    model = peft_llama()
    model.add_adapter("other", lora_config("lora", r=2, lora_alpha=3, init_lora_weights=False))
    model.eval()
    ids = token_batch(batch=4)
    names = ["other", "__base__", "default", "other"]
    expected = logits_and_grads(model, ids, adapter_names=names)
    expected_tokens = model.generate(ids, adapter_names=names, max_new_tokens=3, do_sample=False)
    patch_peft_model(model)
    assert_same(logits_and_grads(model, ids, adapter_names=names), expected)
    # one multi-adapter gather call per layer (tests/test_peft_mixed_batch.py: ranks, scales, models, fallbacks)
    assert fused_calls["multi"] == NUM_LAYERS_ALL_LINEAR and fused_calls["lora"] == 0
    tokens = model.generate(ids, adapter_names=names, max_new_tokens=3, do_sample=False)
    assert torch.equal(tokens, expected_tokens)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # peft's own checks still apply
        model(ids, adapter_names=names[:2])


def test_patch_twice_is_a_no_op_and_unpatch_restores_peft_forward_exactly(fused_calls):
    model = peft_llama()
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    peft_forward = type(layers[0]).forward
    assert all("forward" not in m.__dict__ for m in layers)
    first = patch_peft_model(model)
    patched_forwards = [m.__dict__["forward"] for m in layers]
    second = patch_peft_model(model)
    assert second == first
    assert [m.__dict__["forward"] for m in layers] == patched_forwards
    ids = token_batch()
    patched = logits_and_grads(model, ids)
    assert fused_calls["lora"] == NUM_LAYERS_ALL_LINEAR  # once per layer, not twice
    restored = unpatch_peft_model(model)
    assert sorted(restored) == sorted(first.patched)
    assert all("forward" not in m.__dict__ and m.forward.__func__ is peft_forward for m in layers)
    assert not any(peft_patch.is_patched(m) for m in layers)
    assert_same(logits_and_grads(model, ids), patched)
    assert fused_calls["lora"] == NUM_LAYERS_ALL_LINEAR  # nothing fused after unpatch


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own_tensors(fused_calls):
    model = peft_llama()
    patch_peft_model(model)
    clone = copy.deepcopy(model)
    layer = clone.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert layer.forward.__self__ is layer and peft_patch.is_patched(layer)
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()  # the clone's own adapter: the original must not see it
        ids = token_batch()
        assert rel_err(clone(ids).logits, model(ids).logits) > 1e-4
    assert fused_calls["lora"] == 2 * NUM_LAYERS_ALL_LINEAR


def test_torch_compile_of_a_patched_model(fused_calls):
    kind = "lora"  # DoRA compiles the same way (its ops are registered alike); one model keeps the file fast
    model = peft_llama(kind)
    ids = token_batch()
    expected = logits_and_grads(model, ids)
    patch_peft_model(model)
    compiled = torch.compile(model, backend="aot_eager")  # traces the custom ops (their fake implementations)
    assert_same(logits_and_grads(model, ids, run=compiled), expected)
    assert fused_calls["dora" if kind == "dora" else "lora"] >= NUM_LAYERS_ALL_LINEAR


def test_an_instance_forward_set_before_the_patch_comes_back():
    model = peft_llama()
    layer = next(m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    wrapped = layer.forward
    layer.forward = lambda x, *a, **k: wrapped(x, *a, **k)
    own = layer.forward
    patch_peft_model(model)
    assert layer.forward is not own
    unpatch_peft_model(model)
    assert layer.forward is own


def adam_steps(model, optimizer, steps):
    losses = []
    for step in range(steps):
        ids = token_batch(batch=2, seq=6, seed=10 + step)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_an_optimizer_built_before_the_patch_keeps_training_the_same_tensors(kind):
    reference, model = peft_llama(kind), peft_llama(kind)
    expected = adam_steps(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), 5)
    parameters = {n: p for n, p in model.named_parameters()}
    state_keys = list(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    patch_peft_model(model)
    assert all(p is parameters[n] for n, p in model.named_parameters()) and list(model.state_dict()) == state_keys
    losses = adam_steps(model, optimizer, 5)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected, strict=True)) < TOL
    trained = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p, trained[name]) < TOL, name
            assert rel_err(p, peft_llama(kind).get_parameter(name)) > 1e-4, name  # it did train


# ---------------------------------------------------------------------------------------------------------------
# Real training loops: transformers' Trainer (LoRA, DoRA) and AdaLoRA's allocator loop; then save and reload.
# ---------------------------------------------------------------------------------------------------------------


class CountingTokens(torch.utils.data.Dataset):
    """Sequences that count up from a random start (mod VOCAB): learnable in a few dozen steps."""

    def __init__(self, n=64, seq=8):
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(3))
        self.ids = (start + torch.arange(seq)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_trainer_loss_curve_and_adapters_equal_peft_then_reload_in_plain_peft(kind, tmp_path, fused_calls):
    curves, trained = {}, {}
    for patched in (False, True):
        model = peft_llama(kind)
        if patched:
            patch_peft_model(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), max_steps=30, per_device_train_batch_size=4,
            learning_rate=2e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingTokens())
        trainer.train()
        curves[patched] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trained[patched] = model
    assert fused_calls["dora" if kind == "dora" else "lora"] > 0
    assert len(curves[True]) == 30
    assert max(abs(a - b) / abs(b) for a, b in zip(curves[True], curves[False], strict=True)) < TOL
    assert curves[True][-1] < curves[True][0] - 0.05  # it learned something
    reference, model = trained[False], trained[True]
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p, reference_params[name]) < TOL, name

    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(VOCAB).double(), tmp_path / "adapter")
    model.eval(), reloaded.eval()
    ids = token_batch()
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, model(ids).logits) < TOL


def test_adalora_update_and_allocate_loop_equals_peft_then_reload(tmp_path, fused_calls):
    steps = 12
    overrides = dict(init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=steps, orth_reg_weight=0.1)
    runs = {}
    for patched in (False, True):
        model = peft_llama("adalora", **overrides)
        model.train()
        # peft leaves ranknum (always float(r), never saved) trainable: an optimizer on it would move it and the
        # saved adapter would no longer reload to the trained model, in plain peft too. Train the triplets only.
        trainable = [p for n, p in model.named_parameters() if p.requires_grad and "ranknum" not in n]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        if patched:
            patch_peft_model(model)
        losses = []
        for step in range(steps):
            ids = token_batch(batch=2, seq=6, seed=20 + step)
            loss = model(ids, labels=ids).loss  # peft's AdaLoRA adds its orthogonal regulariser here
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses.append(loss.item())
        runs[patched] = (model, losses)
    (reference, expected), (model, losses) = runs[False], runs[True]
    assert fused_calls["lora"] > 0
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected, strict=True)) < TOL
    reference_params = dict(reference.named_parameters())
    masked = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p, reference_params[name]) < TOL, name
            masked += int((p == 0).sum()) if "lora_E" in name else 0
    assert masked > 0  # the allocator pruned ranks, and the patched layers saw it

    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(VOCAB).double(), tmp_path / "adapter")
    model.eval(), reloaded.eval()
    ids = token_batch()
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, model(ids).logits) < TOL


# ---------------------------------------------------------------------------------------------------------------
# What stays on peft's forward, and says so.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "layer", "reason"),
    [
        (dict(target_modules=["embed_tokens", "q_proj"]), "embed_tokens", "LoRA on an nn.Embedding is not supported"),
        (dict(target_modules=["q_proj"], lora_bias=True), "q_proj", "uses lora_bias, which is not supported"),
    ],
    ids=["embedding", "lora_bias"],
)
def test_unsupported_layers_stay_on_peft_and_are_reported(overrides, layer, reason, fused_calls):
    model = peft_llama("lora", **overrides)
    ids = token_batch()
    expected = logits_and_grads(model, ids)
    report = patch_peft_model(model)
    unpatched = {name: why for name, why in report.unpatched.items() if name.endswith(layer)}
    assert unpatched and all(reason in why for why in unpatched.values()), report.unpatched
    assert all("forward" not in model.get_submodule(name).__dict__ for name in unpatched)
    assert reason in str(report)
    assert_same(logits_and_grads(model, ids), expected)
    assert fused_calls["lora"] == (2 if layer == "embed_tokens" else 0)  # the q_proj layers beside the embedding


def test_dropout_in_training_runs_fused_and_is_peft_in_eval(fused_calls):
    """Our dropout mask is a hash, not torch's RNG stream: in training the numbers equal peft's only in
    distribution; in eval mode (dropout off) they are peft's."""
    model = peft_llama(lora_dropout=0.3)
    ids = token_batch()
    model.eval()
    expected = logits_and_grads(model, ids)
    patch_peft_model(model)
    assert_same(logits_and_grads(model, ids), expected)
    model.train()
    calls = fused_calls["lora"]
    train_logits, grads = logits_and_grads(model, ids)
    assert fused_calls["lora"] == calls + NUM_LAYERS_ALL_LINEAR
    assert rel_err(train_logits, expected[0]) > 1e-4  # the mask was applied ...
    assert all(torch.isfinite(g).all() for g in grads.values())  # ... and trains


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gpt2_conv1d_fan_in_fan_out_uses_the_weight_transposed(dora, fused_calls):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                      fan_in_fan_out=True, init_lora_weights=False,
                                                      use_dora=dora))  # fmt: skip
    ids = token_batch()
    expected = logits_and_grads(model, ids)
    report = patch_peft_model(model)
    assert len(report.patched) == 8 and not report.unpatched  # 2 layers x (c_attn, attn c_proj, c_fc, mlp c_proj)
    assert_same(logits_and_grads(model, ids), expected)
    assert fused_calls["dora" if dora else "lora"] == 8
    conv1d_weights = {m.weight.data_ptr() for m in model.modules() if type(m).__name__ == "Conv1D"}
    assert set(fused_calls["weight_ptrs"]) == conv1d_weights  # the op read the Conv1D weights themselves, no copy


def test_float32_adapters_on_a_bfloat16_base_run_fused_as_accurately_as_peft(fused_calls):
    """get_peft_model keeps the adapters in float32 on a half-precision base; the patch casts them to bf16 per call.
    Neither is exact: against the same model in float64, ours is as accurate as peft's (within 2x, or bf16's
    REL_TOL), for the logits and every adapter gradient."""
    model = peft.get_peft_model(tiny_llama(VOCAB).to(torch.bfloat16), lora_config("lora"))
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32  # peft's default
    ids = token_batch()
    exact = logits_and_grads(copy.deepcopy(model).double(), ids)
    expected = logits_and_grads(model, ids)
    report = patch_peft_model(model)
    assert len(report.patched) == NUM_LAYERS_ALL_LINEAR
    (logits, grads), (peft_logits, peft_grads), (exact_logits, exact_grads) = (
        logits_and_grads(model, ids),
        expected,
        exact,
    )
    assert fused_calls["lora"] == NUM_LAYERS_ALL_LINEAR
    bound = REL_TOL[torch.bfloat16]
    assert rel_err(logits, exact_logits) < max(2 * rel_err(peft_logits, exact_logits), bound)
    assert grads.keys() == exact_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32  # the gradient reached the float32 parameter
        assert rel_err(g, exact_grads[name]) < max(2 * rel_err(peft_grads[name], exact_grads[name]), bound), name


def test_autocast_runs_on_peft(fused_calls):
    model = peft_llama()
    ids = token_batch()
    patch_peft_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        patched = model(ids).logits
    unpatch_peft_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids).logits
    assert torch.equal(patched, expected) and fused_calls["lora"] == 0  # the same code ran: peft's


def test_inputs_of_another_dtype_run_on_peft(fused_calls):
    layer = peft.tuners.lora.layer.Linear(nn.Linear(8, 6), "default", config=peft.LoraConfig(r=2), r=2, lora_alpha=4)
    wrapper = nn.ModuleDict({"layer": layer})
    patch_peft_model(wrapper)
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # peft's own error for a float64 x on float32 weights, not a wrong number
        layer(x)
    assert fused_calls["lora"] == 0
    layer(x.float())
    assert fused_calls["lora"] == 1


# ---------------------------------------------------------------------------------------------------------------
# peft's own argument names on our modules.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [lowrank_kernels.LoRALinear, lowrank_kernels.DoRALinear])
def test_lora_and_dora_modules_accept_peft_argument_names(cls):
    peft_named = cls.from_linear(nn.Linear(8, 6), 4, lora_alpha=16, lora_dropout=0.1, use_rslora=True)
    ours = cls.from_linear(nn.Linear(8, 6), 4, alpha=16, dropout=0.1, rslora=True)
    for layer in (peft_named, ours, cls(8, 6, 4, lora_alpha=16, lora_dropout=0.1, use_rslora=True)):
        assert (layer.lora_alpha, layer.lora_dropout, layer.use_rslora) == (16.0, 0.1, True)
        assert layer.scaling == 16 / 2  # rsLoRA: alpha / sqrt(r)
    default = cls(8, 6, 4)
    assert (default.lora_alpha, default.lora_dropout, default.use_rslora) == (8.0, 0.0, False)
    with pytest.raises(TypeError, match="both alpha=16 and peft's lora_alpha=16"):
        cls.from_linear(nn.Linear(8, 6), 4, alpha=16, lora_alpha=16)
    with pytest.raises(TypeError, match="use_rslora"):
        cls(8, 6, 4, rslora=True, use_rslora=False)


def test_adalora_module_accepts_peft_argument_names():
    layer = lowrank_kernels.AdaLoRALinear.from_linear(nn.Linear(8, 6), 4, lora_alpha=3, lora_dropout=0.2)
    assert (layer.lora_alpha, layer.lora_dropout, layer.scaling) == (3.0, 0.2, 3.0)
    assert lowrank_kernels.AdaLoRALinear(8, 6, 4, lora_dropout=0.1).lora_dropout == 0.1
    with pytest.raises(TypeError, match="lora_dropout"):
        lowrank_kernels.AdaLoRALinear(8, 6, 4, dropout=0.1, lora_dropout=0.1)


# ---------------------------------------------------------------------------------------------------------------
# inject_adapters(model, peft.LoraConfig(...)) builds what peft.inject_adapter_in_model builds.
# ---------------------------------------------------------------------------------------------------------------


def ours_key(peft_key: str) -> str:
    """A peft layer's state-dict key as our layer names it (no adapter name, no base_layer, magnitude unwrapped)."""
    key = peft_key.replace(".base_layer.", ".").replace(".default", "")
    return key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
        dict(r=3, lora_alpha=6, use_dora=True, target_modules="all-linear", rank_pattern={"o_proj": 2}),
        dict(init_r=4, lora_alpha=5, target_modules=["k_proj", "down_proj"], total_step=10, adalora=True),
    ],
    ids=["rslora", "dora", "adalora"],
)
def test_inject_adapters_takes_a_peft_config_like_inject_adapter_in_model(config):
    config = dict(config)
    adalora = config.pop("adalora", False)
    peft_config = (peft.AdaLoraConfig if adalora else peft.LoraConfig)(**config)
    theirs = peft.inject_adapter_in_model(peft_config, tiny_llama(VOCAB).double())
    ours = tiny_llama(VOCAB).double()
    names = lowrank_kernels.inject_adapters(ours, peft_config)
    peft_layers = [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
    assert sorted(names) == sorted(peft_layers)
    trainable = {ours_key(n): p for n, p in theirs.named_parameters() if p.requires_grad and "ranknum" not in n}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(trainable)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():  # peft's adapter tensors (made non-zero) into ours, then the same model twice
        for name, p in trainable.items():
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.1 + (1.0 if "magnitude" in name else 0.0))
            ours_params[name].copy_(p)
    theirs.eval(), ours.eval()
    for name in names:
        layer = ours.get_submodule(name)
        assert layer.lora_dropout == peft_config.lora_dropout
    ids = token_batch()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, theirs(ids).logits) < TOL


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(lora_bias=True), "lora_bias"),
        (dict(init_lora_weights="pissa"), "PiSSA"),
        (dict(init_lora_weights=False), "init_lora_weights=False is not supported"),
    ],
)
def test_inject_adapters_refuses_what_a_peft_config_asks_and_we_lack(config, message):
    model = tiny_llama(VOCAB)
    with pytest.raises(ValueError, match=message):
        lowrank_kernels.inject_adapters(model, peft.LoraConfig(target_modules=["q_proj"], **config))
    assert not lowrank_kernels.adapter_layers(model)
    with pytest.raises(TypeError, match="takes its settings from the config"):
        lowrank_kernels.inject_adapters(model, peft.LoraConfig(target_modules=["q_proj"]), r=4)
