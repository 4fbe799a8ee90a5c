"""Tests of shortcut.set_active_adapters with real peft LoRA layers.

Paper Sec. 3: the shortcut (frozen few-step LoRA) and the trained LoRA branches live on the same
denoiser; the chain switches between the stacked branches (tuned_1, tuned_1 + tuned_2, …) at the LoRA
points and the shortcut alone in the jumps between them. The switch must not touch requires_grad
(peft's own set_adapter does) and must happen inside checkpointed functions so the
recomputation in backward sees the same adapters.

Closed form checked here, per LoRA-wrapped Linear (dropout 0):
    y = W x + b + Σ_{a active} (α_a / r_a) · B_a A_a x

Notation: W, b base weights; A_a (r_a × in), B_a (out × r_a) the LoRA factors of adapter a.

Run: python -m pytest -q tests/test_adapters.py
"""

import warnings

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

import shortcut

SCALES = {"shortcut": 4 / 2, "tuned_1": 3 / 3, "tuned_2": 6 / 2}  # lora_alpha / r
TUNED = ["tuned_1", "tuned_2"]


def lora_model():
    """Linear(4, 8) → tanh → Linear(8, 4), float64, with LoRAs "shortcut" (r=2, α=4, frozen, random)
    and the branches "tuned_1" (r=3, α=3) and "tuned_2" (r=2, α=6), trainable, random so that their deltas are
    not zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], lora_dropout=0.0),
                            model, adapter_name="shortcut")
    with warnings.catch_warnings():  # more adapters on the same model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name, r, alpha in (("tuned_1", 3, 3), ("tuned_2", 2, 6)):
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["0", "2"], lora_dropout=0.0),
                                    model, adapter_name=name)
    model.double()
    for name, p in model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.5)
        p.requires_grad_(".tuned_" in name)
    return model


def lora_params(model, *adapters):
    return [p for n, p in model.named_parameters() if any(f".{a}." in n for a in adapters)]


def closed_form(model, x, active):
    h = x
    for i, layer in enumerate(model):
        if i == 1:
            h = torch.tanh(h)
            continue
        y = torch.nn.functional.linear(h, layer.base_layer.weight, layer.base_layer.bias)
        for a in active:
            y = y + SCALES[a] * h @ layer.lora_A[a].weight.T @ layer.lora_B[a].weight.T
        h = y
    return h


def flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_peft_set_adapter_flips_requires_grad():
    """The trap: peft's layer.set_adapter makes the active adapter trainable and the others frozen."""
    model = lora_model()
    assert all(p.requires_grad for p in lora_params(model, *TUNED))
    for layer in shortcut.lora_layers(model):
        layer.set_adapter("shortcut")
    assert not any(p.requires_grad for p in lora_params(model, *TUNED))  # the trained branches got frozen
    assert all(p.requires_grad for p in lora_params(model, "shortcut"))  # the frozen shortcut got unfrozen


def test_set_active_adapters_keeps_requires_grad_and_matches_closed_form():
    model = lora_model()
    layers = shortcut.lora_layers(model)
    assert len(layers) == 2
    before = flags(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    base = closed_form(model, x, [])
    for active in ([], ["shortcut"], ["tuned_1"], TUNED, ["shortcut"], ["tuned_2"], ["shortcut", *TUNED]):
        shortcut.set_active_adapters(model, active, layers=layers if active == TUNED else None)
        assert flags(model) == before
        torch.testing.assert_close(model(x), closed_form(model, x, active), rtol=1e-12, atol=1e-12)
    # the deltas are real: each adapter changes the output, and stacked branches add up per layer
    shortcut.set_active_adapters(model, [])
    torch.testing.assert_close(model(x), base)
    for active in (["shortcut"], ["tuned_1"], ["tuned_2"]):
        shortcut.set_active_adapters(model, active)
        assert (model(x) - base).abs().max() > 1e-2
    # after switching shortcut → stacked branches, both branches still train and the shortcut does not
    shortcut.set_active_adapters(model, ["shortcut"])
    shortcut.set_active_adapters(model, TUNED)
    y = model(x)
    shortcut.set_active_adapters(model, ["shortcut"])
    (model(y) ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(model, *TUNED))
    assert all(p.grad is None for p in lora_params(model, "shortcut"))
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


def test_a_switch_skips_only_layers_already_in_that_state():
    """set_active_adapters leaves a layer alone only when its own state already is `names` (no memo that another
    call can outdate): after peft disables the adapters, or switches one layer elsewhere, the same call repairs it,
    and repeating a call changes nothing."""
    model = lora_model()
    layers = shortcut.lora_layers(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    before = flags(model)
    shortcut.set_active_adapters(model, TUNED)
    shortcut.set_active_adapters(model, TUNED)  # nothing to do
    torch.testing.assert_close(model(x), closed_form(model, x, TUNED), rtol=1e-12, atol=1e-12)
    assert flags(model) == before
    layers[0].enable_adapters(False)  # peft's own switches behind our back: the layer runs as the base
    layers[1].set_adapter("shortcut")
    peft_flags = flags(model)  # (peft changed requires_grad too: the trap)
    shortcut.set_active_adapters(model, TUNED)
    assert all(not layer.disable_adapters and layer.active_adapters == TUNED for layer in layers)
    assert flags(model) == peft_flags
    torch.testing.assert_close(model(x), closed_form(model, x, TUNED), rtol=1e-12, atol=1e-12)


def _chain(model, x):
    """Three evaluations with different adapters, as in a ShortFT chain: step with LoRA_1, shortcut jump, step with
    the stacked LoRA_1 + LoRA_2."""
    shortcut.set_active_adapters(model, ["tuned_1"])
    y = model(x)
    shortcut.set_active_adapters(model, ["shortcut"])
    z = model(torch.tanh(y))
    shortcut.set_active_adapters(model, TUNED)
    return model(torch.tanh(z))


def _grads(model, x, fn):
    for p in model.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    (fn(x) ** 2).sum().backward()
    return [x.grad] + [p.grad for p in lora_params(model, *TUNED)]


def test_switch_inside_checkpoint_gives_the_same_gradients():
    model = lora_model()
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = _grads(model, x, lambda x: _chain(model, x))
    ckpt = _grads(model, x, lambda x: torch.utils.checkpoint.checkpoint(lambda v: _chain(model, v), x,
                                                                        use_reentrant=False))
    assert all(g is not None for g in ref)
    for a, b in zip(ckpt, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in lora_params(model, "shortcut"))

    # negative control: switching *outside* the checkpointed calls recomputes them with the wrong
    # adapters: the gradients are wrong, or torch refuses the mismatching recomputation
    def outside(v):
        ck = lambda f, u: torch.utils.checkpoint.checkpoint(f, u, use_reentrant=False)  # noqa: E731
        shortcut.set_active_adapters(model, ["tuned_1"])
        y = ck(model, v)
        shortcut.set_active_adapters(model, ["shortcut"])
        z = ck(model, torch.tanh(y))
        shortcut.set_active_adapters(model, TUNED)
        return ck(model, torch.tanh(z))

    try:
        wrong = _grads(model, x, outside)
    except torch.utils.checkpoint.CheckpointError:  # torch noticed the different recomputation
        return
    assert any(w is None or not torch.allclose(w, r) for w, r in zip(wrong, ref))


def test_requires_peft_layers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert shortcut.lora_layers(model) == []
    shortcut.set_active_adapters(model, ["tuned_1"])  # nothing to switch: a no-op
    with pytest.raises(TypeError):
        shortcut.set_active_adapters(model)  # names are required
