"""Differentiable rewards r(x_0, c) for reward backpropagation, chosen by name.

Paper Sec. 3 / Sec. 4: the fine-tuning objective is max_θ E_c E_{x_0 ~ p_θ(·|c)} r(x_0, c), optimised
by backpropagating ∇r through the sampling chain. Every reward here has one signature:

    reward(x, cond) -> (B,) tensor, differentiable in x
        toy:  x (B, 2) points,            cond (B,) class labels
        SD:   x (B, 3, H, W) images in [0, 1], cond list[str] prompts

`make_reward("name")` builds one; `make_reward("pickscore:10,hpsv2:2,aesthetic:0.05")` a weighted sum
(the paper's combined reward). Heavy reward models import lazily and fail with one line naming the
missing package or the hub id / file to fetch.

Run: python -c "import rewards; print(sorted(rewards.REWARDS))"
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

Reward = Callable[[torch.Tensor, object], torch.Tensor]

# name -> factory(**kwargs) -> Reward ; filled in by the sections below
REWARDS: dict[str, Callable[..., Reward]] = {}


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'a' → [('a', 1.0)];  'a:10,b:2' → [('a', 10.0), ('b', 2.0)]."""
    terms = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if not name:
            raise ValueError(f"empty reward name in {spec!r}: write e.g. 'pickscore:10,hpsv2:2'")
        try:
            terms.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"reward weight {weight!r} in {spec!r} is not a number") from None
    return terms


def weighted_sum(terms: list[tuple[Reward, float]]) -> Reward:
    """r(x, c) = Σ_i w_i r_i(x, c)."""

    def reward(x, cond):
        return sum(w * r(x, cond) for r, w in terms)

    return reward


def make_reward(spec: str, **kwargs) -> Reward:
    """Build a reward (or weighted sum) by name; kwargs go to every factory that accepts them."""
    terms = []
    for name, weight in parse_reward_spec(spec):
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}: choose from {', '.join(sorted(REWARDS))}")
        factory = REWARDS[name]
        accepted = inspect.signature(factory).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        terms.append((factory(**{k: v for k, v in kwargs.items() if takes_all or k in accepted}), weight))
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    return weighted_sum(terms)


# ----------------------------------------------------------------------------- toy rewards (2D points)


# ----------------------------------------------------------------------------- image rewards (SD)
