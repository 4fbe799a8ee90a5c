"""A miniature Stable Diffusion 3 trained here on scikit-learn's handwritten digits, with its own shortcut.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604. The paper calls ShortFT (Sec. 3) architecture-agnostic and shows it on SD3, a
rectified-flow transformer (Esser et al., "Scaling Rectified Flow Transformers", 2024,
https://arxiv.org/abs/2403.03206).
SD3 and Hyper-SD3 cannot be downloaded here, so this script trains a base model, a trajectory-preserving shortcut and a
reward with SD3's classes in StableDiffusion3Pipeline's folder layout: the flow-matching sibling of minisd.py, whose
digits, classifier and VAE training it reuses. Stages (each reused when its files and numbers exist; once one is
rebuilt, every later one is):

    classifier  minisd.train_classifier: rewards.DigitClassifier (the `digit` reward), 20 % of the digits held out
    vae         minisd.train_vae (AutoencoderKL 32×32×3 ↔ 4×4×4), then SD3's latent normalisation from the training
                latents z: shift_factor = mean(z), scaling_factor = 1/std(z), so that the pipeline's decoder input
                x / scaling_factor + shift_factor is z
    transformer SD3Transformer2DModel (joint blocks, patch 1 on the 4×4 latents), rectified-flow loss
                L = E ‖v_θ((1 − σ) x_0 + σ ε, σ, c) − (ε − x_0)‖² (`flow_matching_loss`), σ drawn by `sample_sigmas`,
                the prompt "a handwritten d" dropped to "" with probability p_uncond (CFG). Its two
                CLIPTextModelWithProjection (tiny.py's byte-level tokenizer, no T5) start from random init and are
                trained along, then frozen; prompts are encoded by the pipeline's own `encode_prompt`
    guidance    the smallest CFG scale w whose 28-step Euler samples the classifier recognises at target_rate
    shortcut    LoRA distilled from the base's 28-step Euler + CFG trajectories: from a grid step t with
                p_j < t < p_{j−1} (LoRA points p = shortft.paper_points: 814.3, 602.2, 409.3, 8.9) one conditional call
                without CFG, flow_step(x_t, v_φ(x_t, t, c), σ_t, σ_{p_j}), lands on the teacher's x_{p_j}
    trajectory_error  of the chain's jumps next(p_{j−1}) → p_j, against the base's one Euler step over the same interval

Output (runs/minisd3/): pipeline/ (a StableDiffusion3Pipeline folder without T5: load it with
`StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)` and sample it with
`max_sequence_length=0`, see `Args.t5_tokens`), shortcut/pytorch_lora_weights.safetensors (read by
`pipe.load_lora_weights`), classifier.safetensors + .json, samples.png (one row per digit), report.json, args.json.
Notation: x_t scaled latents (B, 4, 4, 4); c = (text tokens (B, L, 64), pooled (B, 64)); σ_t = t / 1000 with t the
float timesteps of FlowMatchEulerDiscreteScheduler; v velocity ≈ ε − x_0; w CFG scale; grid the 28-step Euler grid
1000.0, 987.4, …, 8.9 (shortft.flow_timesteps(28, shift)).

Run: python minisd3.py        (python minisd3.py --preset test: a reduced build in runs/minisd3-test/)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minisd
import rewards
import runio
import sd
import shortcut
import shortft

torch.set_flush_denormal(True)  # small models produce denormal floats, which slow x86 CPUs 10-100x

SHORTCUT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                    "norm1_context.linear", "norm_out.linear", "linear_1", "linear_2", "proj_out", "context_embedder",
                    "pos_embed.proj"]
"""joint attention (image and text streams), feed-forward, AdaLN modulation, timestep/pooled-text embedding, patch
embedding and output layers of the transformer (peft matches name suffixes)"""


@dataclass
class Args:
    """Build the miniature Stable Diffusion 3 on scikit-learn's digits (pipeline, shortcut LoRA, digit reward)."""

    out: str = ""
    """output folder (empty: runs/minisd3, or runs/minisd3-<preset>)"""
    preset: str = "full"
    """full | test (a reduced build, for the tests)"""
    seed: int = 0
    """seed of the split, the inits, the noise and the trajectories"""
    threads: int = 1
    """torch CPU threads"""
    classifier_steps: int = 300
    """Adam steps of the digit classifier (minisd.train_classifier)"""
    vae_channels: list[int] = field(default_factory=lambda: [8, 8, 16, 32])
    """AutoencoderKL block widths (minisd.train_vae; 4 blocks: ×8 down-sampling)"""
    vae_steps: int = 250
    """Adam steps of the VAE"""
    vae_kl: float = 1e-3
    """β of the VAE's KL term"""
    augment_copies: int = 4
    """copies of the training images behind the transformer's latents (the first as is, the others augmented)"""
    heads: int = 3
    """attention heads of the transformer (head width 32: inner width 32·heads)"""
    layers: int = 4
    """joint transformer blocks (the last one, as in SD3, updates the image stream only)"""
    text_width: int = 32
    """width of each CLIP text encoder (2 layers; SD3's CLIP-L and CLIP-G are 768 and 1280)"""
    prompt_tokens: int = 16
    """tokenizer length (SD3: 77; "a handwritten 9" is 15 byte-level tokens with start and end)"""
    t5_tokens: int = 0
    """zero tokens that stand in for the absent T5 in the prompt (the pipeline's max_sequence_length, 256 by default;
    sample with the same value). 0: none; 256 would make every transformer call about 9× as costly (288 tokens, not 32)"""
    shift: float = 3.0
    """FlowMatchEulerDiscreteScheduler's shift, also applied to the training σ (SD3's 3.0)"""
    sigma_sampling: str = "logit_normal"
    """training σ before the shift: logit_normal (σ = sigmoid(n), n ~ N(0, 1), SD3's) | uniform"""
    transformer_steps: int = 500
    """Adam steps of the transformer and text encoders"""
    transformer_batch: int = 128
    """batch of transformer training"""
    transformer_lr: float = 1e-3
    """peak learning rate of transformer training"""
    p_uncond: float = 0.1
    """probability of the empty prompt in transformer training (for classifier-free guidance)"""
    num_steps: int = 28
    """Euler steps of the sampler (SD3's default)"""
    guidance: list[float] = field(default_factory=lambda: [1.5, 2.0, 2.5, 3.0, 4.0, 5.0])
    """candidate CFG scales w of the sampler"""
    target_rate: float = 0.9
    """keep the smallest w whose samples the classifier recognises at this rate (none: the best w)"""
    samples_per_digit: int = 10
    """samples per digit and w (one row of samples.png)"""
    lora_points: list[float] = field(default_factory=list)
    """ShortFT's LoRA timesteps p_j on the grid, the ends of the shortcut's jumps (empty: shortft.paper_points)"""
    shortcut_rank: int = 16
    """rank (= alpha) of the shortcut LoRA"""
    shortcut_targets: list[str] = field(default_factory=lambda: list(SHORTCUT_TARGETS))
    """transformer modules the shortcut LoRA adapts"""
    trajectories: int = 1024
    """teacher trajectories (Euler + CFG from x_T ~ N(0, I), the digits in turn) to distil from"""
    shortcut_steps: int = 400
    """Adam steps of shortcut distillation"""
    shortcut_batch: int = 128
    """(trajectory, grid step) pairs per distillation step"""
    eval_trajectories: int = 200
    """held-out teacher trajectories (other x_T) for the trajectory error"""


PRESETS = {"test": dict(classifier_steps=60, vae_channels=[8, 8, 8, 8], vae_steps=20, augment_copies=1, heads=1,
                        layers=2, text_width=16, transformer_steps=150, transformer_batch=64, guidance=[3.0],
                        samples_per_digit=2, shortcut_rank=4, trajectories=40, shortcut_steps=80, shortcut_batch=64,
                        eval_trajectories=20)}
"""--preset NAME replaces these defaults (fields given on the command line are kept)."""


# ----------------------------------------------------------------------------- the model's pieces


def text_components(seed: int, width: int, tokens: int):
    """tiny.py's byte-level CLIPTokenizer cut to `tokens` and two random-init 2-layer CLIPTextModelWithProjection of
    `width` (SD3's CLIP-L and CLIP-G in miniature): (tokenizer, text_encoder, text_encoder_2)."""
    import tempfile

    import tiny
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as d:
        tokenizer = tiny.tiny_tokenizer(d)
    tokenizer.model_max_length = tokens
    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2,
                            vocab_size=len(tokenizer), max_position_embeddings=tokens, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=width)
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModelWithProjection(config), CLIPTextModelWithProjection(config)


def make_pipeline(transformer, vae, tokenizer, text_encoder, text_encoder_2, scheduler):
    """The StableDiffusion3Pipeline of these components, without T5 (both CLIPs share the byte-level tokenizer)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)


def load_pipeline(folder: str | Path):
    """StableDiffusion3Pipeline.from_pretrained of a minisd3 pipeline folder (no T5), frozen, progress bar off."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embed(pipe, prompts: list[str], t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """c = (tokens, pooled) by the pipeline's own `encode_prompt`: tokens (B, prompt_tokens + t5_tokens, 2·width) the
    two CLIPs' penultimate hidden states side by side, then t5_tokens zero tokens for the absent T5; pooled (B, 2·width)
    their projected pooled outputs side by side. Differentiable in the text encoders."""
    tokens, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=t5_tokens)
    return tokens, pooled


def velocity(transformer, x: torch.Tensor, t, c) -> torch.Tensor:
    """v_θ(x_t, t, c) (B, 4, h, w); t a timestep σ·1000 (a number, or a (B,) tensor of them); c = (tokens, pooled)."""
    t = torch.as_tensor(t, dtype=torch.float32).expand(len(x))
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=c[0], pooled_projections=c[1]).sample


def guided_velocity(transformer, x: torch.Tensor, t, cond, uncond, w: float) -> torch.Tensor:
    """ṽ = v_∅ + w (v_c − v_∅) from one call on [x, x] (unconditional half first, as the pipeline); w ≤ 1: the
    conditional call only. cond = (tokens (B, L, D), pooled (B, P)), uncond the same with batch 1."""
    if w <= 1:
        return velocity(transformer, x, t, cond)
    both = tuple(torch.cat([u.expand_as(c), c]) for u, c in zip(uncond, cond))
    v_u, v_c = velocity(transformer, torch.cat([x, x]), t, both).chunk(2)
    return shortft.classifier_free_guidance(v_u, v_c, w)


def sampler_grid(args: Args) -> list[float]:
    """The sampler's Euler grid τ_N > … > τ_1 (FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N))."""
    return shortft.flow_timesteps(args.num_steps, args.shift)


def lora_points(args: Args, grid: list[float]) -> tuple[float, ...]:
    """ShortFT's LoRA points on the grid: args.lora_points (grid timesteps, to one decimal: 814.3 is 814.3247…), or
    the paper's layout mapped by noise level (shortft.paper_points)."""
    if args.lora_points:
        return shortft.check_lora_points([next((t for t in grid if abs(t - p) < 0.05), p) for p in args.lora_points],
                                         grid)
    return shortft.paper_points(grid, shortft.FlowSchedule())


# ----------------------------------------------------------------------------- rectified flow


def sample_sigmas(n: int, generator: torch.Generator, kind: str = "logit_normal", shift: float = 3.0) -> torch.Tensor:
    """Training noise levels σ (n,): σ_0 = sigmoid(u), u ~ N(0, 1) (SD3's logit-normal, Esser et al. Sec. 3.1) or
    σ_0 ~ U(0, 1), then the sampler's shift σ = s σ_0 / (1 + (s − 1) σ_0), as diffusers' SD3 training scripts draw σ
    from the shifted scheduler's sigmas. Which density to train with is this repo's choice (`--sigma-sampling`)."""
    if kind == "logit_normal":
        sigma = torch.sigmoid(torch.randn(n, generator=generator))
    elif kind == "uniform":
        sigma = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"unknown sigma_sampling {kind!r}: use logit_normal or uniform")
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_matching_loss(velocity_fn, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, c) -> torch.Tensor:
    """Rectified-flow (conditional flow-matching) loss, SD3's objective with uniform weighting:

        L = mean ‖v_θ(x_σ, 1000 σ, c) − (ε − x_0)‖²,   x_σ = (1 − σ) x_0 + σ ε,

    mean over every element. x0, eps (B, …); sigma (B,); velocity_fn(x_σ, t, c) with t (B,) timesteps σ·1000."""
    x_sigma = shortft.flow_add_noise(x0, eps, sigma)
    return (velocity_fn(x_sigma, sigma * 1000, c) - (eps - x0)).pow(2).mean()


# ----------------------------------------------------------------------------- stages


def normalise_latents(args: Args, vae, train) -> dict:
    """SD3's latent normalisation: shift_factor = mean and scaling_factor = 1/std of z ~ q(z|x) over the training
    images (minisd.train_vae set the scale alone, for SD1.5's z·scaling_factor)."""
    x, _ = train
    g = torch.Generator().manual_seed(args.seed + 10)
    with torch.no_grad():
        z = torch.cat([vae.encode(b * 2 - 1).latent_dist.sample(generator=g) for b in x.split(256)])
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    return dict(shift_factor=vae.config.shift_factor, scaling_factor=vae.config.scaling_factor)


def train_transformer(args: Args, vae, train, scheduler):
    """The rectified-flow transformer and its text encoders (`flow_matching_loss`, σ from `sample_sigmas`): x_0 the
    scaled latent (z − shift_factor)·scaling_factor of an (augmented) training image, z ~ q(z|x); c its prompt's
    embedding or, with probability p_uncond, the empty prompt's. Returns (pipeline, report)."""
    from diffusers import SD3Transformer2DModel

    x, y = train
    g = torch.Generator().manual_seed(args.seed + 3)
    with torch.no_grad():  # posterior mean and std of the (augmented) training images, normalised as the pipeline
        posts = [vae.encode(b * 2 - 1).latent_dist for k in range(args.augment_copies)
                 for b in (x if k == 0 else minisd.augment(x, g)).split(256)]
    s, b = vae.config.scaling_factor, vae.config.shift_factor
    mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
    mean, std = (mean - b) * s, std * s
    labels = y.repeat(args.augment_copies)
    tokenizer, text_encoder, text_encoder_2 = text_components(args.seed + 4, args.text_width, args.prompt_tokens)
    torch.manual_seed(args.seed + 5)
    transformer = SD3Transformer2DModel(
        sample_size=mean.shape[-1], patch_size=1, in_channels=4, out_channels=4, num_layers=args.layers,
        attention_head_dim=32, num_attention_heads=args.heads, joint_attention_dim=2 * args.text_width,
        caption_projection_dim=32 * args.heads, pooled_projection_dim=2 * args.text_width,
        pos_embed_max_size=mean.shape[-1])
    pipe = make_pipeline(transformer, vae, tokenizer, text_encoder, text_encoder_2, scheduler)
    prompts = [minisd.prompt(d) for d in range(10)] + [""]

    def loss(i):
        tokens, pooled = embed(pipe, prompts, args.t5_tokens)  # (11, L, D), (11, P)
        idx = torch.randint(0, len(mean), (args.transformer_batch,), generator=g)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = sample_sigmas(len(idx), g, args.sigma_sampling, args.shift)
        k = torch.where(torch.rand(len(idx), generator=g) < args.p_uncond, 10, labels[idx])
        return flow_matching_loss(lambda x_, t, c: velocity(transformer, x_, t, c), x0, eps, sigma,
                                  (tokens[k], pooled[k]))

    params = [*transformer.parameters(), *text_encoder.parameters(), *text_encoder_2.parameters()]
    losses = minisd.adam_steps(params, args.transformer_steps, args.transformer_lr, loss, "transformer")
    for m in (transformer, text_encoder, text_encoder_2):
        m.eval().requires_grad_(False)
    numbers = dict(final_loss=sum(losses[-50:]) / len(losses[-50:]),
                   parameters=sum(p.numel() for p in transformer.parameters()),
                   text_encoders="random init, trained with the transformer", max_sequence_length=args.t5_tokens)
    return pipe, numbers


@torch.no_grad()
def euler_trajectory(transformer, x_T, cond, uncond, w: float, grid) -> torch.Tensor:
    """The base's Euler + CFG chain x_{τ_N} → … → x_{τ_1} → x_0 (the repo's sampler, shortft.sampling_chain on a
    FlowSchedule), every state: (N + 1, B, 4, h, w)."""
    denoisers = {shortft.BASE: lambda x, t, s: guided_velocity(transformer, x, t, cond, uncond, w)}
    states, schedule = [x_T], shortft.FlowSchedule()
    for seg in shortft.sampling_chain(grid, model=shortft.BASE).trunk:
        states.append(shortft.apply_segment(states[-1], seg, denoisers, schedule))
    return torch.stack(states)


def score_guidance(args: Args, pipe, c_digits, c_empty, grid, classifier):
    """Recognition rate (classifier argmax = the prompt's digit) of Euler + CFG samples from the same x_T for every
    candidate w; returns (the chosen w's images (10, samples_per_digit, 3, H, W), report)."""
    labels = torch.arange(10).repeat_interleave(args.samples_per_digit)
    side = pipe.transformer.config.sample_size
    x_T = torch.randn(len(labels), 4, side, side, generator=torch.Generator().manual_seed(args.seed + 6))
    cond = tuple(c[labels] for c in c_digits)
    rates, images = {}, {}
    for w in args.guidance:
        with torch.no_grad():
            images[w] = sd.decode(pipe.vae, euler_trajectory(pipe.transformer, x_T, cond, c_empty, w, grid)[-1])
            hit = (classifier(images[w]).argmax(-1) == labels).float().view(10, -1)
        rates[w] = dict(rate=hit.mean().item(), per_digit=hit.mean(1).tolist())
    good = [w for w in args.guidance if rates[w]["rate"] >= args.target_rate]
    chosen = min(good) if good else max(args.guidance, key=lambda w: rates[w]["rate"])
    report = dict(chosen=chosen, rate=rates[chosen]["rate"], samples=len(labels), steps=args.num_steps,
                  by_scale={str(w): r for w, r in rates.items()})
    return images[chosen].view(10, args.samples_per_digit, *images[chosen].shape[1:]), report


def distil_shortcut(args: Args, transformer, traj, cond, grid, points) -> dict:
    """Add the LoRA "shortcut" to `transformer` and train it so that one conditional call (no CFG) jumps from the
    teacher's x_t to its x_{p_j}, for every grid step t with p_j < t < p_{j−1} (minisd.segment_pairs):

        L = E ‖flow_step(x_t, v_φ(x_t, t, c), σ_t, σ_{p_j}) − x_{p_j}‖²   (latent space, mean over elements).

    traj (N + 1, B, 4, h, w) teacher states, cond = (tokens (B, L, D), pooled (B, P))."""
    from peft import LoraConfig

    g = torch.Generator().manual_seed(args.seed + 7)
    torch.manual_seed(args.seed + 7)
    transformer.add_adapter(LoraConfig(r=args.shortcut_rank, lora_alpha=args.shortcut_rank,
                                       target_modules=list(args.shortcut_targets)), adapter_name="shortcut")
    params = [p.requires_grad_(True) for n, p in transformer.named_parameters() if ".shortcut." in n]
    pairs = torch.tensor(minisd.segment_pairs(grid, points))
    sigmas = torch.tensor(grid, dtype=torch.float64) / 1000

    def loss(i):
        k = pairs[torch.randint(0, len(pairs), (args.shortcut_batch,), generator=g)]
        b = torch.randint(0, traj.shape[1], (args.shortcut_batch,), generator=g)
        x_t, x_p = traj[k[:, 0], b], traj[k[:, 1], b]
        t, s_t, s_p = torch.tensor(grid)[k[:, 0]], sigmas[k[:, 0]].float(), sigmas[k[:, 1]].float()
        v = velocity(transformer, x_t, t, tuple(c[b] for c in cond))
        return (shortft.flow_step(x_t, v, s_t, s_p) - x_p).pow(2).mean()

    losses = minisd.adam_steps(params, args.shortcut_steps, 5e-3, loss, "shortcut")
    transformer.requires_grad_(False)
    return dict(final_loss=sum(losses[-50:]) / len(losses[-50:]), parameters=sum(p.numel() for p in params),
                pairs=len(pairs), guidance="none: one conditional call per jump")


def save_shortcut(transformer, folder: Path) -> None:
    """The LoRA as folder/pytorch_lora_weights.safetensors (StableDiffusion3Pipeline.save_lora_weights, keys
    transformer.<module>.lora_A/B.weight), read by `pipe.load_lora_weights` and `shortcut.load_shortcut_lora`."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, adapter_name="shortcut")
    minisd.save_folder(lambda d: StableDiffusion3Pipeline.save_lora_weights(d, transformer_lora_layers=layers), folder)


@torch.no_grad()
def jump_errors(transformer, traj, cond, uncond, w: float, grid, points) -> dict:
    """For each jump a → p of ShortFT's chain (a = next(p_{j−1})) from the teacher's x_a: ‖x̂_p − x_p‖ against the
    teacher's x_p, relative to its displacement ‖x_p − x_a‖ and to ‖x_p‖ (means over trajectories), for the shortcut
    (adapter "shortcut", one conditional call) and the base's one Euler step a → p with and without CFG."""
    at, out = {t: i for i, t in enumerate(grid)}, {}
    schedule = shortft.FlowSchedule()
    for p_prev, p in zip(points, points[1:]):
        a = grid[at[p_prev] + 1]
        if a == p:  # adjacent points: no interval to jump
            continue
        x_a, x_p = traj[at[a]], traj[at[p]]

        def err(adapters, w_):
            shortcut.set_active_adapters(transformer, adapters)
            x_hat = schedule.step(x_a, guided_velocity(transformer, x_a, a, cond, uncond, w_), a, p)
            d = (x_hat - x_p).flatten(1).norm(dim=1)
            return dict(of_displacement=(d / (x_p - x_a).flatten(1).norm(dim=1)).mean().item(),
                        of_norm=(d / x_p.flatten(1).norm(dim=1)).mean().item())

        out[f"{a:.1f}->{p:.1f}"] = dict(shortcut=err(["shortcut"], 0.0), base_cfg=err([], w), base_cond=err([], 0.0))
    shortcut.set_active_adapters(transformer, [])
    return out


# ----------------------------------------------------------------------------- main


def check_args(args: Args) -> None:
    """One line per bad argument (runio.ArgError, a ValueError) before anything is built."""
    runio.require(args.preset in ("full", *PRESETS), "preset", args.preset, f"choose full or {', '.join(PRESETS)}")
    for name in ("threads", "classifier_steps", "vae_steps", "augment_copies", "heads", "layers", "transformer_steps",
                 "transformer_batch", "samples_per_digit", "shortcut_rank", "trajectories", "shortcut_steps",
                 "shortcut_batch", "eval_trajectories"):
        runio.require_range(name, getattr(args, name), 1, 1 << 20)
    runio.require_range("text_width", args.text_width, 2, 4096, what="two attention heads per text layer")
    runio.require(args.text_width % 2 == 0, "text_width", args.text_width, "must be even (two attention heads)")
    runio.require_range("prompt_tokens", args.prompt_tokens, 15, 77, what='"a handwritten 9" takes 15 tokens')
    runio.require_range("t5_tokens", args.t5_tokens, 0, 512, what="the pipeline's max_sequence_length")
    runio.require_range("shift", args.shift, 0, 100, low_open=True)
    runio.check_arg("sigma_sampling", args.sigma_sampling, sample_sigmas, 1, torch.Generator(), args.sigma_sampling)
    runio.require_range("num_steps", args.num_steps, 4, 1000, what="ShortFT's layout needs 4 distinct LoRA points")
    runio.check_arg("lora_points", args.lora_points, lora_points, args, sampler_grid(args))
    runio.require(bool(args.guidance), "guidance", args.guidance, "give at least one CFG scale")
    for w in args.guidance:
        runio.require_range("guidance", w, 1, 100, what="w ≤ 1 is the conditional model without CFG")
    runio.require_range("target_rate", args.target_rate, 0, 1)
    runio.require_range("p_uncond", args.p_uncond, 0, 1)
    runio.require_range("transformer_lr", args.transformer_lr, 0, 1, low_open=True)
    runio.require_range("vae_kl", args.vae_kl, 0, None)
    runio.require(len(args.vae_channels) >= 1 and all(c >= 1 for c in args.vae_channels), "vae_channels",
                  args.vae_channels, "give positive block widths")
    runio.require(bool(args.shortcut_targets), "shortcut_targets", args.shortcut_targets, "name at least one module")


def apply_preset(args: Args) -> Args:
    check_args(args)
    default = Args()
    changes = {k: v for k, v in PRESETS.get(args.preset, {}).items() if getattr(args, k) == getattr(default, k)}
    out = args.out or ("runs/minisd3" if args.preset == "full" else f"runs/minisd3-{args.preset}")
    return dataclasses.replace(args, out=out, **changes)


def main(args: Args) -> dict:
    """Build (or reuse) every stage in args.out; returns the report (also written to report.json)."""
    args = apply_preset(args)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    torch.set_num_threads(args.threads)
    out, start = Path(args.out), time.perf_counter()
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k != "threads"}
    had_args = (out / "args.json").is_file()
    old = runio.read_json_cache(out / "args.json", "every stage is built again")  # damaged: None, removed
    if old is not None and old != settings:
        changed = ", ".join(k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k])
        raise runio.RunError(f"{out} was built with other arguments ({changed}): delete it or pass another --out")
    runio.write_json(settings, out / "args.json")
    report = runio.read_json_cache(out / "report.json", "every stage is built again")
    report = report if isinstance(report, dict) and not (had_args and old is None) else {}
    pipe_dir, sc_file = out / "pipeline", out / "shortcut" / "pytorch_lora_weights.safetensors"
    rebuild, clock = False, {}

    def todo(key: str, *files: Path) -> bool:
        """Whether stage `key` is built now: its files or numbers are missing, or an earlier stage was rebuilt."""
        nonlocal rebuild
        problem = minisd.damaged_stage(out, files) if not rebuild and key in report else None
        if problem:
            print(f"--- {key}: damaged ({problem}): building it again", file=sys.stderr)
        rebuild = rebuild or key not in report or not all(f.exists() for f in files) or problem is not None
        print(f"--- {key}: " + ("build" if rebuild else "reuse"))
        clock[key] = (time.perf_counter(), time.process_time())
        return rebuild

    def done(key: str, numbers: dict) -> None:
        report[key] = {**numbers, "seconds": round(time.perf_counter() - clock[key][0], 1),
                       "cpu_seconds": round(time.process_time() - clock[key][1], 1)}
        runio.write_json_cache(report, out / "report.json")

    train, heldout = minisd.load_digits_split(args.seed)
    report["data"] = dict(train=len(train[1]), heldout=len(heldout[1]), image_size=32, latent_size=4)
    minisd.forget_damaged_classifier(out, report)
    if todo("classifier", out / "classifier.safetensors", out / "classifier.json"):
        done("classifier", minisd.train_classifier(args, train, heldout, out))
    classifier = rewards.digit(digit_classifier=str(out / "classifier.safetensors")).models[0]

    if todo("vae", pipe_dir / "vae"):
        vae, numbers = minisd.train_vae(args, train, heldout)
        numbers.update(normalise_latents(args, vae, train))  # SD3's shift and scale replace train_vae's scale
        minisd.save_folder(vae.save_pretrained, pipe_dir / "vae")
        done("vae", numbers)
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae").eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=args.shift)
    grid = sampler_grid(args)
    points = lora_points(args, grid)

    if todo("transformer", pipe_dir / "model_index.json"):  # the pipeline folder is written whole
        pipe, numbers = train_transformer(args, vae, train, scheduler)
        minisd.save_folder(pipe.save_pretrained, pipe_dir)
        done("transformer", numbers)
    pipe = load_pipeline(pipe_dir)
    with torch.no_grad():
        c_digits, c_empty = (embed(pipe, p, args.t5_tokens) for p in ([minisd.prompt(d) for d in range(10)], [""]))

    if todo("guidance", out / "samples.png"):
        images, numbers = score_guidance(args, pipe, c_digits, c_empty, grid, classifier)
        minisd.save_png(images, out / "samples.png")
        done("guidance", numbers)
    w, side = report["guidance"]["chosen"], pipe.transformer.config.sample_size

    def teacher(n: int, seed: int):
        """n trajectories of the base's Euler + CFG sampler from x_T ~ N(0, I), the digits in turn: (states, c)."""
        labels = torch.arange(n) % 10
        x_T = torch.randn(n, 4, side, side, generator=torch.Generator().manual_seed(seed))
        cond = tuple(c[labels] for c in c_digits)
        return euler_trajectory(pipe.transformer, x_T, cond, c_empty, w, grid), cond

    if todo("shortcut", sc_file):
        numbers = distil_shortcut(args, pipe.transformer, *teacher(args.trajectories, args.seed + 8), grid, points)
        save_shortcut(pipe.transformer, sc_file.parent)
        done("shortcut", {**numbers, "lora_points": list(points), "teacher_guidance": w})
    if todo("trajectory_error"):  # a fresh transformer and the shortcut file
        pipe = load_pipeline(pipe_dir)
        shortcut.load_shortcut_lora(pipe.transformer, sc_file)  # as train_sd.py loads a shortcut
        shortcut.set_active_adapters(pipe.transformer, [])
        traj, cond = teacher(args.eval_trajectories, args.seed + 9)
        done("trajectory_error", dict(jumps=jump_errors(pipe.transformer, traj, cond, c_empty, w, grid, points),
                                      trajectories=args.eval_trajectories, of_displacement="‖x̂_p − x_p‖ / ‖x_p − x_a‖",
                                      of_norm="‖x̂_p − x_p‖ / ‖x_p‖"))

    report["build_seconds"] = round(sum(report[k]["seconds"] for k in clock), 1)
    report["build_cpu_seconds"] = round(sum(report[k]["cpu_seconds"] for k in clock), 1)
    report["last_call"] = dict(seconds=round(time.perf_counter() - start, 1), threads=args.threads)
    runio.write_json_cache(report, out / "report.json")
    print(f"classifier held-out accuracy {report['classifier']['heldout_accuracy']:.3f}; {args.num_steps}-step samples "
          f"recognised {report['guidance']['rate']:.3f} at w = {w}; jump error / teacher displacement, shortcut "
          "(base one Euler step with CFG): " + ", ".join(f"{k} {v['shortcut']['of_displacement']:.3f} "
          f"({v['base_cfg']['of_displacement']:.3f})" for k, v in report["trajectory_error"]["jumps"].items()))
    print(f"{report['last_call']['seconds']:.0f} s this call, {args.threads} thread(s); everything in {out}")
    return report


if __name__ == "__main__":
    runio.cli(main, Args, check_args)
