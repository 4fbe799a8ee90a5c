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

from dataclasses import dataclass
from pathlib import Path
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


# --- Stable Diffusion shortcut LoRAs


@dataclass(frozen=True)
class ShortcutSpec:
    """A public distillation LoRA for SD1.5 and how its authors sample with it.

    repo, weight_name   where it lives on the Hugging Face hub
    guidance            recommended CFG scale (≤ 1: no CFG, one conditional UNet call per jump)
    spacing             timestep spacing it was distilled for ("trailing" for Hyper-SD / TCD)
    lora_scale          scale of the LoRA update (Hyper-SD recommends 1.0 for the non-CFG LoRAs)
    steps               number of steps it was distilled for (documentation; ShortFT picks its own jumps)
    trajectory_preserving  False for LCM, which re-noises with fresh noise at every step
    """

    repo: str
    weight_name: str
    guidance: float = 0.0
    spacing: str = "trailing"
    lora_scale: float = 1.0
    steps: int = 8
    trajectory_preserving: bool = True


SHORTCUTS: dict[str, ShortcutSpec] = {
    "hyper-sd-8": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD15-8steps-lora.safetensors", steps=8),
    "hyper-sd-4": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD15-4steps-lora.safetensors", steps=4),
    "hyper-sd-2": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD15-2steps-lora.safetensors", steps=2),
    "hyper-sd-1": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD15-1step-lora.safetensors", steps=1),
    "hyper-sd-8-cfg": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD15-8steps-CFG-lora.safetensors", guidance=5.0,
                                   steps=8),
    "hyper-sd-12-cfg": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD15-12steps-CFG-lora.safetensors", guidance=5.0,
                                    steps=12),
    "tcd": ShortcutSpec("h1t/TCD-SD15-LoRA", "pytorch_lora_weights.safetensors", steps=4),
    "pcm-4": ShortcutSpec("wangfuyun/PCM_Weights", "sd15/pcm_sd15_smallcfg_4step_converted.safetensors",
                          guidance=1.0, spacing="trailing", steps=4),
    "lcm": ShortcutSpec("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors", guidance=1.0,
                        spacing="leading", steps=4, trajectory_preserving=False),
}
DEFAULT_SHORTCUT = "hyper-sd-8"


def resolve_shortcut(name_or_path: str, local_files_only: bool = False) -> tuple[Path, ShortcutSpec]:
    """A registry name (see SHORTCUTS) or a local .safetensors file → (file on disk, sampling spec).
    A local file gets Hyper-SD's defaults (no CFG, trailing spacing, scale 1). Errors are one line:
    an unknown name lists the known ones; a missing file says the `hf download` command to run."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in SHORTCUTS:
        if path.suffix == ".safetensors" or path.parent != Path("."):
            if not path.is_file():
                raise FileNotFoundError(f"shortcut LoRA file {str(path)!r} does not exist")
            return path, ShortcutSpec(repo="", weight_name=path.name)
        raise ValueError(f"unknown shortcut {name_or_path!r}: choose from {', '.join(SHORTCUTS)} "
                         f"or pass a path to a .safetensors LoRA")
    spec = SHORTCUTS[name_or_path]
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(spec.repo, spec.weight_name, local_files_only=local_files_only)), spec
    except Exception as e:  # offline, not cached, gated, …
        raise FileNotFoundError(
            f"shortcut {name_or_path!r} is not available ({type(e).__name__}): fetch it with "
            f"`hf download {spec.repo} {spec.weight_name}` and pass the file path, or retry online"
        ) from None


def load_shortcut_lora(unet: torch.nn.Module, file: str | Path, adapter_name: str = "shortcut",
                       lora_scale: float = 1.0) -> list[torch.nn.Parameter]:
    """Load a distillation LoRA (.safetensors, diffusers or Kohya format) into `unet` as a separate,
    **frozen, never fused** peft adapter (SD_NOTES trap 2) with its scale set once. Returns its parameters.
    Afterwards only `adapter_name` is active: set the adapters you want with `set_active_adapters`."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(load_file(str(file)))
    if not any(k.startswith("unet.") for k in state_dict):
        raise ValueError(f"{file} holds no UNet LoRA weights (keys look like {next(iter(state_dict), None)!r})")
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n]
    for p in params:
        p.requires_grad_(False)
    for layer in lora_layers(unet):
        if adapter_name in getattr(layer, "scaling", {}):
            layer.set_scale(adapter_name, lora_scale)
    return params


def shortcut_jump(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_s: float) -> torch.Tensor:
    """A shortcut jump t → s: the deterministic DDIM step with the distilled model's ε (TCD with γ = 0,
    Hyper-SD's DDIM sampling). Identical to `shortft.ddim_step` with η = 0; named here for readers."""
    from shortft import ddim_step

    return ddim_step(x_t, eps, alpha_bar_t, alpha_bar_s)
