"""The trajectory-preserving few-step model ("shortcut") that ShortFT builds its chain from.

Paper Sec. 3 (shortcut-based denoising chain): a few-step model distilled from the base model
jumps x_t → x_s along (approximately) the base model's own DDIM/ODE trajectory in one evaluation.
A jump is one step of the world's schedule with the shortcut's prediction: a deterministic DDIM step with its ε,
x_s = ddim_step(x_t, ε_φ(x_t, t, s), ᾱ_t, ᾱ_s), or on a flow model (SD3) one Euler step with its velocity,
x_s = x_t + (σ_s − σ_t) v_φ(x_t, t).

Every world realises the shortcut as a frozen LoRA on the base denoiser, next to the trainable LoRA:
    toy  a LoRA this repo distils from the toy model's 50-step DDIM trajectories;
    SD   a public distillation LoRA (Hyper-SD by default; TCD, PCM; LCM with a warning);
    SD3  a public CFG-preserving flow LoRA (Hyper-SD3 4/8/16 steps), on the transformer.

Notation: t, s timesteps (s < t, s = shortft.CLEAN for the clean end point; integers on a DDIM grid, σ·1000 floats on
a flow grid); M jumps.

Run: python -c "import shortcut; help(shortcut.set_active_adapters)"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.utils.checkpoint

# ----------------------------------------------------------------------------- adapters (both worlds)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every peft tuner layer inside `model` (LoRA-wrapped Linear/Conv layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_active_adapters(model: torch.nn.Module, names: Sequence[str], layers: Sequence[torch.nn.Module] | None = None) -> None:
    """Make exactly `names` the active LoRA adapters (none: the base model) **without changing
    requires_grad**: peft's own `set_adapter`/`disable_adapters` mark active adapters trainable and
    inactive ones frozen, which silently leaves the trainable LoRA without gradient when another adapter
    is switched in before `backward()`. Call it inside a gradient-checkpointed function, so that the
    recomputation in backward runs with the same adapters as the forward pass.
    Pass `layers=lora_layers(model)` once to skip the module walk on every call. A layer whose active adapters are
    already `names` is left as it is: peft's switch walks every parameter of the layer twice, which on a small UNet
    costs more than the UNet call itself, and most consecutive steps of a chain use the same adapters."""
    names = list(names)
    for layer in lora_layers(model) if layers is None else layers:
        if not layer.disable_adapters and layer.active_adapters == names:
            continue
        flags = [p.requires_grad for p in layer.parameters()]
        if layer.disable_adapters:  # enable_adapters(True) is set_adapter(the old names) and the flag
            layer.enable_adapters(True)
        layer.set_adapter(names)
        for p, flag in zip(layer.parameters(), flags):
            p.requires_grad_(flag)


def enable_adapter_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing inside a diffusers model (`enable_gradient_checkpointing`: each UNet / transformer block
    is recomputed in backward) that recomputes every block with the adapters that were active when it ran forward.
    With the default checkpointing a block is recomputed with whatever adapters the last denoiser call left active
    (peft trap 3 inside the model): in a ShortFT chain that is another step's stack or the shortcut, which gives a
    CheckpointError when the shapes differ, or silently wrong gradients when they agree."""

    def checkpoint(block, *args):
        layers = lora_layers(block)
        active = list(layers[0].active_adapters) if layers else []

        def run(*inputs):
            if layers:  # the forward's adapters; in the forward itself this changes nothing
                set_active_adapters(block, active, layers)
            return block(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


# ----------------------------------------------------------------------------- toy shortcut (distilled here)
#
# The toy's shortcut is a LoRA ("shortcut") on the base ε-MLP that takes the jump end s as an input.
# A jump is one DDIM step with its ε (x_s = ddim_step(x_t, ε_φ(x_t, t, s), ᾱ_t, ᾱ_s)), so the
# shortcut can be trained by matching the *teacher map* Φ_{t→s}: the base model's own DDIM chain
# from t to s along the N-step grid. ShortFT sends the reward gradient through the shortcut
# (∇_{x_t} r = J_φᵀ ∇r), so what matters besides landing in the right place is the Jacobian. The loss
# can therefore also match Jacobian-vector products J v along random unit directions v (central
# differences: 3 evaluations on one batch, ~10× cheaper here than forward-mode AD through peft):
#
#     L = E w_{t→s} (‖x_s^φ − Φ_{t→s}(x_t)‖² + λ_jvp ‖J_φ v − J_Φ v‖²),   w = (|b_{t→s}| + 0.1)^(−p).
#
# Measured on the toy (README): what decides gradient fidelity is the per-jump weight w, not λ_jvp.
# Unweighted x-space matching (p = 0) is dominated by the long jumps (|b| ≈ 14 for 981 → x_0), and the
# short jumps near x_0 drift away from the base's accurate steps (cosine 0.8–0.9 at t ≈ 100); ε-space
# weighting (p = 2) keeps every jump accurate, and then value matching alone reaches cosine ≥ 0.97.
#
# Timesteps here are per-sample (B,) integer tensors; CLEAN (−1) is the chain's end point.
# `eps_fn(x, t, s, c)` is a batched ε-model with per-sample timesteps t, s and conditioning c.


def alpha_bar_at(schedule, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for a (B,) tensor of integer timesteps (CLEAN = −1 gives ᾱ_final), float32 (B,)."""
    ac = schedule.alphas_cumprod.to(t.device)
    a = ac[t.clamp(min=0)]
    return torch.where(t < 0, torch.full_like(a, schedule.final_alpha_cumprod), a).float()


def jump(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, c, eps_fn, schedule) -> torch.Tensor:
    """One shortcut jump t → s (per sample):  x_s = ddim_step(x_t, ε_φ(x_t, t, s, c), ᾱ_t, ᾱ_s).
    x (B, D), t and s (B,) long."""
    from shortft import ddim_step

    return ddim_step(x, eps_fn(x, t, s, c), alpha_bar_at(schedule, t), alpha_bar_at(schedule, s))


def jump_timesteps(t: int, s: int, jumps: int) -> list[int]:
    """`jumps`+1 integer points (for M shortcut jumps) from t down to s, evenly spaced in timestep (s = CLEAN counts as −1)."""
    if jumps < 1:
        raise ValueError(f"number of shortcut jumps must be ≥ 1, got {jumps}")
    if jumps > t - s:
        raise ValueError(f"cannot split {t} → {s} into {jumps} jumps of at least one timestep")
    return [t] + [int(round(t + (s - t) * i / jumps)) for i in range(1, jumps)] + [s]


def teacher_path(t: int, s: int, grid: Sequence[int]) -> list[int]:
    """The base chain's timesteps from t to s: t, the grid points strictly between, s."""
    return [int(t)] + [int(g) for g in grid if s < g < t] + [int(s)]


def teacher_map(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, c, eps_fn, schedule, grid: Sequence[int]) -> torch.Tensor:
    """Φ_{t→s}(x_t): the base model's DDIM chain along `grid` from t to s, vectorised over samples
    with different (t, s); at each step only the samples whose path is not finished are evaluated."""
    from shortft import ddim_step

    paths = [teacher_path(int(a), int(b), grid) for a, b in zip(t.tolist(), s.tolist())]
    length = max(len(p) for p in paths)
    steps = torch.tensor([len(p) - 1 for p in paths], device=x.device)
    paths = torch.tensor([p + [p[-1]] * (length - len(p)) for p in paths], device=x.device)  # (B, L)
    for j in range(length - 1):
        idx = (steps > j).nonzero().squeeze(1)
        t_j, s_j, x_j = paths[idx, j], paths[idx, j + 1], x[idx]
        c_j = c[idx] if isinstance(c, torch.Tensor) else c
        x_s = ddim_step(x_j, eps_fn(x_j, t_j, s_j, c_j), alpha_bar_at(schedule, t_j), alpha_bar_at(schedule, s_j))
        x = x.index_put((idx,), x_s)
    return x


def central_difference_jvp(map_fn, x: torch.Tensor, v: torch.Tensor, *per_sample, h: float = 1e-3):
    """(f(x), J_f(x) v) with J v ≈ (f(x + h v) − f(x − h v)) / 2h, in one batched call of
    map_fn(x3, *per_sample3) on [x, x + hv, x − hv] (per-sample arguments repeated). Error O(h²);
    differentiable, so it can be a training target and a training loss alike."""
    rep = [torch.cat([a, a, a]) if isinstance(a, torch.Tensor) else a for a in per_sample]
    y = map_fn(torch.cat([x, x + h * v, x - h * v]), *rep)
    y0, yp, ym = y.chunk(3)
    return y0, (yp - ym) / (2 * h)


def sample_jump_pairs(n: int, t_max: int, generator: torch.Generator | None = None, p_clean: float = 0.3):
    """(t, s) pairs for distillation: t ~ U{1, …, t_max}; s = CLEAN with probability p_clean, else
    s ~ U{−1, …, t−1}. Returns two (n,) long tensors."""
    t = torch.randint(1, t_max + 1, (n,), generator=generator)
    s = (torch.rand(n, generator=generator) * (t + 1).float()).long() - 1  # U{-1, …, t-1}
    clean = torch.rand(n, generator=generator) < p_clean
    return t, torch.where(clean, torch.full_like(s, -1), s)


def make_distillation_set(x_t, t, s, c, teacher_eps, schedule, grid, generator=None, h: float = 1e-3) -> dict[str, torch.Tensor]:
    """Teacher targets for shortcut distillation: Φ_{t→s}(x_t) and J_Φ v for a random unit v per sample
    (central differences). x_t (B, D); t, s (B,) long; c (B,) conditioning. No autograd graph."""
    v = torch.randn(x_t.shape, generator=generator)
    v = v / v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.ndim - 1))

    def phi(x, t_, s_, c_):
        return teacher_map(x, t_, s_, c_, teacher_eps, schedule, grid)

    with torch.no_grad():
        x_s, jv = central_difference_jvp(phi, x_t, v, t, s, c, h=h)
    return {"x_t": x_t, "t": t, "s": s, "c": c, "v": v, "x_s": x_s, "jv": jv}


def jump_eps_coefficient(t: torch.Tensor, s: torch.Tensor, schedule) -> torch.Tensor:
    """b_{t→s} in x_s = √(ᾱ_s/ᾱ_t) x_t + b ε:  b = √(1−ᾱ_s) − √(ᾱ_s (1−ᾱ_t) / ᾱ_t), (B,).
    |b| is how much an error in the jump's ε moves x_s (≈14 for 981 → x_0, ≈0 for tiny jumps)."""
    a_t, a_s = alpha_bar_at(schedule, t), alpha_bar_at(schedule, s)
    return (1 - a_s).sqrt() - (a_s * (1 - a_t) / a_t).sqrt()


def distillation_loss(batch: dict[str, torch.Tensor], student_eps, schedule, jvp_weight: float = 0.0, h: float = 1e-3,
                      weight_power: float = 1.0, weight_floor: float = 0.1):
    """L = mean w (‖x_s^φ − x_s^teacher‖² + λ_jvp ‖J_φ v − J_Φ v‖²),  w = (|b_{t→s}| + floor)^(−p).

    p = 0 is plain x-space matching, dominated by the long jumps (|b| up to ≈14) so that short jumps
    near x_0 drift from the base's accurate steps; p = 2 is ε-space matching; p = 1 (default) sits
    between. With λ_jvp = 0 this is value (trajectory) matching only. Returns (loss, value, jvp)."""
    w = (jump_eps_coefficient(batch["t"], batch["s"], schedule).abs() + weight_floor) ** (-weight_power)
    w = w / w.mean()

    def student(x, t_, s_, c_):
        return jump(x, t_, s_, c_, student_eps, schedule)

    if jvp_weight > 0:
        x_s, jv = central_difference_jvp(student, batch["x_t"], batch["v"], batch["t"], batch["s"], batch["c"], h=h)
        jvp_part = (w * (jv - batch["jv"]).pow(2).flatten(1).sum(1)).mean()
    else:
        x_s, jvp_part = student(batch["x_t"], batch["t"], batch["s"], batch["c"]), torch.zeros(())
    value_part = (w * (x_s - batch["x_s"]).pow(2).flatten(1).sum(1)).mean()
    return value_part + jvp_weight * jvp_part, value_part.detach(), jvp_part.detach()


def adapter_state_dict(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The parameters of LoRA adapter `name` (keys as in `model.named_parameters()`)."""
    tensors = {k: p.detach().clone() for k, p in model.named_parameters() if f".{name}." in k}
    if not tensors:
        raise KeyError(f"model has no LoRA adapter named {name!r}")
    return tensors


def load_adapter_state_dict(model: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (from `adapter_state_dict`) into adapter `name`; the key sets must match exactly."""
    params = {k: p for k, p in model.named_parameters() if f".{name}." in k}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"adapter {name!r} does not match the saved tensors (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != tensors[k].shape:
                raise ValueError(f"{k}: saved shape {tuple(tensors[k].shape)} != model shape {tuple(p.shape)}")
            p.copy_(tensors[k])


# --- Stable Diffusion shortcut LoRAs


@dataclass(frozen=True)
class ShortcutSpec:
    """A public distillation LoRA and how its authors sample with it.

    repo, weight_name   where it lives on the Hugging Face hub
    guidance            recommended CFG scale (≤ 1: no CFG, one conditional call per jump)
    spacing             timestep spacing it was distilled for ("trailing" for Hyper-SD / TCD; "flow" for the Euler
                        grid of a flow-matching scheduler, Hyper-SD3)
    lora_scale          scale of the LoRA update (Hyper-SD recommends 1.0 for the SD1.5 non-CFG LoRAs, 0.125 for SD3)
    steps               number of steps it was distilled for (documentation; ShortFT picks its own jumps)
    trajectory_preserving  False for LCM, which re-noises with fresh noise at every step
    base                the model family it was distilled from: "sd1.5" (a UNet LoRA) or "sd3" (a transformer LoRA)
    """

    repo: str
    weight_name: str
    guidance: float = 0.0
    spacing: str = "trailing"
    lora_scale: float = 1.0
    steps: int = 8
    trajectory_preserving: bool = True
    base: str = "sd1.5"


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
    # SD3-medium (a transformer LoRA each, ≈ 236 MB). The model card samples them with CFG 3 / 5 / 7 at 4 / 8 / 16
    # steps, fused at scale 0.125: they keep CFG (unlike the SD1.5 non-CFG LoRAs), so a jump uses CFG too.
    "hyper-sd3-4-cfg": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD3-4steps-CFG-lora.safetensors", guidance=3.0,
                                    spacing="flow", lora_scale=0.125, steps=4, base="sd3"),
    "hyper-sd3-8-cfg": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD3-8steps-CFG-lora.safetensors", guidance=5.0,
                                    spacing="flow", lora_scale=0.125, steps=8, base="sd3"),
    "hyper-sd3-16-cfg": ShortcutSpec("ByteDance/Hyper-SD", "Hyper-SD3-16steps-CFG-lora.safetensors", guidance=7.0,
                                     spacing="flow", lora_scale=0.125, steps=16, base="sd3"),
}
DEFAULT_SHORTCUT = "hyper-sd-4"  # the paper's shortcut (Hyper-SD 4-step), for SD1.5
DEFAULT_SHORTCUT_SD3 = "hyper-sd3-8-cfg"
"""This repo's SD3 default (the paper names none): of Hyper-SD3's 4 / 8 / 16-step LoRAs, the 8-step one takes steps
(Δσ ≈ 0.05 … 0.33 on its own 8-step grid with shift 3) closest to the three jumps of the paper's layout on SD3's
28-step grid (σ 0.79 → 0.60, 0.56 → 0.41, 0.35 → 0.01), as the 4-step LoRA's quarter-trajectory steps match the
SD1.5 jumps (741 → 501, 481 → 261, 241 → 1). docs/sd3.md has the numbers."""


def resolve_shortcut(name_or_path: str, local_files_only: bool = False) -> tuple[Path, ShortcutSpec]:
    """A registry name (see SHORTCUTS) or a local .safetensors file → (file on disk, sampling spec).
    A local file named as exactly one registry file (e.g. Hyper-SD3-8steps-CFG-lora.safetensors, fetched by hand) gets
    that entry's spec (its CFG and scale); any other gets Hyper-SD's defaults (no CFG, trailing spacing, scale 1).
    Errors are one line: an unknown name lists the known ones; a missing file says the `hf download` command to run."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in SHORTCUTS:
        if path.suffix == ".safetensors" or path.parent != Path("."):
            if not path.is_file():
                raise FileNotFoundError(f"shortcut LoRA file {str(path)!r} does not exist")
            named = [spec for spec in SHORTCUTS.values() if spec.weight_name == path.name]
            return path, named[0] if len(named) == 1 else ShortcutSpec(repo="", weight_name=path.name)
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


def read_lora_file(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a shortcut LoRA file, checked before any training uses them: readable safetensors, every weight
    finite and of trained size (runio.check_weights_finite: a NaN or rescaled file would make every update NaN).
    ValueError (one line) naming the file."""
    import runio
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' own error, OSError, …
        raise ValueError(f"{file} is not a readable .safetensors file ({type(e).__name__})") from None
    try:
        runio.check_weights_finite(tensors, f"shortcut LoRA {file}")
    except runio.CheckpointError as e:
        raise ValueError(str(e)) from None
    return tensors


def load_shortcut_lora(unet: torch.nn.Module, file: str | Path, adapter_name: str = "shortcut",
                       lora_scale: float = 1.0) -> list[torch.nn.Parameter]:
    """Load a distillation LoRA (.safetensors) into the denoiser `unet` — SD1.5's UNet (diffusers or Kohya format,
    keys `unet.…`) or SD3's transformer (diffusers format, keys `transformer.…`) — as a separate, **frozen, never
    fused** peft adapter with its scale set once (peft runs a fused layer as its base layer only, so fusing the
    shortcut would silently drop the trainable LoRA there). Returns its parameters. Afterwards only `adapter_name` is
    active: set the adapters you want with `set_active_adapters`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline

    tensors = read_lora_file(file)
    if isinstance(unet, SD3Transformer2DModel):
        what, prefix = "SD3 transformer", "transformer."
        state_dict = StableDiffusion3Pipeline.lora_state_dict(tensors)

        def load():
            StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, unet, adapter_name=adapter_name)
    else:
        what, prefix = "UNet", "unet."
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(tensors)

        def load():
            StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name=adapter_name)
    if not any(k.startswith(prefix) for k in state_dict):
        raise ValueError(f"{file} holds no {what} LoRA weights (keys look like {next(iter(state_dict), None)!r})")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # weights it cannot place are an error below, not a warning
    try:
        load()
    except (ValueError, RuntimeError) as e:  # peft: none of its modules is in this model, or other shapes
        raise ValueError(f"{file} does not fit this {what} ({' '.join(str(e).split())[:200]})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n]
    saved = sum(v.numel() for v in state_dict.values() if v.dim() > 0)
    if sum(p.numel() for p in params) != saved:  # diffusers only warns about weights it could not place
        raise ValueError(f"{file} does not fit this {what}: {saved - sum(p.numel() for p in params):,} of its "
                         f"{saved:,} LoRA weights belong to no module of it (a LoRA of another model?)")
    for p in params:
        p.requires_grad_(False)
    for layer in lora_layers(unet):
        if adapter_name in getattr(layer, "scaling", {}):
            layer.set_scale(adapter_name, lora_scale)
    return params
