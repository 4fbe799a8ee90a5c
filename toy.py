"""The toy world: a 2D class-conditional diffusion on CPU, with its distilled shortcut and ShortFT's LoRAs.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3, in miniature: a base ε-model, a trajectory-preserving few-step model
("shortcut") distilled from it, and the trainable LoRA branches that `shortft.active_loras` switches per timestep.
The chain code is `shortft.py`, exactly as Stable Diffusion runs it; this file only supplies the denoisers.

    data        a ring of `modes` Gaussians; class c = a sector of modes/classes neighbouring modes (the "prompt")
    base        residual MLP ε_θ(x_t, t, s, c) with classifier-free guidance (class `classes` = null class);
                its jump-end input `inp_s` is a zero Linear that pretraining never updates, so the base ignores s
    shortcut    a LoRA "shortcut" on every Linear of the base (inp_s included), distilled from the base's guided
                50-step DDIM trajectories: one evaluation jumps t → s, no CFG (the guidance is distilled in)
    tuned_i     the trainable LoRA branches (paper: LoRA_i), on every Linear but inp_s (an ε-model has no jump end)

Notation (code -> paper): x_T, x_0 ends of the chain; grid τ_N > … > τ_1 (SD1.5's 50-step leading DDIM grid,
981 … 1); points p_1 > … > p_k the LoRA points; w = `guidance` the CFG scale; R = `radius` the ring radius.

Run: python -c "import toy; w = toy.build_toy(toy.WorldArgs()); print(w.grid[:3], w.names)"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import rewards
import runio
import shortcut
import shortft
from shortft import BASE, CLEAN, SHORTCUT, TUNED


@dataclass
class WorldArgs:
    """The toy world: data, base model and shortcut (both cached under `cache_dir` by these fields)."""

    world_seed: int = 0
    """seed of the data, the base's pretraining, the shortcut's distillation and the evaluation batch"""
    cache_dir: str = "runs/cache"
    """where the pretrained base and the distilled shortcut are cached (keyed by a hash of the world's fields)"""
    radius: float = 2.0
    """ring radius R (the data scale that trajectory errors are relative to)"""
    modes: int = 8
    """Gaussians on the ring"""
    classes: int = 4
    """classes (sectors of modes/classes neighbouring modes); class `classes` is the null class of CFG"""
    mode_std: float = 0.1
    """standard deviation of each Gaussian"""
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
    guidance: float = 2.0
    """CFG scale w of the base sampler, of the shortcut's teacher and of the tuned model"""
    shortcut_rank: int = 32
    """LoRA rank of the shortcut"""
    distill_steps: int = 4000
    """Adam steps of shortcut distillation"""
    distill_pairs: int = 8192
    """(x_t, t, s) teacher targets computed once for distillation"""
    distill_batch: int = 512
    """batch of shortcut distillation"""
    distill_chain_jumps: float = 0.0
    """share of the distillation pairs that are exactly the jumps of ShortFT's chain on the 50-step grid
    (next(p_{i−1}) → p_i for the paper's LoRA points); the rest are arbitrary pairs t > s"""
    jvp_weight: float = 0.0
    """λ_jvp: weight of the Jacobian-vector-product term of distillation (0 = value matching only)"""
    distill_weight_power: float = 2.0
    """p of the per-jump loss weight (|b_{t→s}| + 0.1)^(−p): 0 = x-space, 2 = ε-space (shortcut.py)"""
    shortcut: str = "distilled"
    """what a chain's jump runs (SHORTCUTS): 'distilled' (the distilled LoRA), 'base' (the base's own one DDIM step
    over the jump, with CFG), 'zero' (the shortcut LoRA at zero: the base's one DDIM step without CFG); the last two
    are shortcuts of lower quality, for measuring what progressive training is for"""


SHORTCUTS = ("distilled", "base", "zero")
"""What a jump can run (WorldArgs.shortcut): the distilled LoRA; the base's DDIM step with CFG; the zero LoRA."""
MAX_SIZE = 1 << 16
"""Sanity bound of every count and width of the toy (batches, widths, ranks, modes): a larger value is a typo that
would exhaust memory."""


def check_world_args(w: WorldArgs) -> None:
    """Every world setting that cannot work, in field order, before anything is pretrained or loaded: one line
    `--flag VALUE: what to do` (runio.ArgError, a ValueError)."""
    runio.require_range("world_seed", w.world_seed, 0, 2**32 - 1)
    runio.check_writable_dir("--cache-dir", w.cache_dir)
    runio.require_range("radius", w.radius, 0, 100, low_open=True)
    runio.require_range("modes", w.modes, 1, 1024)
    runio.require_range("classes", w.classes, 1, w.modes, what="a class is a sector of modes/classes modes")
    runio.require(w.modes % w.classes == 0, "modes", w.modes, f"must be a multiple of --classes ({w.classes})")
    runio.require_range("mode_std", w.mode_std, 0, w.radius, low_open=True)
    runio.require_range("hidden", w.hidden, 1, 4096)
    runio.require_range("depth", w.depth, 0, 64)
    runio.require_range("pretrain_steps", w.pretrain_steps, 1)
    runio.require_range("pretrain_batch", w.pretrain_batch, 1, MAX_SIZE)
    runio.require_range("p_uncond", w.p_uncond, 0, 1)
    runio.require_range("guidance", w.guidance, 0, 100)
    runio.require_range("shortcut_rank", w.shortcut_rank, 1, 1024)
    runio.require_range("distill_steps", w.distill_steps, 1)
    runio.require_range("distill_pairs", w.distill_pairs, 1, 1 << 20)
    runio.require_range("distill_batch", w.distill_batch, 1, MAX_SIZE)
    runio.require_range("distill_chain_jumps", w.distill_chain_jumps, 0, 1)
    runio.require_range("jvp_weight", w.jvp_weight, 0, 1e3)
    runio.require_range("distill_weight_power", w.distill_weight_power, -10, 10)
    runio.require(w.shortcut in SHORTCUTS, "shortcut", w.shortcut, f"use {', '.join(SHORTCUTS)}")


CACHE_VERSION = 3  # bump when the model or a cached stage changes
BASE_FIELDS = ("world_seed", "radius", "modes", "classes", "mode_std", "hidden", "depth", "pretrain_steps",
               "pretrain_batch", "p_uncond")
SHORTCUT_FIELDS = tuple(f.name for f in dataclasses.fields(WorldArgs) if f.name not in ("cache_dir", "shortcut"))
"""The fields the distilled shortcut depends on (`shortcut` only picks what a jump runs, after distillation)."""
NUM_STEPS = 50  # the grid the shortcut is distilled on and every chain runs on (SD1.5's sampler)


# ----------------------------------------------------------------------------- data and model


def sample_ring(n: int, w: WorldArgs, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of the ring of Gaussians and their classes: x (n, 2), c (n,) long."""
    j = torch.randint(0, w.modes, (n,), generator=generator)
    x = rewards.mode_centers(w.radius, w.modes)[j] + w.mode_std * torch.randn(n, 2, generator=generator)
    return x, j // (w.modes // w.classes)


def timestep_embedding(t: torch.Tensor, dim: int = 32, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) integer timesteps (CLEAN = −1 allowed) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=1)


class EpsMLP(nn.Module):
    """ε_θ(x_t, t, s, c): residual MLP on [x_t, emb(t), emb(c)] plus `inp_s`·emb(s).

    `inp_s` is a zero Linear that pretraining never updates, so the base ignores s exactly and a shortcut LoRA
    at its zero init *is* the base's own DDIM step t → s; distillation teaches the LoRA to use s."""

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
        z = torch.cat([x, timestep_embedding(t, self.emb), self.class_emb(c)], 1)  # (B, 2 + 2·emb)
        h = self.inp(z) + self.inp_s(timestep_embedding(s, self.emb))  # (B, hidden)
        for layer in self.hidden:
            h = h + layer(F.silu(h))
        return self.out(F.silu(h))  # (B, 2)


def linear_names(model: EpsMLP) -> list[str]:
    """The Linear layers of the bare ε-MLP: the LoRA targets (call before any adapter is injected)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def add_lora(model: nn.Module, name: str, rank: int, alpha: float, seed: int, targets: Sequence[str]) -> None:
    """Inject LoRA adapter `name` with peft into the Linear layers `targets`; A is drawn from `seed`, B = 0, so the
    adapter starts as no change at all; the global RNG is left as it was."""
    from peft import LoraConfig, inject_adapter_in_model

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft warns that a further adapter is added: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), model, adapter_name=name)
    torch.set_rng_state(state)


# ----------------------------------------------------------------------------- the world and its denoisers


@dataclass
class Toy:
    """Everything a chain needs: the model with its adapters, schedule, grid, CFG scale and the LoRA layout."""

    model: EpsMLP
    schedule: shortft.NoiseSchedule
    grid: list[int]
    guidance: float
    classes: int
    names: list[str]  # trainable adapters tuned_1 … tuned_n
    points: tuple[int, ...] | None = None  # LoRA points (None: one LoRA at every step)
    timestep_aware: bool = True
    layers: list = field(default_factory=list)  # peft tuner layers (switched on every call)
    shortcut: str = "distilled"  # what a jump runs (WorldArgs.shortcut)

    def active(self, t: int) -> list[str]:
        """The adapters the tuned model uses at timestep t (shortft.active_loras)."""
        return [self.names[i] for i in shortft.active_loras(t, self.points, self.timestep_aware)]

    def tuned_params(self, names: Sequence[str] | None = None) -> list[nn.Parameter]:
        """Parameters of the trainable adapters `names` (default: all of them), in a fixed order."""
        keep = self.names if names is None else names
        return [p for n, p in self.model.named_parameters() if any(f".{a}." in n for a in keep)]

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """Every trainable adapter's tensors (keys as in named_parameters)."""
        return {k: v for a in self.names for k, v in shortcut.adapter_state_dict(self.model, a).items()}

    def load_tuned_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for a in self.names:
            shortcut.load_adapter_state_dict(self.model, a, {k: v for k, v in tensors.items() if f".{a}." in k})


def eps(world: Toy, adapters: list[str], x, t, s, c, guided: bool = True) -> torch.Tensor:
    """ε of the model with exactly `adapters` active, per-sample (B,) t, s, c; with CFG (one batched forward,
    ε̃ = ε_∅ + w (ε_c − ε_∅)) when `guided`. Adapters are switched inside the call, so a checkpointed step
    recomputes with the same ones."""
    layers, model = world.layers, world.model
    if not (layers and list(layers[0].active_adapters) == adapters and not layers[0].disable_adapters):
        shortcut.set_active_adapters(model, adapters, layers)
    if not guided or world.guidance == 1.0:
        return model(x, t, s, c)
    null = torch.full_like(c, world.classes)
    e_null, e_cond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([null, c])).chunk(2)
    return shortft.classifier_free_guidance(e_null, e_cond, world.guidance)


def make_denoisers(world: Toy, cond: torch.Tensor) -> dict:
    """The denoisers a shortft chain looks up by name, for class labels `cond` (B,):

    BASE      the frozen pretrained model, no adapter, with CFG
    TUNED     the adapters world.active(t) picks (stacked LoRA_1 + … + LoRA_i at p_i; none: the base), with CFG
    SHORTCUT  the frozen shortcut adapter only, no CFG, told the jump end s (world.shortcut 'distilled' or 'zero');
              with world.shortcut 'base', the base with CFG at t, i.e. the base's one DDIM step t → s

    Ordinary ε-models are given s = t (the base ignores s; the tuned LoRAs have no adapter on inp_s)."""

    def vec(t):
        return torch.full((cond.shape[0],), CLEAN if t is None else int(t), dtype=torch.long)

    def base(x, t, s=None):
        return eps(world, [], x, vec(t), vec(t), cond)

    def tuned(x, t, s=None):
        return eps(world, world.active(t), x, vec(t), vec(t), cond)

    def short(x, t, s):
        if world.shortcut == "base":
            return base(x, t)
        return eps(world, ["shortcut"], x, vec(t), vec(s), cond, guided=False)

    return {BASE: base, TUNED: tuned, SHORTCUT: short}


@torch.no_grad()
def sample(world: Toy, x_T: torch.Tensor, cond: torch.Tensor, model: str = TUNED) -> torch.Tensor:
    """x_0 of the ordinary 50-step no-grad DDIM sampler (shortft.sampling_chain): TUNED where a LoRA acts, BASE
    elsewhere (the trained model's semantics), or model=BASE for the base alone."""
    chain = shortft.sampling_chain(world.grid, world.points, model)
    return shortft.run_chain(x_T, chain.trunk, make_denoisers(world, cond), world.schedule)


@torch.no_grad()
def shortcut_sample(world: Toy, x: torch.Tensor, cond: torch.Tensor, t: int, s: int, jumps: int) -> torch.Tensor:
    """x_s from x_t in `jumps` shortcut jumps evenly spaced in timestep (shortcut.jump_timesteps)."""
    pts = shortcut.jump_timesteps(t, s, jumps)
    segs = [shortft.Segment(SHORTCUT, a, b, grad=False) for a, b in zip(pts, pts[1:])]
    return shortft.run_chain(x, segs, make_denoisers(world, cond), world.schedule)


def eval_batch(w: WorldArgs, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed held-out evaluation batch (x_T, classes): the same for every method and seed."""
    g = torch.Generator().manual_seed(w.world_seed + 4)
    return torch.randn(n, 2, generator=g), torch.randint(0, w.classes, (n,), generator=g)


def make_reward(spec: str, w: WorldArgs):
    """rewards.make_reward with the ring's geometry."""
    return rewards.make_reward(spec, ring_radius=w.radius, modes=w.modes, classes=w.classes)


# ----------------------------------------------------------------------------- pretraining and distillation


def pretrain_base(w: WorldArgs, schedule: shortft.NoiseSchedule) -> EpsMLP:
    """DDPM ε-prediction:  L = E ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, ·, c)‖², classes dropped to the null class
    with probability p_uncond; `inp_s` stays zero (the base ignores s)."""
    g = torch.Generator().manual_seed(w.world_seed)
    torch.manual_seed(w.world_seed)
    model = EpsMLP(w.hidden, w.depth, w.classes)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("inp_s.")], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, w.pretrain_steps)
    ac = schedule.alphas_cumprod.float()
    for _ in range(w.pretrain_steps):
        x0, c = sample_ring(w.pretrain_batch, w, g)
        c = torch.where(torch.rand(len(c), generator=g) < w.p_uncond, torch.full_like(c, w.classes), c)
        t = torch.randint(0, schedule.num_train_timesteps, (len(c),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (model(shortft.add_noise(x0, noise, ac[t]), t, t, c) - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(False)


def chain_jump_pairs(n: int, grid: Sequence[int], points: Sequence[int], generator: torch.Generator):
    """n (t, s) pairs drawn uniformly among the jumps of ShortFT's chain: next(p_{i−1}) → p_i. (n,) long each."""
    after = {p: (grid[grid.index(p) + 1] if p != grid[-1] else CLEAN) for p in points}
    jumps = torch.tensor([(after[a], b) for a, b in zip(points, points[1:]) if after[a] != b])
    return jumps[torch.randint(0, len(jumps), (n,), generator=generator)].unbind(1)


def distill_shortcut(w: WorldArgs, world: Toy) -> None:
    """Distil the "shortcut" LoRA from the base's guided DDIM trajectories (shortcut.py, toy section).

    Inputs x_t: half on the base's own trajectories from x_T ~ N(0, I) (the states a chain meets), half noised
    data (states off the trajectory, as after fine-tuning). Targets: the teacher map Φ_{t→s} (the base's DDIM along
    the grid from t to s) and, with λ_jvp > 0, its JVP along a random direction."""
    g = torch.Generator().manual_seed(w.world_seed + 1)
    n = w.distill_pairs
    teacher = lambda x, t, s, c: eps(world, [], x, t, t, c)  # noqa: E731
    t, s = shortcut.sample_jump_pairs(n, world.grid[0], g)
    n_chain = int(round(w.distill_chain_jumps * n))
    if n_chain:
        t[:n_chain], s[:n_chain] = chain_jump_pairs(n_chain, world.grid, shortft.PAPER_LORA_POINTS, g)
    c = torch.randint(0, w.classes, (n,), generator=g)
    with torch.no_grad():  # on-trajectory x_t: the teacher from x_T down to t
        x_t = shortcut.teacher_map(torch.randn(n, 2, generator=g), torch.full_like(t, world.grid[0]), t, c,
                                   teacher, world.schedule, world.grid)
    x0, c0 = sample_ring(n, w, g)
    noisy = shortft.add_noise(x0, torch.randn(n, 2, generator=g), shortcut.alpha_bar_at(world.schedule, t))
    half = torch.arange(n) % 2 == 1
    x_t, c = torch.where(half[:, None], noisy, x_t), torch.where(half, c0, c)
    data = shortcut.make_distillation_set(x_t, t, s, c, teacher, world.schedule, world.grid, g)

    params = [p for n_, p in world.model.named_parameters() if ".shortcut." in n_]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, w.distill_steps)
    student = lambda x, t_, s_, c_: eps(world, ["shortcut"], x, t_, s_, c_, guided=False)  # noqa: E731
    for _ in range(w.distill_steps):
        idx = torch.randint(0, n, (w.distill_batch,), generator=g)
        loss, _, _ = shortcut.distillation_loss({k: v[idx] for k, v in data.items()}, student, world.schedule,
                                                w.jvp_weight, weight_power=w.distill_weight_power)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    for p in params:
        p.requires_grad_(False)


def cache_key(w: WorldArgs, fields: Sequence[str]) -> str:
    """Short hash of the world fields a cached stage depends on."""
    blob = json.dumps({"version": CACHE_VERSION, **{f: getattr(w, f) for f in fields}}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def build_toy(w: WorldArgs, points: Sequence[int] | None = None, timestep_aware: bool = True, lora_rank: int = 4,
              lora_alpha: float = 4.0, seed: int = 0, log=None) -> Toy:
    """The world with `shortft.num_loras(points, timestep_aware)` trainable adapters tuned_1 … tuned_n (A drawn
    from `seed`, B = 0) and requires_grad on all of them. Base and shortcut are pretrained / distilled once and
    then loaded from `w.cache_dir`; `log(part, seconds, cached)` hears how long each part took."""
    schedule = shortft.make_schedule()
    grid = shortft.ddim_timesteps(NUM_STEPS)
    cache = Path(w.cache_dir)
    t0 = time.perf_counter()
    base_path = cache / f"base_{cache_key(w, BASE_FIELDS)}.safetensors"
    model = EpsMLP(w.hidden, w.depth, w.classes)
    hit = runio.load_cached_tensors(base_path, model.load_state_dict)  # a damaged cache file is rebuilt
    if hit:
        model.requires_grad_(False)
    else:
        model = pretrain_base(w, schedule)
        runio.save_tensors(model.state_dict(), base_path)
    if log:
        log("base", time.perf_counter() - t0, hit)

    targets = linear_names(model)
    add_lora(model, "shortcut", w.shortcut_rank, w.shortcut_rank, w.world_seed + 2, targets)
    names = shortft.lora_names(shortft.num_loras(points, timestep_aware))
    for i, name in enumerate(names):  # an ε-model has no jump end: the tuned LoRAs leave inp_s alone
        add_lora(model, name, lora_rank, lora_alpha, seed * 1000 + 3 + i, [n for n in targets if n != "inp_s"])
    model.requires_grad_(False)
    world = Toy(model, schedule, grid, w.guidance, w.classes, names,
                None if points is None else tuple(points), timestep_aware, shortcut.lora_layers(model), w.shortcut)

    t0 = time.perf_counter()
    sc_path = cache / f"shortcut_{cache_key(w, SHORTCUT_FIELDS)}.safetensors"
    init = {k: v.clone() for k, v in shortcut.adapter_state_dict(model, "shortcut").items()}
    if w.shortcut == "zero":  # the LoRA as injected: B = 0, so a jump is the base's DDIM step without CFG
        hit = True
    else:
        hit = runio.load_cached_tensors(sc_path, lambda t: shortcut.load_adapter_state_dict(model, "shortcut", t))
    if not hit:
        shortcut.load_adapter_state_dict(model, "shortcut", init)  # a damaged file may have been copied in part
        distill_shortcut(w, world)
        runio.save_tensors(shortcut.adapter_state_dict(model, "shortcut"), sc_path)
    if log:
        log("shortcut", time.perf_counter() - t0, hit)
    for p in world.tuned_params():
        p.requires_grad_(True)
    return world


def world_args(args) -> WorldArgs:
    """The WorldArgs part of any arguments object that extends WorldArgs (e.g. train_toy.Args)."""
    return WorldArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldArgs)})
