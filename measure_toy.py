"""Measurements of the paper's claims on the toy world: shortcut accuracy, gradient fidelity and bias, gradient norm.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3: the shortcut-based chain stands in for the original 50-step chain, so
(1) the shortcut must land where the original chain lands, and (2) the reward gradient ShortFT sends into each LoRA
branch should point where the exact gradient of the *same* parametrisation through the original chain points.

    exact chain   the ordinary 50-step sampler with gradient at every step: LoRA_1 on 981 … 761, the base between the
                  LoRA points, the stacked LoRA_1 + … + LoRA_i at p_i (shortft.sampling_chain, every step grad=True)
    cos_j         cos(∇_{tuned_j} L of ShortFT's chain, ∇_{tuned_j} L of the exact chain), same x_T and classes
    bias          for any method: cos(E_d g_d, g*) of its draws d against the exact gradient g* of its own
                  parametrisation (one LoRA at every step for the baselines), next to one draw's cos(g_d, g*)

Notation (code -> paper): points p_1 > … > p_k; stage i; R the ring radius; M shortcut jumps.

Run: python -c "import measure_toy as m, toy; w = toy.build_toy(toy.WorldArgs(), (761, 501, 261, 1)); print(m.chain_jump_errors(w, *toy.eval_batch(toy.WorldArgs(), 256), 2.0))"
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import torch

import shortft
import toy
from shortft import BASE, CLEAN, Chain


# ----------------------------------------------------------------------------- shortcut accuracy


@torch.no_grad()
def base_trajectory(world: toy.Toy, x_T: torch.Tensor, cond: torch.Tensor) -> dict[int, torch.Tensor]:
    """The base's 50-step DDIM states: {t: x_t} for every grid timestep t, and CLEAN: x_0."""
    den = toy.make_denoisers(world, cond)
    states, x = {}, x_T
    for seg in shortft.sampling_chain(world.grid, model=BASE).trunk:
        states[seg.t] = x
        x = shortft.apply_segment(x, seg, den, world.schedule)
    states[CLEAN] = x
    return states


@torch.no_grad()
def trajectory_errors(world: toy.Toy, x_T, cond, radius: float, jumps: Sequence[int] = (1, 2, 4, 8)) -> dict:
    """‖x_0(M shortcut jumps from x_T) − x_0(base, 50 steps)‖ / R (mean, 95th percentile) per M, next to the base's
    own M-step DDIM (what a chain of M evaluations gets without a shortcut)."""
    ref = base_trajectory(world, x_T, cond)[CLEAN]
    out = {}
    for m in jumps:
        err = (toy.shortcut_sample(world, x_T, cond, world.grid[0], CLEAN, m) - ref).norm(dim=1) / radius
        few = dataclasses.replace(world, grid=shortft.ddim_timesteps(m))
        ddim = (toy.sample(few, x_T, cond, BASE) - ref).norm(dim=1) / radius
        out[str(m)] = {"mean": err.mean().item(), "p95": err.quantile(0.95).item(), "ddim_mean": ddim.mean().item()}
    return out


@torch.no_grad()
def chain_jump_errors(world: toy.Toy, x_T, cond, radius: float, points: Sequence[int] = shortft.PAPER_LORA_POINTS) -> dict:
    """For each jump of ShortFT's chain, next(p_{i−1}) → p_i (paper: 741→501, 481→261, 241→1): from the state of the
    base's 50-step trajectory at its start, ‖x_{p_i}(one shortcut jump) − x_{p_i}(base trajectory)‖ / R (mean, 95th
    percentile), next to the base's own one-step DDIM over the same interval (`ddim_mean`)."""
    traj, den = base_trajectory(world, x_T, cond), toy.make_denoisers(world, cond)
    out = {}
    for prev, p in zip(points, points[1:]):
        t = world.grid[world.grid.index(prev) + 1]
        if t == p:
            continue
        jump = shortft.apply_segment(traj[t], shortft.Segment(shortft.SHORTCUT, t, p), den, world.schedule)
        one = shortft.apply_segment(traj[t], shortft.Segment(BASE, t, p), den, world.schedule)
        err, err_ddim = ((y - traj[p]).norm(dim=1) / radius for y in (jump, one))
        out[f"{t}->{p}"] = {"mean": err.mean().item(), "p95": err.quantile(0.95).item(), "ddim_mean": err_ddim.mean().item()}
    return out


# ----------------------------------------------------------------------------- gradient fidelity


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened gradients."""
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def exact_chain(grid: Sequence[int], points: Sequence[int] | None) -> Chain:
    """The original sampler with gradient through every step: the exact gradient of ShortFT's parametrisation."""
    return Chain([dataclasses.replace(seg, grad=True) for seg in shortft.sampling_chain(grid, points).trunk])


def branch_gradients(world: toy.Toy, chain: Chain, x_T, cond, reward_fn) -> dict[str, torch.Tensor]:
    """∇_{tuned_j} of L = −mean r(x_0, c) through `chain`, flattened per branch (zeros where none reaches); one
    backward pass for all branches."""
    loss, _ = shortft.reward_loss(x_T, chain, toy.make_denoisers(world, cond), world.schedule, lambda x: reward_fn(x, cond))
    params = {name: world.tuned_params([name]) for name in world.names}
    flat = [p for name in world.names for p in params[name]]
    grads = iter(torch.autograd.grad(loss, flat, allow_unused=True) if loss.requires_grad else [None] * len(flat))
    return {name: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for p, g in zip(ps, grads)])
            for name, ps in params.items()}


def gradient_fidelity(world: toy.Toy, x_T, cond, reward_fn, segment1_grad_steps: Sequence[int] = (1, 12)) -> dict:
    """Per stage i (and, for stage 1, per `segment1_grad_steps`): the cosine between ShortFT's gradient and the exact
    gradient for each branch the stage trains (LoRA_i … LoRA_k) and for all of them together ("stage"), plus the
    share of the exact gradient's norm that lies in the LoRA A matrices (0 while every B = 0: at init only the B
    matrices receive gradient)."""
    exact = branch_gradients(world, exact_chain(world.grid, world.points), x_T, cond, reward_fn)
    a_share = {}
    for name in world.names:
        keys = [k for k, p in world.model.named_parameters() if f".{name}." in k]
        is_a = torch.cat([torch.full((p.numel(),), ".lora_A." in k) for k, p in world.model.named_parameters() if k in keys])
        a_share[name] = (exact[name][is_a].norm() / exact[name].norm().clamp_min(1e-30)).item()
    rows = {}
    for stage in range(1, len(world.names) + 1):
        for steps in segment1_grad_steps if stage == 1 else (1,):
            chain = shortft.shortft(world.grid, world.points, stage=stage, segment1_grad_steps=steps)
            got = branch_gradients(world, chain, x_T, cond, reward_fn)
            names = world.names[stage - 1:]
            row = {n: cosine(got[n], exact[n]) for n in names}
            row["stage"] = cosine(torch.cat([got[n] for n in names]), torch.cat([exact[n] for n in names]))
            rows[f"stage {stage}" + (f", segment1_grad_steps {steps}" if stage == 1 else "")] = row
    return {"cosine": rows, "exact_norm": {n: g.norm().item() for n, g in exact.items()}, "a_share_of_exact": a_share}


# ----------------------------------------------------------------------------- gradient bias of every method


class Pinned(random.Random):
    """A `random.Random` whose one `randrange` / `randint` call returns the `index`-th value of its range and records
    the range's size: a method's builder, given Pinned(i), builds the i-th chain of its finite support. Python draws
    these uniformly, so the plain mean over the support is the method's exact expectation."""

    def __init__(self, index: int):
        super().__init__(0)
        self.index, self.size, self.calls = index, None, 0

    def randrange(self, start, stop=None, step=1):
        values = range(0, start) if stop is None else range(start, stop, step)
        self.calls, self.size = self.calls + 1, len(values)
        return values[self.index]

    def randint(self, a, b):
        return self.randrange(a, b + 1)


def method_draws(method: str, grid: Sequence[int], switches: dict, noise_draws: int = 32) -> list[tuple[Chain, int | None]]:
    """What one update of `method` can send: (chain, torch seed of its re-noising or None), each equally likely. A
    method that draws one integer (AlignProp's K, ReFL's graded step, DRTune's offset) gives every chain of its
    support; a chain that re-noises (DRaFT-LV) gives `noise_draws` seeds of its fresh ε; a deterministic one, itself.
    Gradient checkpointing is switched off: it recomputes the same forward, so it changes memory, not the gradient."""
    probe = Pinned(0)
    first = shortft.make_chain(method, grid, probe, **switches)
    if probe.calls > 1:
        raise ValueError(f"{method} draws {probe.calls} integers per chain: enumerate their joint support instead")
    chains = [first] if probe.size is None else \
        [shortft.make_chain(method, grid, Pinned(i), **switches) for i in range(probe.size)]
    chains = [Chain([dataclasses.replace(s, checkpoint=False) for s in c.trunk],
                    [[dataclasses.replace(s, checkpoint=False) for s in b] for b in c.branches]) for c in chains]
    if any(seg.model == shortft.NOISE for seg in first.segments()):
        return [(chain, seed) for chain in chains for seed in range(noise_draws)]
    return [(chain, None) for chain in chains]


def draw_gradient(world: toy.Toy, chain: Chain, seed: int | None, names: Sequence[str], x_T, cond, reward_fn) -> torch.Tensor:
    """The gradient one draw of a method sends into the branches `names`, flattened (a re-noising chain seeded)."""
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        got = branch_gradients(world, chain, x_T, cond, reward_fn)
    return torch.cat([got[n] for n in names])


def gradient_bias(world: toy.Toy, draws: list[tuple[Chain, int | None]], names: Sequence[str], x_T, cond, reward_fn,
                  exact: dict[str, torch.Tensor] | None = None) -> dict:
    """Bias and variance of a method's gradient g into `names` against the exact gradient g* of the same
    parametrisation through the complete chain (`exact_chain`, every step with gradient; same x_T and classes):

        one draw      cos(g_d, g*) and ‖g_d‖ / ‖g*‖ for every draw d (its spread is the method's noise)
        expectation   cos(ḡ, g*) and ‖ḡ‖ / ‖g*‖ with ḡ = mean_d g_d (exact over an enumerated support; its gap
                      to 1 is the method's bias)

    `exact`: g* per branch, if already computed (`branch_gradients` of `exact_chain`)."""
    if exact is None:
        exact = branch_gradients(world, exact_chain(world.grid, world.points), x_T, cond, reward_fn)
    g_star = torch.cat([exact[n] for n in names])
    grads = [draw_gradient(world, chain, seed, names, x_T, cond, reward_fn) for chain, seed in draws]
    mean = torch.stack(grads).mean(0)
    norm = g_star.norm().item()
    return {"draw_cos": [cosine(g, g_star) for g in grads], "draw_rel_norm": [g.norm().item() / norm for g in grads],
            "mean_cos": cosine(mean, g_star), "mean_rel_norm": mean.norm().item() / norm, "exact_norm": norm,
            "draws": len(grads)}


# ----------------------------------------------------------------------------- gradient norm vs chain length


def snap_points(grid: Sequence[int], points: Sequence[int] = shortft.PAPER_LORA_POINTS) -> tuple[int, ...]:
    """The LoRA points moved to the nearest timesteps of another grid; the last one is that grid's last step."""
    snapped = [min(grid, key=lambda g: abs(g - p)) for p in points[:-1]] + [grid[-1]]
    return shortft.check_lora_points(snapped, grid)


def gradient_norms(world: toy.Toy, x_T, cond, reward_fn, lengths: Sequence[int] = (10, 20, 50, 100, 200)) -> dict:
    """‖∇_LoRA L‖ over every branch for chains over N-step grids: the complete chain of one LoRA at every step
    (`full`), the exact chain of ShortFT's stacked LoRAs (`exact`) and ShortFT's stage-1 chain (`shortft`), with the
    LoRA points snapped to each grid; same x_T and classes."""
    out = {"chain_length": [], "full": [], "exact": [], "shortft": []}

    def norm(w: toy.Toy, chain: Chain) -> float:
        return torch.cat(list(branch_gradients(w, chain, x_T, cond, reward_fn).values())).norm().item()

    for n in lengths:
        grid = shortft.ddim_timesteps(n)
        w = dataclasses.replace(world, grid=grid, points=snap_points(grid))
        out["chain_length"].append(n)
        out["full"].append(norm(dataclasses.replace(w, points=None), shortft.full(grid, checkpoint=False)))
        out["exact"].append(norm(w, exact_chain(grid, w.points)))
        out["shortft"].append(norm(w, shortft.shortft(grid, w.points)))
    return out
