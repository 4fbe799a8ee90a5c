"""Stable Diffusion 3 / 3.5 as a ShortFT world: components, LoRA branches, denoisers, sampler, saved model.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3 calls ShortFT architecture-agnostic and shows it on SD3 (a rectified-flow
transformer) without settings. This file is the SD1.5 world of `sd.py` moved to SD3, function by function, so that
the two read side by side: the same chains (`shortft.py`), where only the step changes — velocity prediction and the
rectified-flow Euler step x_s = x_t + (σ_s − σ_t) v on SD3's 28-step grid with shift 3 (1000.0, 987.4, …, 8.9;
`shortft.FlowSchedule`) instead of the DDIM ε-step. Trainable LoRA branches LoRA_1 … LoRA_k sit on the transformer's
joint-attention and feed-forward layers (`LORA_TARGETS`), stacked at the LoRA points (by default the paper's mapped
by noise level: 814.3, 602.2, 409.3, 8.9), and a frozen CFG-preserving Hyper-SD3 LoRA is the shortcut. What is the same
in both worlds (prompt files, hub checks, adapter bookkeeping, decode, the saved folder's layout, the stock-pipeline
switching) is imported from `sd.py`, not copied.

Notation (code -> paper):
    tuned_i           LoRA_i, a peft adapter on the transformer (i = 1 … k); the step at p_i uses tuned_1 + … + tuned_i
    shortcut          the frozen distillation LoRA (Hyper-SD3), its own peft adapter, never fused
    BASE / TUNED      v of the transformer without LoRA / with the branches active at t, both with CFG w:
                      ṽ = v_∅ + w (v_c − v_∅), one transformer call on the batch [∅, c]
    SHORTCUT          v_φ of the shortcut adapter alone, with CFG w_φ (Hyper-SD3 keeps CFG: 3 / 5 / 7)
    t, σ              t = σ·1000, a float; the transformer takes t itself as its timestep
    cond, uncond      Conditioning(embeds (B, 77 + 256, 4096), pooled (B, 2048)) of the prompts and of "": the two
                      CLIP encoders' penultimate hidden states side by side, zero-padded to T5's width, then T5's 256
                      tokens (zeros when T5 is off); pooled = the two CLIP projections side by side
    latents           x_σ (B, 16, H/8, W/8); images (B, 3, H, W) in [0, 1]

Run: python train_sd.py --tiny-sd3        (tiny random SD3 on CPU; the library: python -c "import sd3; help(sd3)")
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

import rewards
import runio
import sd
import shortcut
import shortft
from sd import (  # noqa: F401  shared with SD1.5: the same functions, imported so that both worlds offer them
    LORA_JSON, SHORTCUT_ADAPTER, decode, find_file, grid_from_diffusers, guarded_update, latent_side, load_prompts,
    lora_parameters, lora_weights, prepare_pipeline, read_lora_layout, save_grid, schedule_from_diffusers,
    set_trainable, stage_adapters)

PIPELINE = "StableDiffusion3Pipeline"
"""The diffusers pipeline class of this world (model_index.json `_class_name`), SD3 and SD3.5 alike."""
NETWORK = "transformer"
"""Key of the denoising network (SD3Transformer2DModel) in the components `load_components` returns."""
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
"""Transformer modules that get the trainable LoRA branches (this repo's reading of the paper's "attention and
feed-forward" on an MMDiT): the joint attention's projections of both streams — image (to_q, to_k, to_v, to_out.0;
SD3.5's second image attention attn2 has the same names) and text (add_q_proj, add_k_proj, add_v_proj, to_add_out) —
and the feed-forward of both streams (ff, ff_context). Not: the AdaLN modulation (norm1.linear, …), the patch,
time, text and context embedders, proj_out, the text encoders."""
GUIDANCE = 7.0
"""Default CFG scale w of the base and tuned model (StableDiffusion3Pipeline's default)."""
DEFAULT_SHORTCUT = shortcut.DEFAULT_SHORTCUT_SD3
"""This repo's SD3 shortcut (the paper names none): Hyper-SD3 8-step CFG LoRA (shortcut.DEFAULT_SHORTCUT_SD3)."""
T5_TOKENS = 256
"""T5 tokens of the prompt embedding (StableDiffusion3Pipeline's default max_sequence_length), zeros without T5."""
PIPELINE_FILES = ("transformer/config.json", "vae/config.json", "text_encoder/config.json",
                  "text_encoder_2/config.json", "tokenizer", "tokenizer_2", "scheduler/scheduler_config.json")
"""What `load_components` reads from an SD3 pipeline folder (text_encoder_3/ and tokenizer_3/ only with T5)."""
FOLDER = "an SD3 pipeline folder (transformer/, vae/, text_encoder/, text_encoder_2/, …)"
"""How one-line errors name the model folder this world needs."""
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
"""SD3's and SD3.5's scheduler config (the chain arguments are checked against its grid before a model is read)."""


class Conditioning(NamedTuple):
    """What the SD3 transformer is conditioned on: the token embeddings (B, 77 + T5_TOKENS, D) and the pooled
    embedding (B, P) (encoder_hidden_states and pooled_projections)."""

    embeds: torch.Tensor
    pooled: torch.Tensor


# ----------------------------------------------------------------------------- components and prompts


def load_components(model: str, device="cpu", dtype=torch.float32, t5: bool = False, t5_tokens: int = T5_TOKENS) -> dict:
    """SD3 / SD3.5 tokenizers and text encoders (two CLIP, T5 only with `t5`: otherwise text_encoder_3 and
    tokenizer_3 are None and their part of the prompt embedding is zeros, as StableDiffusion3Pipeline does), VAE,
    transformer (frozen, in `dtype`) and flow-matching scheduler from a hub id or a local pipeline folder, and
    `t5_tokens`, the length of T5's part of the prompt embedding (the pipeline's `max_sequence_length`; 0 for a model
    trained without it). A missing folder or uncached hub id gives one line with the `hf download` command."""
    if not 0 <= t5_tokens <= 512 or (t5 and t5_tokens == 0):
        raise ValueError(f"t5_tokens must be in [{int(t5)}, 512] (StableDiffusion3Pipeline's max_sequence_length), "
                         f"got {t5_tokens}")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    if sd._looks_local(model) and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"model folder {model!r} does not exist: pass an SD3 pipeline folder or a hub id "
                                f"such as stabilityai/stable-diffusion-3.5-medium")

    def load(cls, sub):
        return rewards.load_pretrained(cls, model, f"SD3 {sub}", subfolder=sub)

    c = dict(tokenizer=load(CLIPTokenizer, "tokenizer"), text_encoder=load(CLIPTextModelWithProjection, "text_encoder"),
             tokenizer_2=load(CLIPTokenizer, "tokenizer_2"),
             text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2"), tokenizer_3=None, text_encoder_3=None,
             vae=load(AutoencoderKL, "vae"), transformer=load(SD3Transformer2DModel, "transformer"),
             scheduler=load(FlowMatchEulerDiscreteScheduler, "scheduler"), t5_tokens=int(t5_tokens))
    if t5:
        c.update(tokenizer_3=load(T5TokenizerFast, "tokenizer_3"), text_encoder_3=load(T5EncoderModel, "text_encoder_3"))
    for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer"):
        if c[k] is None:
            continue
        c[k].to(device)
        if c[k].dtype != dtype:  # cast only when needed: diffusers warns on every dtype .to()
            c[k].to(dtype)
        c[k].requires_grad_(False).eval()
    return c


def encode_prompts(prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence, cache: dict,
                   width: int, t5_tokens: int = T5_TOKENS) -> Conditioning:
    """StableDiffusion3Pipeline.encode_prompt for `prompts`, one pass of each encoder per distinct prompt ever seen
    (`cache`): CLIP-L and CLIP-G (tokenized to the first tokenizer's 77 tokens) give their penultimate hidden states,
    side by side and zero-padded to `width` (the transformer's joint_attention_dim, T5's width), and their projected
    pooled outputs, side by side; T5 (`tokenizers[2]`, `text_encoders[2]`; None: zeros (t5_tokens, width)) gives
    `t5_tokens` more tokens. Returns Conditioning(embeds (B, 77 + t5_tokens, width), pooled (B, P))."""
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        te = text_encoders[0]
        length = tokenizers[0].model_max_length
        with torch.no_grad():
            hidden, pooled = [], []
            for tok, enc in zip(tokenizers[:2], text_encoders[:2]):
                ids = tok(missing, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids.to(enc.device)
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2].to(te.dtype))  # (M, 77, D_i)
                pooled.append(out[0])  # (M, P_i): text_embeds, the projection of the pooled token
            clip = torch.nn.functional.pad(torch.cat(hidden, dim=-1), (0, width - sum(h.shape[-1] for h in hidden)))
            if len(text_encoders) < 3 or text_encoders[2] is None:
                t5 = torch.zeros(len(missing), t5_tokens, width, device=te.device, dtype=te.dtype)
            else:
                ids = tokenizers[2](missing, padding="max_length", max_length=t5_tokens, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids.to(text_encoders[2].device)
                t5 = text_encoders[2](ids)[0].to(text_encoders[2].dtype)
            embeds, pools = torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)
        cache.update({p: (e, q) for p, e, q in zip(missing, embeds, pools)})
    return Conditioning(torch.stack([cache[p][0] for p in prompts]), torch.stack([cache[p][1] for p in prompts]))


def encode(c: dict, prompts: Sequence[str], cache: dict) -> Conditioning:
    """The conditioning `make_denoisers` takes, from the components `c` (`encode_prompts` with c's tokenizers and
    text encoders, T5 when `load_components` loaded it, and c's `t5_tokens`)."""
    return encode_prompts(prompts, (c["tokenizer"], c["tokenizer_2"], c["tokenizer_3"]),
                          (c["text_encoder"], c["text_encoder_2"], c["text_encoder_3"]), cache,
                          c["transformer"].config.joint_attention_dim, c.get("t5_tokens", T5_TOKENS))


def resolution_step(vae, transformer) -> int:
    """The image side must be a multiple of this: the VAE's downsampling 2^(levels − 1) times the transformer's patch
    size (SD3: 8 · 2 = 16; the tiny model: 2 · 2 = 4)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * transformer.config.patch_size


# ----------------------------------------------------------------------------- LoRA branches (peft)


def add_tuned_loras(transformer, n: int, rank: int = 128, alpha: float = 128.0,
                    targets: Sequence[str] = LORA_TARGETS) -> list[str]:
    """`sd.add_tuned_loras` on the transformer with SD3's targets: the trainable branches tuned_1 … tuned_n, B = 0 at
    init, float32, all frozen (choose what trains with `set_trainable`). Returns the adapter names."""
    return sd.add_tuned_loras(transformer, n, rank, alpha, targets)


# ----------------------------------------------------------------------------- denoisers


def make_denoisers(transformer, cond: Conditioning, uncond: Conditioning, guidance: float = GUIDANCE,
                   points: Sequence[float] | None = None, timestep_aware: bool = True,
                   shortcut_guidance: float = shortcut.SHORTCUTS[DEFAULT_SHORTCUT].guidance,
                   layers=None) -> dict[str, shortft.Denoiser]:
    """The callables v = f(x_t, t, s) the chains look up by name, as `sd.make_denoisers`:

        BASE      the transformer without LoRA, CFG w
        TUNED     the branches shortft.active_loras(t, points, timestep_aware) picks (tuned_1 at every step when
                  points is None, as for every baseline; none: the base), CFG w
        SHORTCUT  the shortcut adapter alone, CFG shortcut_guidance (Hyper-SD3's CFG LoRAs: 3, 5, 7); the chain's
                  flow step makes a jump t → s one Euler step x_s = x_t + (σ_s − σ_t) v_φ

    Each sets its adapters inside the call without touching requires_grad. w ≤ 1 is one conditional call; otherwise
    the batch [∅, c] goes through the transformer in one call. The timestep is t = σ·1000 as a float (B,) tensor, as
    the pipeline passes it. cond, uncond: Conditioning of B prompts and of ""; x_t (B, 16, h, w)."""
    layers = shortcut.lora_layers(transformer) if layers is None else layers
    names = shortft.lora_names(shortft.num_loras(points, timestep_aware))
    b = cond.embeds.shape[0]
    both = Conditioning(torch.cat([uncond.embeds.expand(b, -1, -1), cond.embeds]),
                        torch.cat([uncond.pooled.expand(b, -1), cond.pooled]))

    def velocity(x, t, adapters, w):
        shortcut.set_active_adapters(transformer, adapters, layers)
        c, x_in = (cond, x) if w <= 1.0 else (both, torch.cat([x, x]))
        v = transformer(hidden_states=x_in.to(transformer.dtype), encoder_hidden_states=c.embeds,
                        pooled_projections=c.pooled,
                        timestep=torch.full((x_in.shape[0],), float(t), device=x.device)).sample.to(x.dtype)
        return v if w <= 1.0 else shortft.classifier_free_guidance(*v.chunk(2), w)

    def tuned_at(t):
        return [names[i] for i in shortft.active_loras(t, points, timestep_aware)]

    return {shortft.BASE: lambda x, t, s: velocity(x, t, [], guidance),
            shortft.TUNED: lambda x, t, s: velocity(x, t, tuned_at(t), guidance),
            shortft.SHORTCUT: lambda x, t, s: velocity(x, t, [SHORTCUT_ADAPTER], shortcut_guidance)}


@torch.no_grad()
def sample(c: dict, prompts: Sequence[str], seeds: Sequence[int], grid: Sequence[float], guidance: float = GUIDANCE,
           points: Sequence[float] | None = None, timestep_aware: bool = True, model: str = shortft.TUNED,
           resolution: int = 512, batch: int = 4, cache: dict | None = None) -> torch.Tensor:
    """The ordinary N-step Euler + CFG sampler (`shortft.sampling_chain(grid, points, model)`: TUNED where a LoRA
    acts, BASE elsewhere; model=BASE samples the base) from one fixed seed per prompt; images (B, 3, H, W) on CPU.
    `c` holds the components `load_components` returns. The fine-tuned model is exactly this sampler."""
    sd.check_sampler_inputs(prompts, seeds, batch)
    transformer, vae = c["transformer"], c["vae"]
    cache = {} if cache is None else cache
    device = next(transformer.parameters()).device
    schedule = schedule_from_diffusers(c["scheduler"].config)
    chain = shortft.sampling_chain(grid, points, model)
    side = latent_side(vae, resolution)
    uncond = encode(c, [""], cache)
    images = []
    for i in range(0, len(prompts), batch):
        ps = prompts[i : i + batch]
        x = torch.stack([torch.randn(transformer.config.in_channels, side, side,
                                     generator=torch.Generator().manual_seed(s)) for s in seeds[i : i + batch]])
        den = make_denoisers(transformer, encode(c, ps, cache), uncond, guidance, points, timestep_aware)
        images.append(decode(vae, shortft.run_chain(x.to(device), chain.trunk, den, schedule)).cpu())
    return torch.cat(images)


# ----------------------------------------------------------------------------- the saved model


def write_lora(transformer, folder: str | Path, grid: Sequence[float], points: Sequence[float] | None = None,
               timestep_aware: bool = True, guidance: float = GUIDANCE, **info) -> None:
    """Write the fine-tuned model's files into the existing folder `folder` (see `save_lora`)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    names = shortft.lora_names(shortft.num_loras(points, timestep_aware))
    for name in names:
        StableDiffusion3Pipeline.save_lora_weights(
            folder, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=name),
            weight_name=f"{name}.safetensors", transformer_lora_adapter_metadata=sd.adapter_metadata(transformer, name))
    sd.write_layout(folder, names, grid, points, timestep_aware, guidance, **info)


def save_lora(transformer, out_dir: str | Path, grid: Sequence[float], points: Sequence[float] | None = None,
              timestep_aware: bool = True, guidance: float = GUIDANCE, **info) -> Path:
    """Write the fine-tuned model to `out_dir`, replaced as a whole (`runio.atomic_folder`), as `sd.save_lora` does:
    one diffusers-format transformer LoRA file per branch, `tuned_1.safetensors` …, each loadable with
    `pipe.load_lora_weights(out_dir, weight_name=…, adapter_name=…)` in a StableDiffusion3Pipeline, and `shortft.json`
    (the LoRA points, timestep_aware, the adapter names, and the flow grid as σ·1000 floats). `info` adds JSON fields."""
    with runio.atomic_folder(out_dir) as tmp:
        write_lora(transformer, tmp, grid, points, timestep_aware, guidance, **info)
    return Path(out_dir)


def load_lora(transformer, lora_dir: str | Path) -> dict:
    """Load every branch of a saved LoRA folder into `transformer` as frozen adapters tuned_1 … and return its layout
    (`shortft.json`, read and checked by `sd.read_lora_layout`), e.g. for `sample(c, …, grid=layout["grid"],
    points=layout["lora_points"], timestep_aware=layout["timestep_aware"])`."""
    from diffusers import StableDiffusion3Pipeline

    layout = read_lora_layout(lora_dir, transformer)
    for name, file in zip(layout["adapters"], layout["files"]):
        state_dict, meta = StableDiffusion3Pipeline.lora_state_dict(str(lora_dir), weight_name=file,
                                                                    return_lora_metadata=True)
        with warnings.catch_warnings():  # peft warns that a further adapter is added: that is the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, transformer, adapter_name=name,
                                                                metadata=meta)
    set_trainable(transformer, [])
    return layout


# ----------------------------------------------------------------------------- training helpers


def check_model(transformer, vae, resolution: int, lora_targets) -> None:
    """What can only be checked against the loaded model, before training starts: the resolution against the VAE's
    downsampling and the patch size, and against the largest latent the transformer's position embedding covers;
    that every LoRA target names a module of the transformer (peft's rule: the name or its last dotted parts).
    One-line `--flag VALUE: …` errors."""
    step = resolution_step(vae, transformer)
    runio.require(resolution % step == 0, "resolution", resolution,
                  f"must be a multiple of {step} for this model (its VAE's downsampling × patch size)")
    cover = transformer.config.pos_embed_max_size
    if cover is not None:
        largest = cover * step
        runio.require(resolution <= largest, "resolution", resolution,
                      f"at most {largest} for this model (its position embedding covers {cover}² patches)")
    modules = [n for n, _ in transformer.named_modules()]
    missing = [t for t in lora_targets if not any(n == t or n.endswith("." + t) for n in modules)]
    runio.require(not missing, "lora_targets", lora_targets,
                  f"no transformer module is named {missing[0] if missing else ''!r}: e.g. {' '.join(LORA_TARGETS)}")
