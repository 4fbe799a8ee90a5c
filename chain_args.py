"""The chain's command-line switches, shared by every world and script: one flag, one meaning, one default.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3 (LoRA points, timestep-aware LoRA, progressive training) and the baselines
of its Table 1. This file is glue, not the method: it turns `ChainArgs` into the keyword arguments of
`shortft.make_chain` and checks them against the world's grid before anything is built. `train_toy.Args`,
`train_sd.Args` and `bench_sd.Args` extend `ChainArgs`. It also holds how long each progressive-training stage
lasts (`stage_at`, `stage_of`: the paper does not say; k equal shares of the budget unless --stage-fractions).

Notation (code -> paper): points p_1 > … > p_k the LoRA points; stage i of progressive training; progress ∈ [0, 1] the
share of the training budget spent; grid τ_N > … > τ_1 the world's sampler (SD1.5 and the toy: 50 DDIM steps
981 … 1; SD3: 28 Euler steps on σ·1000).

Run: python -c "import chain_args, shortft; a = chain_args.ChainArgs(); g = shortft.ddim_timesteps(50); \
print(chain_args.layout(a, g, shortft.make_schedule()))"
"""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import shortft


@dataclass
class ChainArgs:
    """The chain's switches, shared by every world: `train_toy.Args` and `train_sd.Args` extend this class, so a flag
    means the same thing, with the same default, in both scripts."""

    method: str = "shortft"
    """shortft | full | draft_k | draft_lv | alignprop | refl | drtune (shortft.METHODS)"""
    num_steps: int = 0
    """N, steps of the sampler being fine-tuned (0: the world's own: 50 DDIM steps 981 … 1 for SD1.5 and the toy, 28
    Euler steps for SD3)"""
    lora_points: list[float] = field(default_factory=list)
    """ShortFT: LoRA points p_1 > … > p_k, timesteps of the grid (the last is the grid's last step; on a flow grid σ·1000
    to one decimal, e.g. 814.3); k segments. Empty: the paper's 761 501 261 1 on SD1.5's 50-step grid, and on any other
    grid the steps of the same noise level (shortft.paper_points; SD3: 814.3 602.2 409.3 8.9)"""
    timestep_aware: bool = True
    """ShortFT: one stacked LoRA branch per point (LoRA_i = LoRA_{i−1} + a new branch); --no-timestep-aware is the
    paper's ablation: one LoRA shared at the same places"""
    progressive: bool = True
    """ShortFT: progressive training in k stages; --no-progressive is the paper's ablation (stage 1 throughout)"""
    stage_fractions: list[float] = field(default_factory=list)
    """ShortFT: share of the training budget each stage gets (empty: k equal shares)"""
    segment1_grad_steps: int = 1
    """ShortFT: steps of segment 1 (τ_N … p_1) that carry gradient in stage 1 (1: only the last; all of them: 12 on
    SD1.5's grid)"""
    prefix: str = "original"
    """ShortFT: what runs before p_i in stage i ≥ 2: 'original' (the N-step chain) or 'shortcut' (no-grad jumps)"""
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
    """DRTune: steps whose denoiser output carries gradient"""


def grid_points(values: Sequence[float], grid: Sequence[float], tolerance: float = 0.05) -> list[float]:
    """`--lora-points` as grid timesteps: a value on the grid as it is, a value within `tolerance` of a grid timestep
    as that timestep (a flow grid's timesteps are floats such as 814.3247: typing 814.3 names it); any other value is
    left as typed, for `shortft.check_lora_points` to refuse."""
    grid = [shortft.timestep(t) for t in grid]
    snapped = []
    for v in values:
        near = min(grid, key=lambda t: abs(t - v)) if grid and not isinstance(v, bool) \
            and isinstance(v, (int, float)) else None
        snapped.append(near if near is not None and abs(near - v) <= tolerance else v)
    return snapped


def layout(args: ChainArgs, grid: Sequence[float], schedule) -> tuple[tuple[float, ...] | None, bool]:
    """(LoRA points, timestep-aware) of the method on `grid`: ShortFT's points (`--lora-points`, each the grid
    timestep it names, `grid_points`; or the paper's mapped to the grid by `shortft.paper_points`); None (one LoRA at
    every step) for every baseline."""
    if args.method != "shortft":
        return None, False
    if args.lora_points:
        return shortft.check_lora_points(grid_points(args.lora_points, grid), grid), args.timestep_aware
    return shortft.paper_points(grid, schedule), args.timestep_aware


def num_stages(args: ChainArgs, grid: Sequence[float], schedule) -> int:
    """Progressive stages of the run: k for ShortFT with progressive training, else 1."""
    points, _ = layout(args, grid, schedule)
    return len(points) if points and args.progressive else 1


def stage_at(progress: float, k: int, fractions: Sequence[float] = ()) -> int:
    """The progressive-training stage (1 … k) at `progress` ∈ [0, 1] of the training budget. Stage i lasts
    fractions[i−1] of the budget (empty: k equal parts; the paper does not say how long each stage lasts)."""
    k = shortft._count("the number of stages", k, 1, 1 << 20)
    if isinstance(progress, bool) or not isinstance(progress, numbers.Real) or math.isnan(progress):
        raise TypeError(f"progress must be a number in [0, 1], got {progress!r}")
    fractions = list(fractions) or [1.0 / k] * k
    if len(fractions) != k or any(not (isinstance(f, numbers.Real) and math.isfinite(f) and f > 0) for f in fractions):
        raise ValueError(f"stage fractions {fractions} must be {k} positive numbers (one per stage)")
    edge, total = 0.0, sum(fractions)
    for i, f in enumerate(fractions, start=1):
        edge += f / total
        if progress < edge:
            return i
    return k


def stage_of(args: ChainArgs, progress: float, k: int) -> int:
    """The stage at `progress` ∈ [0, 1] of the budget among `k` = `num_stages(…)` stages (`stage_at`).
    Without timestep-aware LoRA the stages still change the chain (original prefix down to p_i); only the one shared
    LoRA is trained in all of them, so each Table 3 ablation changes exactly one thing."""
    return stage_at(progress, k, args.stage_fractions) if k > 1 else 1


def chain_switches(args: ChainArgs, points: Sequence[float] | None, stage: int = 1) -> dict:
    """The keyword arguments `make_chain(args.method, grid, rng, **…)` needs, from the shared arguments and the points
    `layout` resolved."""
    return {
        "shortft": dict(points=tuple(points or ()), stage=stage, segment1_grad_steps=args.segment1_grad_steps,
                        prefix=args.prefix, checkpoint=args.checkpoint_segments),
        "full": {}, "draft_k": dict(k=args.draft_k), "draft_lv": dict(n=args.draft_lv_n),
        "alignprop": dict(k_min=args.alignprop_k_min, k_max=args.alignprop_k_max or None),
        "refl": dict(last=args.refl_last), "drtune": dict(k=args.drtune_k),
    }[args.method]


def check_chain_args(args: ChainArgs, grid: Sequence[float] | None = None, schedule=None) -> None:
    """One-line errors `--flag VALUE: what is wrong` for chain settings that cannot work on `grid` (default: the
    N-step DDIM grid of SD1.5's schedule), before any model is built, in field order: every switch against the grid
    (also the switches of methods other than `method`, which a benchmark times with the same arguments), ShortFT's
    layout when the method is ShortFT, then the method's chain for stage 1 and for its last stage."""

    def check(name: str, test: Callable[[], object]) -> None:
        try:
            test()
        except (ValueError, TypeError) as e:
            value = getattr(args, name)
            shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
                if isinstance(value, (list, tuple)) else str(value)
            raise ValueError(f"--{name.replace('_', '-')} {shown or '(empty)'}: {e}") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    def on_grid(test: Callable[[], object]) -> None:  # a point off a float (flow) grid: list the grid to choose from
        try:
            test()
        except ValueError as e:
            if "are not on the" in str(e) and any(isinstance(t, float) for t in grid):
                raise ValueError(f"{e}; the grid: {' '.join(f'{t:.1f}' for t in grid)}") from None
            raise

    check("method", lambda: need(args.method in shortft.BUILDERS,
                                 f"unknown method; choose one of {', '.join(shortft.METHODS)}"))
    check("num_steps", lambda: need(isinstance(args.num_steps, int) and 0 <= args.num_steps <= 1000,
                                    "must be in [0, 1000] (0: the world's own sampler)"))
    if grid is None:
        grid, schedule = shortft.ddim_timesteps(args.num_steps or 50), shortft.make_schedule()
    n = len(grid)
    points = None
    if args.method == "shortft":
        if args.lora_points:
            check("lora_points", lambda: on_grid(lambda: shortft.check_lora_points(grid_points(args.lora_points, grid),
                                                                                  grid)))
        else:
            check("lora_points", lambda: shortft.paper_points(grid, schedule))
        points, _ = layout(args, grid, schedule)
        check("stage_fractions", lambda: stage_at(0.0, len(points), args.stage_fractions))
        seg1 = len([t for t in grid if t >= points[0]])
        check("segment1_grad_steps", lambda: need(1 <= args.segment1_grad_steps <= seg1,
                                                  f"must be in [1, {seg1}] (segment 1 has {seg1} steps)"))
    else:
        check("stage_fractions", lambda: need(all(f > 0 for f in args.stage_fractions), "must be positive numbers"))
        check("segment1_grad_steps", lambda: need(args.segment1_grad_steps >= 1, "must be ≥ 1"))
    check("prefix", lambda: need(args.prefix in ("original", "shortcut"), "use 'original' or 'shortcut'"))
    check("draft_k", lambda: shortft.draft_k(grid, args.draft_k))
    check("draft_lv_n", lambda: need(1 <= args.draft_lv_n <= n, f"DRaFT-LV needs 1 ≤ n ≤ {n} re-noised copies (each "
                                                                 "costs one gradient evaluation)"))
    check("alignprop_k_min", lambda: need(1 <= args.alignprop_k_min <= n, f"AlignProp needs 1 ≤ k_min ≤ {n}"))
    rng = random.Random(0)  # the checks draw nothing from the global RNGs a run is seeded with
    check("alignprop_k_max", lambda: shortft.alignprop(grid, args.alignprop_k_min, args.alignprop_k_max or None, rng))
    check("refl_last", lambda: shortft.refl(grid, args.refl_last, rng))
    check("drtune_k", lambda: shortft.drtune(grid, args.drtune_k, rng))
    k = len(points) if points is not None and args.progressive else 1
    for stage in {1, k}:
        check("method", lambda: shortft.make_chain(args.method, grid, rng, **chain_switches(args, points, stage)))


# ----------------------------------------------------------------------------- fail fast (not the method: glue)


PROBE_PARTS = {shortft.BASE: ("base model", "the model's weights (--model)"),
               shortft.TUNED: ("tuned model", "the LoRA branches (--lora-alpha, or the checkpoint resumed)"),
               shortft.SHORTCUT: ("shortcut", "the shortcut's weights (--shortcut, --shortcut-scale)"),
               "chain": ("chain", "the weights of the model, the LoRA branches and the shortcut"),
               "decoder": ("decoder", "the VAE's weights"),
               "reward": ("reward", "--reward (its weights, its model or classifier)")}
"""What the fail-fast probe names (each part of a chain, and what to check when it gives NaN/inf)."""


def probe_chain(chain: shortft.Chain, x_T, denoisers: dict, schedule, reward: Callable, decode: Callable | None = None,
                ) -> None:
    """Before training, once: every denoiser (called at the chain's first timestep), then the chain, the decoder and
    the reward (on the chain's end) must give finite outputs, the reward one value per sample. A run that cannot
    learn (every update would be skipped) stops here with one line (runio.RunError) saying which part is at fault.
    No gradient; the random streams are left as they were (the probe draws from a fork of them)."""
    import torch

    import runio

    def need(out, part: str, at: str = "") -> None:
        if not isinstance(out, torch.Tensor) or not bool(torch.isfinite(out.float()).all()):
            name, hint = PROBE_PARTS.get(part, (part, part))
            raise runio.RunError(f"the run cannot learn: the {name} gives NaN/inf{at}: check {hint}")

    segments = chain.segments()
    t0 = segments[0].t
    t1 = next((s.s for s in segments if s.s not in (shortft.CLEAN, shortft.X0)), shortft.CLEAN)
    with torch.no_grad(), torch.random.fork_rng():
        for part, fn in denoisers.items():
            need(fn(x_T, t0, t1), part, f" at t = {t0:g}")
        x0 = shortft.chain_outputs(x_T, chain, denoisers, schedule)[0]
        need(x0, "chain", " at its end")  # a denoiser finite at t0 but not later
        image = x0 if decode is None else decode(x0)
        need(image, "decoder")
        r = reward(image)
        need(r, "reward")
        if tuple(r.shape) != (x_T.shape[0],):
            raise runio.RunError(f"the reward gives shape {tuple(r.shape)}, not one value per sample ({x_T.shape[0]},)")


def stage_gaps(args: ChainArgs, k: int, updates: int) -> str | None:
    """One line if a budget of `updates` updates leaves a progressive stage of the `k` without any update (stage i
    gets the updates whose progress u / updates falls in its share), else None."""
    seen = {stage_of(args, u / updates, k) for u in range(updates)} if k > 1 else {1}
    missing = [s for s in range(1, k + 1) if s not in seen]
    return (f"warning: {updates} updates for {k} progressive stages: stage(s) {' '.join(map(str, missing))} get no "
            f"update; give at least {k} updates (or --no-progressive)") if missing else None


def stage_jump(prev: int | None, stage: int, update: int) -> str | None:
    """One line if progressive training went from stage `prev` straight to `stage`, past stages no update trained
    (a budget in GFLOP or seconds too small for every stage), else None."""
    if prev is None or stage <= prev + 1:
        return None
    return (f"warning: update {update + 1} is in stage {stage}: stage(s) {' '.join(map(str, range(prev + 1, stage)))} "
            f"got no update; give a larger budget (or --no-progressive)")
