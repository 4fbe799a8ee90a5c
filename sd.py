"""Stable Diffusion 1.5 as a ShortFT world: components, LoRA branches, denoisers, sampler, saved model.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3 on SD1.5: a 50-step DDIM chain ("leading": 981, 961, …, 1) with CFG,
trainable LoRA branches LoRA_1 … LoRA_k (rank 128 on the UNet's attention and feed-forward layers), stacked at the
LoRA points (`shortft.active_loras`), and a frozen Hyper-SD LoRA as the shortcut. `train_sd.py`, `bench_sd.py` and
notebook 03 import everything they need from here; the chains themselves live in `shortft.py`. `sd3.py` is the SD3
world with the same functions; what both worlds share (prompt files, hub checks, adapter bookkeeping, decode, the saved
folder's layout, `prepare_pipeline`) lives here and is imported there.

Notation (code -> paper):
    tuned_i           LoRA_i, a peft adapter on the UNet (i = 1 … k); the step at p_i uses tuned_1 + … + tuned_i
    shortcut          the frozen distillation LoRA (Hyper-SD), its own peft adapter, never fused
    BASE / TUNED      ε of the UNet without LoRA / with the branches active at t, both with CFG w:
                      ε̃ = ε_∅ + w (ε_c − ε_∅), one UNet call on the batch [∅, c]
    SHORTCUT          ε_φ of the shortcut adapter alone; no CFG by default (one conditional call)
    cond, uncond      CLIP text embeddings (B, 77, D) of the prompts and (1, 77, D) of ""
    latents           x_t (B, 4, H/8, W/8); images (B, 3, H, W) in [0, 1]

Run: python -c "import sd; help(sd.prepare_pipeline)"        (the script that uses it all: python train_sd.py --tiny)
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch

import rewards
import runio
import shortcut
import shortft

PIPELINE = "StableDiffusionPipeline"
"""The diffusers pipeline class of this world (model_index.json `_class_name`); sd3.py's is StableDiffusion3Pipeline."""
NETWORK = "unet"
"""Key of the denoising network in the components `load_components` returns (sd3.py: "transformer")."""
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
"""UNet modules that get the trainable LoRA branches: attention (self and cross) and feed-forward, as in the paper."""
GUIDANCE = 7.5
"""Default CFG scale w of the base and tuned model (StableDiffusionPipeline's default)."""
DEFAULT_SHORTCUT = shortcut.DEFAULT_SHORTCUT
"""The paper's shortcut for SD1.5: Hyper-SD 4-step (`hyper-sd-4`)."""
SHORTCUT_ADAPTER = "shortcut"
"""peft adapter name of the frozen shortcut LoRA."""
LORA_JSON = "shortft.json"
"""The file next to tuned_1.safetensors … that says how the branches are used (LoRA points, grid)."""
PIPELINE_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                  "scheduler/scheduler_config.json")
"""What `load_components` reads from an SD1.5 pipeline folder."""
FOLDER = "an SD1.5 pipeline folder (unet/, vae/, …)"
"""How one-line errors name the model folder this world needs."""
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
"""SD1.5's scheduler config (the chain arguments are checked against its grid before a model is read)."""


# ----------------------------------------------------------------------------- components and prompts


def find_file(path: str | Path) -> Path:
    """`path` as given, or relative to this file's folder when it is not found from the current one."""
    path = Path(path)
    here = Path(__file__).resolve().parent / path
    return here if not path.exists() and not path.is_absolute() and here.exists() else path


def load_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, '#' comments skipped. A missing, empty, binary file or a folder: one-line
    error."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"prompt file {str(path)!r} is a folder: pass a text file, one prompt per line")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist: write one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text: write one prompt per line") from None
    prompts = [p for p in (line.split("#", 1)[0].strip() for line in text.splitlines()) if p]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} has no prompts: write one prompt per line")
    return prompts


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (huggingface_hub's endpoint) accepts a TCP connection within `timeout` seconds."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url, ok = urlparse(constants.ENDPOINT), []

    def probe():
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(ok)


def hub_offline() -> bool:
    """True when the hub is off limits: HF_HUB_OFFLINE is set, or the hub cannot be reached, in which case
    HF_HUB_OFFLINE is set for this process, so that every later load reads the local cache at once instead of
    retrying for minutes."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
    return constants.HF_HUB_OFFLINE


def _looks_local(value: str) -> bool:
    """A path rather than a hub id 'owner/name': starts with / . ~, has a backslash or more than one '/', or its first
    part is an existing folder (models/sd15 with ./models present)."""
    return value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1 \
        or ("/" in value and Path(value.split("/", 1)[0]).expanduser().is_dir())


def check_source(flag: str, value: str, needs: Sequence[str], what: str) -> None:
    """ArgError (one line) unless `value` is a local folder holding every path of `needs`, or a hub id whose
    `needs[0]` is in the local hub cache or can be downloaded now; no network round trip for a local path. `what`
    names the kind of folder in the message (e.g. 'an SD1.5 pipeline folder')."""
    path = Path(value).expanduser()
    if path.exists():
        runio.require(path.is_dir(), flag, value, f"is a file: pass {what}")
        missing = [n for n in needs if not (path / n).exists()]
        runio.require(not missing, flag, value, f"the folder has no {missing[0] if missing else ''}: pass {what}")
        return
    runio.require(not _looks_local(value), flag, value,
                  f"the folder does not exist: pass {what}, or a hub id owner/name")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise runio.ArgError(flag, value, f"no such folder, nor a hub id owner/name: pass {what}") from None
    if isinstance(try_to_load_from_cache(value, needs[0]), str):
        return
    runio.require(not hub_offline(), flag, value, f"not in the local hub cache and the hub is offline: fetch it with "
                                                  f"`hf download {value}`, or pass {what}")


def model_file(model: str, name: str) -> Path | None:
    """The file `name` (e.g. model_index.json) of a local model folder or of a hub id in the local hub cache (fetched
    when the hub is reachable); None when it is not there. Never raises for a missing file."""
    path = Path(model).expanduser()
    if path.is_dir() or _looks_local(model):
        return path / name if (path / name).is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, name)
        if isinstance(cached, str):
            return Path(cached)
        if not hub_offline():
            return Path(hf_hub_download(model, name))
    except Exception:  # a bad id, a gated repository, no such file: the caller reports what it needs
        pass
    return None


def pipeline_class(model: str) -> str | None:
    """The diffusers pipeline class of a model folder or hub id: model_index.json's `_class_name`, or, without one, a
    flow-matching scheduler config means StableDiffusion3Pipeline and a DDIM-family one StableDiffusionPipeline; None
    when neither file can be read (a missing folder, an uncached hub id offline)."""
    index = model_file(model, "model_index.json")
    if index is not None:
        try:
            return str(json.loads(index.read_text()).get("_class_name"))
        except (OSError, ValueError, AttributeError):
            return None
    config = model_file(model, "scheduler/scheduler_config.json")
    try:
        return None if config is None else ("StableDiffusion3Pipeline" if is_flow_matching(json.loads(
            config.read_text())) else PIPELINE)
    except (OSError, ValueError, AttributeError):
        return None


def scheduler_config(model: str) -> dict | None:
    """The scheduler config (scheduler/scheduler_config.json) of a model folder or cached hub id, or None."""
    config = model_file(model, "scheduler/scheduler_config.json")
    try:
        return None if config is None else dict(json.loads(config.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def check_shortcut(flag: str, value: str, base: str = "sd1.5") -> None:
    """ArgError (one line) unless `value` is a name of shortcut.SHORTCUTS distilled from a `base` model (sd1.5 or
    sd3) whose file is cached or can be downloaded now, or a readable .safetensors file with LoRA weights (whether
    they fit the model is checked once it is loaded)."""
    spec = shortcut.SHORTCUTS.get(value)
    if spec is not None:
        fits = [n for n, s in shortcut.SHORTCUTS.items() if s.base == base]
        runio.require(spec.base == base, flag, value, f"a shortcut of {spec.base} models, not of this {base} model: "
                                                      f"choose from {', '.join(fits)} or pass a .safetensors LoRA file")
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec.repo, spec.weight_name), str) or not hub_offline():
            return
        raise runio.ArgError(flag, value, f"not in the local hub cache and the hub is offline: fetch it with `hf "
                                          f"download {spec.repo} {spec.weight_name}` and pass the file")
    path = Path(value).expanduser()
    runio.require(path.suffix == ".safetensors" or path.parent != Path(".") or path.exists(), flag, value,
                  f"unknown shortcut {value!r}: choose from {', '.join(shortcut.SHORTCUTS)} or pass a .safetensors "
                  "LoRA file")
    runio.require(path.exists(), flag, value, "the file does not exist: pass a .safetensors LoRA file")
    runio.require(path.is_file(), flag, value, "is a folder: pass a .safetensors LoRA file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors' own error type, OSError, …: the file is not readable safetensors
        raise runio.ArgError(flag, value, f"not a readable .safetensors file ({type(e).__name__}): pass a "
                                          f"shortcut LoRA file") from None
    runio.require(any("lora" in k.lower() for k in keys), flag, value,
                  f"holds no LoRA weights ({len(keys)} tensors, e.g. {keys[0] if keys else 'none'}): pass a shortcut "
                  f"LoRA file")


def load_components(model: str, device="cpu", dtype=torch.float32) -> dict:
    """SD1.5 tokenizer, text encoder, VAE, UNet (frozen, in `dtype`) and DDIM scheduler from a hub id or a local
    pipeline folder. A missing folder or uncached hub id gives one line with the `hf download` command."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if _looks_local(model) and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"model folder {model!r} does not exist: pass an SD1.5 pipeline folder or a hub id "
                                f"such as stable-diffusion-v1-5/stable-diffusion-v1-5")

    def load(cls, sub):
        return rewards.load_pretrained(cls, model, f"SD {sub}", subfolder=sub)

    c = dict(tokenizer=load(CLIPTokenizer, "tokenizer"), text_encoder=load(CLIPTextModel, "text_encoder"),
             vae=load(AutoencoderKL, "vae"), unet=load(UNet2DConditionModel, "unet"),
             scheduler=load(DDIMScheduler, "scheduler"))
    for k in ("text_encoder", "vae", "unet"):
        c[k].to(device)
        if c[k].dtype != dtype:  # cast only when needed: diffusers warns on every dtype .to()
            c[k].to(dtype)
        c[k].requires_grad_(False).eval()
    return c


def is_flow_matching(config: Mapping) -> bool:
    """Whether a diffusers scheduler config is a flow-matching one (SD3, FLUX): by its class name, or, for a
    scheduler built in code (no `_class_name`), by its keys (a `shift` and no β schedule)."""
    return "FlowMatch" in str(config.get("_class_name", "")) or ("shift" in config and "beta_start" not in config)


def schedule_from_diffusers(config: Mapping) -> shortft.NoiseSchedule | shortft.FlowSchedule:
    """The schedule of a diffusers scheduler (pass `scheduler.config`): a FlowSchedule for the flow-matching
    schedulers (SD3, FLUX), a NoiseSchedule with the same ᾱ_t for DDIM/DDPM/… (SD1.5)."""
    if is_flow_matching(config):
        return shortft.FlowSchedule(config.get("num_train_timesteps", 1000))
    return shortft.make_schedule(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=config.get("beta_start", 0.00085),
        beta_end=config.get("beta_end", 0.012),
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
        set_alpha_to_one=config.get("set_alpha_to_one", False),
    )


def grid_from_diffusers(config: Mapping, num_steps: int = 0) -> list[int | float]:
    """The N-step sampler grid of a diffusers scheduler config: DDIM with "leading" spacing (SD1.5's sampler: 981,
    961, …, 1 for N = 50) or the flow-matching Euler grid with the config's static shift (SD3's: 28 steps, shift 3).
    N = 0: the model's own default, 50 DDIM steps or 28 Euler steps."""
    if is_flow_matching(config):
        num_steps = num_steps or 28
        if config.get("use_dynamic_shifting", False):
            raise ValueError("this flow-matching scheduler shifts its grid by image size (use_dynamic_shifting, as "
                             "FLUX): only static shifts (SD3, SD3.5) are supported")
        return shortft.flow_timesteps(num_steps, config.get("shift", 1.0), config.get("num_train_timesteps", 1000))
    return shortft.ddim_timesteps(num_steps or 50, config.get("num_train_timesteps", 1000), "leading",
                                  config.get("steps_offset", 1))


def latent_side(vae, resolution: int) -> int:
    """Latent side h = H / f with f = 2^(VAE levels − 1) (SD1.5: 8; the tiny VAE: 2)."""
    return resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def resolution_step(vae, unet) -> int:
    """The image side must be a multiple of this: the VAE's downsampling 2^(levels − 1) times the UNet's
    2^(blocks − 1) (SD1.5: 8 · 8 = 64; the tiny model: 2 · 2 = 4)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)


def encode_prompts(prompts: Sequence[str], tokenizer, text_encoder, cache: dict) -> torch.Tensor:
    """CLIP text embeddings (B, 77, D), one text-encoder pass per distinct prompt ever seen (`cache`)."""
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        with torch.no_grad():
            cache.update(zip(missing, text_encoder(ids)[0]))
    return torch.stack([cache[p] for p in prompts])


def encode(c: dict, prompts: Sequence[str], cache: dict) -> torch.Tensor:
    """The conditioning `make_denoisers` takes, from the components `c` (`encode_prompts` with c's tokenizer and
    text encoder); sd3.encode is the SD3 world's."""
    return encode_prompts(prompts, c["tokenizer"], c["text_encoder"], cache)


# ----------------------------------------------------------------------------- LoRA branches (peft)


def add_tuned_loras(unet, n: int, rank: int = 128, alpha: float = 128.0,
                    targets: Sequence[str] = LORA_TARGETS) -> list[str]:
    """Add the trainable branches tuned_1 … tuned_n (paper: LoRA_1 … LoRA_k) with peft, B = 0 at init so the model
    starts as the base; their weights are float32 whatever the UNet's dtype. Every parameter of the UNet is left
    frozen: choose what trains with `set_trainable`. Returns the adapter names."""
    from peft import LoraConfig

    names = shortft.lora_names(n)
    with warnings.catch_warnings():  # peft warns that a further adapter is added: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in names:
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=list(targets)), adapter_name=name)
    for p in lora_parameters(unet, names):
        p.data = p.data.float()
    set_trainable(unet, [])
    return names


def lora_weights(unet, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapters `names` by their name in `unet.named_parameters()` (checkpoints use these keys)."""
    return {n: p for n, p in unet.named_parameters() if any(f".{a}." in n for a in names)}


def lora_parameters(unet, names: Sequence[str]) -> list[torch.nn.Parameter]:
    """The parameters of adapters `names`, in module order."""
    return list(lora_weights(unet, names).values())


def set_trainable(unet, names: Sequence[str]) -> list[torch.nn.Parameter]:
    """requires_grad on exactly the parameters of adapters `names`, off on every other adapter (the shortcut too)
    and on the base weights. Call it after every peft/diffusers call that may have flipped the flags (peft's
    set_adapter and diffusers' LoRA loading do) and at each progressive-training stage. Returns the trainable
    parameters."""
    for p in unet.parameters():
        p.requires_grad_(False)
    params = lora_parameters(unet, names)
    for p in params:
        p.requires_grad_(True)
    return params


def stage_adapters(stage: int, points: Sequence[int] | None, timestep_aware: bool = True) -> list[str]:
    """Names of the branches trained in progressive stage `stage` (tuned_i … tuned_k; tuned_1 with one LoRA)."""
    names = shortft.lora_names(shortft.num_loras(points, timestep_aware))
    return [names[i] for i in shortft.trainable_loras(stage, points, timestep_aware)]


# ----------------------------------------------------------------------------- denoisers


def make_denoisers(unet, cond: torch.Tensor, uncond: torch.Tensor, guidance: float = 7.5,
                   points: Sequence[int] | None = None, timestep_aware: bool = True, shortcut_guidance: float = 0.0,
                   layers=None) -> dict[str, shortft.Denoiser]:
    """The callables ε = f(x_t, t, s) the chains look up by name:

        BASE      the UNet without LoRA, CFG w
        TUNED     the branches shortft.active_loras(t, points, timestep_aware) picks (tuned_1 at every step when
                  points is None, as for every baseline; none: the base), CFG w
        SHORTCUT  the shortcut adapter alone, CFG only if shortcut_guidance > 1 (Hyper-SD: none)

    Each sets its adapters inside the call (so that checkpoint recomputation sees the same model) without touching
    requires_grad (peft's set_adapter would freeze the trained branches). w ≤ 1 is one conditional UNet call; otherwise the batch [∅, c]
    goes through the UNet in one call.  cond (B, 77, D), uncond (1, 77, D); x_t (B, 4, h, w)."""
    layers = shortcut.lora_layers(unet) if layers is None else layers
    names = shortft.lora_names(shortft.num_loras(points, timestep_aware))
    both = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond])
    dtype = unet.dtype  # once: diffusers finds it by walking every module (on a small UNet, as long as a call)

    def eps(x, t, adapters, w):
        shortcut.set_active_adapters(unet, adapters, layers)
        x_in = x.to(dtype)
        if w <= 1.0:
            return unet(x_in, t, encoder_hidden_states=cond).sample.to(x.dtype)
        e_u, e_c = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=both).sample.to(x.dtype).chunk(2)
        return shortft.classifier_free_guidance(e_u, e_c, w)

    def tuned_at(t):
        return [names[i] for i in shortft.active_loras(t, points, timestep_aware)]

    return {shortft.BASE: lambda x, t, s: eps(x, t, [], guidance),
            shortft.TUNED: lambda x, t, s: eps(x, t, tuned_at(t), guidance),
            shortft.SHORTCUT: lambda x, t, s: eps(x, t, [SHORTCUT_ADAPTER], shortcut_guidance)}


def decode(vae, latents: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """VAE decode: images = (D(z / scaling_factor + shift_factor) + 1) / 2 clamped to [0, 1] (SD1.5's VAE has no
    shift, SD3's has one, as in the diffusers pipelines); (B, C, h, w) → (B, 3, f·h, f·w)."""
    shift = getattr(vae.config, "shift_factor", None)

    def dec(z):
        z = z.to(vae.dtype) / vae.config.scaling_factor
        return vae.decode(z if shift is None else z + shift).sample.float()

    x = torch.utils.checkpoint.checkpoint(dec, latents, use_reentrant=False) if checkpoint and latents.requires_grad \
        else dec(latents)
    return ((x + 1) / 2).clamp(0, 1)


def check_sampler_inputs(prompts: Sequence[str], seeds: Sequence[int], batch: int) -> None:
    """TypeError / ValueError saying what to pass unless `prompts` is a non-empty list of strings with one seed each
    and `batch` a positive integer (a library caller's mistakes would otherwise loop forever, or not at all)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts or len(seeds) != len(prompts):
        raise ValueError(f"give one or more prompts and one seed per prompt, got {len(prompts)} prompts and "
                         f"{len(seeds)} seeds")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer (images per sampler call), got {batch!r}")


@torch.no_grad()
def sample(c: dict, prompts: Sequence[str], seeds: Sequence[int], grid: Sequence[int], guidance: float = 7.5,
           points: Sequence[int] | None = None, timestep_aware: bool = True, model: str = shortft.TUNED,
           resolution: int = 512, batch: int = 4, cache: dict | None = None) -> torch.Tensor:
    """The ordinary N-step DDIM + CFG sampler (`shortft.sampling_chain(grid, points, model)`: TUNED where a LoRA
    acts, BASE elsewhere; model=BASE samples the base) from one fixed seed per prompt; images (B, 3, H, W) on CPU.
    `c` holds the components `load_components` returns. The fine-tuned model is exactly this sampler."""
    check_sampler_inputs(prompts, seeds, batch)
    unet, vae, tok, te = c["unet"], c["vae"], c["tokenizer"], c["text_encoder"]
    cache = {} if cache is None else cache
    device = next(unet.parameters()).device
    schedule = schedule_from_diffusers(c["scheduler"].config)
    chain = shortft.sampling_chain(grid, points, model)
    side = latent_side(vae, resolution)
    uncond = encode_prompts([""], tok, te, cache)
    images = []
    for i in range(0, len(prompts), batch):
        ps = prompts[i : i + batch]
        x = torch.stack([torch.randn(unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(s))
                         for s in seeds[i : i + batch]]).to(device)
        den = make_denoisers(unet, encode_prompts(ps, tok, te, cache), uncond, guidance, points, timestep_aware)
        images.append(decode(vae, shortft.run_chain(x, chain.trunk, den, schedule)).cpu())
    return torch.cat(images)


def save_grid(rows: Sequence[torch.Tensor], path: str | Path) -> None:
    """PNG with one row of images per tensor (B, 3, H, W) in [0, 1], e.g. [base, tuned]; written atomically."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # (3, rows·H, B·W)
    png = io.BytesIO()
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(png, format="PNG")
    runio.write_bytes(png.getvalue(), path)


# ----------------------------------------------------------------------------- the saved model


def write_lora(unet, folder: str | Path, grid: Sequence[int], points: Sequence[int] | None = None,
               timestep_aware: bool = True, guidance: float = 7.5, **info) -> None:
    """Write the fine-tuned model's files into the existing folder `folder` (see `save_lora`)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    names = shortft.lora_names(shortft.num_loras(points, timestep_aware))
    for name in names:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"{name}.safetensors",
                                                  unet_lora_adapter_metadata=adapter_metadata(unet, name))
    write_layout(folder, names, grid, points, timestep_aware, guidance, timestep_spacing="leading", **info)


def adapter_metadata(model, name: str) -> dict:
    """The peft LoraConfig of adapter `name` as the metadata diffusers stores next to a LoRA file (sorted targets)."""
    meta = model.peft_config[name].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return meta


def write_layout(folder: str | Path, names: Sequence[str], grid: Sequence[float], points: Sequence[float] | None,
                 timestep_aware: bool, guidance: float, **info) -> None:
    """`shortft.json` of a LoRA folder: the adapter names and files, the LoRA points, timestep_aware, the grid (integers
    on a DDIM grid, σ·1000 floats on a flow grid), the CFG scale and `info`, one field per line."""
    layout = dict(adapters=list(names), files=[f"{n}.safetensors" for n in names],
                  lora_points=None if points is None else [shortft.timestep(p) for p in points],
                  timestep_aware=timestep_aware, grid=[shortft.timestep(t) for t in grid], guidance_scale=guidance,
                  **info)
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in layout.items())  # one field per line
    (Path(folder) / LORA_JSON).write_text("{\n" + lines + "\n}\n")


def save_lora(unet, out_dir: str | Path, grid: Sequence[int], points: Sequence[int] | None = None,
              timestep_aware: bool = True, guidance: float = 7.5, **info) -> Path:
    """Write the fine-tuned model to `out_dir`, replaced as a whole (`runio.atomic_folder`: a kill leaves the previous
    copy or the new one, and MANIFEST.json lists each file's size and hash): one diffusers-format LoRA file per
    branch, `tuned_1.safetensors` …, each loadable with `pipe.load_lora_weights(out_dir, weight_name=…,
    adapter_name=…)`, and `shortft.json` saying how they combine: the LoRA points, timestep_aware, the adapter names
    and the grid of the sampler they were trained for (the model is `sample(…, points, timestep_aware)` on that
    grid). `info` adds JSON fields (e.g. the method)."""
    with runio.atomic_folder(out_dir) as tmp:
        write_lora(unet, tmp, grid, points, timestep_aware, guidance, **info)
    return Path(out_dir)


def read_lora_layout(lora_dir: str | Path, model=None) -> dict:
    """The `shortft.json` of a saved LoRA folder, once the folder passed every check — the one validator of a LoRA
    folder, shared by `load_lora`, `prepare_pipeline` and sd3's: its manifest (MANIFEST.json, or state.json in a
    checkpoint) matches every file; shortft.json matches its schema (`check_lora_layout`); every branch file holds
    finite LoRA pairs of one rank, the same keys and shapes in every branch, and, with `model` (the UNet or
    transformer it goes into), modules of that model with its shapes (`check_lora_files`). A missing folder or file:
    FileNotFoundError; anything damaged: ValueError; both one line naming the folder."""
    lora_dir = Path(lora_dir)
    where = f"LoRA folder {str(lora_dir)!r}"
    if not lora_dir.is_dir():
        raise FileNotFoundError(f"{where} {'is a file, not a folder' if lora_dir.exists() else 'does not exist'}: "
                                "pass the lora/ folder train_sd.py writes (runs/<name>/lora)")
    if not (lora_dir / LORA_JSON).is_file():
        raise FileNotFoundError(f"{where} has no {LORA_JSON}: it says which branch acts at which "
                                f"timestep; pass a folder written by train_sd.py (runs/<name>/lora)")
    manifest = next((m for m in ("MANIFEST.json", "state.json") if (lora_dir / m).is_file()), None)
    problem = manifest and runio.folder_problem(lora_dir, manifest)
    if manifest and not problem:
        listed = json.loads((lora_dir / manifest).read_text())["files"]
        problem = next((f"{manifest} does not list {f}" for f in sorted(p.name for p in lora_dir.iterdir())
                        if f.endswith((".json", ".safetensors")) and f != manifest and f not in listed), None)
    if problem:
        raise ValueError(f"{where} is damaged or was changed after it was written ({problem}): write it again "
                         f"(train_sd.py --resume), or delete {manifest} if you edited it on purpose")
    try:
        layout = json.loads((lora_dir / LORA_JSON).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{where}: {LORA_JSON} is not readable JSON ({runio._one_line(e)[:120]})") from None
    check_lora_layout(layout, where)
    missing = [f for f in layout["files"] if not (lora_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{where} lacks {', '.join(missing)} listed in {LORA_JSON}")
    check_lora_files(lora_dir, layout["files"], model, where)
    return layout


def check_lora_layout(layout, where: str = "LoRA folder") -> None:
    """ValueError (one line) unless `layout` is a shortft.json as `write_layout` writes it: `grid` a non-empty strictly
    decreasing list of timesteps in [0, 1000] (with `timestep_spacing` "leading": the DDIM grid of its length);
    `lora_points` null or a non-empty strictly decreasing list of grid
    timesteps ending at its last step; `timestep_aware` true or false; `adapters` tuned_1 … tuned_k, k =
    shortft.num_loras(points, timestep_aware); `files` <adapter>.safetensors; `guidance_scale` a finite number ≥ 0;
    the optional `t5` a bool and `t5_tokens` an integer in [0, 512]."""
    def fail(what: str):
        raise ValueError(f"{where}: {LORA_JSON} {what}: write the folder again with train_sd.py (runs/<name>/lora)")

    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not isinstance(layout, dict):
        fail(f"holds a {type(layout).__name__}, not a JSON object")
    need = ("adapters", "files", "lora_points", "timestep_aware", "grid", "guidance_scale")
    absent = [k for k in need if k not in layout]
    if absent:
        fail(f"lacks {', '.join(map(repr, absent))}")
    grid, points, aware = layout["grid"], layout["lora_points"], layout["timestep_aware"]
    if not (isinstance(grid, list) and grid and all(number(t) and 0 <= t <= 1000 for t in grid)
            and all(a > b for a, b in zip(grid, grid[1:]))):
        fail("'grid' is not a non-empty strictly decreasing list of timesteps in [0, 1000]")
    if layout.get("timestep_spacing") == "leading" and (grid[-1] != int(grid[-1]) or len(grid) > 1000 or grid !=
                                                        shortft.ddim_timesteps(len(grid), 1000, "leading", int(grid[-1]))):
        fail(f"'grid' ({len(grid)} steps, {grid[0]:g} … {grid[-1]:g}) is not a DDIM grid with leading spacing")
    if not isinstance(aware, bool):
        fail(f"'timestep_aware' is {aware!r}, not true or false")
    if points is not None:
        if not (isinstance(points, list) and points and all(number(p) for p in points)):
            fail(f"'lora_points' is {str(points)[:60]}, not null or a non-empty list of timesteps")
        off = [p for p in points if not any(abs(p - t) <= 1e-6 * max(1.0, abs(t)) for t in grid)]
        if off:
            fail(f"'lora_points' {off[:3]} are not on its {len(grid)}-step grid")
        if any(a <= b for a, b in zip(points, points[1:])):
            fail(f"'lora_points' {points} are not strictly decreasing")
        if abs(points[-1] - grid[-1]) > 1e-6 * max(1.0, abs(grid[-1])):
            fail(f"'lora_points' end at {points[-1]}, not at the grid's last step {grid[-1]}")
    names = shortft.lora_names(shortft.num_loras(points, aware))
    if layout["adapters"] != names:
        fail(f"'adapters' is {str(layout['adapters'])[:80]}, its LoRA points need {names}")
    if layout["files"] != [f"{n}.safetensors" for n in names]:
        fail(f"'files' is {str(layout['files'])[:80]}, not {', '.join(f'{n}.safetensors' for n in names)}")
    if not (number(layout["guidance_scale"]) and layout["guidance_scale"] >= 0):
        fail(f"'guidance_scale' is {layout['guidance_scale']!r}, not a finite number ≥ 0")
    if "t5" in layout and not isinstance(layout["t5"], bool):
        fail(f"'t5' is {layout['t5']!r}, not true or false")
    tokens = layout.get("t5_tokens", 0)
    if not (isinstance(tokens, int) and not isinstance(tokens, bool) and 0 <= tokens <= 512):
        fail(f"'t5_tokens' is {tokens!r}, not an integer in [0, 512]")


_LORA_KEY = re.compile(r"(unet|transformer)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight")


def check_lora_files(lora_dir: str | Path, files: Sequence[str], model=None, where: str = "LoRA folder") -> None:
    """ValueError (one line) unless every branch file is readable safetensors holding only LoRA pairs (`<prefix>.<module>
    .lora_A/lora_B.weight`, or `.lora.down/.lora.up.weight`; prefix unet or transformer), each pair of one rank,
    floating, finite and of trained size (runio.check_weights_finite), with the same keys and shapes in every file;
    with `model`, each module one of `model`'s whose weight has the pair's input and output sizes."""
    from safetensors.torch import load_file

    first = None
    for file in files:
        path = Path(lora_dir) / file
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors' own error, OSError, …: not readable safetensors
            raise ValueError(f"{where}: {file} is not a readable .safetensors file ({type(e).__name__})") from None
        try:
            runio.check_weights_finite(tensors, f"{where}: {file}")
        except runio.CheckpointError as e:
            raise ValueError(str(e)) from None
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _LORA_KEY.fullmatch(key)
            if m is None or not t.is_floating_point() or t.dim() < 2:
                raise ValueError(f"{where}: {file} holds {key!r} ({t.dtype}, {tuple(t.shape)}), not a LoRA matrix: "
                                 "pass a folder written by train_sd.py")
            pairs.setdefault(f"{m.group(1)}.{m.group(2)}", {})["A" if m.group(3) in ("lora_A", "lora.down") else "B"] = t
        if not pairs:
            raise ValueError(f"{where}: {file} holds no LoRA weights")
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
                raise ValueError(f"{where}: {file}: {module} has no matching lora_A/lora_B pair (one rank)")
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        if first is None:
            first = (file, shapes)
        elif shapes != first[1]:
            raise ValueError(f"{where}: {file} holds other keys or shapes than {first[0]}: every branch is one LoRA "
                             "setup (targets, rank)")
        if model is not None and file == files[0]:
            for module, ab in pairs.items():
                name = module.split(".", 1)[1]
                try:
                    layer = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"{where}: {file}: this model has no module {name!r} (a LoRA of another "
                                     "model?)") from None
                base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                w = getattr(base, "weight", None)
                if w is None or w.dim() < 2 or ab["B"].shape[0] != w.shape[0] or ab["A"].shape[1] != w.shape[1]:
                    raise ValueError(f"{where}: {file}: {name} is {tuple(ab['A'].shape[1:2])} → "
                                     f"{tuple(ab['B'].shape[:1])} in the LoRA, {None if w is None else tuple(w.shape)}"
                                     " in this model (a LoRA of another model?)")


def load_lora(unet, lora_dir: str | Path) -> dict:
    """Load every branch of a saved LoRA folder into `unet` as frozen adapters tuned_1 … and return its layout
    (`shortft.json`), e.g. for `sample(c, …, grid=layout["grid"], points=layout["lora_points"],
    timestep_aware=layout["timestep_aware"])`."""
    from diffusers import StableDiffusionPipeline

    layout = read_lora_layout(lora_dir, unet)
    for name, file in zip(layout["adapters"], layout["files"]):
        state_dict, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(lora_dir), weight_name=file,
                                                                           return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name=name, metadata=meta)
    set_trainable(unet, [])
    return layout


def prepare_pipeline(pipe, lora_dir: str | Path) -> dict:
    """Make a stock diffusers `StableDiffusionPipeline` (or `StableDiffusion3Pipeline`: sd3.prepare_pipeline is this
    function) sample the fine-tuned model: load each branch of the LoRA folder as an adapter, switch to a DDIM
    scheduler with "leading" spacing (SD1.5's grid; a flow-matching scheduler, SD3's, is kept as it is), activate the
    branches of the first step, and return the keyword arguments for `pipe(prompt, **kwargs)`: the number of steps,
    the CFG scale the model was trained with, and `callback_on_step_end`, which after each step activates the
    branches `shortft.active_loras` picks for the NEXT step (after the last step: the first step's, for the next
    call), and for SD3 the T5 length the branches were trained with (`max_sequence_length`). Other LoRAs loaded into
    the pipeline are switched off while it runs."""
    from diffusers import DDIMScheduler

    lora_dir = Path(lora_dir)
    layout = read_lora_layout(lora_dir, getattr(pipe, "unet", None) or getattr(pipe, "transformer", None))
    if layout.get("t5") is False and getattr(pipe, "text_encoder_3", None) is not None:
        warnings.warn("these branches were trained without T5 (its prompt tokens were zeros): load the pipeline with "
                      "text_encoder_3=None, tokenizer_3=None to sample the model that was trained", stacklevel=2)
    for name, file in zip(layout["adapters"], layout["files"]):
        pipe.load_lora_weights(str(lora_dir), weight_name=file, adapter_name=name)
    flow = is_flow_matching(pipe.scheduler.config)
    if not flow:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    grid, points, aware, names = layout["grid"], layout["lora_points"], layout["timestep_aware"], layout["adapters"]

    def activate(t: int) -> None:
        active = [names[i] for i in shortft.active_loras(t, points, aware)]
        if active:
            pipe.enable_lora()
            pipe.set_adapters(active)
        else:
            pipe.disable_lora()

    def switch(pipe_, i: int, t, callback_kwargs: dict) -> dict:
        timesteps = [shortft.timestep(s) for s in pipe_.scheduler.timesteps]
        if len(timesteps) != len(grid) or any(abs(a - b) > 1e-3 for a, b in zip(timesteps, grid)):
            raise ValueError(f"this LoRA was trained for the {len(grid)}-step "
                             f"{'flow-matching Euler' if flow else 'leading DDIM'} grid ({grid[0]:g} … {grid[-1]:g}): "
                             f"call the pipeline with num_inference_steps={len(grid)}")
        activate(grid[i + 1] if i + 1 < len(grid) else grid[0])
        return callback_kwargs

    activate(grid[0])
    kwargs = dict(num_inference_steps=len(grid), guidance_scale=layout["guidance_scale"], callback_on_step_end=switch)
    if "t5_tokens" in layout:  # SD3: the length of T5's part of the prompt embedding the branches were trained with
        kwargs["max_sequence_length"] = layout["t5_tokens"]
    return kwargs


# ----------------------------------------------------------------------------- training helpers


def check_model(unet, vae, resolution: int, lora_targets) -> None:
    """What can only be checked against the loaded model, before training starts: the resolution against the VAE's
    and the UNet's downsampling, and that every LoRA target names a module of the UNet (peft's rule: the name or its
    last dotted parts). One-line `--flag VALUE: …` errors."""
    step = resolution_step(vae, unet)
    runio.require(resolution % step == 0, "resolution", resolution,
                  f"must be a multiple of {step} for this model (its VAE's and UNet's downsampling)")
    modules = [n for n, _ in unet.named_modules()]
    missing = [t for t in lora_targets if not any(n == t or n.endswith("." + t) for n in modules)]
    runio.require(not missing, "lora_targets", lora_targets,
                  f"no UNet module is named {missing[0] if missing else ''!r}: e.g. {' '.join(LORA_TARGETS)}")


def guarded_update(accelerator, optimizer, params, max_grad_norm: float) -> tuple[bool, float]:
    """`runio.guarded_step` under accelerate: gradients averaged over processes and unscaled (fp16) first; a
    NaN/inf gradient is dropped and lowers the fp16 loss scale. Returns (applied, norm before clipping).

    Several processes: one all-reduce of every gradient (mean) gives each process the same gradient bit for bit, so
    every process takes the same decision (applied or skipped, the same clipping) and holds the same weights after
    it. A parameter that no process has a gradient for keeps none, so AdamW leaves it (and its moments) alone as in
    one process; one that only some processes have a gradient for counts zero on the others."""
    params = list(params)
    if accelerator.num_processes > 1 and params:
        has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = accelerator.reduce(torch.cat([g.flatten().float() for g in grads] + [has]), reduction="mean")
        keep = (flat[-len(params):] > 0).tolist()
        for p, g, k in zip(params, flat[: -len(params)].split([p.numel() for p in params]), keep):
            p.grad = g.view_as(p).to(p.dtype) if k else None
    accelerator.unscale_gradients()
    applied, norm = runio.guarded_step(optimizer, params, max_grad_norm)
    if not math.isfinite(norm) and accelerator.scaler is not None:
        accelerator.scaler.update()  # optimizer.step(), which updates the scale, was skipped
    return applied, norm


# ----------------------------------------------------------------------------- several processes
# One run, N processes (torchrun, `accelerate launch --multi_gpu`): every process draws the same random numbers (the
# same seed), so each draws the whole batch of N × B prompts, noise and one chain and keeps its own B (rank r: the
# r-th slice). The run is then one process at batch N × B by construction, and every process's random streams equal
# the main process's, which is what a checkpoint stores. Only the main process writes.

WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Where launchers put the number of processes (torchrun; MPI implementations), as accelerate reads them."""


def launched_processes() -> int:
    """How many processes the launcher started for this run (1 without a launcher). RunError where `accelerate launch
    --num_processes N` started a single process: it runs several only with --multi_gpu (or under MPI with --cpu) and
    otherwise silently trains one process at 1/N of the batch asked for."""
    n = max(int(os.environ.get(v) or 1) for v in WORLD_SIZE_VARS)
    if n == 1 and "ACCELERATE_DYNAMO_BACKEND" in os.environ and "MASTER_ADDR" in os.environ:
        # accelerate's one-process launcher sets MASTER_ADDR only when more than one process was asked for
        raise runio.RunError("accelerate launch --num_processes N started a single process (accelerate starts several "
                             "only with --multi_gpu, or under MPI with --cpu): run `accelerate launch --multi_gpu "
                             "--num_processes N train_sd.py …` or `torchrun --nproc_per_node N train_sd.py …` "
                             "(on a machine without GPUs, the processes then share the CPU through gloo)")
    return n


PROCESS_GROUP_TIMEOUT_S = 2 * 3600
"""How long processes wait for each other in a collective: the others wait for the main one while it evaluates and
writes checkpoints alone (torch's defaults: 30 min for gloo, 10 min for NCCL)."""


def make_accelerator(**kwargs):
    """accelerate's Accelerator(**kwargs), joined by every process the launcher started. On a machine without an
    accelerator (GPU, XPU, …) several processes talk through gloo on the CPU: accelerate would otherwise start each
    one alone, training and writing the same run folder independently. RunError if the processes did not join."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    n = launched_processes()
    wait = InitProcessGroupKwargs(timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    accelerator = Accelerator(cpu=n > 1 and not torch.accelerator.is_available(), kwargs_handlers=[wait], **kwargs)
    if accelerator.num_processes != n:
        raise runio.RunError(f"{n} processes were launched but accelerate joined {accelerator.num_processes} of them "
                             "(each would train alone): launch with torchrun or `accelerate launch --multi_gpu`")
    return accelerator


def batch_share(accelerator, batch_size: int) -> slice:
    """This process's part of the whole batch of `num_processes × batch_size` draws: the rank-th slice."""
    return slice(accelerator.process_index * batch_size, (accelerator.process_index + 1) * batch_size)


def gather_mean(accelerator, values: torch.Tensor) -> float:
    """The mean of `values` over every process's (the whole batch's), the same number on each process."""
    return accelerator.gather(values.detach().float().reshape(-1)).mean().item()


def update_cost(accelerator, gflop: float, cpu_seconds: float, seconds: float) -> tuple[float, float, float]:
    """What one update cost the run, the same numbers on every process: GFLOP and CPU-seconds summed over the processes
    (so N processes at batch B spend what one process at batch N × B does), wall-seconds of the slowest one. A budget
    measured per process would let processes disagree on when a stage starts or the run stops, and hang."""
    if accelerator.num_processes == 1:
        return gflop, cpu_seconds, seconds
    each = accelerator.gather(torch.tensor([[gflop, cpu_seconds, seconds]], dtype=torch.float64,
                                           device=accelerator.device)).cpu()
    return float(each[:, 0].sum()), float(each[:, 1].sum()), float(each[:, 2].max())


def run_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the weights' bytes and of the random streams (Python, numpy, torch CPU): what processes of one run
    must agree on."""
    import hashlib
    import random

    import numpy as np

    h = hashlib.sha256()
    for name, w in sorted(weights.items()):
        h.update(name.encode())
        h.update(w.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    h.update(torch.get_rng_state().numpy().tobytes())
    h.update(repr(random.getstate()).encode())
    kind, keys, *rest = np.random.get_state()
    h.update(keys.tobytes() + repr((kind, *rest)).encode())
    return h.hexdigest()


def check_processes_agree(accelerator, weights: Mapping[str, torch.Tensor], update: int) -> None:
    """RunError (on every process) unless all processes hold the same weights bit for bit and the same random
    streams: run before each checkpoint and before the final save, so a run whose gradients were not averaged, or
    whose processes drew differently, stops loudly instead of saving one process's half-trained weights."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    digests = gather_object([run_digest(weights)])
    if len(set(digests)) > 1:
        raise runio.RunError(f"update {update}: the {len(digests)} processes hold different LoRA weights or random "
                             "streams (gradients not averaged, different checkpoints loaded, or one process drew "
                             f"random numbers the others did not): stopped before writing anything for update {update}")
