"""Tests of shortcut.set_active_adapters with real peft LoRA layers.

Paper Sec. 3: the shortcut (frozen few-step LoRA) and the trained LoRA live on the same denoiser;
the chain switches between "tuned", "shortcut" and "shortcut+tuned". The switch must not touch
requires_grad (peft's own set_adapter does: SD_NOTES trap 1) and must happen inside checkpointed
functions so the recomputation in backward sees the same adapters (trap 3).

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

SCALES = {"shortcut": 4 / 2, "tuned": 3 / 3}  # lora_alpha / r


def lora_model():
    """Linear(4, 8) → tanh → Linear(8, 4), float64, with LoRAs "shortcut" (r=2, α=4, frozen, random)
    and "tuned" (r=3, α=3, trainable, random so that its delta is not zero)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], lora_dropout=0.0),
                            model, adapter_name="shortcut")
    with warnings.catch_warnings():  # a second adapter on the same model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(LoraConfig(r=3, lora_alpha=3, target_modules=["0", "2"], lora_dropout=0.0),
                                model, adapter_name="tuned")
    model.double()
    for name, p in model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.5)
        p.requires_grad_(".tuned." in name)
    return model


def lora_params(model, adapter):
    return [p for n, p in model.named_parameters() if f".{adapter}." in n]


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
    assert all(p.requires_grad for p in lora_params(model, "tuned"))
    for layer in shortcut.lora_layers(model):
        layer.set_adapter("shortcut")
    assert not any(p.requires_grad for p in lora_params(model, "tuned"))  # the trained LoRA got frozen
    assert all(p.requires_grad for p in lora_params(model, "shortcut"))  # the frozen shortcut got unfrozen


def test_set_active_adapters_keeps_requires_grad_and_matches_closed_form():
    model = lora_model()
    layers = shortcut.lora_layers(model)
    assert len(layers) == 2
    before = flags(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    base = closed_form(model, x, [])
    for active in ([], ["shortcut"], ["tuned"], ["shortcut", "tuned"], ["shortcut"], ["tuned"]):
        shortcut.set_active_adapters(model, active, layers=layers if active == ["tuned"] else None)
        assert flags(model) == before
        torch.testing.assert_close(model(x), closed_form(model, x, active), rtol=1e-12, atol=1e-12)
    # the deltas are real: each adapter changes the output, and the two effects add up per layer
    shortcut.set_active_adapters(model, [])
    torch.testing.assert_close(model(x), base)
    shortcut.set_active_adapters(model, ["shortcut"])
    assert (model(x) - base).abs().max() > 1e-2
    # after switching shortcut → tuned, the tuned LoRA still trains and the shortcut does not
    shortcut.set_active_adapters(model, ["shortcut"])
    shortcut.set_active_adapters(model, ["tuned"])
    y = model(x)
    shortcut.set_active_adapters(model, ["shortcut", "tuned"])
    (model(y) ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(model, "tuned"))
    assert all(p.grad is None for p in lora_params(model, "shortcut"))
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


def _chain(model, x):
    """Three evaluations with different adapters, as in a ShortFT chain: tuned step, then jumps."""
    shortcut.set_active_adapters(model, ["tuned"])
    y = model(x)
    shortcut.set_active_adapters(model, ["shortcut", "tuned"])
    z = model(torch.tanh(y))
    shortcut.set_active_adapters(model, ["shortcut"])
    return model(torch.tanh(z))


def _grads(model, x, fn):
    for p in model.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    (fn(x) ** 2).sum().backward()
    return [x.grad] + [p.grad for p in lora_params(model, "tuned")]


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
    # adapters: the gradients are wrong, or torch refuses the mismatching recomputation (trap 3)
    def outside(v):
        ck = lambda f, u: torch.utils.checkpoint.checkpoint(f, u, use_reentrant=False)  # noqa: E731
        shortcut.set_active_adapters(model, ["tuned"])
        y = ck(model, v)
        shortcut.set_active_adapters(model, ["shortcut", "tuned"])
        z = ck(model, torch.tanh(y))
        shortcut.set_active_adapters(model, ["shortcut"])
        return ck(model, torch.tanh(z))

    try:
        wrong = _grads(model, x, outside)
    except torch.utils.checkpoint.CheckpointError:  # torch noticed the different recomputation
        return
    assert any(w is None or not torch.allclose(w, r) for w, r in zip(wrong, ref))


def test_requires_peft_layers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert shortcut.lora_layers(model) == []
    shortcut.set_active_adapters(model, ["tuned"])  # nothing to switch: a no-op
    with pytest.raises(TypeError):
        shortcut.set_active_adapters(model)  # names are required
