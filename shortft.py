"""ShortFT: reward backpropagation through a shortcut-based denoising chain.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 (Sec. 3: reward backpropagation, the shortcut-based chain).

Everything here is model-agnostic: `x` may be (B, 2) toy points or (B, 4, 64, 64) SD latents.
A *denoiser* is any callable ``eps = denoiser(x_t, t, s)`` (ε-prediction at integer timestep t; s is
the end of the step, ignored by ordinary ε-models and used by shortcut models that jump t → s).
Conditioning, classifier-free guidance and adapter switching live inside that callable.

A *chain* is a list of `Segment`s, one denoiser evaluation each, run by `run_chain`. ShortFT and
every baseline (DRaFT-K, DRaFT-LV, AlignProp, ReFL, DRTune, the complete chain) are functions that
return such a list, so the methods differ only in *which* segments carry gradient.

Notation (code -> paper):
    alphas_cumprod[t]  ᾱ_t           grid            τ_N > … > τ_1 (DDIM timesteps)
    x_t, eps           x_t, ε_θ(x_t)  CLEAN (= -1)    end of the chain, ᾱ = ᾱ_final (SD1.5: ᾱ_0)
    predict_x0         x̂_0 (Eq. DDIM) X0 (= None)     "jump straight to x̂_0" (ᾱ_s = 1, ReFL)
    k                  index of the trained step τ_k → τ_{k-1} on the grid
    M                  shortcut jumps from τ_{k-1} to the clean sample

Run: python -c "import shortft; print(shortft.ddim_timesteps(50))"
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

Denoiser = Callable[[torch.Tensor, int, "int | None"], torch.Tensor]
RewardFn = Callable[[torch.Tensor], torch.Tensor]

METHODS = ("shortft", "full", "draft_k", "draft_lv", "alignprop", "refl", "drtune")


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

    model        key into the denoisers dict ("tuned", "shortcut", "shortcut+tuned", …), or
                 "noise": draw fresh ε and return x_s = √ᾱ_s x + √(1 − ᾱ_s) ε (DRaFT-LV).
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
    if seg.model == "noise":
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


def sampling_chain(grid: Sequence[int], model: str = "tuned") -> Chain:
    """The ordinary no-grad DDIM sampler over `grid`, ending at CLEAN (evaluation, not training)."""
    return Chain(_steps(model, _points(grid), grad=False))


def chain_cost(chain: Chain) -> dict[str, int]:
    """Denoiser evaluations of a chain: forward-only, with gradient, and recomputed by checkpointing."""
    evals = [s for s in chain.segments() if s.model != "noise"]
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
    return Chain(_steps("tuned", _points(grid), grad=True, checkpoint=checkpoint))


def draft_k(grid: Sequence[int], k: int = 1, checkpoint: bool = True) -> Chain:
    """DRaFT-K (Clark et al. 2024): N − K steps without gradient, the last K with gradient."""
    points = _points(grid)
    n = len(points) - 1
    if not 1 <= k <= n:
        raise ValueError(f"DRaFT-K needs 1 ≤ K ≤ {n} (the chain length), got K={k}")
    return Chain(
        _steps("tuned", points[: n - k + 1], grad=False)
        + _steps("tuned", points[n - k :], grad=True, checkpoint=checkpoint)
    )


def draft_lv(grid: Sequence[int], n: int = 2) -> Chain:
    """DRaFT-LV (Clark et al. 2024): x_0 with no gradient, then n times re-noise to τ_1 with fresh ε
    and take one grad step τ_1 → x_0; the loss averages the n rewards."""
    if n < 1:
        raise ValueError(f"DRaFT-LV needs n ≥ 1 re-noised copies, got {n}")
    points = _points(grid)
    t1 = points[-2]
    branch = [Segment("noise", CLEAN, t1), Segment("tuned", t1, CLEAN, grad=True)]
    return Chain(_steps("tuned", points, grad=False), [list(branch) for _ in range(n)])


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
    return Chain(_steps("tuned", points[: j + 1], grad=False) + [Segment("tuned", points[j], X0, grad=True)])


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
        Segment("tuned", t, s, grad=True, detach_input=True, detach_eps=i not in trained,
                checkpoint=checkpoint and i in trained)
        for i, (t, s) in enumerate(zip(points, points[1:]))
    ])


def timestep_range_index(t: int, boundaries: Sequence[int]) -> int:
    """Which timestep-aware LoRA owns timestep t. `boundaries` split [0, T) into ranges, e.g.
    (500,) → range 0 is t ≥ 500 (early, noisy steps), range 1 is t < 500."""
    return sum(t < b for b in sorted(boundaries, reverse=True))


def draw_trained_step(
    grid: Sequence[int], rng: random.Random | None = None, sampling: str = "uniform",
    boundaries: Sequence[int] = (), update: int = 0,
) -> int:
    """Grid index k of ShortFT's trained step τ_k → τ_{k−1} (k = 0 is the first, noisiest step).

    uniform     k ~ U{0, …, N−1}
    stratified  cycle over the timestep-aware LoRA ranges by update number, k uniform inside the range,
                so every adapter is trained equally often.
    """
    rng = rng or random
    n = len(grid)
    if sampling == "uniform":
        return rng.randrange(n)
    if sampling == "stratified":
        ranges: dict[int, list[int]] = {}
        for i, t in enumerate(grid):
            ranges.setdefault(timestep_range_index(t, boundaries), []).append(i)
        owned = [ranges[r] for r in sorted(ranges)]
        return rng.choice(owned[update % len(owned)])
    raise ValueError(f"unknown trained-step sampling {sampling!r}: use 'uniform' or 'stratified'")


def shortft(
    grid: Sequence[int],
    k: int | None = None,
    jumps_before: int = 2,
    jumps_after: int = 4,
    trained_steps: int = 1,
    lora_in_shortcut: bool = False,
    rng: random.Random | None = None,
    sampling: str = "uniform",
    boundaries: Sequence[int] = (),
    update: int = 0,
    checkpoint: bool = True,
) -> Chain:
    """ShortFT's shortcut-based chain (paper Sec. 3):

        x_T ─ shortcut, `jumps_before` jumps, no grad ─▶ x_{τ_k}
            ─ `trained_steps` DDIM steps of the tuned model, grad ─▶ x_{τ_{k−n}}
            ─ shortcut, M = `jumps_after` jumps, grad, checkpointed ─▶ x_0
              (at most one jump per remaining timestep, so fewer than M right before x_0)

    The trained step receives the complete, untruncated reward gradient through a chain only
    M + n evaluations long. `k` is drawn by `draw_trained_step` unless given; `lora_in_shortcut`
    keeps the trainable LoRA active inside every shortcut jump (denoiser "shortcut+tuned"), so the
    chain approximates the tuned model's own chain end to end: the trained step starts from the tuned
    model's states (as every baseline's no-grad prefix does) and the gradient flows through its jumps.
    """
    points = _points(grid)
    n = len(grid)
    if not 1 <= trained_steps <= n:
        raise ValueError(f"ShortFT needs 1 ≤ trained_steps ≤ {n}, got {trained_steps}")
    if k is None:
        k = draw_trained_step(grid[: n - trained_steps + 1], rng, sampling, boundaries, update)
    if not 0 <= k <= n - trained_steps:
        raise ValueError(f"trained step index k={k} is outside [0, {n - trained_steps}] for a {n}-step grid")
    shortcut = "shortcut+tuned" if lora_in_shortcut else "shortcut"
    t_k, t_end = points[k], points[k + trained_steps]
    trunk: list[Segment] = []
    if k > 0:
        before = jump_timesteps(points[0], t_k, min(jumps_before, points[0] - t_k))
        trunk += _steps(shortcut, before, grad=False)
    trunk += _steps("tuned", points[k : k + trained_steps + 1], grad=True, checkpoint=checkpoint)
    if t_end != CLEAN:
        after = jump_timesteps(t_end, CLEAN, min(jumps_after, t_end - CLEAN))
        trunk += _steps(shortcut, after, grad=True, checkpoint=checkpoint)
    return Chain(trunk)


def make_chain(method: str, grid: Sequence[int], rng: random.Random | None = None, **switches) -> Chain:
    """The training chain of `method` (one of METHODS) with its switches, drawn afresh per update."""
    builders = {"shortft": shortft, "full": full, "draft_k": draft_k, "draft_lv": draft_lv,
                "alignprop": alignprop, "refl": refl, "drtune": drtune}
    if method not in builders:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    builder = builders[method]
    accepted = set(inspect.signature(builder).parameters) - {"grid"}
    unknown = sorted(set(switches) - accepted)
    if unknown:
        raise ValueError(f"bad switch for method {method!r}: {', '.join(unknown)} "
                         f"(it takes {', '.join(sorted(accepted - {'rng'}))})")
    if "rng" in accepted:
        switches["rng"] = rng
    return builder(grid, **switches)


# ----------------------------------------------------------------------------- update


def grad_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """‖∇‖₂ over all parameters that have a gradient (inf/nan propagate)."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def guarded_step(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], max_grad_norm: float | None = 1.0
) -> tuple[bool, float]:
    """Clip and apply the update unless the gradient is NaN/inf, in which case the gradients are
    dropped and nothing reaches the weights. Returns (applied, gradient norm before clipping)."""
    norm = grad_norm(params)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False, float(norm)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True, float(norm)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened gradients."""
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
