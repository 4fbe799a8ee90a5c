"""ShortFT on a 2D toy diffusion, end to end on CPU: where the repo measures the paper's claims.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3 (shortcut-based chain), Sec. 4 (comparison with reward
backpropagation baselines). The same `shortft.py` chain code runs Stable Diffusion in `train_sd.py`.

Pipeline (each stage cached under runs/cache/ by its config):
    data        ring of `modes` Gaussians; class c = a sector of `modes/classes` modes (the "prompt")
    base        MLP ε-model ε_θ(x_t, t, s, c) with CFG (null class); the base ignores s (zero `inp_s`)
    shortcut    LoRA "shortcut" on the base, distilled from the base's 50-step DDIM trajectories
                (per-jump weighted value matching; optional JVP term, see shortcut.py); jumps t → s in
                one evaluation
    fine-tune   LoRA "tuned" (same config for every method) by reward backpropagation, one method
                (--method) or all seven with the same budget (--compare, the default)
    measure     trajectory error of the shortcut, gradient cosine vs the complete chain, gradient
                norm vs chain length, reward vs wall-clock

Notation (code -> paper): x_T, x_0 start/end of the chain; grid τ_N > … > τ_1 (50-step DDIM, leading);
k index of ShortFT's trained step τ_k → τ_{k−1}; M (`jumps_after`) shortcut jumps to x_0;
w (`guidance_scale`) CFG scale; r(x_0, c) the reward.

Run: python train_toy.py            (everything: pretrain, distil, measure, compare; ≈3 min on 2 cores)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import rewards
import runio
import shortcut
import shortft
from shortft import CLEAN, Segment


@dataclass
class Args:
    """ShortFT on a 2D toy diffusion (pretrain, distil the shortcut, fine-tune, measure, compare)."""

    name: str = "toy"
    """run folder: runs/<name>/ (args.json, metrics.json, metrics.jsonl, figures, checkpoints)"""
    out: str = "runs"
    """root folder of run folders and of the cache of base/shortcut weights"""
    seed: int = 0
    """seed of everything (data, init, x_T draws, chain draws)"""
    threads: int = 1
    """torch CPU threads (1 is as fast for this small MLP and far more robust on a busy machine)"""
    # data
    radius: float = 2.0
    """ring radius R (the data scale that trajectory errors are relative to)"""
    modes: int = 8
    """Gaussians on the ring"""
    classes: int = 4
    """classes (sectors of modes/classes neighbouring modes); class `classes` is the null class of CFG"""
    mode_std: float = 0.1
    """standard deviation of each Gaussian"""
    # base model
    hidden: int = 64
    """width of the ε-MLP"""
    depth: int = 2
    """residual hidden layers of the ε-MLP"""
    pretrain_steps: int = 2000
    """Adam steps of base pretraining (ε-prediction loss)"""
    pretrain_batch: int = 512
    """batch of base pretraining"""
    p_uncond: float = 0.1
    """probability of dropping the class to the null class in pretraining (for CFG)"""
    guidance_scale: float = 2.0
    """CFG scale w of the base sampler, the shortcut's teacher and every fine-tuned chain"""
    num_steps: int = 50
    """N, steps of the DDIM grid (leading spacing, SD1.5's default: 981, 961, …, 1)"""
    # shortcut
    shortcut_rank: int = 32
    """LoRA rank of the shortcut"""
    distill_steps: int = 4000
    """Adam steps of shortcut distillation"""
    distill_pairs: int = 8192
    """(x_t, t, s) teacher targets computed once for distillation"""
    distill_batch: int = 512
    """batch of shortcut distillation"""
    jvp_weight: float = 0.0
    """λ_jvp: weight of the Jacobian-vector-product term (0 = value matching only; 1 = the ablation)"""
    distill_weight_power: float = 2.0
    """p of the per-jump loss weight (|b_{t→s}| + 0.1)^(−p): 0 = x-space, 2 = ε-space (shortcut.py)"""
    # fine-tuning
    method: str = "shortft"
    """method of a single run (with --no-compare): shortft, full, draft_k, draft_lv, alignprop, refl, drtune"""
    compare: bool = True
    """run every method with the same budget (the main job)"""
    reward: str = "region:1,quality:1"
    """reward spec (names: region, quality, class_agreement, class_shift, mode_shift). The default pulls
    every class towards a disc around the top mode AND keeps samples on the ring: the gain comes from
    moving each class's mass onto its mode nearest the disc, a choice the noisy early steps make (a
    last-step drag leaves the ring, which `quality` penalises), so last-step-only methods stall;
    'region' alone lets the last step drag points anywhere and every method looks alike (see README)"""
    lora_rank: int = 4
    """rank of the trainable LoRA (same config for every method)"""
    lr: float = 1e-3
    """Adam learning rate of the trainable LoRA"""
    lora_decay: float = 0.0
    """λ of a LoRA-norm regulariser shared by every method: loss += λ Σ_layers ‖B A · α/r‖_F² (the
    weight change the trainable LoRA makes; 0 = off)"""
    batch: int = 64
    """x_T samples per update"""
    max_grad_norm: float = 1.0
    """gradient clipping (NaN/inf gradients skip the update instead)"""
    budget: float = 10.0
    """training budget per method, in `budget_unit`"""
    budget_unit: str = "seconds"
    """'seconds' (wall-clock, evaluation excluded) or 'updates' (bit-reproducible)"""
    evals: int = 40
    """reward evaluations per method (evenly spaced over the budget, plus one before training); the
    time-to-target crossing is interpolated linearly between two evaluations"""
    eval_batch: int = 512
    """fixed (x_T, class) pairs of the reward evaluation (50-step no-grad DDIM)"""
    save_every: int = 0
    """save a checkpoint every this many updates (single-method runs; 0 = only at the end)"""
    resume: bool = False
    """continue a single-method run from its latest checkpoint"""
    # method switches
    jumps_after: int = 4
    """ShortFT: M, shortcut jumps from τ_{k−1} to x_0"""
    jumps_before: int = 2
    """ShortFT: shortcut jumps from x_T to τ_k (no gradient)"""
    trained_steps: int = 1
    """ShortFT: consecutive trained steps per chain"""
    lora_in_shortcut: bool = True
    """ShortFT: keep the trainable LoRA active inside every shortcut jump (--no-lora-in-shortcut: the
    LoRA acts on the trained step only; on the toy that reading over-pushes and diverges, see README)"""
    lora_ranges: list[int] = field(default_factory=list)
    """timestep-aware LoRA: boundaries splitting [0, 1000) into ranges, one trainable adapter each
    (e.g. 500 → two adapters); ShortFT then draws k stratified over the ranges"""
    draft_k: int = 1
    """DRaFT-K: K"""
    draft_lv_n: int = 2
    """DRaFT-LV: re-noised copies"""
    alignprop_k_min: int = 1
    """AlignProp: smallest truncation length"""
    alignprop_k_max: int = 10
    """AlignProp: largest truncation length"""
    refl_last: int = 10
    """ReFL: the graded step is drawn among the last this many steps"""
    drtune_k: int = 5
    """DRTune: trained steps per chain"""
    # measurements
    measure: bool = True
    """measure trajectory error, gradient cosine and gradient norm vs chain length"""
    grad_samples: int = 64
    """x_T samples per gradient measurement"""
    cosine_steps: list[int] = field(default_factory=lambda: [4, 14, 24, 34, 44, 49])
    """grid indices k (0 = noisiest) whose gradient cosine is measured"""
    cosine_rewards: list[str] = field(default_factory=lambda: ["region", "quality"])
    """further rewards whose gradient cosine is measured (metrics grad_cosine_by_reward): fidelity depends
    on how sharp the reward is compared with the shortcut's end-point error"""
    chain_lengths: list[int] = field(default_factory=lambda: [10, 20, 50, 100, 200])
    """chain lengths of the gradient-norm measurement"""


# ----------------------------------------------------------------------------- data


def sample_ring(n: int, radius: float = 2.0, modes: int = 8, classes: int = 4, std: float = 0.1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of the ring of Gaussians and their classes: x (n, 2), c (n,) long."""
    j = torch.randint(0, modes, (n,), generator=generator)
    x = rewards.mode_centers(radius, modes)[j] + std * torch.randn(n, 2, generator=generator)
    return x, j // (modes // classes)


# ----------------------------------------------------------------------------- model


def timestep_embedding(t: torch.Tensor, dim: int = 32, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (CLEAN = −1 allowed) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=1)


class EpsMLP(nn.Module):
    """ε_θ(x_t, t, s, c): residual MLP on [x_t, emb(t), emb(c)] plus `inp_s`·emb(s).

    The jump end s is an input so that the shortcut can be a LoRA on this very network. `inp_s` is a
    zero Linear that pretraining never updates, so the base ignores s exactly (it is an ordinary
    ε-model) and a shortcut LoRA at its zero init *is* the base's own DDIM step t → s; distillation
    then teaches the LoRA (on `inp_s` and every other Linear) to use s. Class `classes` is the null
    class of classifier-free guidance."""

    def __init__(self, hidden: int = 64, depth: int = 2, classes: int = 4, emb: int = 32):
        super().__init__()
        self.emb = emb
        self.class_emb = nn.Embedding(classes + 1, emb)
        self.inp = nn.Linear(2 + 2 * emb, hidden)
        self.inp_s = nn.Linear(emb, hidden, bias=False)
        nn.init.zeros_(self.inp_s.weight)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x, timestep_embedding(t, self.emb), self.class_emb(c)], 1)
        h = self.inp(z) + self.inp_s(timestep_embedding(s, self.emb))
        for layer in self.hidden:
            h = h + layer(F.silu(h))
        return self.out(F.silu(h))  # (B, 2)


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the Linear layers: the LoRA targets of both adapters."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def add_lora(model: nn.Module, name: str, rank: int, seed: int, targets: list[str]) -> None:
    """Inject LoRA adapter `name` (rank r, α = r) into `targets` with peft; A is drawn from `seed`."""
    from peft import LoraConfig, inject_adapter_in_model

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model, adapter_name=name)
    torch.set_rng_state(state)


def use_adapters(model: nn.Module, names: list[str], layers) -> None:
    """shortcut.set_active_adapters, skipped when exactly `names` are already active (cheap check)."""
    if layers and list(layers[0].active_adapters) == names and not layers[0].disable_adapters:
        return
    shortcut.set_active_adapters(model, names, layers)


# ----------------------------------------------------------------------------- the toy world


@dataclass
class Toy:
    """Everything a chain needs: model with its adapters, schedule, grid, CFG scale."""

    model: EpsMLP
    schedule: shortft.NoiseSchedule
    grid: list[int]
    guidance_scale: float
    classes: int
    tuned: list[str]  # trainable adapters, one per timestep range
    boundaries: list[int]
    layers: list = field(default_factory=list)

    def tuned_adapter(self, t: int) -> str:
        """The timestep-aware LoRA that owns timestep t."""
        return self.tuned[shortft.timestep_range_index(t, self.boundaries)] if self.boundaries else self.tuned[0]

    def tuned_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if any(f".{a}." in n for a in self.tuned)]


def guided_eps(model: nn.Module, x, t, s, c, w: float, null: int) -> torch.Tensor:
    """CFG with one batched forward:  ε̃ = ε_∅ + w (ε_c − ε_∅), per-sample (B,) t, s, c."""
    if w == 1.0:
        return model(x, t, s, c)
    e = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([torch.full_like(c, null), c]))
    e_null, e_cond = e.chunk(2)
    return shortft.classifier_free_guidance(e_null, e_cond, w)


def batched_eps(toy: Toy, adapters: list[str], guided: bool = True, use_s: bool = False):
    """eps_fn(x, t, s, c) with per-sample timesteps for `adapters` (shortcut.py's batched form).
    Ordinary ε-models are given s = t (the base ignores s; a tuned LoRA sees the same input in training
    and sampling); the shortcut sees the jump end (`use_s`)."""

    def eps_fn(x, t, s, c):
        use_adapters(toy.model, adapters, toy.layers)
        w = toy.guidance_scale if guided else 1.0
        return guided_eps(toy.model, x, t, s if use_s else t, c, w, toy.classes)

    return eps_fn


def make_denoisers(toy: Toy, cond: torch.Tensor) -> dict:
    """The denoisers dict that shortft chains look models up in, for class labels `cond` (B,):

    base            the frozen pretrained model (no adapter), with CFG
    tuned           base + the trainable LoRA owning timestep t (timestep-aware when several), with CFG
    shortcut        base + the frozen shortcut LoRA: one evaluation per jump t → s (guidance distilled)
    shortcut+tuned  the shortcut with the trainable LoRA also active (ShortFT's --lora-in-shortcut)

    Adapters are switched inside each callable, so checkpoint recompute sees the right ones."""
    b = cond.shape[0]

    def vec(t):
        return torch.full((b,), CLEAN if t is None else int(t), dtype=torch.long)

    def base(x, t, s=None):
        return batched_eps(toy, [])(x, vec(t), vec(t), cond)

    def tuned(x, t, s=None):
        return batched_eps(toy, [toy.tuned_adapter(t)])(x, vec(t), vec(t), cond)

    def short(x, t, s):
        return batched_eps(toy, ["shortcut"], guided=False, use_s=True)(x, vec(t), vec(s), cond)

    def short_tuned(x, t, s):
        return batched_eps(toy, ["shortcut", toy.tuned_adapter(t)], guided=False, use_s=True)(x, vec(t), vec(s), cond)

    return {"base": base, "tuned": tuned, "shortcut": short, "shortcut+tuned": short_tuned}


def shortcut_segments(t: int, s: int, jumps: int, model: str = "shortcut", grad: bool = False) -> list[Segment]:
    """M shortcut jumps t → s evenly spaced in timestep (shortft.jump_timesteps)."""
    pts = shortft.jump_timesteps(t, s, jumps)
    return [Segment(model, a, b, grad=grad) for a, b in zip(pts, pts[1:])]


@torch.no_grad()
def sample(toy: Toy, x_T: torch.Tensor, cond: torch.Tensor, model: str = "tuned", jumps: int | None = None) -> torch.Tensor:
    """x_0 from x_T: the ordinary no-grad N-step DDIM sampler of `model`, or `jumps` shortcut jumps."""
    den = make_denoisers(toy, cond)
    if jumps is None:
        return shortft.run_chain(x_T, shortft.sampling_chain(toy.grid, model).trunk, den, toy.schedule)
    return shortft.run_chain(x_T, shortcut_segments(toy.grid[0], CLEAN, jumps), den, toy.schedule)


# ----------------------------------------------------------------------------- pretraining and distillation (cached)


def config_key(args: Args, fields: list[str]) -> str:
    """Short hash of the arguments a cached stage depends on."""
    blob = json.dumps({"version": CACHE_VERSION, **{f: getattr(args, f) for f in fields}}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


CACHE_VERSION = 2  # bump when the model or a cached stage changes
BASE_FIELDS = ["seed", "radius", "modes", "classes", "mode_std", "hidden", "depth", "pretrain_steps",
               "pretrain_batch", "p_uncond"]
SHORTCUT_FIELDS = BASE_FIELDS + ["guidance_scale", "num_steps", "shortcut_rank", "distill_steps",
                                 "distill_pairs", "distill_batch", "jvp_weight", "distill_weight_power"]


def pretrain_base(args: Args, schedule: shortft.NoiseSchedule, progress: bool = True) -> tuple[EpsMLP, list[float]]:
    """Train ε_θ with  L = E ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, ·, c)‖²  (DDPM), classes dropped to the
    null class with probability p_uncond; `inp_s` stays zero (the base ignores s). Returns (model, losses)."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = EpsMLP(args.hidden, args.depth, args.classes)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("inp_s.")], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.pretrain_steps)
    ac = schedule.alphas_cumprod.float()
    losses = []
    for _ in tqdm(range(args.pretrain_steps), desc="pretrain base", disable=not progress, mininterval=1):
        x0, c = sample_ring(args.pretrain_batch, args.radius, args.modes, args.classes, args.mode_std, g)
        c = torch.where(torch.rand(len(c), generator=g) < args.p_uncond, torch.full_like(c, args.classes), c)
        t = torch.randint(0, schedule.num_train_timesteps, (len(c),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = (model(shortft.add_noise(x0, eps, ac[t]), t, t, c) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.requires_grad_(False), losses


def distill_shortcut(args: Args, toy: Toy, progress: bool = True) -> list[dict]:
    """Distil the "shortcut" LoRA from the base's DDIM trajectories (shortcut.py, toy section).

    Inputs x_t: half on the base's own guided trajectories from x_T ~ N(0, I) (the states a chain
    meets), half noised data (states off the trajectory, e.g. after fine-tuning). Targets: the teacher
    map Φ_{t→s} (DDIM along the grid) and its JVP along a random direction. Returns the loss history."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.distill_pairs
    teacher = batched_eps(toy, [])
    t, s = shortcut.sample_jump_pairs(n, toy.grid[0], g)
    c = torch.randint(0, args.classes, (n,), generator=g)
    with torch.no_grad():  # on-trajectory x_t: teacher from x_T down to t
        x_t = shortcut.teacher_map(torch.randn(n, 2, generator=g), torch.full_like(t, toy.grid[0]), t, c,
                                   teacher, toy.schedule, toy.grid)
    x0, c0 = sample_ring(n, args.radius, args.modes, args.classes, args.mode_std, g)
    noisy = shortft.add_noise(x0, torch.randn(n, 2, generator=g), shortcut.alpha_bar_at(toy.schedule, t))
    half = torch.arange(n) % 2 == 1
    x_t, c = torch.where(half[:, None], noisy, x_t), torch.where(half, c0, c)
    use_adapters(toy.model, [], toy.layers)  # switch outside the forward-mode transforms (peft sets requires_grad)
    data = shortcut.make_distillation_set(x_t, t, s, c, teacher, toy.schedule, toy.grid, g)

    params = [p for n_, p in toy.model.named_parameters() if ".shortcut." in n_]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.distill_steps)
    student = batched_eps(toy, ["shortcut"], guided=False, use_s=True)
    use_adapters(toy.model, ["shortcut"], toy.layers)
    history = []
    for step in tqdm(range(args.distill_steps), desc="distil shortcut", disable=not progress, mininterval=1):
        idx = torch.randint(0, n, (args.distill_batch,), generator=g)
        loss, value, jvp = shortcut.distillation_loss({k: v[idx] for k, v in data.items()}, student, toy.schedule,
                                                      args.jvp_weight, weight_power=args.distill_weight_power)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append({"loss/distill": loss.item(), "loss/value": value.item(), "loss/jvp": jvp.item()})
    for p in params:
        p.requires_grad_(False)
    return history


def build_toy(args: Args, progress: bool = True) -> tuple[Toy, dict]:
    """Base (pretrained or loaded from runs/cache), shortcut LoRA (distilled or loaded), trainable
    LoRA(s). Returns (toy, info with cache paths, timings and loss histories)."""
    schedule = shortft.make_schedule()
    grid = shortft.ddim_timesteps(args.num_steps, spacing="leading")
    cache = Path(args.out) / "cache"
    info: dict = {}

    base_path = cache / f"base_{config_key(args, BASE_FIELDS)}.safetensors"
    t0 = time.perf_counter()
    if base_path.is_file():
        model = EpsMLP(args.hidden, args.depth, args.classes)
        model.load_state_dict(runio.load_tensors(base_path))
        model.requires_grad_(False)
    else:
        model, losses = pretrain_base(args, schedule, progress)
        runio.save_tensors(model.state_dict(), base_path)
        info["pretrain_loss"] = losses
    info["base"] = {"path": str(base_path), "seconds": time.perf_counter() - t0}

    targets = linear_names(model)
    tuned = [f"tuned{i}" for i in range(len(args.lora_ranges) + 1)] if args.lora_ranges else ["tuned"]
    add_lora(model, "shortcut", args.shortcut_rank, args.seed + 2, targets)
    for i, name in enumerate(tuned):
        add_lora(model, name, args.lora_rank, args.seed + 3 + i, targets)
    model.requires_grad_(False)
    toy = Toy(model, schedule, grid, args.guidance_scale, args.classes, tuned, sorted((int(b) for b in args.lora_ranges), reverse=True),
              shortcut.lora_layers(model))

    sc_path = cache / f"shortcut_{config_key(args, SHORTCUT_FIELDS)}.safetensors"
    t0 = time.perf_counter()
    if sc_path.is_file():
        shortcut.load_adapter(model, "shortcut", sc_path)
    else:
        info["distill_loss"] = distill_shortcut(args, toy, progress)
        shortcut.save_adapter(model, "shortcut", sc_path, {"jvp_weight": str(args.jvp_weight)})
    info["shortcut"] = {"path": str(sc_path), "seconds": time.perf_counter() - t0}
    for p in toy.tuned_params():
        p.requires_grad_(True)
    return toy, info


# ----------------------------------------------------------------------------- measurements


def trajectory_error(toy: Toy, x_T: torch.Tensor, cond: torch.Tensor, radius: float,
                     jumps: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """‖x_0^shortcut(M jumps) − x_0^DDIM-N‖ / R from the same x_T (mean and 95th percentile), and the
    same for the base's own M-step DDIM (what the shortcut improves on)."""
    ref = sample(toy, x_T, cond, "base")
    out = {}
    for m in jumps:
        err = (sample(toy, x_T, cond, jumps=m) - ref).norm(dim=1) / radius
        with torch.no_grad():
            few = shortft.run_chain(x_T, shortft.sampling_chain(shortft.ddim_timesteps(m), "base").trunk,
                                    make_denoisers(toy, cond), toy.schedule)
        ddim_err = (few - ref).norm(dim=1) / radius
        out[str(m)] = {"mean": err.mean().item(), "p95": err.quantile(0.95).item(),
                       "ddim_mean": ddim_err.mean().item()}
    return out


def step_gradient(toy: Toy, x_k: torch.Tensor, cond: torch.Tensor, segments: list[Segment], reward_fn,
                  wrt: str = "lora") -> torch.Tensor:
    """The reward gradient that the segments starting at x_{τ_k} send into the trained step (the first
    segment, model "tuned"): w.r.t. the trainable LoRA ("lora", flattened) or w.r.t. x_{τ_{k−1}} ("x")."""
    den = make_denoisers(toy, cond)
    params = toy.tuned_params()
    first = shortft.apply_segment(x_k, segments[0], den, toy.schedule)
    hook = first.detach().requires_grad_(True) if wrt == "x" else first
    x0 = shortft.run_chain(hook, segments[1:], den, toy.schedule)
    r = reward_fn(x0, cond)
    if wrt == "x":
        return torch.autograd.grad(r.sum(), hook)[0]
    grads = torch.autograd.grad(r.mean(), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def continuation(method: str, toy: Toy, k: int, args: Args) -> list[Segment] | None:
    """The segments from x_{τ_k} to x_0 that `method` uses when grid step k is its trained step, built
    from the method's own chain; the untrained steps run the frozen base. None where the method sends
    no gradient into step k (DRaFT-K beyond its K steps, ReFL outside its last steps)."""
    n = len(toy.grid)

    def base(seg):
        return dataclasses.replace(seg, model="base")

    if method == "full":
        segs = shortft.full(toy.grid, checkpoint=False).trunk[k:]
        return segs[:1] + [base(s) for s in segs[1:]]
    if method == "shortft":
        chain = shortft.shortft(toy.grid, k=k, jumps_after=args.jumps_after, checkpoint=False)
        return [s for s in chain.trunk if s.grad]
    if method == "draft_k":
        if k < n - args.draft_k:
            return None
        segs = shortft.draft_k(toy.grid, args.draft_k, checkpoint=False).trunk[k:]
        return segs[:1] + [base(s) for s in segs[1:]]
    if method == "refl":
        if k < n - args.refl_last:
            return None
        return [Segment("tuned", toy.grid[k], shortft.X0)]
    if method == "drtune":
        segs = [dataclasses.replace(s, checkpoint=False) for s in shortft.drtune(toy.grid, k=n, rng=random.Random(0)).trunk[k:]]
        return segs[:1] + [dataclasses.replace(base(s), detach_eps=True) for s in segs[1:]]
    raise ValueError(f"no gradient-cosine continuation for {method!r}")


def gradient_cosines(toy: Toy, args: Args, reward_fn, methods=("shortft", "drtune", "refl", "draft_k")) -> dict:
    """cos(∇ of method, ∇ of the complete chain) for the gradient sent into step k (one trained step),
    per method and timestep τ_k, w.r.t. the trainable LoRA ("lora") and w.r.t. x_{τ_{k−1}} ("x", mean
    per-sample cosine). x_{τ_k} is reached exactly by the base's own DDIM chain (no shortcut error),
    for `grad_samples` x_T draws."""
    g = torch.Generator().manual_seed(args.seed + 5)
    x_T = torch.randn(args.grad_samples, 2, generator=g)
    cond = torch.randint(0, args.classes, (args.grad_samples,), generator=g)
    den = make_denoisers(toy, cond)
    out: dict = {m: {} for m in methods}
    out["timesteps"] = []
    for k in args.cosine_steps:
        if not 0 <= k < len(toy.grid):
            raise ValueError(f"cosine step {k} is outside the {len(toy.grid)}-step grid")
        t = toy.grid[k]
        out["timesteps"].append(t)
        with torch.no_grad():
            x_k = shortft.run_chain(x_T, shortft.sampling_chain(toy.grid, "base").trunk[:k], den, toy.schedule)
        ref = {w: step_gradient(toy, x_k, cond, continuation("full", toy, k, args), reward_fn, w) for w in ("lora", "x")}
        for m in methods:
            segs = continuation(m, toy, k, args)
            if segs is None:
                out[m][str(t)] = None
                continue
            lora = step_gradient(toy, x_k, cond, segs, reward_fn, "lora")
            cos_x = None
            if segs[0].s is not shortft.X0:  # ReFL's step returns x̂_0: there is no x_{τ_{k−1}} to compare
                gx = step_gradient(toy, x_k, cond, segs, reward_fn, "x")
                cos_x = shortft.cosine(gx, ref["x"])
            out[m][str(t)] = {"lora": shortft.cosine(lora, ref["lora"]), "x": cos_x}
    return out


def gradient_norms(toy: Toy, args: Args, reward_fn) -> dict:
    """‖∇_LoRA L‖ of complete-chain backprop for chains of 10 … 200 DDIM steps, next to ShortFT's
    (one trained step, M jumps; mean over every k of that grid), same x_T batch."""
    g = torch.Generator().manual_seed(args.seed + 6)
    x_T = torch.randn(args.grad_samples, 2, generator=g)
    cond = torch.randint(0, args.classes, (args.grad_samples,), generator=g)
    den = make_denoisers(toy, cond)
    params = toy.tuned_params()
    out = {"chain_length": [], "full": [], "shortft": []}

    def norm(chain):
        loss, _ = shortft.reward_loss(x_T, chain, den, toy.schedule, lambda x: reward_fn(x, cond))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([gr.flatten() for gr in grads if gr is not None]).norm().item()

    for n in args.chain_lengths:
        grid = shortft.ddim_timesteps(n)
        out["chain_length"].append(n)
        out["full"].append(norm(shortft.full(grid, checkpoint=False)))
        ks = sorted(set(range(0, n, max(1, n // 10))))
        out["shortft"].append(sum(norm(shortft.shortft(grid, k=k, jumps_after=min(args.jumps_after, n), checkpoint=False))
                                  for k in ks) / len(ks))
    return out


# ----------------------------------------------------------------------------- fine-tuning helpers


def method_switches(method: str, args: Args, toy: Toy, update: int) -> dict:
    """The switches `shortft.make_chain` gets for `method` (everything set from Args)."""
    if method == "shortft":
        return dict(jumps_before=args.jumps_before, jumps_after=args.jumps_after, trained_steps=args.trained_steps,
                    lora_in_shortcut=args.lora_in_shortcut, boundaries=toy.boundaries, update=update,
                    sampling="stratified" if toy.boundaries else "uniform")
    return {"full": {}, "draft_k": dict(k=args.draft_k), "draft_lv": dict(n=args.draft_lv_n),
            "alignprop": dict(k_min=args.alignprop_k_min, k_max=args.alignprop_k_max),
            "refl": dict(last=args.refl_last), "drtune": dict(k=args.drtune_k)}[method]


def check_args(args: Args) -> None:
    """Fail early, in one line, on arguments that cannot work."""
    if args.method not in shortft.METHODS:
        raise ValueError(f"unknown method {args.method!r}: choose one of {', '.join(shortft.METHODS)}")
    for name, _ in rewards.parse_reward_spec(args.reward):
        if name not in rewards.REWARDS:
            raise ValueError(f"unknown reward {name!r}: choose from {', '.join(sorted(rewards.REWARDS))}")
    if not 1 <= args.jumps_after < args.num_steps:
        raise ValueError(f"--jumps-after M={args.jumps_after} must be in [1, {args.num_steps - 1}] "
                         f"(fewer shortcut jumps than the {args.num_steps}-step chain)")
    if not 1 <= args.jumps_before < args.num_steps:
        raise ValueError(f"--jumps-before={args.jumps_before} must be in [1, {args.num_steps - 1}]")
    if args.budget_unit not in ("seconds", "updates"):
        raise ValueError(f"--budget-unit must be 'seconds' or 'updates', got {args.budget_unit!r}")
    if args.resume and args.compare:
        raise ValueError("--resume continues a single-method run: add --no-compare --method NAME")
    if args.modes % args.classes:
        raise ValueError(f"--modes ({args.modes}) must be a multiple of --classes ({args.classes})")


def lora_delta_norm2(toy: Toy) -> torch.Tensor:
    """Σ over LoRA layers and trainable adapters of ‖ΔW‖_F², ΔW = B A · α/r (the regulariser's norm)."""
    total = torch.zeros(())
    for layer in toy.layers:
        for a in toy.tuned:
            if a in layer.lora_A:
                total = total + (layer.lora_B[a].weight @ layer.lora_A[a].weight * layer.scaling[a]).pow(2).sum()
    return total


def reset_tuned(toy: Toy, init: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every method starts from the same trainable-LoRA initialisation."""
    for name, tensors in init.items():
        shortcut.load_adapter_state_dict(toy.model, name, tensors)


def tuned_weights(toy: Toy) -> dict[str, torch.Tensor]:
    return {k: v for a in toy.tuned for k, v in shortcut.adapter_state_dict(toy.model, a).items()}


@torch.no_grad()
def evaluate(toy: Toy, x_T, cond, reward_fn) -> tuple[float, torch.Tensor]:
    """Mean reward of the ordinary 50-step no-grad DDIM sampler with the trainable LoRA, fixed batch."""
    x0 = sample(toy, x_T, cond, "tuned")
    r = reward_fn(x0, cond)
    return r[torch.isfinite(r)].mean().item(), x0


def finetune(toy: Toy, method: str, args: Args, reward_fn, eval_set, run_dir: Path | None = None,
             progress: bool = True) -> dict:
    """Fine-tune the trainable LoRA with `method` for `args.budget` (seconds of update time, or updates):
    the reward-backpropagation loop, in three sections (sample / reward / update). Logs reward/mean at
    `args.evals` evenly spaced points (evaluation time excluded); saves/resumes checkpoints in run_dir.
    Returns the loop state: update, seconds, skipped, curve."""
    from tqdm import tqdm

    params = toy.tuned_params()
    opt = torch.optim.Adam(params, lr=args.lr)
    chain_rng = random.Random(args.seed + 10)
    torch.manual_seed(args.seed + 10)
    state = {"update": 0, "seconds": 0.0, "skipped": 0, "curve": []}
    ckpt = runio.latest_checkpoint(run_dir) if (run_dir and args.resume) else None
    if ckpt is not None:
        weights, state = runio.load_checkpoint(ckpt, opt)
        with torch.no_grad():
            for k, p in toy.model.named_parameters():
                if k in weights:
                    p.copy_(weights[k])
        chain_rng.setstate(_tuplify(state.pop("chain_rng")))
        print(f"resumed {method} from {ckpt} at update {state['update']}")
    x_eval, c_eval = eval_set

    def log_eval():
        r, _ = evaluate(toy, x_eval, c_eval, reward_fn)
        state["curve"].append({"update": state["update"], "seconds": state["seconds"], "reward/mean": r})
        return r

    def spent():
        return state["seconds"] if args.budget_unit == "seconds" else state["update"]

    if not state["curve"]:
        log_eval()
    next_eval = args.budget * (len(state["curve"])) / args.evals
    bar = tqdm(total=args.budget, desc=f"{method:>9}", disable=not progress, mininterval=1,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} " + args.budget_unit[:3] + " {postfix}")
    bar.update(spent())
    while spent() < args.budget:
        t0 = time.perf_counter()
        # --- sample ---: x_T and classes (the "prompts"), and this update's chain
        x_T = torch.randn(args.batch, 2)
        cond = torch.randint(0, args.classes, (args.batch,))
        chain = shortft.make_chain(method, toy.grid, chain_rng, **method_switches(method, args, toy, state["update"]))
        den = make_denoisers(toy, cond)
        # --- reward ---: L = −mean r(x_0, c) through the chain
        loss, r = shortft.reward_loss(x_T, chain, den, toy.schedule, lambda x0: reward_fn(x0, cond))
        if args.lora_decay:
            loss = loss + args.lora_decay * lora_delta_norm2(toy)
        # --- update ---: NaN/inf gradients are dropped (counted), never applied
        loss.backward()
        applied, gnorm = shortft.guarded_step(opt, params, args.max_grad_norm)
        state["skipped"] += not applied
        state["update"] += 1
        dt = time.perf_counter() - t0
        state["seconds"] += dt
        bar.update(min(dt if args.budget_unit == "seconds" else 1, args.budget - bar.n))
        if run_dir is not None:
            runio.append_jsonl({"method": method, "update": state["update"], "loss/reward": loss.item(),
                                "reward/train": r.mean().item(), "grad/norm": gnorm, "update/applied": applied,
                                "time/seconds": state["seconds"]}, run_dir / "metrics.jsonl")
        if spent() >= next_eval or spent() >= args.budget:
            bar.set_postfix_str(f"reward {log_eval():.3f}")
            next_eval = args.budget * len(state["curve"]) / args.evals
        if run_dir is not None and args.save_every and state["update"] % args.save_every == 0:
            save_run_checkpoint(run_dir, toy, opt, state, chain_rng)
    bar.close()
    if run_dir is not None:
        save_run_checkpoint(run_dir, toy, opt, state, chain_rng)
    return state


def save_run_checkpoint(run_dir: Path, toy: Toy, opt, state: dict, chain_rng: random.Random) -> Path:
    """Checkpoint: trainable LoRA + optimizer + RNGs + loop state (runio, atomic safetensors)."""
    return runio.save_checkpoint(run_dir, state["update"], tuned_weights(toy), opt,
                                 {**state, "chain_rng": list(_listify(chain_rng.getstate()))})


def _listify(o):
    return [_listify(x) for x in o] if isinstance(o, (tuple, list)) else o


def _tuplify(o):
    return tuple(_tuplify(x) for x in o) if isinstance(o, list) else o


def seconds_to(curve: list[dict], target: float, interpolate: bool = False) -> float | None:
    """Training seconds of the first evaluation whose reward is ≥ target (None if never); with
    `interpolate`, the crossing on the straight line between that evaluation and the one before it."""
    for i, p in enumerate(curve):
        if p["reward/mean"] >= target:
            if not interpolate or i == 0:
                return p["seconds"]
            q = curve[i - 1]
            frac = (target - q["reward/mean"]) / (p["reward/mean"] - q["reward/mean"])
            return q["seconds"] + frac * (p["seconds"] - q["seconds"])
    return None


def summarise(methods: dict, fraction: float = 0.99) -> dict:
    """Derived numbers per method: seconds per update, reward gained per second, and seconds to reach
    the target = reward_before + `fraction` × (complete chain's final gain), i.e. full's final reward
    up to 1% of its gain (evaluations are discrete, and a saturated reward is never exceeded).
    seconds_to_target is the crossing interpolated linearly between the two evaluations around it;
    seconds_to_target_eval is the first evaluation at or above the target (coarser, never earlier)."""
    out = {}
    for name, st in methods.items():
        curve = st["curve"]
        before, after = curve[0]["reward/mean"], curve[-1]["reward/mean"]
        out[name] = {"reward_before": before, "reward_after": after, "seconds": st["seconds"],
                     "updates": st["update"], "skipped": st["skipped"],
                     "seconds_per_update": st["seconds"] / max(st["update"], 1),
                     "reward_gain_per_second": (after - before) / max(st["seconds"], 1e-9), "curve": curve}
    if "full" in out:
        full = out["full"]
        target = full["reward_before"] + fraction * (full["reward_after"] - full["reward_before"])
        for name, v in out.items():
            v["target_reward"] = target
            v["seconds_to_target"] = seconds_to(v["curve"], target, interpolate=True)
            v["seconds_to_target_eval"] = seconds_to(v["curve"], target)
        for name, v in out.items():  # seconds to the target as a fraction of the complete chain's budget
            hit = v["seconds_to_target"]
            v["fraction_of_full_seconds"] = None if hit is None else hit / max(full["seconds"], 1e-9)
    return out


# ----------------------------------------------------------------------------- figures


def plot_all(run_dir: Path, metrics: dict, scatters: dict, traj: dict | None, radius: float) -> list[str]:
    """Write the PNG figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def done(fig, name):
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)

    if metrics.get("methods"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, m in metrics["methods"].items():
            ax.plot([p["seconds"] for p in m["curve"]], [p["reward/mean"] for p in m["curve"]], "o-", ms=3, label=name,
                    lw=2.5 if name == "shortft" else 1.2)
        ax.set(xlabel="training wall-clock (s, evaluation excluded)", ylabel="reward (50-step DDIM, eval batch)",
               title="reward vs wall-clock")
        ax.legend(fontsize=8)
        done(fig, "reward_vs_seconds.png")

        names = list(scatters)
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            before, after = scatters[name]
            ax.scatter(*before.T, s=2, alpha=0.3, c="gray", label="before")
            ax.scatter(*after.T, s=2, alpha=0.5, c="C3", label="after")
            ax.set(title=name, xlim=(-1.6 * radius, 1.6 * radius), ylim=(-1.6 * radius, 1.6 * radius), aspect="equal")
            ax.set_xticks([]), ax.set_yticks([])
        axes[0][0].legend(fontsize=7, markerscale=4)
        done(fig, "samples_before_after.png")

    if traj is not None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        chain = traj["chain"]  # (steps+1, n, 2)
        for i in range(chain.shape[1]):
            ax.plot(chain[:, i, 0], chain[:, i, 1], "-", c="gray", lw=0.8, alpha=0.7)
        for m, pts in traj["jumps"].items():
            for i in range(pts.shape[1]):
                ax.plot(pts[:, i, 0], pts[:, i, 1], "o--", ms=3, lw=0.8, c=f"C{[1, 2, 4, 8].index(m) if m in (1, 2, 4, 8) else 5}",
                        label=f"shortcut, M={m}" if i == 0 else None)
        ax.set(title="50-step DDIM (gray) vs shortcut jumps", aspect="equal")
        ax.legend(fontsize=7)
        done(fig, "trajectories.png")

    if "grad_norm" in metrics:
        gn = metrics["grad_norm"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(gn["chain_length"], gn["full"], "o-", label="complete chain")
        ax.plot(gn["chain_length"], gn["shortft"], "s-", label="ShortFT (one step + M jumps)")
        ax.set(xscale="log", yscale="log", xlabel="DDIM steps in the chain", ylabel="‖∇_LoRA L‖", title="gradient norm vs chain length")
        ax.legend(fontsize=8)
        done(fig, "grad_norm_vs_chain_length.png")

    if "grad_cosine" in metrics:
        gc = metrics["grad_cosine"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in [k for k in gc if k != "timesteps"]:
            pts = [(int(t), v["lora"]) for t, v in gc[m].items() if v is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=m)
        ax.axhline(0.9, c="gray", ls=":", lw=1)
        ax.set(xlabel="timestep τ_k of the trained step", ylabel="cos(∇, complete-chain ∇)", title="gradient fidelity",
               ylim=(-0.1, 1.05))
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        done(fig, "grad_cosine_vs_timestep.png")
    return files


# ----------------------------------------------------------------------------- main


def main(args: Args) -> dict:
    try:
        check_args(args)
    except ValueError as e:  # bad arguments: one line, no traceback
        raise SystemExit(f"train_toy.py: error: {e}") from None
    torch.set_num_threads(args.threads)
    run_dir = Path(args.out) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    runio.write_json(dataclasses.asdict(args), run_dir / "args.json")
    if not args.resume and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    methods = list(shortft.METHODS) if args.compare else [args.method]
    reward_fn = rewards.make_reward(args.reward, ring_radius=args.radius, modes=args.modes, classes=args.classes)
    t_start = time.perf_counter()

    toy, info = build_toy(args)
    print(f"grid: {args.num_steps} DDIM steps (leading) {toy.grid[0]} … {toy.grid[-1]} → x_0 (ᾱ_final = "
          f"{toy.schedule.final_alpha_cumprod:.5f}); CFG w = {args.guidance_scale}; trainable LoRA rank "
          f"{args.lora_rank} × {len(toy.tuned)} adapter(s) = {sum(p.numel() for p in toy.tuned_params())} params; "
          f"shortcut rank {args.shortcut_rank}")
    for m in methods:
        cost = shortft.chain_cost(shortft.make_chain(m, toy.grid, random.Random(0), **method_switches(m, args, toy, 0)))
        print(f"  {m:>9}: denoiser evaluations per update {cost}")
    print(f"budget per method: {args.budget:g} {args.budget_unit}; reward '{args.reward}'; run folder {run_dir}")
    metrics: dict = {"cache": info["base"] | {"shortcut": info["shortcut"]}}
    if "distill_loss" in info:
        metrics["distill_final"] = info["distill_loss"][-1]

    g = torch.Generator().manual_seed(args.seed + 4)
    x_eval = torch.randn(args.eval_batch, 2, generator=g)
    c_eval = torch.randint(0, args.classes, (args.eval_batch,), generator=g)
    traj = None
    if args.measure:
        t0 = time.perf_counter()
        metrics["trajectory_error"] = trajectory_error(toy, x_eval, c_eval, args.radius)
        metrics["grad_cosine"] = gradient_cosines(toy, args, reward_fn)
        metrics["grad_cosine_by_reward"] = {args.reward: metrics["grad_cosine"]} | {
            spec: gradient_cosines(toy, args, rewards.make_reward(spec, ring_radius=args.radius, modes=args.modes,
                                                                  classes=args.classes), methods=("shortft",))
            for spec in args.cosine_rewards if spec != args.reward}
        metrics["grad_norm"] = gradient_norms(toy, args, reward_fn)
        metrics["measure_seconds"] = time.perf_counter() - t0
        with torch.no_grad():  # a few trajectories for the figure
            den = make_denoisers(toy, c_eval[:12])
            xs = [x_eval[:12]]
            for seg in shortft.sampling_chain(toy.grid, "base").trunk:
                xs.append(shortft.apply_segment(xs[-1], seg, den, toy.schedule))
            jumps = {}
            for m in (1, 4):
                pts = [x_eval[:12]]
                for seg in shortcut_segments(toy.grid[0], CLEAN, m):
                    pts.append(shortft.apply_segment(pts[-1], seg, den, toy.schedule))
                jumps[m] = torch.stack(pts).numpy()
            traj = {"chain": torch.stack(xs).numpy(), "jumps": jumps}
        te = metrics["trajectory_error"]
        print("trajectory error / R (mean): " + ", ".join(f"M={m}: {v['mean']:.4f}" for m, v in te.items()))
        for spec, cos in metrics["grad_cosine_by_reward"].items():
            print(f"grad cosine (LoRA) ShortFT, reward {spec}: " + ", ".join(
                f"t={t}: {v['lora']:.3f}" for t, v in cos["shortft"].items()))

    init = {a: shortcut.adapter_state_dict(toy.model, a) for a in toy.tuned}
    results, scatters, on_ring = {}, {}, {}
    quality = rewards.make_reward("quality", ring_radius=args.radius, modes=args.modes)  # off-manifold check
    for m in methods:
        reset_tuned(toy, init)
        _, before = evaluate(toy, x_eval, c_eval, reward_fn)
        results[m] = finetune(toy, m, args, reward_fn, (x_eval, c_eval), run_dir if not args.compare else None)
        _, after = evaluate(toy, x_eval, c_eval, reward_fn)
        scatters[m] = (before.numpy(), after.numpy())
        on_ring[m] = (quality(before, c_eval).mean().item(), quality(after, c_eval).mean().item())
        if args.compare:
            runio.save_tensors(tuned_weights(toy), run_dir / f"lora_{m}.safetensors")
    metrics["methods"] = summarise(results)
    for m, (q0, q1) in on_ring.items():  # "quality" (ring log-density) of the samples: did the method hack r?
        metrics["methods"][m].update({"quality_before": q0, "quality_after": q1})
    metrics["total_seconds"] = time.perf_counter() - t_start
    metrics["figures"] = plot_all(run_dir, metrics, scatters, traj, args.radius)
    runio.write_json(metrics, run_dir / "metrics.json")

    print(f"\n{'method':>9} {'before':>8} {'after':>8} {'seconds':>8} {'updates':>8} {'s/update':>9} {'gain/s':>8} "
          f"{'s→target':>8} {'÷full':>6} {'quality':>8}")
    for m, v in metrics["methods"].items():
        hit, frac = v.get("seconds_to_target"), v.get("fraction_of_full_seconds")
        print(f"{m:>9} {v['reward_before']:8.3f} {v['reward_after']:8.3f} {v['seconds']:8.1f} {v['updates']:8d} "
              f"{v['seconds_per_update']:9.4f} {v['reward_gain_per_second']:8.4f} {'never' if hit is None else f'{hit:.2f}':>8} "
              f"{'-' if frac is None else f'{frac:.2f}':>6} {v['quality_after']:8.2f}")
    if "fraction_of_full_seconds" in metrics["methods"].get("shortft", {}):
        v = metrics["methods"]["shortft"]
        hit, frac = v["seconds_to_target"], v["fraction_of_full_seconds"]
        print(f"target = full's final reward within 1% of its gain ({v['target_reward']:.3f}); ShortFT reaches it "
              + ("never" if hit is None else f"after {hit:.2f} s (crossing interpolated between evaluations every "
                 f"{args.budget / args.evals:g} {args.budget_unit}) = {frac:.3f} of full's budget"))
    print(f"total {metrics['total_seconds']:.1f} s; metrics and figures in {run_dir}")
    return metrics


if __name__ == "__main__":
    main(runio.parse_args(Args))
