"""A miniature Stable Diffusion trained here on scikit-learn's handwritten digits, with its own shortcut.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604. ShortFT (Sec. 3) needs a base model, a trajectory-preserving few-step model
(the shortcut) and a reward. SD1.5 and Hyper-SD cannot be downloaded here, so this script trains all three with
SD's classes and in its file layout, on which `train_sd.py` runs unchanged. Stages (each reused when its files
and numbers exist; once one is rebuilt, every later one is):

    classifier  rewards.DigitClassifier (the `digit` reward) on 32×32 RGB digits, 20 % held out
    vae         AutoencoderKL 32×32×3 ↔ 4×4×4 (×8, as SD): ‖D(z) − x‖² + β KL; scaling_factor = 1/std(z)
    unet        UNet2DConditionModel, ε-prediction with SD1.5's scaled_linear schedule, prompt "a handwritten d"
                dropped to "" with probability p_uncond (CFG). Its CLIPTextModel (tiny.py's byte-level
                tokenizer) starts from random init and is trained along, then frozen
    guidance    the smallest CFG scale w whose 50-step DDIM samples the classifier recognises at target_rate
                (the sampler of samples.png)
    shortcut    LoRA distilled from the base's 50-step DDIM + CFG trajectories at the teacher's scale w_T
                (teacher_guidance: the scale bench_minisd.py trains and evaluates at, so that the shortcut imitates
                the chain it replaces), segment by segment: from a grid point t with p_j < t < p_{j−1} (LoRA points
                p = 761, 501, 261, 1) one conditional call without CFG, ddim_step(x_t, ε_φ(x_t, t, c), ᾱ_t,
                ᾱ_{p_j}), lands on the teacher's x_{p_j}
    trajectory_error  of the jumps 741→501, 481→261, 241→1 on fresh w_T trajectories, against the base's one-step
                DDIM jump with and without CFG

Output (runs/minisd/): pipeline/ (a StableDiffusionPipeline folder), shortcut/pytorch_lora_weights.safetensors,
classifier.safetensors + .json, samples.png (one row per digit), report.json (every number), args.json.
Notation: x_t scaled latents (B, 4, 4, 4); c text embeddings (B, 77, 32); w CFG scale; grid the 50-step
"leading" DDIM grid 981, 961, …, 1 (shortft.ddim_timesteps); ᾱ_t = schedule.alpha_bar(t); w_T the teacher's CFG
scale.

Run: python minisd.py        (python minisd.py --preset test: a reduced build in runs/minisd-test/)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import rewards
import runio
import sd
import shortcut
import shortft

torch.set_flush_denormal(True)  # small models produce denormal floats, which slow x86 CPUs 10-100x


SHORTCUT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                    "conv2", "time_emb_proj", "conv_in", "conv_out", "linear_1", "linear_2"]
"""attention, feed-forward, resnet and time-embedding layers of the UNet (peft matches name suffixes)"""


@dataclass
class Args:
    """Build the miniature Stable Diffusion on scikit-learn's digits (pipeline, shortcut LoRA, digit reward)."""

    out: str = ""
    """output folder (empty: runs/minisd, or runs/minisd-<preset>)"""
    preset: str = "full"
    """full | test (a reduced build, for the tests)"""
    seed: int = 0
    """seed of the split, the inits, the noise and the trajectories"""
    threads: int = 1
    """torch CPU threads"""
    classifier_steps: int = 300
    """Adam steps of the digit classifier (batch 128, augmented: ±2 px shift, ±10° rotation, ×0.9–1.1 scale)"""
    vae_channels: list = field(default_factory=lambda: [8, 8, 16, 32])
    """AutoencoderKL block widths (4 blocks: ×8 down-sampling, as SD)"""
    vae_steps: int = 250
    """Adam steps of the VAE (batch 64, augmented)"""
    vae_kl: float = 1e-3
    """β of the KL term (both terms summed per image)"""
    augment_copies: int = 4
    """copies of the training images behind the UNet's latents (the first as is, the others augmented)"""
    unet_channels: list = field(default_factory=lambda: [32, 64])
    """UNet block widths (a CrossAttnDownBlock2D / CrossAttnUpBlock2D each)"""
    unet_steps: int = 800
    """Adam steps of the UNet and text encoder"""
    unet_batch: int = 128
    """batch of UNet training"""
    p_uncond: float = 0.1
    """probability of the empty prompt in UNet training (for classifier-free guidance)"""
    guidance: list = field(default_factory=lambda: [2.0, 3.0, 4.0, 5.0])
    """candidate CFG scales w of the 50-step DDIM sampler"""
    target_rate: float = 0.9
    """keep the smallest w whose samples the classifier recognises at this rate (none: the best w)"""
    samples_per_digit: int = 10
    """samples per digit and w (one row of samples.png)"""
    lora_points: list = field(default_factory=lambda: [761, 501, 261, 1])
    """ShortFT's LoRA timesteps p_j: the ends of the shortcut's segments"""
    teacher_guidance: float = 2.0
    """CFG scale w_T of the teacher trajectories the shortcut is distilled from and measured on: the scale the chains
    it stands in for run at (bench_minisd.py trains and evaluates at it); 0: the scale the guidance stage chose"""
    shortcut_rank: int = 16
    """rank (= alpha) of the shortcut LoRA"""
    shortcut_targets: list = field(default_factory=lambda: list(SHORTCUT_TARGETS))
    """UNet modules the shortcut LoRA adapts"""
    trajectories: int = 1024
    """teacher trajectories (50-step DDIM + CFG from x_T ~ N(0, I), the digits in turn) to distil from"""
    shortcut_steps: int = 400
    """Adam steps of shortcut distillation"""
    shortcut_batch: int = 128
    """(trajectory, grid point) pairs per distillation step"""
    eval_trajectories: int = 200
    """held-out teacher trajectories (other x_T) for the trajectory error"""


PRESETS = {"test": dict(classifier_steps=60, vae_channels=[8, 8, 8, 8], vae_steps=20, augment_copies=1,
                        unet_channels=[16, 32], unet_steps=80, unet_batch=64, guidance=[3.0], samples_per_digit=2,
                        shortcut_rank=4, trajectories=40, shortcut_steps=80, shortcut_batch=64, eval_trajectories=20)}
"""--preset NAME replaces these defaults (fields given on the command line are kept)."""


def prompt(d: int) -> str:
    return f"a handwritten {d}"


# ----------------------------------------------------------------------------- data


def load_digits_split(seed: int, size: int = 32):
    """sklearn's digits as images (N, 3, size, size) in [0, 1] and labels (N,); returns (train, held-out)
    pairs, 20 % held out, stratified by digit."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    y = torch.tensor(d.target)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=d.target)
    return (x[tr].contiguous(), y[tr]), (x[te].contiguous(), y[te])


def augment(x: torch.Tensor, g: torch.Generator, shift: float = 2.0, degrees: float = 10.0) -> torch.Tensor:
    """A random affine map per image: shift ±`shift` px, rotation ±`degrees`, scale ×0.9–1.1, zero padded."""
    n, s = x.shape[0], x.shape[-1]
    u = lambda: torch.rand(n, generator=g) * 2 - 1  # noqa: E731  U(−1, 1)
    a, k = u() * degrees * torch.pi / 180, 1 + 0.1 * u()
    theta = torch.stack([torch.stack([a.cos() / k, -a.sin() / k, u() * 2 * shift / s], 1),
                         torch.stack([a.sin() / k, a.cos() / k, u() * 2 * shift / s], 1)], 1)  # (n, 2, 3)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def adam_steps(params, steps: int, lr: float, loss_fn, desc: str) -> list[float]:
    """`steps` Adam updates of loss_fn(step), linear warm-up then cosine decay, gradient norm clipped to 1;
    a non-finite loss or gradient skips its update, so it never reaches the weights. Returns the losses."""
    from tqdm import tqdm

    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / warm) * 0.5 * (1 + torch.cos(
        torch.tensor(torch.pi * i / steps)).item()))
    losses = []
    for i in tqdm(range(steps), desc=desc, mininterval=5, file=sys.stdout):
        loss = loss_fn(i)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
                opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def save_folder(write, path: Path) -> None:
    """write(temporary folder), then swap it in as `path` with a MANIFEST.json (runio.atomic_folder): a folder is
    either complete or absent, and a file damaged later is seen (`damaged_stage`)."""
    with runio.atomic_folder(path) as tmp:
        write(tmp)


def damaged_stage(out: Path, files) -> str | None:
    """Why one of a stage's saved `files` is damaged (one line), or None: each is checked against the MANIFEST.json of
    the nearest folder above it, inside `out`, that has one (folders written before manifests are not checked)."""
    for f in files:
        for folder in [f] + list(f.parents):
            if folder == out.parent or out not in [folder, *folder.parents]:
                break
            if (folder / "MANIFEST.json").is_file():
                problem = runio.folder_problem(folder)
                if problem is not None:
                    return f"{folder}: {problem}"
                break
    return None


# ----------------------------------------------------------------------------- stages


def train_classifier(args: Args, train, heldout, out: Path) -> dict:
    """Cross-entropy on augmented training images; writes classifier.safetensors + classifier.json."""
    (x, y), (x_te, y_te) = train, heldout
    g = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    model = rewards.DigitClassifier()

    def loss(i):
        idx = torch.randint(0, len(x), (128,), generator=g)
        return F.cross_entropy(model(augment(x[idx], g)), y[idx])

    adam_steps(model.parameters(), args.classifier_steps, 3e-3, loss, "classifier")
    with torch.no_grad():
        accuracy = (model.eval()(x_te).argmax(-1) == y_te).float().mean().item()
    rewards.save_digit_classifier(model, out / "classifier.safetensors")
    return dict(heldout_accuracy=accuracy, heldout=len(y_te))


def train_vae(args: Args, train, heldout):
    """AutoencoderKL on images in [−1, 1]: L = Σ‖D(z) − x‖² + β KL(q(z|x) ‖ N(0, I)), z ~ q(z|x), per image;
    then scaling_factor = 1/std of z over the training images (how SD's 0.18215 was set)."""
    from diffusers import AutoencoderKL

    (x, _), (x_te, _) = train, heldout
    g = torch.Generator().manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 2)
    n = len(args.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(args.vae_channels),
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=1, norm_num_groups=min(8, *args.vae_channels), sample_size=x.shape[-1])

    def loss(i):
        batch = augment(x[torch.randint(0, len(x), (64,), generator=g)], g) * 2 - 1
        post = vae.encode(batch).latent_dist
        return ((vae.decode(post.sample()).sample - batch).pow(2).flatten(1).sum(1) + args.vae_kl * post.kl()).mean()

    adam_steps(vae.parameters(), args.vae_steps, 4e-3, loss, "vae")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(b * 2 - 1).latent_dist.sample() for b in x.split(256)])
        vae.register_to_config(scaling_factor=1 / z.std().item())
        rec = torch.cat([vae.decode(vae.encode(b * 2 - 1).latent_dist.mode()).sample for b in x_te.split(256)])
    mse = (((rec + 1) / 2).clamp(0, 1) - x_te).pow(2).mean().item()
    return vae, dict(heldout_mse=mse, heldout_psnr_db=-10 * torch.log10(torch.tensor(mse)).item(),
                     scaling_factor=vae.config.scaling_factor)


def text_components(seed: int, width: int = 32):
    """tiny.py's byte-level CLIPTokenizer (77 tokens) and a random-init 2-layer CLIPTextModel of `width`."""
    import tempfile

    import tiny
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as d:
        tokenizer = tiny.tiny_tokenizer(d)
    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2,
                            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=width)
    return tokenizer, CLIPTextModel(config)


def embed(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Text embeddings c (B, 77, D): the last hidden states, as SD's pipeline feeds them to the UNet."""
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(args: Args, vae, train, schedule):
    """ε-prediction (DDPM):  L = E ‖ε − ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε, t, c)‖²,  t ~ U{0, …, 999},  z ~ q(z|x) of an
    augmented training image, c its prompt's embedding or, with probability p_uncond, the empty prompt's;
    the text encoder is trained along. Returns (unet, tokenizer, text_encoder, report)."""
    from diffusers import UNet2DConditionModel

    x, y = train
    g = torch.Generator().manual_seed(args.seed + 3)
    with torch.no_grad():  # posterior mean and std of the (augmented) training images, ×scaling_factor
        posts = [vae.encode(b * 2 - 1).latent_dist for k in range(args.augment_copies)
                 for b in (x if k == 0 else augment(x, g)).split(256)]
    mean, std = (torch.cat([getattr(p, a) for p in posts]) * vae.config.scaling_factor for a in ("mean", "std"))
    labels = y.repeat(args.augment_copies)
    tokenizer, text_encoder = text_components(args.seed + 4)
    torch.manual_seed(args.seed + 5)
    n = len(args.unet_channels)
    unet = UNet2DConditionModel(sample_size=mean.shape[-1], in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=tuple(args.unet_channels), cross_attention_dim=32, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
                                norm_num_groups=min(16, args.unet_channels[0]))
    ac = schedule.alphas_cumprod.float()

    def loss(i):
        c_all = embed(tokenizer, text_encoder, [prompt(d) for d in range(10)] + [""])  # (11, 77, 32)
        idx = torch.randint(0, len(mean), (args.unet_batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        t = torch.randint(0, schedule.num_train_timesteps, (len(idx),), generator=g)
        eps = torch.randn(z.shape, generator=g)
        c = c_all[torch.where(torch.rand(len(idx), generator=g) < args.p_uncond, 10, labels[idx])]
        return (unet(shortft.add_noise(z, eps, ac[t]), t, encoder_hidden_states=c).sample - eps).pow(2).mean()

    losses = adam_steps([*unet.parameters(), *text_encoder.parameters()], args.unet_steps, 1e-3, loss, "unet")
    for m in (unet, text_encoder):
        m.eval().requires_grad_(False)
    numbers = dict(final_loss=sum(losses[-50:]) / len(losses[-50:]), text_encoder="random init, trained with the UNet")
    return unet, tokenizer, text_encoder, numbers


def guided_eps(unet, x, t, cond, uncond, w: float) -> torch.Tensor:
    """ε̃ = ε_∅ + w (ε_c − ε_∅) from one UNet call on [x, x]; w ≤ 1: the conditional call only. x (B, 4, h, w)."""
    if w <= 1:
        return unet(x, t, encoder_hidden_states=cond).sample
    e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond])).sample.chunk(2)
    return shortft.classifier_free_guidance(e_u, e_c, w)


@torch.no_grad()
def ddim_trajectory(unet, x_T, cond, uncond, w, grid, schedule) -> torch.Tensor:
    """The base's DDIM + CFG chain x_{τ_N} → … → x_{τ_1} → x_0, every state: (N + 1, B, 4, h, w)."""
    states = [x_T]
    for t, s in zip(grid, [*grid[1:], shortft.CLEAN]):
        eps = guided_eps(unet, states[-1], t, cond, uncond, w)
        states.append(shortft.ddim_step(states[-1], eps, schedule.alpha_bar(t), schedule.alpha_bar(s)))
    return torch.stack(states)


def score_guidance(args: Args, unet, vae, c_digits, c_empty, grid, schedule, classifier):
    """Recognition rate (classifier argmax = the prompt's digit) of 50-step DDIM + CFG samples from the same
    x_T for every candidate w; returns (the chosen w's images (10, samples_per_digit, 3, H, W), report)."""
    labels = torch.arange(10).repeat_interleave(args.samples_per_digit)
    side = unet.config.sample_size
    x_T = torch.randn(len(labels), 4, side, side, generator=torch.Generator().manual_seed(args.seed + 6))
    rates, images = {}, {}
    for w in args.guidance:
        z = ddim_trajectory(unet, x_T, c_digits[labels], c_empty, w, grid, schedule)[-1]
        with torch.no_grad():
            images[w] = ((vae.decode(z / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
            hit = (classifier(images[w]).argmax(-1) == labels).float().view(10, -1)
        rates[w] = dict(rate=hit.mean().item(), per_digit=hit.mean(1).tolist())
    good = [w for w in args.guidance if rates[w]["rate"] >= args.target_rate]
    chosen = min(good) if good else max(args.guidance, key=lambda w: rates[w]["rate"])
    report = dict(chosen=chosen, rate=rates[chosen]["rate"], samples=len(labels), by_scale={str(w): r for w, r in rates.items()})
    return images[chosen].view(10, args.samples_per_digit, *images[chosen].shape[1:]), report


def segment_pairs(grid, points) -> list[tuple[int, int]]:
    """(index of t, index of p_j) on the grid for every grid point t with p_j < t < p_{j−1}."""
    at = {t: i for i, t in enumerate(grid)}
    return [(i, at[max(p for p in points if p < t)]) for i, t in enumerate(grid) if t not in points and t > min(points)]


def distil_shortcut(args: Args, unet, traj, cond, grid, schedule) -> dict:
    """Add the LoRA "shortcut" to `unet` and train it so that one conditional call jumps from the teacher's x_t
    to its x_{p_j}:  L = E ‖ddim_step(x_t, ε_φ(x_t, t, c), ᾱ_t, ᾱ_{p_j}) − x_{p_j}‖²  (shortcut.distillation_loss
    with weight power 0: latent space). traj (N + 1, B, 4, h, w) teacher states, cond (B, 77, D)."""
    from peft import LoraConfig

    g = torch.Generator().manual_seed(args.seed + 7)
    torch.manual_seed(args.seed + 7)
    unet.add_adapter(LoraConfig(r=args.shortcut_rank, lora_alpha=args.shortcut_rank,
                                target_modules=list(args.shortcut_targets)), adapter_name="shortcut")
    params = [p.requires_grad_(True) for n, p in unet.named_parameters() if ".shortcut." in n]
    pairs, times = torch.tensor(segment_pairs(grid, args.lora_points)), torch.tensor(grid)
    student = lambda x, t, s, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731  (s: no jump-end input)

    def loss(i):
        k = pairs[torch.randint(0, len(pairs), (args.shortcut_batch,), generator=g)]
        b = torch.randint(0, traj.shape[1], (args.shortcut_batch,), generator=g)
        batch = dict(x_t=traj[k[:, 0], b], t=times[k[:, 0]], s=times[k[:, 1]], c=cond[b], x_s=traj[k[:, 1], b])
        return shortcut.distillation_loss(batch, student, schedule, weight_power=0.0)[0]

    losses = adam_steps(params, args.shortcut_steps, 5e-3, loss, "shortcut")
    unet.requires_grad_(False)
    return dict(final_loss=sum(losses[-50:]) / len(losses[-50:]), parameters=sum(p.numel() for p in params))


def save_shortcut(unet, folder: Path) -> None:
    """The LoRA as folder/pytorch_lora_weights.safetensors (diffusers' save_lora_weights, keys
    unet.<module>.lora_A/B.weight), read by shortcut.load_shortcut_lora and pipe.load_lora_weights. The keys stay
    in peft's naming: convert_state_dict_to_diffusers renames only the attention projections (to lora.down/up),
    and diffusers' loader, which decides the format from the first key alone, then drops one of the two kinds."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(unet, adapter_name="shortcut")
    save_folder(lambda d: StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=layers), folder)


@torch.no_grad()
def jump_errors(unet, traj, cond, uncond, w, grid, schedule, points) -> dict:
    """For each ShortFT jump a → p (741→501, 481→261, 241→1) from the teacher's x_a: ‖x̂_p − x_p‖ against the
    teacher's x_p, relative to its displacement ‖x_p − x_a‖ and to ‖x_p‖ (means over trajectories), for the
    shortcut (adapter "shortcut", one conditional call) and the base's one-step DDIM jump with and without CFG."""
    at, out = {t: i for i, t in enumerate(grid)}, {}
    for p_prev, p in zip(points, points[1:]):
        a = grid[at[p_prev] + 1]
        x_a, x_p = traj[at[a]], traj[at[p]]

        def err(adapters, w_):
            shortcut.set_active_adapters(unet, adapters)
            x_hat = shortft.ddim_step(x_a, guided_eps(unet, x_a, a, cond, uncond, w_), schedule.alpha_bar(a),
                                      schedule.alpha_bar(p))
            d = (x_hat - x_p).flatten(1).norm(dim=1)
            return dict(of_displacement=(d / (x_p - x_a).flatten(1).norm(dim=1)).mean().item(),
                        of_norm=(d / x_p.flatten(1).norm(dim=1)).mean().item())

        out[f"{a}->{p}"] = dict(shortcut=err(["shortcut"], 0.0), base_cfg=err([], w), base_cond=err([], 0.0))
    shortcut.set_active_adapters(unet, [])
    return out


def shortcut_error(pipeline: str | Path, shortcut_file: str | Path, w: float, trajectories: int = 200, seed: int = 9,
                   points=(761, 501, 261, 1)) -> dict:
    """`jump_errors` of a shortcut LoRA file against `trajectories` fresh 50-step DDIM + CFG (scale w) trajectories of
    the base in `pipeline` (x_T from torch.Generator seed `seed`, prompts the digits in turn), the UNet and the LoRA
    loaded as train_sd.py loads them. The build's trajectory_error stage is this call (w_T, seed + 9)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline = Path(pipeline)
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval().requires_grad_(False)
    shortcut.load_shortcut_lora(unet, shortcut_file)
    shortcut.set_active_adapters(unet, [])
    tokenizer, text_encoder = CLIPTokenizer.from_pretrained(pipeline / "tokenizer"), CLIPTextModel.from_pretrained(
        pipeline / "text_encoder")
    schedule = sd.schedule_from_diffusers(DDIMScheduler.from_pretrained(pipeline / "scheduler").config)
    grid, labels, side = shortft.ddim_timesteps(50, spacing="leading"), torch.arange(trajectories) % 10, unet.config.sample_size
    with torch.no_grad():
        c_digits, c_empty = (embed(tokenizer, text_encoder, p) for p in ([prompt(d) for d in range(10)], [""]))
    x_T = torch.randn(trajectories, 4, side, side, generator=torch.Generator().manual_seed(seed))
    traj = ddim_trajectory(unet, x_T, c_digits[labels], c_empty, w, grid, schedule)
    return jump_errors(unet, traj, c_digits[labels], c_empty, w, grid, schedule, points)


def save_png(images: torch.Tensor, path: Path) -> None:
    """(rows, cols, 3, H, W) in [0, 1] → one PNG grid."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(row), dim=-1) for row in images], dim=-2)  # (3, rows·H, cols·W)
    tmp = path.with_name("tmp." + path.name)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def check_args(args: Args) -> None:
    """One line (`--flag VALUE: what to do`, a ValueError) per argument that cannot build, before anything runs."""
    apply_preset(args)  # an unknown --preset
    if args.out:
        runio.check_writable_dir("--out", args.out)
    runio.require_range("seed", args.seed, 0, 2**32 - 1)
    runio.require_range("threads", args.threads, 1, os.cpu_count() or 1, what="at most this machine's CPU cores")
    for flag, high in (("classifier_steps", 10**6), ("vae_steps", 10**6), ("augment_copies", 64), ("unet_steps", 10**6),
                       ("unet_batch", 4096), ("samples_per_digit", 1000), ("shortcut_rank", 1024),
                       ("trajectories", 10**5), ("shortcut_steps", 10**6), ("shortcut_batch", 4096),
                       ("eval_trajectories", 10**5)):
        runio.require_range(flag, getattr(args, flag), 1, high)
    for flag in ("vae_kl", "p_uncond", "target_rate"):
        runio.require_range(flag, getattr(args, flag), 0, 1)
    runio.require_range("teacher_guidance", args.teacher_guidance, 0, 100, what="0: the scale the guidance stage chose")
    runio.require(len(args.vae_channels) == 4 and all(isinstance(c, int) and 8 <= c <= 1024 and c % 8 == 0
                                                      for c in args.vae_channels), "vae_channels", args.vae_channels,
                  "give 4 block widths (32 px → 4 latents), each a multiple of 8 in [8, 1024]")
    runio.require(1 <= len(args.unet_channels) <= 3 and all(isinstance(c, int) and 16 <= c <= 1024 and c % 16 == 0
                                                            for c in args.unet_channels), "unet_channels",
                  args.unet_channels, "give 1 to 3 block widths (4×4 latents), each a multiple of 16 in [16, 1024]")
    runio.require(bool(args.guidance), "guidance", args.guidance, "give at least one CFG scale")
    for w in args.guidance:
        runio.require_range("guidance", w, 0, 100)
    runio.check_arg("lora_points", args.lora_points, shortft.check_lora_points, args.lora_points,
                    shortft.ddim_timesteps(50, spacing="leading"))
    runio.require(bool(args.shortcut_targets) and all(args.shortcut_targets), "shortcut_targets", args.shortcut_targets,
                  "name one or more UNet modules")


def apply_preset(args: Args) -> Args:
    if args.preset not in ("full", *PRESETS):
        raise ValueError(f"unknown preset {args.preset!r}: choose full or {', '.join(PRESETS)}")
    default = Args()
    changes = {k: v for k, v in PRESETS.get(args.preset, {}).items() if getattr(args, k) == getattr(default, k)}
    out = args.out or ("runs/minisd" if args.preset == "full" else f"runs/minisd-{args.preset}")
    return dataclasses.replace(args, out=out, **changes)


def main(args: Args) -> dict:
    """Build (or reuse) every stage in args.out; returns the report (also written to report.json)."""
    args = apply_preset(args)
    with runio.run_lock(Path(args.out) / ".lock", "build folder"):  # one writer per folder
        return build(args)


def forget_damaged_classifier(out: Path, report: dict) -> None:
    """A classifier in `out` that `rewards.load_digit_classifier` refuses is trained again: its report entry goes."""
    if (out / "classifier.safetensors").is_file() and (out / "classifier.json").is_file():
        try:
            rewards.load_digit_classifier(str(out / "classifier.safetensors"), str(out / "classifier.json"))
        except ValueError as e:
            print(f"{e}: training it again", file=sys.stderr)
            report.pop("classifier", None)


def build(args: Args) -> dict:
    """`main`'s work, in the locked folder args.out."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

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
    pipe, sc_file = out / "pipeline", out / "shortcut" / "pytorch_lora_weights.safetensors"
    rebuild, clock = False, {}

    def todo(key: str, *files: Path) -> bool:
        """Whether stage `key` is built now: its files or numbers are missing, or an earlier stage was rebuilt."""
        nonlocal rebuild
        problem = damaged_stage(out, files) if not rebuild and key in report else None
        if problem:
            print(f"--- {key}: damaged ({problem}): building it again", file=sys.stderr)
        rebuild = rebuild or key not in report or not all(f.exists() for f in files) or problem is not None
        print(f"--- {key}: " + ("build" if rebuild else "reuse"))
        clock[key] = time.perf_counter()
        return rebuild

    def done(key: str, numbers: dict) -> None:
        report[key] = {**numbers, "seconds": round(time.perf_counter() - clock[key], 1)}
        runio.write_json_cache(report, out / "report.json")

    train, heldout = load_digits_split(args.seed)
    report["data"] = dict(train=len(train[1]), heldout=len(heldout[1]), image_size=32, latent_size=4)
    forget_damaged_classifier(out, report)
    if todo("classifier", out / "classifier.safetensors", out / "classifier.json"):
        done("classifier", train_classifier(args, train, heldout, out))
    classifier = rewards.digit(digit_classifier=str(out / "classifier.safetensors")).models[0]

    if todo("vae", pipe / "vae"):
        vae, numbers = train_vae(args, train, heldout)
        save_folder(vae.save_pretrained, pipe / "vae")
        done("vae", numbers)
    vae = AutoencoderKL.from_pretrained(pipe / "vae").eval().requires_grad_(False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    schedule, grid = sd.schedule_from_diffusers(scheduler.config), shortft.ddim_timesteps(50, spacing="leading")

    if todo("unet", pipe / "model_index.json"):  # the pipeline folder is written whole, model_index.json included
        unet, tokenizer, text_encoder, numbers = train_unet(args, vae, train, schedule)
        save_folder(StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False).save_pretrained, pipe)
        done("unet", numbers)
    unet = UNet2DConditionModel.from_pretrained(pipe / "unet").eval().requires_grad_(False)
    tokenizer, text_encoder = CLIPTokenizer.from_pretrained(pipe / "tokenizer"), CLIPTextModel.from_pretrained(pipe / "text_encoder")
    with torch.no_grad():
        c_digits, c_empty = (embed(tokenizer, text_encoder, p) for p in ([prompt(d) for d in range(10)], [""]))

    if todo("guidance", out / "samples.png"):
        images, numbers = score_guidance(args, unet, vae, c_digits, c_empty, grid, schedule, classifier)
        save_png(images, out / "samples.png")
        done("guidance", numbers)
    w, side = report["guidance"]["chosen"], unet.config.sample_size
    w_T = args.teacher_guidance or w

    def teacher(n: int, seed: int):
        """n trajectories of the base's 50-step DDIM + CFG (w_T) from x_T ~ N(0, I), the digits in turn: (states, c)."""
        labels = torch.arange(n) % 10
        x_T = torch.randn(n, 4, side, side, generator=torch.Generator().manual_seed(seed))
        return ddim_trajectory(unet, x_T, c_digits[labels], c_empty, w_T, grid, schedule), c_digits[labels]

    if todo("shortcut", sc_file):
        numbers = distil_shortcut(args, unet, *teacher(args.trajectories, args.seed + 8), grid, schedule)
        save_shortcut(unet, sc_file.parent)
        done("shortcut", {**numbers, "teacher_guidance": w_T})
    if todo("trajectory_error"):  # a fresh UNet and the shortcut file, loaded as train_sd.py loads them
        errors = shortcut_error(pipe, sc_file, w_T, args.eval_trajectories, args.seed + 9, args.lora_points)
        done("trajectory_error", dict(jumps=errors, guidance=w_T, trajectories=args.eval_trajectories,
                                      of_displacement="‖x̂_p − x_p‖ / ‖x_p − x_a‖",
                                      of_norm="‖x̂_p − x_p‖ / ‖x_p‖"))

    report["build_seconds"] = round(sum(report[k]["seconds"] for k in clock), 1)
    report["last_call"] = dict(seconds=round(time.perf_counter() - start, 1), threads=args.threads)
    runio.write_json_cache(report, out / "report.json")
    print(f"classifier held-out accuracy {report['classifier']['heldout_accuracy']:.3f}; 50-step samples recognised "
          f"{report['guidance']['rate']:.3f} at w = {w}; shortcut distilled at w_T = {w_T}; jump error / teacher "
          f"displacement at w_T, shortcut (base one-step with CFG): "
          + ", ".join(f"{k} {v['shortcut']['of_displacement']:.3f} ({v['base_cfg']['of_displacement']:.3f})"
                      for k, v in report["trajectory_error"]["jumps"].items()))
    print(f"{report['last_call']['seconds']:.0f} s this call, {args.threads} thread(s); everything in {out}")
    return report


if __name__ == "__main__":
    runio.cli(main, Args, check_args)
