"""ShortFT: reward backpropagation through a shortcut-based denoising chain.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 (Sec. 3: the shortcut-based chain, timestep-aware LoRA, progressive training).

Everything here is model-agnostic: `x` may be (B, 2) toy points, (B, 4, 64, 64) SD latents or (B, 16, 128, 128) SD3
latents. A *denoiser* is any callable ``out = denoiser(x_t, t, s)``: the model's prediction at timestep t (s is the
end of the step, ignored by ordinary models and used by shortcut models that jump t → s). Conditioning,
classifier-free guidance and adapter switching live inside that callable. What a step *does* with the prediction is
the schedule's (the paper calls ShortFT architecture-agnostic; only this changes between worlds):

    NoiseSchedule  ε-prediction on ᾱ_t, integer timesteps (SD1.5, the toy, the digits model): the DDIM step
    FlowSchedule   velocity prediction on σ_t = t / T, float timesteps σ·1000 (SD3, FLUX): the rectified-flow Euler step

A *chain* is a list of `Segment`s, one denoiser evaluation each, run by `run_chain`. ShortFT and
every baseline (DRaFT-K, DRaFT-LV, AlignProp, ReFL, DRTune, the complete chain) are functions that
return such a list, so the methods differ only in *which* segments carry gradient.

Notation (code -> paper):
    alphas_cumprod[t]  ᾱ_t            grid          τ_N > … > τ_1 (SD1.5: 981, 961, …, 1; SD3: 1000.0, 987.4, …, 8.9)
    x_t, out           x_t, ε_θ or v_θ CLEAN (= -1)  end of the chain, ᾱ = ᾱ_final (SD1.5: ᾱ_0), σ = 0 (flow)
    predict_x0         x̂_0 (DDIM)      X0 (= None)   "jump straight to x̂_0" (ᾱ_s = 1, σ_s = 0; ReFL)
    sigma              σ_t (flow)      x_σ = (1 − σ) x_0 + σ ε, v ≈ ε − x_0
    points             LoRA timesteps p_1 > … > p_k (paper: 761, 501, 261, 1), k segments
    tuned_i            LoRA_i; the step at p_i uses LoRA_1 + … + LoRA_i (stacked timestep-aware LoRA)
    stage              progressive-training stage i = 1 … k (trains LoRA_i … LoRA_k)

Run: python -c "import shortft; print(*shortft.shortft(shortft.ddim_timesteps(50)).trunk, sep='\n')"
"""

from __future__ import annotations

import inspect
import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.utils.checkpoint

CLEAN = -1  # "timestep" of the chain's end point x_0: ᾱ = NoiseSchedule.final_alpha_cumprod, σ = 0
X0 = None  # target of a step that returns the x̂_0 prediction itself (ᾱ_s = 1, σ_s = 0), used by ReFL

# Denoiser names a Segment can use (keys of the denoisers dict every world builds).
BASE = "base"  # the frozen pretrained model, no LoRA
TUNED = "tuned"  # the model being fine-tuned: the LoRA branches `active_loras(t)` picks (none: the base)
SHORTCUT = "shortcut"  # the frozen trajectory-preserving few-step model: one evaluation jumps t → s
NOISE = "noise"  # not a model: re-noise x_0 to x_s with fresh ε (DRaFT-LV)
DENOISERS = (BASE, TUNED, SHORTCUT)

Denoiser = Callable[[torch.Tensor, float, "float | None"], torch.Tensor]
RewardFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- timesteps


def timestep(t) -> int | float:
    """A grid timestep as a plain Python number (an int when it is integral, else a float); anything else — a bool,
    a string, NaN, ±inf, a tensor with more than one element — is a TypeError or ValueError that says what to pass."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise TypeError(f"a timestep must be one number, got a tensor of shape {tuple(t.shape)}")
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"a timestep must be a number, got {type(t).__name__} {t!r}")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"a timestep must be finite, got {t}")
    return int(t) if t.is_integer() else t


def check_grid(grid: Iterable) -> list[int | float]:
    """The sampler's grid τ_N > … > τ_1 as plain numbers: non-empty, finite, strictly decreasing, none of them CLEAN
    (the chain adds the end point itself). One ValueError/TypeError naming what is wrong otherwise."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable):
        raise TypeError(f"the timestep grid must be a sequence of numbers, got {type(grid).__name__}")
    grid = [timestep(t) for t in grid]
    if not grid:
        raise ValueError("the timestep grid is empty: pass τ_N > … > τ_1, e.g. shortft.ddim_timesteps(50)")
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"the timestep grid must be strictly decreasing, got {grid[:5]}…")
    if grid[-1] <= CLEAN:
        raise ValueError(f"grid timesteps must be > {CLEAN} (CLEAN, the chain's end point, is added by the chain)")
    return grid


# ----------------------------------------------------------------------------- ε-prediction on ᾱ_t (DDIM)


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for t = 0 … T-1 (float64, CPU) and ᾱ of the chain's end point (diffusers'
    `final_alpha_cumprod`: 1 with `set_alpha_to_one=True`, ᾱ_0 otherwise, as in SD1.5). Its denoisers predict ε
    and its step is the DDIM step (`ddim_step`)."""

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_bar(self, t) -> float:
        """ᾱ_t as a Python float; t = CLEAN gives ᾱ_final, t = X0 (None) gives 1."""
        if t is None:
            return 1.0
        t = timestep(t)
        if t == CLEAN:
            return self.final_alpha_cumprod
        if not (isinstance(t, int) and 0 <= t < self.num_train_timesteps):
            raise ValueError(f"timestep {t} is outside the schedule: DDIM timesteps are integers in "
                             f"[0, {self.num_train_timesteps - 1}] (use shortft.CLEAN = -1 for the chain's end point)")
        return float(self.alphas_cumprod[t])

    def log_snr(self, t) -> float:
        """log(ᾱ_t / (1 − ᾱ_t)): the noise level of x_t, comparable across schedules (+inf at X0)."""
        a = self.alpha_bar(t)
        return math.inf if a >= 1 else math.log(a / (1 - a))

    def step(self, x_t: torch.Tensor, eps: torch.Tensor, t, s) -> torch.Tensor:
        """x_t → x_s with the model's ε (deterministic DDIM, η = 0); s = X0 returns x̂_0."""
        return ddim_step(x_t, eps, self.alpha_bar(t), self.alpha_bar(s))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x_0) at timestep t."""
        return add_noise(x0, noise, self.alpha_bar(t))


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


# ----------------------------------------------------------------------------- velocity prediction on σ_t (rectified flow)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow (SD3, SD3.5, FLUX): x_σ = (1 − σ) x_0 + σ ε with σ_t = t / T, the timestep numbering of
    diffusers' FlowMatchEulerDiscreteScheduler (T = 1000; its grids are float σ·1000); the chain's end point CLEAN
    and X0 have σ = 0. Its denoisers predict the velocity v ≈ ε − x_0 and its step is the Euler step (`flow_step`).
    In the DDIM reading, ᾱ-scaled: x̂_0 = x_σ − σ v and ε̂ = x_σ + (1 − σ) v."""

    num_train_timesteps: int = 1000

    def sigma(self, t) -> float:
        """σ_t = t / T; t = CLEAN or X0 (None) gives 0."""
        if t is None:
            return 0.0
        t = timestep(t)
        if t == CLEAN:
            return 0.0
        if not 0 <= t <= self.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside the flow schedule [0, {self.num_train_timesteps}] "
                             f"(σ·{self.num_train_timesteps}; use shortft.CLEAN = -1 for the chain's end point)")
        return t / self.num_train_timesteps

    def log_snr(self, t) -> float:
        """log((1 − σ)² / σ²): the noise level of x_σ in the same units as NoiseSchedule.log_snr (+inf at σ = 0)."""
        s = self.sigma(t)
        return math.inf if s <= 0 else -math.inf if s >= 1 else 2 * math.log((1 - s) / s)

    def step(self, x_t: torch.Tensor, v: torch.Tensor, t, s) -> torch.Tensor:
        """x_t → x_s with the model's velocity (one Euler step); s = X0 (or CLEAN) returns x̂_0 = x_t − σ_t v."""
        return flow_step(x_t, v, self.sigma(t), self.sigma(s))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The forward process at timestep t: x_σ = (1 − σ) x_0 + σ ε."""
        return flow_add_noise(x0, noise, self.sigma(t))


def flow_timesteps(num_steps: int = 28, shift: float = 3.0, num_train_timesteps: int = 1000) -> list[float]:
    """The Euler grid τ_N > … > τ_1 (σ·T, floats) exactly as diffusers' `FlowMatchEulerDiscreteScheduler(shift=…)
    .set_timesteps(N)` builds it (static shift, no Karras/exponential/beta sigmas):

        σ' = s σ / (1 + (s − 1) σ),  σ_i = shift'(linspace(1, σ'_min, N)),  σ'_min = shift'(1 / T)

    (σ'_min is shifted once when the scheduler is made and once more here, as diffusers does). SD3 (N = 28, s = 3):
    1000.0, 987.4, 974.1, …, 199.8, 110.9, 8.9."""
    import numpy as np

    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if not (isinstance(shift, numbers.Real) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    train = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    train = train / num_train_timesteps
    train = shift * train / (1 + (shift - 1) * train)  # the scheduler's own sigmas (float32)
    t_max, t_min = train[0].item() * num_train_timesteps, train[-1].item() * num_train_timesteps
    sigmas = np.linspace(t_max, t_min, num_steps) / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    steps = torch.from_numpy(sigmas).to(torch.float32) * num_train_timesteps
    return [timestep(t) for t in steps.tolist()]


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Rectified-flow forward process:  x_σ = (1 − σ) x_0 + σ ε."""
    s = _coef(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_predict_x0(x_t: torch.Tensor, v: torch.Tensor, sigma_t: float | torch.Tensor) -> torch.Tensor:
    """The clean-sample estimate of a velocity model:  x̂_0 = x_σ − σ v."""
    return x_t - _coef(sigma_t, x_t) * v


def flow_step(x_t: torch.Tensor, v: torch.Tensor, sigma_t: float | torch.Tensor,
              sigma_s: float | torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dσ = v from σ_t to σ_s (diffusers'
    FlowMatchEulerDiscreteScheduler.step):  x_s = x_t + (σ_s − σ_t) v.  σ_s = 0 gives x̂_0 = x_t − σ_t v.
    It is the DDIM step in the flow's parametrisation: x_s = (1 − σ_s) x̂_0 + σ_s ε̂ with ε̂ = x_t + (1 − σ_t) v."""
    return x_t + (_coef(sigma_s, x_t) - _coef(sigma_t, x_t)) * v


Schedule = "NoiseSchedule | FlowSchedule"


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022), of ε or of v alike:  ε̃ = ε_∅ + w (ε_c − ε_∅)."""
    return uncond + guidance_scale * (cond - uncond)


# ----------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class Segment:
    """One evaluation of denoiser `model` taking x_t to x_s (s < t), or a re-noising.

    model          BASE, TUNED or SHORTCUT (a key of the denoisers dict), or NOISE: draw fresh ε and
                   re-noise x to x_s with the schedule's forward process (DRaFT-LV).
    t, s           grid timesteps (s < t, but a NOISE segment goes back up); s = CLEAN (-1) ends the chain, s = X0
                   (None) returns x̂_0.
    grad           False: the whole step runs under no_grad and cuts the graph.
    checkpoint     recompute the step in backward instead of storing its activations.
    detach_input   the denoiser sees sg(x_t): gradient reaches x_t only through the step's skip term
                   (√(ᾱ_s/ᾱ_t) x_t for DDIM, x_t itself for the Euler step).
    detach_output  the model's output (ε or v) is computed under no_grad (the step stays linear in x_t), as
                   DRTune's untrained steps.
    """

    model: str
    t: int | float | None
    s: int | float | None
    grad: bool = True
    checkpoint: bool = False
    detach_input: bool = False
    detach_output: bool = False

    def __post_init__(self):
        if self.model not in (*DENOISERS, NOISE):
            raise ValueError(f"unknown denoiser {self.model!r} in a Segment: use one of {', '.join((*DENOISERS, NOISE))}")
        t, s = (None if v is None else timestep(v) for v in (self.t, self.s))
        if t is None or (self.model != NOISE and s is not None and not s < t):
            raise ValueError(f"a Segment goes from t to an earlier s (s < t, s = CLEAN or X0 at the end), got "
                             f"{self.t} → {self.s}")
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "s", s)


@dataclass
class Chain:
    """`trunk` runs from x_T; then each branch continues from the trunk's output and the loss is the
    mean reward over branches. Every method has one empty branch except DRaFT-LV (n re-noised copies)."""

    trunk: list[Segment]
    branches: list[list[Segment]] = field(default_factory=lambda: [[]])

    def segments(self) -> list[Segment]:
        return self.trunk + [s for b in self.branches for s in b]


def apply_segment(x: torch.Tensor, seg: Segment, denoisers: Mapping[str, Denoiser], schedule: Schedule) -> torch.Tensor:
    """x_t → x_s for one segment with the schedule's step (DDIM or Euler), honouring its gradient switches."""
    if seg.model == NOISE:
        return schedule.add_noise(x, torch.randn_like(x), seg.s)
    try:
        denoiser = denoisers[seg.model]
    except KeyError:
        raise KeyError(f"chain needs denoiser {seg.model!r} but only {sorted(denoisers)} were given") from None

    def step(x_t: torch.Tensor) -> torch.Tensor:
        x_in = x_t.detach() if seg.detach_input else x_t
        if seg.detach_output:
            with torch.no_grad():
                out = denoiser(x_in, seg.t, seg.s)
        else:
            out = denoiser(x_in, seg.t, seg.s)
        return schedule.step(x_t, out, seg.t, seg.s)

    if not seg.grad:
        with torch.no_grad():
            return step(x)
    if seg.checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(step, x, use_reentrant=False)
    return step(x)


def run_chain(
    x: torch.Tensor, segments: Sequence[Segment], denoisers: Mapping[str, Denoiser], schedule: Schedule
) -> torch.Tensor:
    """Run the segments in order from x (usually x_T ~ N(0, I))."""
    for seg in segments:
        x = apply_segment(x, seg, denoisers, schedule)
    return x


def chain_outputs(
    x_T: torch.Tensor, chain: Chain, denoisers: Mapping[str, Denoiser], schedule: Schedule
) -> list[torch.Tensor]:
    """The chain's end points: one tensor per branch."""
    x = run_chain(x_T, chain.trunk, denoisers, schedule)
    return [run_chain(x, branch, denoisers, schedule) for branch in chain.branches]


def reward_loss(
    x_T: torch.Tensor,
    chain: Chain,
    denoisers: Mapping[str, Denoiser],
    schedule: Schedule,
    reward_fn: RewardFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward backpropagation objective  L = −E[r(x_0)]  over the chain's branches.

    `reward_fn` maps the chain's end point (points, or latents it decodes itself) to (B,) rewards; any other shape
    is a ValueError. Returns (loss, rewards of the first branch, detached)."""
    rewards = []
    for x0 in chain_outputs(x_T, chain, denoisers, schedule):
        r = reward_fn(x0)
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (x0.shape[0],):
            shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"the reward must return one value per sample, shape ({x0.shape[0]},), got {shape}")
        rewards.append(r)
    loss = -torch.stack([r.mean() for r in rewards]).mean()
    return loss, rewards[0].detach()


def sampling_chain(grid: Sequence[float], points: Sequence[float] | None = None, model: str = TUNED) -> Chain:
    """The ordinary no-grad sampler over `grid` (DDIM or Euler steps), ending at CLEAN (evaluation and inference, not
    training): with `points`, TUNED where `active_loras` puts a LoRA and BASE elsewhere; `model=BASE` samples the
    base."""
    grid = check_grid(grid)
    if model == BASE:
        return Chain(_steps(BASE, _points(grid), grad=False))
    return Chain(_original_steps(grid, grid[0], grid[-1], points, grad=False))


def chain_cost(chain: Chain) -> dict[str, int]:
    """Denoiser evaluations of a chain: forward-only, with gradient, and recomputed by checkpointing."""
    evals = [s for s in chain.segments() if s.model != NOISE]
    return {
        "no_grad": sum(not s.grad for s in evals),
        "grad": sum(s.grad and not s.detach_output for s in evals),
        "skip_path_only": sum(s.grad and s.detach_output for s in evals),
        "checkpointed": sum(s.grad and s.checkpoint for s in evals),
    }


# ----------------------------------------------------------------------------- methods


def _points(grid: Sequence[float]) -> list[float]:
    """[τ_N, …, τ_1, CLEAN]: the chain visits these in order (the grid checked by `check_grid`)."""
    return check_grid(grid) + [CLEAN]


def _steps(model: str, points: Sequence[float], **kw) -> list[Segment]:
    return [Segment(model, t, s, **kw) for t, s in zip(points, points[1:])]


def _count(what: str, value, low: int, high: int) -> int:
    """A method's integer switch in [low, high]: TypeError for a non-integer (bools and floats included),
    ValueError out of range; the message names the switch and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer in [{low}, {high}], got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], got {value}")
    return int(value)


def full(grid: Sequence[float], checkpoint: bool = True) -> Chain:
    """Complete-chain reward backprop (DRaFT / AlignProp without truncation): N grad steps."""
    return Chain(_steps(TUNED, _points(grid), grad=True, checkpoint=checkpoint))


def draft_k(grid: Sequence[float], k: int = 1, checkpoint: bool = True) -> Chain:
    """DRaFT-K (Clark et al. 2024): N − K steps without gradient, the last K with gradient."""
    points = _points(grid)
    n = len(points) - 1
    k = _count("DRaFT-K's K (steps with gradient, at most the chain length)", k, 1, n)
    return Chain(
        _steps(TUNED, points[: n - k + 1], grad=False)
        + _steps(TUNED, points[n - k :], grad=True, checkpoint=checkpoint)
    )


def draft_lv(grid: Sequence[float], n: int = 2) -> Chain:
    """DRaFT-LV (Clark et al. 2024): x_0 with no gradient, then n times re-noise it to τ_1 with fresh ε (DDIM:
    x_τ1 = √ᾱ_τ1 x_0 + √(1−ᾱ_τ1) ε; flow: x_σ1 = (1 − σ_1) x_0 + σ_1 ε) and take one grad step τ_1 → x_0; the loss
    averages the n rewards."""
    points = _points(grid)
    n = _count("DRaFT-LV's n (re-noised copies, each one gradient evaluation)", n, 1, len(grid))
    t1 = points[-2]
    branch = [Segment(NOISE, CLEAN, t1), Segment(TUNED, t1, CLEAN, grad=True)]
    return Chain(_steps(TUNED, points, grad=False), [list(branch) for _ in range(n)])


def alignprop(
    grid: Sequence[float], k_min: int = 1, k_max: int | None = None, rng: random.Random | None = None,
    checkpoint: bool = True,
) -> Chain:
    """AlignProp (Prabhudesai et al. 2023): the full chain with gradient through the last K steps,
    K ~ U[k_min, k_max] drawn afresh each update (randomised truncated backprop)."""
    n = len(_points(grid)) - 1
    k_max = _count("AlignProp's k_max", n if k_max is None else k_max, 1, n)
    k_min = _count("AlignProp's k_min (at most k_max)", k_min, 1, k_max)
    k = (rng or random).randint(k_min, k_max)
    return draft_k(grid, k, checkpoint=checkpoint)


def refl(grid: Sequence[float], last: int = 10, rng: random.Random | None = None) -> Chain:
    """ReFL (ImageReward, Xu et al. 2023): no gradient down to a random step among the last `last` of the grid, then
    one grad evaluation that returns the model's x̂_0 directly (DDIM: (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t; flow: x_t − σ_t v_θ)."""
    points = _points(grid)
    n = len(points) - 1
    last = _count("ReFL's last (the graded step is drawn among the last this many)", last, 1, n)
    j = (rng or random).randrange(n - last, n)  # grid index of the graded step
    return Chain(_steps(TUNED, points[: j + 1], grad=False) + [Segment(TUNED, points[j], X0, grad=True)])


def drtune(
    grid: Sequence[float], k: int = 5, rng: random.Random | None = None, checkpoint: bool = True
) -> Chain:
    """DRTune (Wu et al. 2024): every step's denoiser sees sg(x_t), so the gradient travels along the step's skip
    path only (DDIM: the √(ᾱ_s/ᾱ_t)-scaled x_t; Euler: x_t itself); K evenly spaced steps (random offset) pass
    gradient into θ."""
    points = _points(grid)
    n = len(points) - 1
    k = _count("DRTune's K (steps whose output carries gradient)", k, 1, n)
    stride = n // k
    offset = (rng or random).randrange(stride)
    trained = {offset + i * stride for i in range(k)}
    return Chain([
        Segment(TUNED, t, s, grad=True, detach_input=True, detach_output=i not in trained,
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


def check_lora_points(points: Sequence[float], grid: Sequence[float]) -> tuple[int | float, ...]:
    """LoRA points must be grid timesteps, strictly decreasing, the last one the grid's last step."""
    grid = check_grid(grid)
    if isinstance(points, (str, bytes)) or not isinstance(points, Iterable):
        raise TypeError(f"LoRA points must be a sequence of grid timesteps, got {type(points).__name__}")
    points = tuple(timestep(p) for p in points)
    if not points:
        raise ValueError(f"LoRA points are empty: give at least one grid timestep, e.g. {' '.join(map(str, grid[::12]))}")
    off = [p for p in points if p not in set(grid)]
    if off:
        raise ValueError(f"LoRA point(s) {off} are not on the {len(grid)}-step grid ({grid[0]}, "
                         f"{grid[1] if len(grid) > 1 else '…'}, …, {grid[-1]}): choose grid timesteps (on a grid "
                         f"other than SD1.5's, shortft.paper_points gives the paper's layout)")
    if any(a <= b for a, b in zip(points, points[1:])):
        raise ValueError(f"LoRA points {list(points)} must be strictly decreasing")
    if points[-1] != grid[-1]:
        raise ValueError(f"the last LoRA point must be the grid's last step {grid[-1]} (it makes x_0), got {points[-1]}")
    return points


def paper_points(grid: Sequence[float], schedule: Schedule | None = None) -> tuple[int | float, ...]:
    """The paper's layout on any grid (this repo's reading; the paper gives only SD1.5's 761, 501, 261, 1): each of
    p_1 … p_{k−1} moves to the grid step whose noise level log(SNR) (`schedule.log_snr`) is nearest that of the
    paper's point under SD1.5's schedule, and p_k is the grid's last step. On SD1.5's 50-step grid this is the
    paper's points exactly; on SD3's 28-step flow grid (shift 3) it is 814.3, 602.2, 409.3, 8.9 (grid steps 11, 18,
    22, 27 of 0 … 27). `schedule` defaults to SD1.5's DDIM schedule."""
    grid = check_grid(grid)
    schedule = make_schedule() if schedule is None else schedule
    reference = make_schedule()
    levels = {t: schedule.log_snr(t) for t in grid}
    points = [min(grid, key=lambda t: abs(levels[t] - reference.log_snr(p))) for p in PAPER_LORA_POINTS[:-1]]
    points.append(grid[-1])
    if any(a <= b for a, b in zip(points, points[1:])):
        raise ValueError(f"the {len(grid)}-step grid is too short for the paper's {len(PAPER_LORA_POINTS)} distinct "
                         f"LoRA points (its noise levels give {points}): use more steps or give the points yourself")
    return tuple(points)


def active_loras(t, points: Sequence[float] | None = None, timestep_aware: bool = True) -> tuple[int, ...]:
    """Which LoRA branches act at timestep t (index i is the paper's LoRA_{i+1}) — the one place that decides it,
    used by the training chains, the ordinary sampler and the saved model alike:

        t ≥ p_1          (0,)            segment 1: LoRA_1 at every step
        t = p_i, i ≥ 2   (0, 1, …, i−1)  stacked timestep-aware LoRA: ΔW_1 + … + ΔW_i
        otherwise        ()              the base model (the intervals the shortcut replaces in training)

    `points=None` is a single LoRA at every step (every baseline). `timestep_aware=False` is the paper's ablation
    "without timestep-aware LoRA": one LoRA, (0,), at the same places."""
    if points is None:
        return (0,)
    t, points = timestep(t), list(points)
    if not points or any(a <= b for a, b in zip(points, points[1:])):
        raise ValueError(f"LoRA points {points} must be non-empty and strictly decreasing (shortft.check_lora_points)")
    if t >= points[0]:
        return (0,)
    if t not in points:
        return ()
    return tuple(range(points.index(t) + 1)) if timestep_aware else (0,)


def num_loras(points: Sequence[float] | None = None, timestep_aware: bool = True) -> int:
    """Number of LoRA branches: k = len(points) when timestep-aware, else 1."""
    return len(points) if points is not None and timestep_aware else 1


def lora_names(n: int) -> list[str]:
    """Adapter names of the n trainable LoRA branches: tuned_1 … tuned_n (the paper's LoRA_1 … LoRA_k)."""
    return [f"tuned_{i + 1}" for i in range(n)]


def trainable_loras(stage: int, points: Sequence[float] | None = None, timestep_aware: bool = True) -> tuple[int, ...]:
    """Progressive training: stage i optimises LoRA_i … LoRA_k (indices i−1 … k−1). With one LoRA, always (0,)."""
    n = num_loras(points, timestep_aware)
    if n == 1:
        return (0,)
    stage = _count("the stage (one per LoRA point)", stage, 1, n)
    return tuple(range(stage - 1, n))


def _next_point(grid: Sequence[float], t) -> int | float:
    """The grid point after t (CLEAN after the last)."""
    return [*grid, CLEAN][list(grid).index(t) + 1]


def _original_steps(grid, t_from, t_to, points, **kw) -> list[Segment]:
    """The original chain's steps at grid timesteps t_from ≥ t ≥ t_to: TUNED where a LoRA acts, BASE elsewhere."""
    return [Segment(TUNED if active_loras(t, points) else BASE, t, _next_point(grid, t), **kw)
            for t in grid if t_from >= t >= t_to]


def shortft(
    grid: Sequence[float],
    points: Sequence[float] | None = None,
    stage: int = 1,
    segment1_grad_steps: int = 1,
    prefix: str = "original",
    checkpoint: bool = False,
    schedule: Schedule | None = None,
) -> Chain:
    """ShortFT's shortcut-based chain for progressive-training stage i = `stage` (paper Sec. 3):

        x_T ─ original chain down to p_i, no grad ─▶ step θ at p_i (grad)
            ─ for j = i+1 … k: shortcut jump next(p_{j−1}) → p_j, step θ at p_j (grad) ─▶ x_0

    θ is the tuned model with the LoRAs `active_loras(t)` picks; the jumps stand in for the base model that
    inference runs between LoRA points, so no LoRA is active inside them. Stage 1's "original chain" is segment 1
    (981 … 761 with LoRA_1 on SD1.5), of which the last `segment1_grad_steps` steps carry gradient (1: the paper's
    chain of ≈ 7 evaluations). `prefix="shortcut"` replaces the skipped intervals before p_i by no-grad jumps as well
    (cheaper, but the training/inference mismatch the stages remove comes back). No gradient checkpointing by
    default: the chain is short (the paper counts this as a memory win). `points=None`: the paper's layout on this
    grid, `paper_points(grid, schedule)` (SD1.5's 761, 501, 261, 1 on its 50-step grid; pass `schedule` on a flow
    grid)."""
    grid = check_grid(grid)
    points = paper_points(grid, schedule) if points is None else check_lora_points(points, grid)
    k = len(points)
    stage = _count(f"stage ({k} LoRA points give stages 1 … {k})", stage, 1, k)
    seg1 = [t for t in grid if t >= points[0]]
    segment1_grad_steps = _count(f"segment1_grad_steps (segment 1 has {len(seg1)} steps: {seg1[0]} … {seg1[-1]})",
                                 segment1_grad_steps, 1, len(seg1))
    if prefix not in ("original", "shortcut"):
        raise ValueError(f"unknown prefix {prefix!r}: use 'original' or 'shortcut'")
    p_i = points[stage - 1]
    grad_from = seg1[-segment1_grad_steps] if stage == 1 else p_i
    trunk = []
    if prefix == "original" or stage == 1:
        trunk += [s for s in _original_steps(grid, grid[0], grad_from, points, grad=False) if s.t > grad_from]
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


def make_chain(method: str, grid: Sequence[float], rng: random.Random | None = None, **switches) -> Chain:
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
