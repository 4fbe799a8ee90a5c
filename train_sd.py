"""Stable Diffusion 1.5 LoRA fine-tuning by reward backpropagation: ShortFT and every baseline.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3 (shortcut-based chain), Sec. 4 (SD1.5 experiments).

One update: draw prompts c and x_T ~ N(0, I) (B, 4, H/8, W/8); build the method's chain with
`shortft.make_chain` over SD1.5's 50-step DDIM grid ("leading": 981 … 1); run it with the denoisers
below; decode x_0 with the VAE; loss = −r(decode(x_0), c); backprop into the trainable LoRA only.

Notation (code -> paper):
    "tuned"           ε_θ with classifier-free guidance w (one UNet call on the batch [∅, c])
    "shortcut"        ε_φ of the frozen distillation LoRA (Hyper-SD: no CFG, one call on c)
    "shortcut+tuned"  ε_φ with the trainable LoRA also active
    boundaries        timestep-aware LoRA: adapter i owns timesteps in range i (shortft.timestep_range_index)

Run: python train_sd.py --tiny        (CPU, under a minute: tiny random SD, a few updates, runs/sd-tiny/)
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import rewards
import runio
import shortcut
import shortft

# x86 CPUs run 10-100x slower on denormal floats, which random tiny models produce in abundance. The flag is
# per thread and worker threads copy it when they start, so it is set here, before any parallel work.
torch.set_flush_denormal(True)


@dataclass
class Args:
    """Fine-tune a Stable Diffusion 1.5 LoRA with ShortFT or a baseline (reward backpropagation)."""

    name: str = "sd"
    """run folder: runs/<name>/ (args.json, metrics.jsonl, checkpoints/, lora/, eval PNG grids)"""
    out_dir: str = "runs"
    """parent folder of run folders"""
    tiny: bool = False
    """build tiny random SD components, a tiny CLIP reward and a stand-in shortcut LoRA (no downloads)"""
    tiny_dir: str = ""
    """where --tiny builds (or reuses) its files (empty: runs/<name>/tiny)"""
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local folder of the SD1.5 pipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"""
    method: str = "shortft"
    """shortft | full | draft_k | draft_lv | alignprop | refl | drtune (shortft.METHODS)"""
    reward: str = "aesthetic"
    """reward name or weighted sum, e.g. 'pickscore:10,hpsv2:2,aesthetic:0.05' (rewards.REWARDS)"""
    clip_model: str | None = None
    """CLIP backbone for CLIP-based rewards (None: each reward's default)"""
    shortcut: str = shortcut.DEFAULT_SHORTCUT
    """shortcut LoRA: a name in shortcut.SHORTCUTS or a local .safetensors file (ShortFT only)"""
    shortcut_guidance: float | None = None
    """CFG scale inside shortcut jumps (None: the shortcut's recommendation; ≤ 1 means no CFG)"""
    shortcut_scale: float | None = None
    """LoRA scale of the shortcut (None: the shortcut's recommendation)"""
    train_prompts: str = "prompts/train.txt"
    """training prompts, one per line ('#' starts a comment)"""
    eval_prompts: str = "prompts/eval.txt"
    """held-out prompts for evaluation"""
    resolution: int = 512
    """image side in pixels (latents are resolution / 8)"""
    steps: int = 200
    """optimizer updates"""
    batch_size: int = 1
    """prompts per micro-batch and process"""
    grad_accum: int = 1
    """micro-batches per update"""
    lr: float = 3e-4
    """AdamW learning rate of the LoRA"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (≤ 0: none); NaN/inf updates are skipped either way"""
    lora_rank: int = 8
    """rank r of the trainable LoRA"""
    lora_alpha: float = 8.0
    """LoRA alpha (update scale alpha / r)"""
    lora_targets: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet modules that get the trainable LoRA"""
    timestep_boundaries: list = field(default_factory=list)
    """timestep-aware LoRA: e.g. 500 → one adapter for t ≥ 500 and one for t < 500 (empty: one adapter)"""
    num_steps: int = 50
    """DDIM steps N of the chain being fine-tuned (SD's sampler)"""
    spacing: str = "leading"
    """DDIM timestep spacing of the chain (SD1.5 samples with 'leading')"""
    guidance: float = 7.5
    """classifier-free guidance scale w of the tuned model"""
    jumps_before: int = 2
    """ShortFT: shortcut jumps from x_T to the trained step (no gradient)"""
    jumps_after: int = 4
    """ShortFT: shortcut jumps M from the trained step to x_0 (with gradient)"""
    trained_steps: int = 1
    """ShortFT: consecutive DDIM steps of the tuned model with gradient"""
    lora_in_shortcut: bool = True
    """ShortFT: keep the trainable LoRA active inside every shortcut jump, so the chain follows the tuned model's
    trajectory (the toy diverges without it; --no-lora-in-shortcut trains the single step only)"""
    sampling: str = "uniform"
    """ShortFT: how the trained step is drawn: uniform | stratified (by timestep-aware range)"""
    draft_k: int = 1
    """DRaFT-K: steps with gradient"""
    draft_lv_n: int = 2
    """DRaFT-LV: re-noised copies"""
    alignprop_k_min: int = 1
    """AlignProp: minimum truncation length"""
    alignprop_k_max: int | None = None
    """AlignProp: maximum truncation length (None: N)"""
    refl_last: int = 10
    """ReFL: the graded step is drawn among the last this-many steps"""
    drtune_k: int = 5
    """DRTune: steps whose ε carries gradient"""
    mixed_precision: str = "no"
    """no | bf16 | fp16 (accelerate); frozen weights are stored in this dtype, the LoRA in float32"""
    gradient_checkpointing: bool = False
    """also checkpoint inside the UNet (chains already checkpoint whole steps)"""
    checkpoint_decode: bool = True
    """recompute the VAE decode in backward instead of storing its activations"""
    channels_last: bool = True
    """channels_last memory format for the UNet and VAE on CUDA"""
    compile: bool = False
    """torch.compile the UNet (CUDA; recompiles once per adapter combination)"""
    seed: int = 0
    """seed of prompts, noise and chain draws"""
    eval_every: int = 100
    """evaluate on the held-out prompts every this many updates (0: only at the end)"""
    eval_samples: int = 12
    """held-out prompts evaluated (one fixed seed each)"""
    eval_batch: int = 4
    """images per sampler batch during evaluation"""
    save_every: int = 100
    """checkpoint (LoRA + optimizer + RNG) every this many updates, and at the end"""
    resume: bool = False
    """continue from the run folder's latest checkpoint (optimizer, step and RNG restored exactly)"""
    log_with: str = ""
    """extra trackers through accelerate: tensorboard, wandb (metrics.jsonl is always written)"""


TINY = dict(resolution=32, steps=4, eval_every=0, eval_samples=4, save_every=2, name="sd-tiny")
"""--tiny replaces these defaults (fields set to anything other than their default are kept)."""


# ----------------------------------------------------------------------------- building blocks


def find_file(path: str | Path) -> Path:
    """`path` as given, or relative to this script's folder when it is not found from the current one."""
    path = Path(path)
    here = Path(__file__).resolve().parent / path
    return here if not path.exists() and not path.is_absolute() and here.exists() else path


def load_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, '#' comments skipped. Missing or empty file: one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist: write one prompt per line")
    prompts = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} has no prompts: write one prompt per line")
    return prompts


def load_components(model: str, device="cpu", dtype=torch.float32) -> dict:
    """SD1.5 tokenizer, text encoder, VAE, UNet (frozen, in `dtype`) and DDIM scheduler from a hub id or
    a local pipeline folder. Missing weights: one line with the `hf download` command."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
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


def adapter_names(boundaries) -> list[str]:
    """Names of the trainable adapters: 'tuned', or 'tuned_0', 'tuned_1', … for timestep-aware LoRA."""
    return ["tuned"] if not boundaries else [f"tuned_{i}" for i in range(len(boundaries) + 1)]


def add_trainable_lora(unet, rank: int = 8, alpha: float = 8.0, targets=("to_q", "to_k", "to_v", "to_out.0"),
                       boundaries=()) -> tuple[list[str], list[torch.nn.Parameter]]:
    """Add the trainable LoRA adapter(s) with peft (B = 0 at init, so the model starts as the base).
    With `boundaries`, one adapter per timestep range (timestep-aware LoRA). Returns (names, float32
    parameters that require grad); everything else in the UNet is frozen."""
    from peft import LoraConfig

    names = adapter_names(boundaries)
    for name in names:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=list(targets)), adapter_name=name)
    return names, trainable_parameters(unet, names)


def trainable_parameters(unet, names) -> list[torch.nn.Parameter]:
    """Set requires_grad on exactly the parameters of adapters `names` (float32), off everywhere else.
    Call after every peft/diffusers call that may have flipped it (SD_NOTES trap 1)."""
    params = []
    for n, p in unet.named_parameters():
        mine = any(f".{a}." in n for a in names)
        p.requires_grad_(mine)
        if mine:
            p.data = p.data.float()
            params.append(p)
    return params


def encode_prompts(prompts, tokenizer, text_encoder, cache: dict) -> torch.Tensor:
    """Text embeddings (B, 77, D), one text-encoder pass per distinct prompt ever seen (cached)."""
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        with torch.no_grad():
            cache.update(zip(missing, text_encoder(ids)[0]))
    return torch.stack([cache[p] for p in prompts])


def make_denoisers(unet, cond, uncond, guidance: float, tuned: list[str], boundaries=(),
                   shortcut_adapter: str | None = None, shortcut_guidance: float = 0.0, layers=None) -> dict:
    """The callables ε = f(x_t, t, s) the chains look up by name. Each sets its own adapters inside
    the call (so checkpoint recomputation sees the same model: SD_NOTES trap 3) without touching
    requires_grad (trap 1). Guidance w ≤ 1 means no CFG: one conditional UNet call; otherwise the
    batch [∅, c] goes through the UNet in one call.  cond, uncond: (B, 77, D) and (1, 77, D).
    `tuned` = [] gives the base model (evaluation)."""
    layers = shortcut.lora_layers(unet) if layers is None else layers
    b = cond.shape[0]
    both = torch.cat([uncond.expand(b, -1, -1), cond])

    def eps(x, t, adapters, w):
        shortcut.set_active_adapters(unet, adapters, layers)
        x_in = x.to(unet.dtype)
        if w <= 1.0:
            return unet(x_in, t, encoder_hidden_states=cond).sample.to(x.dtype)
        e_u, e_c = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=both).sample.to(x.dtype).chunk(2)
        return shortft.classifier_free_guidance(e_u, e_c, w)

    def lora_at(t):
        return [tuned[shortft.timestep_range_index(t, boundaries)]] if tuned else []

    denoisers = {"tuned": lambda x, t, s: eps(x, t, lora_at(t), guidance)}
    if shortcut_adapter is not None:
        denoisers["shortcut"] = lambda x, t, s: eps(x, t, [shortcut_adapter], shortcut_guidance)
        denoisers["shortcut+tuned"] = lambda x, t, s: eps(x, t, [shortcut_adapter, *lora_at(t)], shortcut_guidance)
    return denoisers


def decode(vae, latents: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """VAE decode: images = (D(z / scaling_factor) + 1) / 2 clamped to [0, 1]; (B, 4, h, w) → (B, 3, 8h, 8w)."""

    def dec(z):
        return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float()

    x = torch.utils.checkpoint.checkpoint(dec, latents, use_reentrant=False) if checkpoint and latents.requires_grad \
        else dec(latents)
    return ((x + 1) / 2).clamp(0, 1)


def chain_switches(args: Args) -> dict:
    """The switches of `args.method` for shortft.make_chain."""
    return {
        "shortft": dict(jumps_before=args.jumps_before, jumps_after=args.jumps_after,
                        trained_steps=args.trained_steps, lora_in_shortcut=args.lora_in_shortcut,
                        sampling=args.sampling, boundaries=tuple(args.timestep_boundaries)),
        "full": {}, "draft_k": dict(k=args.draft_k), "draft_lv": dict(n=args.draft_lv_n),
        "alignprop": dict(k_min=args.alignprop_k_min, k_max=args.alignprop_k_max),
        "refl": dict(last=args.refl_last), "drtune": dict(k=args.drtune_k),
    }[args.method]


def lora_state_dict(unet, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA key format (what `load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))


def save_lora(unet, names: list[str], out_dir: str | Path) -> list[Path]:
    """Write the trainable LoRA as `pytorch_lora_weights.safetensors` (one adapter) or
    `pytorch_lora_weights_range{i}.safetensors` (timestep-aware), loadable with `pipe.load_lora_weights`."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    files = []
    for i, name in enumerate(names):
        weight_name = "pytorch_lora_weights.safetensors" if len(names) == 1 else f"pytorch_lora_weights_range{i}.safetensors"
        meta = unet.peft_config[name].to_dict()
        meta["target_modules"] = sorted(meta["target_modules"])
        StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=lora_state_dict(unet, name),
                                                  weight_name=weight_name, unet_lora_adapter_metadata=meta)
        files.append(out_dir / weight_name)
    return files


@torch.no_grad()
def sample(unet, vae, tokenizer, text_encoder, cache, prompts, grid, schedule, guidance, tuned, boundaries=(),
           seeds=None, resolution=512, batch=4) -> torch.Tensor:
    """The ordinary N-step DDIM + CFG sampler (shortft.sampling_chain) from fixed seeds; images (B, 3, H, W)."""
    device = next(unet.parameters()).device
    uncond = encode_prompts([""], tokenizer, text_encoder, cache)
    chain = shortft.sampling_chain(grid)
    side = resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    images = []
    for i in range(0, len(prompts), batch):
        ps = prompts[i : i + batch]
        x = torch.stack([torch.randn(unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(s))
                         for s in seeds[i : i + batch]]).to(device)
        den = make_denoisers(unet, encode_prompts(ps, tokenizer, text_encoder, cache), uncond, guidance, tuned, boundaries)
        images.append(decode(vae, shortft.run_chain(x, chain.trunk, den, schedule)).cpu())
    return torch.cat(images)


def save_grid(rows: list[torch.Tensor], path: str | Path) -> None:
    """PNG with one row of images per tensor (B, 3, H, W) in [0, 1], e.g. [base, tuned]."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # (3, rows·H, B·W)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)


def guarded_update(accelerator, optimizer, params, max_grad_norm: float) -> tuple[bool, float]:
    """shortft.guarded_step with accelerate: gradients averaged over processes, unscaled (fp16), then
    NaN/inf → no update (the fp16 loss scale is lowered), else clip and step. Returns (applied, norm)."""
    if accelerator.num_processes > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    accelerator.unscale_gradients()
    norm = shortft.grad_norm(params)
    if not torch.isfinite(norm):
        if accelerator.scaler is not None:
            accelerator.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return False, float(norm)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True, float(norm)


def check_args(args: Args) -> None:
    """Fail early, in one line, on names that do not exist."""
    if args.method not in shortft.METHODS:
        raise ValueError(f"unknown method {args.method!r}: choose one of {', '.join(shortft.METHODS)}")
    for name, _ in rewards.parse_reward_spec(args.reward):
        if name not in rewards.REWARDS:
            raise ValueError(f"unknown reward {name!r}: choose from {', '.join(sorted(rewards.REWARDS))}")
    if args.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"unknown mixed precision {args.mixed_precision!r}: use no, bf16 or fp16")


def apply_tiny(args: Args) -> Args:
    """--tiny: build tiny SD, CLIP and shortcut files under runs/<name>/tiny/ and point the args at them."""
    import tiny

    defaults = Args()
    keep = lambda k: getattr(args, k) != getattr(defaults, k)  # noqa: E731
    args = dataclasses.replace(args, **{k: v for k, v in TINY.items() if not keep(k)})
    root = Path(args.tiny_dir) if args.tiny_dir else Path(args.out_dir) / args.name / "tiny"
    sd = tiny.tiny_sd(root / "sd")
    if not (root / "clip" / "config.json").is_file():
        tiny.tiny_clip(root / "clip")
    sc = root / "shortcut_lora.safetensors"
    if not sc.is_file():
        tiny.tiny_shortcut_lora(sc, sd / "unet")
    tiny_files = dict(model=str(sd), reward="clipscore", clip_model=str(root / "clip"), shortcut=str(sc))
    return dataclasses.replace(args, **{k: v for k, v in tiny_files.items() if not keep(k)})


# ----------------------------------------------------------------------------- main


def main(args: Args) -> dict:
    """Train; returns {"run_dir", "step", "skipped", "eval", "args"}."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if args.tiny:
        args = apply_tiny(args)
    args = dataclasses.replace(args, timestep_boundaries=[int(b) for b in args.timestep_boundaries],
                               train_prompts=str(find_file(args.train_prompts)),
                               eval_prompts=str(find_file(args.eval_prompts)))
    check_args(args)
    run_dir = Path(args.out_dir) / args.name
    train_prompts, eval_prompts = load_prompts(args.train_prompts), load_prompts(args.eval_prompts)[: args.eval_samples]
    sc_file, sc_spec = shortcut.resolve_shortcut(args.shortcut) if args.method == "shortft" else (None, None)

    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
                              log_with=args.log_with or None, project_dir=str(run_dir))
    device, main_proc = accelerator.device, accelerator.is_main_process
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    set_seed(args.seed + accelerator.process_index)  # python, numpy, torch: every draw below comes from these

    c = load_components(args.model, device, dtype)
    unet, vae, tok, te = c["unet"], c["vae"], c["tokenizer"], c["text_encoder"]
    schedule = shortft.schedule_from_diffusers(c["scheduler"].config)
    grid = shortft.ddim_timesteps(args.num_steps, schedule.num_train_timesteps, args.spacing,
                                  c["scheduler"].config.get("steps_offset", 1))
    if sc_file is not None:
        if not sc_spec.trajectory_preserving:
            print(f"warning: shortcut {args.shortcut!r} is not trajectory-preserving (it re-noises at every step); "
                  f"ShortFT assumes it lands where the {args.num_steps}-step chain lands", file=sys.stderr)
        sc_scale = sc_spec.lora_scale if args.shortcut_scale is None else args.shortcut_scale
        sc_guidance = sc_spec.guidance if args.shortcut_guidance is None else args.shortcut_guidance
        shortcut.load_shortcut_lora(unet, sc_file, "shortcut", sc_scale)
    names, params = add_trainable_lora(unet, args.lora_rank, args.lora_alpha, args.lora_targets, args.timestep_boundaries)
    params = trainable_parameters(unet, names)  # again, after every adapter call (trap 1)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.channels_last and device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    layers = shortcut.lora_layers(unet)
    forward_unet = torch.compile(unet) if args.compile else unet
    reward = rewards.make_reward(args.reward, device=device, dtype=dtype,
                                 **({"clip_model": args.clip_model} if args.clip_model else {}))
    optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay))
    cache: dict[str, torch.Tensor] = {}

    step, skipped = 0, 0
    ckpt = runio.latest_checkpoint(run_dir) if args.resume else None
    if ckpt is not None:
        weights, state = runio.load_checkpoint(ckpt, optimizer.optimizer)
        named = dict(unet.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                named[n].copy_(w)
        step, skipped = state["step"], state["skipped"]
        if accelerator.num_processes > 1:  # the checkpoint holds one process's RNG: give each its own stream again
            set_seed(args.seed + 1000 * step + accelerator.process_index)
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        runio.write_json(dataclasses.asdict(args), run_dir / "args.json")
        if args.log_with:
            accelerator.init_trackers(args.name, config={k: str(v) for k, v in dataclasses.asdict(args).items()})

    example = shortft.make_chain(args.method, grid, random.Random(0), **chain_switches(args))
    print(f"run {run_dir}  method {args.method}  reward {args.reward}  model {args.model}\n"
          f"  grid {args.num_steps} DDIM steps ({args.spacing}: {grid[0]} … {grid[-1]}), CFG {args.guidance}, "
          f"{args.resolution}px, {args.mixed_precision} on {device} × {accelerator.num_processes}\n"
          f"  LoRA {names} rank {args.lora_rank} alpha {args.lora_alpha}: {sum(p.numel() for p in params):,} trainable\n"
          f"  shortcut {args.shortcut if sc_file else '-'}"
          + (f" (scale {sc_scale}, guidance {sc_guidance})" if sc_file else "") + "\n"
          f"  effective batch {args.batch_size * args.grad_accum * accelerator.num_processes}, "
          f"updates {step} → {args.steps}, example chain cost {shortft.chain_cost(example)}")

    def evaluate(tag):
        kw = dict(seeds=list(range(len(eval_prompts))), resolution=args.resolution, batch=args.eval_batch)
        if "base" not in evaluate.__dict__:
            evaluate.base = sample(unet, vae, tok, te, cache, eval_prompts, grid, schedule, args.guidance, [], **kw)
            with torch.no_grad():
                evaluate.base_r = reward(evaluate.base.to(device), eval_prompts).float().cpu()
        tuned = sample(unet, vae, tok, te, cache, eval_prompts, grid, schedule, args.guidance, names,
                       args.timestep_boundaries, **kw)
        with torch.no_grad():
            r = reward(tuned.to(device), eval_prompts).float().cpu()
        save_grid([evaluate.base, tuned], run_dir / f"eval_{tag}.png")
        out = {"step": step, "eval/reward_mean": r.mean().item(), "eval/reward_std": r.std(unbiased=False).item(),
               "eval/base_reward_mean": evaluate.base_r.mean().item(),
               "eval/base_reward_std": evaluate.base_r.std(unbiased=False).item()}
        runio.append_jsonl(out, run_dir / "metrics.jsonl")
        print(f"  eval @ {step}: reward {out['eval/reward_mean']:.4f} ± {out['eval/reward_std']:.4f} "
              f"(base {out['eval/base_reward_mean']:.4f} ± {out['eval/base_reward_std']:.4f})")
        return out

    def save():
        tmp = run_dir / ".lora_tmp"
        save_lora(unet, names, tmp)
        extra = {f.name: f for f in sorted(tmp.glob("*.safetensors"))}
        runio.save_checkpoint(run_dir, step, {n: p for n, p in unet.named_parameters() if p.requires_grad},
                              optimizer.optimizer, {"skipped": skipped, "args": dataclasses.asdict(args)}, extra)
        tmp.rmdir()
        save_lora(unet, names, run_dir / "lora")

    side = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    last_eval = None
    bar = tqdm(total=args.steps, initial=step, disable=not main_proc, desc=args.method)
    t0 = time.perf_counter()
    while step < args.steps:
        with accelerator.accumulate(unet):
            # --- sample ---
            prompts = [random.choice(train_prompts) for _ in range(args.batch_size)]
            cond = encode_prompts(prompts, tok, te, cache)
            uncond = encode_prompts([""], tok, te, cache)
            den = make_denoisers(forward_unet, cond, uncond, args.guidance, names, args.timestep_boundaries,
                                 "shortcut" if sc_file else None, sc_guidance if sc_file else 0.0, layers)
            chain = shortft.make_chain(args.method, grid, None, **chain_switches(args),
                                       **({"update": step} if args.method == "shortft" else {}))
            x_T = torch.randn(args.batch_size, unet.config.in_channels, side, side, device=device)

            # --- reward ---
            def reward_fn(latents):
                return reward(decode(vae, latents, args.checkpoint_decode), prompts).float()

            with accelerator.autocast():
                loss, r = shortft.reward_loss(x_T, chain, den, schedule, reward_fn)

            # --- update ---
            accelerator.backward(loss)
            if not accelerator.sync_gradients:
                continue
            applied, norm = guarded_update(accelerator, optimizer, params, args.max_grad_norm)
        skipped += not applied
        step += 1
        bar.update(1)
        bar.set_postfix(reward=f"{r.mean().item():.4f}", grad=f"{norm:.3g}")
        metrics = {"step": step, "loss": loss.item(), "reward/mean": r.mean().item(),
                   "reward/std": r.std(unbiased=False).item() if r.numel() > 1 else 0.0, "grad/norm": norm,
                   "update/skipped": skipped, "time/update_s": time.perf_counter() - t0,  # all micro-batches
                   "chain/grad_evals": shortft.chain_cost(chain)["grad"]}
        if main_proc:
            runio.append_jsonl(metrics, run_dir / "metrics.jsonl")
            if args.log_with:
                accelerator.log(metrics, step=step)
            if args.eval_every and step % args.eval_every == 0:
                last_eval = evaluate(f"step{step:06d}")
            if step % args.save_every == 0 or step == args.steps:
                save()
        t0 = time.perf_counter()
    bar.close()
    if main_proc:
        if last_eval is None or last_eval["step"] != step:
            last_eval = evaluate(f"step{step:06d}")
        if not (run_dir / "lora").is_dir():
            save()
        print(f"LoRA: {run_dir / 'lora'} (pipe.load_lora_weights('{run_dir / 'lora'}') in any SD1.5 pipeline)")
    accelerator.end_training()
    return {"run_dir": run_dir, "step": step, "skipped": skipped, "eval": last_eval, "args": args}


if __name__ == "__main__":
    try:
        main(runio.parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
