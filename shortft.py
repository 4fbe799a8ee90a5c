"""ShortFT: reward backpropagation through a shortcut-based denoising chain.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 (Sec. 3: the shortcut-based chain, timestep-aware LoRA, progressive training).

Everything here is model-agnostic: `x` may be (B, 2) toy points or (B, 4, 64, 64) SD latents.
A *denoiser* is any callable ``eps = denoiser(x_t, t, s)`` (ε-prediction at integer timestep t; s is
the end of the step, ignored by ordinary ε-models and used by shortcut models that jump t → s).
Conditioning, classifier-free guidance and adapter switching live inside that callable.

A *chain* is a list of `Segment`s, one denoiser evaluation each, run by `run_chain`. ShortFT and
every baseline (DRaFT-K, DRaFT-LV, AlignProp, ReFL, DRTune, the complete chain) are functions that
return such a list, so the methods differ only in *which* segments carry gradient.

Notation (code -> paper):
    alphas_cumprod[t]  ᾱ_t            grid          τ_N > … > τ_1 (DDIM timesteps; SD1.5: 981, 961, …, 1)
    x_t, eps           x_t, ε_θ(x_t)   CLEAN (= -1)  end of the chain, ᾱ = ᾱ_final (SD1.5: ᾱ_0)
    predict_x0         x̂_0 (DDIM)      X0 (= None)   "jump straight to x̂_0" (ᾱ_s = 1, ReFL)
    points             LoRA timesteps p_1 > … > p_k (paper: 761, 501, 261, 1), k segments
    tuned_i            LoRA_i; the step at p_i uses LoRA_1 + … + LoRA_i (stacked timestep-aware LoRA)
    stage              progressive-training stage i = 1 … k (trains LoRA_i … LoRA_k)

Run: python -c "import shortft; print(*shortft.shortft(shortft.ddim_timesteps(50)).trunk, sep='\n')"
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.utils.checkpoint

CLEAN = -1  # "timestep" of the chain's end point x_0; its ᾱ is NoiseSchedule.final_alpha_cumprod
X0 = None  # target of a step that returns the x̂_0 prediction itself (ᾱ_s = 1), used by ReFL

# Denoiser names a Segment can use (keys of the denoisers dict every world builds).
BASE = "base"  # the frozen pretrained model, no LoRA
TUNED = "tuned"  # the model being fine-tuned: the LoRA branches `active_loras(t)` picks (none: the base)
SHORTCUT = "shortcut"  # the frozen trajectory-preserving few-step model: one evaluation jumps t → s
NOISE = "noise"  # not a model: re-noise x_0 to x_s with fresh ε (DRaFT-LV)
DENOISERS = (BASE, TUNED, SHORTCUT)

Denoiser = Callable[[torch.Tensor, int, "int | None"], torch.Tensor]
RewardFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- noise schedule


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for t = 0 … T-1 (float64, CPU) and ᾱ of the chain's end point (diffusers'
    `final_alpha_cumprod`: 1 with `set_alpha_to_one=True`, ᾱ_0 otherwise, as in SD1.5)."""

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_bar(self, t: int | None) -> float:
        """ᾱ_t as a Python float; t = CLEAN gives ᾱ_final, t = X0 (None) gives 1."""
        if t is None:
            return 1.0
        t = int(t)
        if t == CLEAN:
            return self.final_alpha_cumprod
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(
                f"timestep {t} is outside the schedule [0, {self.num_train_timesteps - 1}] "
                f"(use shortft.CLEAN = -1 for the chain's end point)"
            )
        return float(self.alphas_cumprod[t])


def make_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    set_alpha_to_one: bool = False,
) -> NoiseSchedule:
    """β schedule → ᾱ_t = Π_{i≤t} (1 − β_i). Defaults are SD1.5's (`scaled_linear`, 1000 steps):
    β_t = (linspace(√β_start, √β_end, T))², as in diffusers' DDIMScheduler."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}: use 'scaled_linear' or 'linear'")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
    return NoiseSchedule(alphas_cumprod, final)


def schedule_from_diffusers(config: Mapping) -> NoiseSchedule:
    """The same schedule as a diffusers scheduler (pass `scheduler.config`)."""
    return make_schedule(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=config.get("beta_start", 0.00085),
        beta_end=config.get("beta_end", 0.012),
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
        set_alpha_to_one=config.get("set_alpha_to_one", False),
    )


def ddim_timesteps(
    num_steps: int = 50, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 1
) -> list[int]:
    """The DDIM grid τ_N > … > τ_1 exactly as diffusers' `DDIMScheduler.set_timesteps` builds it.

    leading  (SD1.5 default): (arange(N) · T//N)[::-1] + steps_offset → [981, 961, …, 1] for N = 50
    trailing (Hyper-SD, TCD): round(arange(T, 0, −T/N)) − 1          → [999, 979, …, 19]
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = [i * ratio + steps_offset for i in range(num_steps)][::-1]
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        steps = [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(num_steps)]
    else:
        raise ValueError(f"unknown spacing {spacing!r}: use 'leading' or 'trailing'")
    return [min(max(t, 0), num_train_timesteps - 1) for t in steps]


# ----------------------------------------------------------------------------- DDIM equations


def _coef(a: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A per-sample (B,) coefficient reshaped to broadcast against x; floats pass through."""
    if isinstance(a, torch.Tensor) and a.ndim == 1:
        return a.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return a


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: float | torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0):  x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
    a = _coef(alpha_bar_t, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float | torch.Tensor) -> torch.Tensor:
    """DDIM's clean-sample estimate:  x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    a = _coef(alpha_bar_t, x_t)
    return (x_t - (1 - a) ** 0.5 * eps) / a**0.5


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: float | torch.Tensor,
    alpha_bar_s: float | torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step t → s (Song et al. 2021, Eq. 12):

        x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε + σ z,   σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s).

    η = 0 is the deterministic probability-flow step used for every chain in this repo; ᾱ_s = 1
    returns x̂_0. Shapes: x_t, eps (B, …); ᾱ floats or (B,) tensors.
    """
    a_t, a_s = _coef(alpha_bar_t, x_t), _coef(alpha_bar_s, x_t)
    x0 = predict_x0(x_t, eps, a_t)
    if eta == 0:
        return a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs `noise` (a tensor shaped like x_t)")
    sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
    return a_s**0.5 * x0 + (1 - a_s - sigma**2) ** 0.5 * eps + sigma * noise


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022):  ε̃ = ε_∅ + w (ε_c − ε_∅)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


# ----------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class Segment:
    """One evaluation of denoiser `model` taking x_t to x_s (s < t), or a re-noising.

    model        BASE, TUNED or SHORTCUT (a key of the denoisers dict), or NOISE: draw fresh ε and
                 return x_s = √ᾱ_s x + √(1 − ᾱ_s) ε (DRaFT-LV).
    t, s         integer timesteps; s = CLEAN (-1) ends the chain, s = X0 (None) returns x̂_0.
    grad         False: the whole step runs under no_grad and cuts the graph.
    checkpoint   recompute the step in backward instead of storing its activations.
    detach_input the denoiser sees sg(x_t): gradient reaches x_t only through the DDIM skip term.
    detach_eps   ε is computed under no_grad (the step stays linear in x_t), as DRTune's untrained steps.
    """

    model: str
    t: int
    s: int | None
    grad: bool = True
    checkpoint: bool = False
    detach_input: bool = False
    detach_eps: bool = False

    def __post_init__(self):
        if self.model not in (*DENOISERS, NOISE):
            raise ValueError(f"unknown denoiser {self.model!r} in a Segment: use one of {', '.join((*DENOISERS, NOISE))}")


@dataclass
class Chain:
    """`trunk` runs from x_T; then each branch continues from the trunk's output and the loss is the
    mean reward over branches. Every method has one empty branch except DRaFT-LV (n re-noised copies)."""

    trunk: list[Segment]
    branches: list[list[Segment]] = field(default_factory=lambda: [[]])

    def segments(self) -> list[Segment]:
        return self.trunk + [s for b in self.branches for s in b]


def apply_segment(
    x: torch.Tensor, seg: Segment, denoisers: Mapping[str, Denoiser], schedule: NoiseSchedule
) -> torch.Tensor:
    """x_t → x_s for one segment, honouring its gradient switches."""
    a_t, a_s = schedule.alpha_bar(seg.t), schedule.alpha_bar(seg.s)
    if seg.model == NOISE:
        return add_noise(x, torch.randn_like(x), a_s)
    try:
        denoiser = denoisers[seg.model]
    except KeyError:
        raise KeyError(f"chain needs denoiser {seg.model!r} but only {sorted(denoisers)} were given") from None

    def step(x_t: torch.Tensor) -> torch.Tensor:
        x_in = x_t.detach() if seg.detach_input else x_t
        if seg.detach_eps:
            with torch.no_grad():
                eps = denoiser(x_in, seg.t, seg.s)
        else:
            eps = denoiser(x_in, seg.t, seg.s)
        return ddim_step(x_t, eps, a_t, a_s)

    if not seg.grad:
        with torch.no_grad():
            return step(x)
    if seg.checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(step, x, use_reentrant=False)
    return step(x)


def run_chain(
    x: torch.Tensor, segments: Sequence[Segment], denoisers: Mapping[str, Denoiser], schedule: NoiseSchedule
) -> torch.Tensor:
    """Run the segments in order from x (usually x_T ~ N(0, I))."""
    for seg in segments:
        x = apply_segment(x, seg, denoisers, schedule)
    return x


def chain_outputs(
    x_T: torch.Tensor, chain: Chain, denoisers: Mapping[str, Denoiser], schedule: NoiseSchedule
) -> list[torch.Tensor]:
    """The chain's end points: one tensor per branch."""
    x = run_chain(x_T, chain.trunk, denoisers, schedule)
    return [run_chain(x, branch, denoisers, schedule) for branch in chain.branches]


def reward_loss(
    x_T: torch.Tensor,
    chain: Chain,
    denoisers: Mapping[str, Denoiser],
    schedule: NoiseSchedule,
    reward_fn: RewardFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward backpropagation objective  L = −E[r(x_0)]  over the chain's branches.

    `reward_fn` maps the chain's end point (points, or latents it decodes itself) to (B,) rewards.
    Returns (loss, rewards of the first branch, detached)."""
    rewards = [reward_fn(x0) for x0 in chain_outputs(x_T, chain, denoisers, schedule)]
    loss = -torch.stack([r.mean() for r in rewards]).mean()
    return loss, rewards[0].detach()


def sampling_chain(grid: Sequence[int], points: Sequence[int] | None = None, model: str = TUNED) -> Chain:
    """The ordinary no-grad DDIM sampler over `grid`, ending at CLEAN (evaluation and inference, not training):
    with `points`, TUNED where `active_loras` puts a LoRA and BASE elsewhere; `model=BASE` samples the base."""
    _points(grid)
    if model == BASE:
        return Chain(_steps(BASE, _points(grid), grad=False))
    return Chain(_original_steps(grid, grid[0], grid[-1], points, grad=False))


def chain_cost(chain: Chain) -> dict[str, int]:
    """Denoiser evaluations of a chain: forward-only, with gradient, and recomputed by checkpointing."""
    evals = [s for s in chain.segments() if s.model != NOISE]
    return {
        "no_grad": sum(not s.grad for s in evals),
        "grad": sum(s.grad and not s.detach_eps for s in evals),
        "skip_path_only": sum(s.grad and s.detach_eps for s in evals),
        "checkpointed": sum(s.grad and s.checkpoint for s in evals),
    }


# ----------------------------------------------------------------------------- methods


def _points(grid: Sequence[int]) -> list[int]:
    """[τ_N, …, τ_1, CLEAN]: the chain visits these in order."""
    grid = [int(t) for t in grid]
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"the timestep grid must be strictly decreasing, got {grid[:5]}…")
    return grid + [CLEAN]


def _steps(model: str, points: Sequence[int], **kw) -> list[Segment]:
    return [Segment(model, t, s, **kw) for t, s in zip(points, points[1:])]


def jump_timesteps(t: int, s: int, jumps: int) -> list[int]:
    """`jumps`+1 points from t down to s, evenly spaced in timestep (s = CLEAN counts as −1)."""
    if jumps < 1:
        raise ValueError(f"number of shortcut jumps must be ≥ 1, got {jumps}")
    if jumps > t - s:
        raise ValueError(f"cannot split {t} → {s} into {jumps} jumps of at least one timestep")
    return [t] + [int(round(t + (s - t) * i / jumps)) for i in range(1, jumps)] + [s]


def full(grid: Sequence[int], checkpoint: bool = True) -> Chain:
    """Complete-chain reward backprop (DRaFT / AlignProp without truncation): N grad steps."""
    return Chain(_steps(TUNED, _points(grid), grad=True, checkpoint=checkpoint))


def draft_k(grid: Sequence[int], k: int = 1, checkpoint: bool = True) -> Chain:
    """DRaFT-K (Clark et al. 2024): N − K steps without gradient, the last K with gradient."""
    points = _points(grid)
    n = len(points) - 1
    if not 1 <= k <= n:
        raise ValueError(f"DRaFT-K needs 1 ≤ K ≤ {n} (the chain length), got K={k}")
    return Chain(
        _steps(TUNED, points[: n - k + 1], grad=False)
        + _steps(TUNED, points[n - k :], grad=True, checkpoint=checkpoint)
    )


def draft_lv(grid: Sequence[int], n: int = 2) -> Chain:
    """DRaFT-LV (Clark et al. 2024): x_0 with no gradient, then n times re-noise to τ_1 with fresh ε
    and take one grad step τ_1 → x_0; the loss averages the n rewards."""
    if n < 1:
        raise ValueError(f"DRaFT-LV needs n ≥ 1 re-noised copies, got {n}")
    points = _points(grid)
    t1 = points[-2]
    branch = [Segment(NOISE, CLEAN, t1), Segment(TUNED, t1, CLEAN, grad=True)]
    return Chain(_steps(TUNED, points, grad=False), [list(branch) for _ in range(n)])


def alignprop(
    grid: Sequence[int], k_min: int = 1, k_max: int | None = None, rng: random.Random | None = None,
    checkpoint: bool = True,
) -> Chain:
    """AlignProp (Prabhudesai et al. 2023): the full chain with gradient through the last K steps,
    K ~ U[k_min, k_max] drawn afresh each update (randomised truncated backprop)."""
    n = len(grid)
    k_max = n if k_max is None else k_max
    if not 1 <= k_min <= k_max <= n:
        raise ValueError(f"AlignProp needs 1 ≤ k_min ≤ k_max ≤ {n}, got [{k_min}, {k_max}]")
    k = (rng or random).randint(k_min, k_max)
    return draft_k(grid, k, checkpoint=checkpoint)


def refl(grid: Sequence[int], last: int = 10, rng: random.Random | None = None) -> Chain:
    """ReFL (ImageReward, Xu et al. 2023): no gradient down to a random step among the last `last`
    of the grid, then one grad evaluation that returns x̂_0 = (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t directly."""
    n = len(grid)
    if not 1 <= last <= n:
        raise ValueError(f"ReFL needs 1 ≤ last ≤ {n}, got {last}")
    j = (rng or random).randrange(n - last, n)  # grid index of the graded step
    points = _points(grid)
    return Chain(_steps(TUNED, points[: j + 1], grad=False) + [Segment(TUNED, points[j], X0, grad=True)])


def drtune(
    grid: Sequence[int], k: int = 5, rng: random.Random | None = None, checkpoint: bool = True
) -> Chain:
    """DRTune (Wu et al. 2024): every step's denoiser sees sg(x_t), so the gradient travels along the
    √ᾱ-scaled skip path only; K evenly spaced steps (random offset) pass gradient into θ."""
    n = len(grid)
    if not 1 <= k <= n:
        raise ValueError(f"DRTune needs 1 ≤ K ≤ {n}, got K={k}")
    stride = n // k
    offset = (rng or random).randrange(stride)
    trained = {offset + i * stride for i in range(k)}
    points = _points(grid)
    return Chain([
        Segment(TUNED, t, s, grad=True, detach_input=True, detach_eps=i not in trained,
                checkpoint=checkpoint and i in trained)
        for i, (t, s) in enumerate(zip(points, points[1:]))
    ])


# ----------------------------------------------------------------------------- ShortFT (paper Sec. 3)
#
# The paper's layout on SD1.5's 50-step grid (981, 961, …, 21, 1), LoRA points P = (761, 501, 261, 1):
#
#   inference   981 … 761 │ 741 … 521 │ 501 │ 481 … 281 │ 261 │ 241 … 21 │ 1 → x_0
#               LoRA_1     │ base      │ Σ₂  │ base      │ Σ₃  │ base     │ Σ₄          Σ_i = LoRA_1 + … + LoRA_i
#   training    θ (grad on the last)  jump 741→501 │ θ │ jump 481→261 │ θ │ jump 241→1 │ θ
#
# Segment 1 runs every grid step down to p_1 with LoRA_1; every later segment i is one shortcut jump over the
# steps the base model runs at inference, then one step at p_i with the stacked LoRA Σ_i. Stage i of progressive
# training runs the original chain down to p_i without gradient, then the shortcut chain after it, and trains
# LoRA_i … LoRA_k only.

PAPER_LORA_POINTS = (761, 501, 261, 1)
"""The paper's LoRA timesteps on SD1.5's 50-step leading grid (k = 4 segments)."""


def check_lora_points(points: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """LoRA points must be grid timesteps, strictly decreasing, the last one the grid's last step."""
    points = tuple(int(p) for p in points)
    if not points:
        raise ValueError("LoRA points are empty: give at least one grid timestep, e.g. 761 501 261 1")
    off = [p for p in points if p not in set(grid)]
    if off:
        raise ValueError(f"LoRA point(s) {off} are not on the {len(grid)}-step grid ({grid[0]}, {grid[1]}, …, "
                         f"{grid[-1]}): choose grid timesteps")
    if any(a <= b for a, b in zip(points, points[1:])):
        raise ValueError(f"LoRA points {list(points)} must be strictly decreasing")
    if points[-1] != grid[-1]:
        raise ValueError(f"the last LoRA point must be the grid's last step {grid[-1]} (it makes x_0), got {points[-1]}")
    return points


def active_loras(t: int, points: Sequence[int] | None = None, timestep_aware: bool = True) -> tuple[int, ...]:
    """Which LoRA branches act at timestep t (index i is the paper's LoRA_{i+1}) — the one place that decides it,
    used by the training chains, the ordinary sampler and the saved model alike:

        t ≥ p_1          (0,)            segment 1: LoRA_1 at every step
        t = p_i, i ≥ 2   (0, 1, …, i−1)  stacked timestep-aware LoRA: ΔW_1 + … + ΔW_i
        otherwise        ()              the base model (the intervals the shortcut replaces in training)

    `points=None` is a single LoRA at every step (every baseline). `timestep_aware=False` is the paper's ablation
    "without timestep-aware LoRA": one LoRA, (0,), at the same places."""
    if points is None:
        return (0,)
    t = int(t)
    if t >= points[0]:
        return (0,)
    if t not in points:
        return ()
    return tuple(range(points.index(t) + 1)) if timestep_aware else (0,)


def num_loras(points: Sequence[int] | None = None, timestep_aware: bool = True) -> int:
    """Number of LoRA branches: k = len(points) when timestep-aware, else 1."""
    return len(points) if points is not None and timestep_aware else 1


def lora_names(n: int) -> list[str]:
    """Adapter names of the n trainable LoRA branches: tuned_1 … tuned_n (the paper's LoRA_1 … LoRA_k)."""
    return [f"tuned_{i + 1}" for i in range(n)]


def trainable_loras(stage: int, points: Sequence[int] | None = None, timestep_aware: bool = True) -> tuple[int, ...]:
    """Progressive training: stage i optimises LoRA_i … LoRA_k (indices i−1 … k−1). With one LoRA, always (0,)."""
    n = num_loras(points, timestep_aware)
    if n == 1:
        return (0,)
    if not 1 <= stage <= n:
        raise ValueError(f"stage {stage} is out of range: there are {n} stages (one per LoRA point)")
    return tuple(range(stage - 1, n))


def stage_at(progress: float, k: int, fractions: Sequence[float] = ()) -> int:
    """The progressive-training stage (1 … k) at `progress` ∈ [0, 1] of the training budget. Stage i lasts
    fractions[i−1] of the budget (empty: k equal parts; the paper does not say how long each stage lasts)."""
    fractions = list(fractions) or [1.0 / k] * k
    if len(fractions) != k or any(not f > 0 for f in fractions):
        raise ValueError(f"stage fractions {fractions} must be {k} positive numbers (one per stage)")
    edge, total = 0.0, sum(fractions)
    for i, f in enumerate(fractions, start=1):
        edge += f / total
        if progress < edge:
            return i
    return k


def _next_point(grid: Sequence[int], t: int) -> int:
    """The grid point after t (CLEAN after the last)."""
    i = list(grid).index(t)
    return grid[i + 1] if i + 1 < len(grid) else CLEAN


def _original_steps(grid, t_from: int, t_to: int, points, **kw) -> list[Segment]:
    """The original chain's steps at grid timesteps t_from ≥ t ≥ t_to: TUNED where a LoRA acts, BASE elsewhere."""
    return [Segment(TUNED if active_loras(t, points) else BASE, t, _next_point(grid, t), **kw)
            for t in grid if t_from >= t >= t_to]


def shortft(
    grid: Sequence[int],
    points: Sequence[int] = PAPER_LORA_POINTS,
    stage: int = 1,
    segment1_grad_steps: int = 1,
    prefix: str = "original",
    checkpoint: bool = False,
) -> Chain:
    """ShortFT's shortcut-based chain for progressive-training stage i = `stage` (paper Sec. 3):

        x_T ─ original chain down to p_i, no grad ─▶ step θ at p_i (grad)
            ─ for j = i+1 … k: shortcut jump next(p_{j−1}) → p_j, step θ at p_j (grad) ─▶ x_0

    θ is the tuned model with the LoRAs `active_loras(t)` picks; the jumps stand in for the base model that
    inference runs between LoRA points, so no LoRA is active inside them. Stage 1's "original chain" is segment 1
    (981 … 761 with LoRA_1), of which the last `segment1_grad_steps` steps carry gradient (1: the paper's chain of
    ≈ 7 evaluations). `prefix="shortcut"` replaces the skipped intervals before p_i by no-grad jumps as well
    (cheaper, but the training/inference mismatch the stages remove comes back). No gradient checkpointing by
    default: the chain is short (the paper counts this as a memory win)."""
    grid = [int(t) for t in grid]
    _points(grid)
    points = check_lora_points(points, grid)
    k = len(points)
    if not 1 <= stage <= k:
        raise ValueError(f"stage {stage} is out of range: {k} LoRA points give stages 1 … {k}")
    seg1 = [t for t in grid if t >= points[0]]
    if not 1 <= segment1_grad_steps <= len(seg1):
        raise ValueError(f"segment1_grad_steps={segment1_grad_steps} must be in [1, {len(seg1)}] "
                         f"(segment 1 has {len(seg1)} steps: {seg1[0]} … {seg1[-1]})")
    if prefix not in ("original", "shortcut"):
        raise ValueError(f"unknown prefix {prefix!r}: use 'original' or 'shortcut'")
    p_i = points[stage - 1]
    grad_from = seg1[-segment1_grad_steps] if stage == 1 else p_i
    trunk = []
    if prefix == "original" or stage == 1:
        trunk += _original_steps(grid, grid[0], grad_from + 1, points, grad=False)
    else:
        trunk += _original_steps(grid, grid[0], points[0], points, grad=False)
        for prev, p in zip(points[: stage - 1], points[1:stage]):
            if _next_point(grid, prev) != p:
                trunk.append(Segment(SHORTCUT, _next_point(grid, prev), p, grad=False))
            if p != p_i:
                trunk.append(Segment(TUNED, p, _next_point(grid, p), grad=False))
    trunk += _original_steps(grid, grad_from, p_i, points, grad=True, checkpoint=checkpoint)
    for prev, p in zip(points[stage - 1 :], points[stage:]):
        if _next_point(grid, prev) != p:
            trunk.append(Segment(SHORTCUT, _next_point(grid, prev), p, grad=True, checkpoint=checkpoint))
        trunk.append(Segment(TUNED, p, _next_point(grid, p), grad=True, checkpoint=checkpoint))
    return Chain(trunk)


BUILDERS = {"shortft": shortft, "full": full, "draft_k": draft_k, "draft_lv": draft_lv,
            "alignprop": alignprop, "refl": refl, "drtune": drtune}
METHODS = tuple(BUILDERS)


def make_chain(method: str, grid: Sequence[int], rng: random.Random | None = None, **switches) -> Chain:
    """The training chain of `method` (one of METHODS) with its switches, drawn afresh per update."""
    if method not in BUILDERS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    builder = BUILDERS[method]
    accepted = set(inspect.signature(builder).parameters) - {"grid"}
    unknown = sorted(set(switches) - accepted)
    if unknown:
        raise ValueError(f"bad switch for method {method!r}: {', '.join(unknown)} "
                         f"(it takes {', '.join(sorted(accepted - {'rng'}))})")
    if "rng" in accepted:
        switches["rng"] = rng
    return builder(grid, **switches)


@dataclass
class ChainArgs:
    """The chain's switches, shared by every world: `train_toy.Args` and `train_sd.Args` extend this class, so a flag
    means the same thing, with the same default, in both scripts."""

    method: str = "shortft"
    """shortft | full | draft_k | draft_lv | alignprop | refl | drtune (shortft.METHODS)"""
    num_steps: int = 50
    """N, steps of the DDIM grid being fine-tuned (leading spacing, SD1.5's sampler: 981, 961, …, 1)"""
    lora_points: list[int] = field(default_factory=lambda: list(PAPER_LORA_POINTS))
    """ShortFT: LoRA points p_1 > … > p_k on the grid (the last is the grid's last step); k segments"""
    timestep_aware: bool = True
    """ShortFT: one stacked LoRA branch per point (LoRA_i = LoRA_{i−1} + a new branch); --no-timestep-aware is the
    paper's ablation: one LoRA shared at the same places"""
    progressive: bool = True
    """ShortFT: progressive training in k stages; --no-progressive is the paper's ablation (stage 1 throughout)"""
    stage_fractions: list[float] = field(default_factory=list)
    """ShortFT: share of the training budget each stage gets (empty: k equal shares)"""
    segment1_grad_steps: int = 1
    """ShortFT: steps of segment 1 (981 … p_1) that carry gradient in stage 1 (1: only the last; 12: all of them)"""
    prefix: str = "original"
    """ShortFT: what runs before p_i in stage i ≥ 2: 'original' (the 50-step chain) or 'shortcut' (no-grad jumps)"""
    checkpoint_segments: bool = False
    """ShortFT: gradient-checkpoint each gradient step of its chain (off, as in the paper; on for small GPUs). The
    baselines always checkpoint their gradient steps"""
    draft_k: int = 1
    """DRaFT-K: K, steps with gradient at the end of the chain"""
    draft_lv_n: int = 2
    """DRaFT-LV: re-noised copies n (at most N: each costs one gradient evaluation)"""
    alignprop_k_min: int = 1
    """AlignProp: smallest truncation length"""
    alignprop_k_max: int = 0
    """AlignProp: largest truncation length (0: N, the whole chain)"""
    refl_last: int = 10
    """ReFL: the graded step is drawn among the last this many steps"""
    drtune_k: int = 5
    """DRTune: steps whose ε carries gradient"""


def layout(args: ChainArgs) -> tuple[tuple[int, ...] | None, bool]:
    """(LoRA points, timestep-aware) of the method: ShortFT's points; None (one LoRA at every step) otherwise."""
    if args.method == "shortft":
        return tuple(args.lora_points), args.timestep_aware
    return None, False


def stage_of(args: ChainArgs, progress: float) -> int:
    """The stage at `progress` ∈ [0, 1] of the budget: stage_at(…) for ShortFT with progressive training, else 1.
    Without timestep-aware LoRA the stages still change the chain (original prefix down to p_i); only the one shared
    LoRA is trained in all of them, so each Table 3 ablation changes exactly one thing."""
    points, _ = layout(args)
    return stage_at(progress, len(points), args.stage_fractions) if points and args.progressive else 1


def chain_switches(args: ChainArgs, stage: int = 1) -> dict:
    """The keyword arguments `make_chain(args.method, grid, rng, **…)` needs, from the shared arguments."""
    return {
        "shortft": dict(points=tuple(args.lora_points), stage=stage, segment1_grad_steps=args.segment1_grad_steps,
                        prefix=args.prefix, checkpoint=args.checkpoint_segments),
        "full": {}, "draft_k": dict(k=args.draft_k), "draft_lv": dict(n=args.draft_lv_n),
        "alignprop": dict(k_min=args.alignprop_k_min, k_max=args.alignprop_k_max or None),
        "refl": dict(last=args.refl_last), "drtune": dict(k=args.drtune_k),
    }[args.method]


def check_chain_args(args: ChainArgs) -> None:
    """One-line errors `--flag VALUE: what is wrong` for chain settings that cannot work, before any model is built,
    in field order: every switch against the grid (also the switches of methods other than `method`, which a
    benchmark times with the same arguments), ShortFT's layout when the method is ShortFT, then the method's chain for
    stage 1 and for its last stage."""

    def check(name: str, test: Callable[[], object]) -> None:
        try:
            test()
        except ValueError as e:
            value = getattr(args, name)
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            raise ValueError(f"--{name.replace('_', '-')} {shown or '(empty)'}: {e}") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    check("method", lambda: need(args.method in BUILDERS, f"unknown method; choose one of {', '.join(METHODS)}"))
    check("num_steps", lambda: need(1 <= args.num_steps <= 1000, "must be in [1, 1000]"))
    grid = ddim_timesteps(args.num_steps)
    n = len(grid)
    points, aware = layout(args)
    if points is not None:
        check("lora_points", lambda: check_lora_points(points, grid))
        check("stage_fractions", lambda: stage_at(0.0, len(points), args.stage_fractions))
        seg1 = len([t for t in grid if t >= points[0]])
        check("segment1_grad_steps", lambda: need(1 <= args.segment1_grad_steps <= seg1,
                                                  f"must be in [1, {seg1}] (segment 1 has {seg1} steps)"))
    else:
        check("stage_fractions", lambda: need(all(f > 0 for f in args.stage_fractions), "must be positive numbers"))
        check("segment1_grad_steps", lambda: need(args.segment1_grad_steps >= 1, "must be ≥ 1"))
    check("prefix", lambda: need(args.prefix in ("original", "shortcut"), "use 'original' or 'shortcut'"))
    check("draft_k", lambda: draft_k(grid, args.draft_k))
    check("draft_lv_n", lambda: need(1 <= args.draft_lv_n <= n, f"DRaFT-LV needs 1 ≤ n ≤ {n} re-noised copies (each "
                                                                 "costs one gradient evaluation)"))
    check("alignprop_k_min", lambda: need(1 <= args.alignprop_k_min <= n, f"AlignProp needs 1 ≤ k_min ≤ {n}"))
    check("alignprop_k_max", lambda: alignprop(grid, args.alignprop_k_min, args.alignprop_k_max or None))
    check("refl_last", lambda: refl(grid, args.refl_last))
    check("drtune_k", lambda: drtune(grid, args.drtune_k))
    for stage in {1, len(points) if points is not None and args.progressive else 1}:
        check("method", lambda: make_chain(args.method, grid, random.Random(0), **chain_switches(args, stage)))


# ----------------------------------------------------------------------------- update


def grad_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """‖∇‖₂ over all parameters that have a gradient (inf/nan propagate)."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def guarded_step(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], max_grad_norm: float | None = 1.0
) -> tuple[bool, float]:
    """Clip and apply the update unless it would put NaN/inf into the weights: a non-finite gradient is dropped
    before the step, and weights that come out of the step non-finite (e.g. an absurd learning rate) are restored
    from a copy taken just before it. Returns (applied, gradient norm before clipping)."""
    norm = grad_norm(params)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False, float(norm)
    if max_grad_norm is not None and max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if all(bool(torch.isfinite(p).all()) for p in params):
        return True, float(norm)
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return False, float(norm)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened gradients."""
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
