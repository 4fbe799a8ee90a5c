"""The trajectory-preserving few-step model ("shortcut") that ShortFT builds its chain from.

Paper Sec. 3 (shortcut-based denoising chain): a few-step model distilled from the base model
jumps x_t → x_s along (approximately) the base model's own DDIM/ODE trajectory in one evaluation.
A jump is a deterministic DDIM step with the shortcut's ε:  x_s = ddim_step(x_t, ε_φ(x_t, t, s), ᾱ_t, ᾱ_s).

Both worlds realise the shortcut as a frozen LoRA on the base denoiser, next to the trainable LoRA:
    toy  a LoRA this repo distils from the toy model's 50-step DDIM trajectories;
    SD   a public distillation LoRA (Hyper-SD by default; TCD, PCM; LCM with a warning).

Notation: t, s integer timesteps (s < t, s = shortft.CLEAN for the clean end point); M jumps.

Run: python -c "import shortcut; help(shortcut.set_active_adapters)"
"""

from __future__ import annotations

from typing import Sequence

import torch

# ----------------------------------------------------------------------------- adapters (both worlds)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every peft tuner layer inside `model` (LoRA-wrapped Linear/Conv layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_active_adapters(model: torch.nn.Module, names: Sequence[str], layers: Sequence[torch.nn.Module] | None = None) -> None:
    """Make exactly `names` the active LoRA adapters (none: the base model) **without changing
    requires_grad**. peft's own `set_adapter`/`disable_adapters` mark active adapters trainable and
    inactive ones frozen, which silently freezes the trainable LoRA when the shortcut is switched in
    before `backward()` (SD_NOTES trap 1). Call it inside checkpointed functions (trap 3).
    Pass `layers=lora_layers(model)` once to skip the module walk on every call."""
    names = list(names)
    for layer in lora_layers(model) if layers is None else layers:
        flags = [p.requires_grad for p in layer.parameters()]
        layer.enable_adapters(True)
        layer.set_adapter(names)
        for p, flag in zip(layer.parameters(), flags):
            p.requires_grad_(flag)
