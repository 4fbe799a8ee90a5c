"""Each method's chain sends the reward gradient exactly where its paper says (BASELINES.md table).

Paper Sec. 3 (ShortFT: jump T → τ_k without gradient, one trained DDIM step τ_k → τ_{k−1}, M
shortcut jumps to x_0 with gradient) and the baselines DRaFT-K / DRaFT-LV (Clark et al. 2024),
AlignProp (Prabhudesai et al. 2023), ReFL (Xu et al. 2023), DRTune (Wu et al. 2024).

Trick: every denoiser evaluation multiplies its ε by a fresh scalar leaf p = 1, logged with
(model, t, s). After backward, p.grad ≠ 0 exactly for the evaluations the reward gradient passes
through, so "which steps train θ" is read off the log.

Notation: N grid steps, k grid index of ShortFT's trained step, M = jumps_after, K = trained steps.

Run: python -m pytest -q tests/test_core_methods.py
"""

import random

import pytest
import torch

import shortft
from shortft import CLEAN, X0


class Probe:
    """ε = p · (tanh(W x) + t/1000) with a fresh leaf p = 1 per call, logged as (model, t, s, p, input)."""

    def __init__(self, name, log):
        self.name, self.log = name, log
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(2, 2, dtype=torch.float64, generator=g)

    def __call__(self, x, t, s):
        p = torch.ones((), dtype=torch.float64, requires_grad=True)
        self.log.append(dict(model=self.name, t=t, s=s, p=p, x=x, input_requires_grad=x.requires_grad))
        return p * (torch.tanh(x @ self.w) + t / 1000.0)


def probes():
    log = []
    return {n: Probe(n, log) for n in ("tuned", "shortcut", "shortcut+tuned")}, log


def run(chain, x_T=None, reward=lambda x: -(x**2).sum(1)):
    """Forward + backward of the reward loss; returns the log of the forward evaluations (recomputations
    done by checkpointing in backward are dropped) with `grad` = whether p received gradient."""
    sch = shortft.make_schedule()
    den, log = probes()
    x_T = torch.randn(4, 2, dtype=torch.float64) if x_T is None else x_T
    loss, _ = shortft.reward_loss(x_T, chain, den, sch, reward)
    forward = list(log)
    if loss.requires_grad:
        loss.backward()
    for e in forward:
        e["grad"] = e["p"].grad is not None and float(e["p"].grad.abs()) > 0
    return forward, loss


def grad_steps(log):
    return [(e["model"], e["t"], e["s"]) for e in log if e["grad"]]


def assert_connected(segments, start, end=CLEAN):
    """Consecutive segments meet: each starts where the previous ended."""
    assert segments[0].t == start and segments[-1].s == end
    for a, b in zip(segments, segments[1:]):
        assert b.t == a.s, (a, b)


GRID = shortft.ddim_timesteps(10)
POINTS = GRID + [CLEAN]


# ----------------------------------------------------------------------------- baselines


def test_full_trains_every_step():
    chain = shortft.full(GRID)
    assert_connected(chain.trunk, GRID[0])
    log, _ = run(chain)
    assert grad_steps(log) == [("tuned", t, s) for t, s in zip(POINTS, POINTS[1:])]
    assert shortft.chain_cost(chain) == {"no_grad": 0, "grad": 10, "skip_path_only": 0, "checkpointed": 10}


@pytest.mark.parametrize("k", [1, 3, 10])
def test_draft_k_trains_exactly_the_last_k(k):
    chain = shortft.draft_k(GRID, k=k)
    assert_connected(chain.trunk, GRID[0])
    log, _ = run(chain)
    assert len(log) == 10
    assert grad_steps(log) == [("tuned", t, s) for t, s in zip(POINTS[10 - k :], POINTS[11 - k :])]
    assert shortft.chain_cost(chain)["no_grad"] == 10 - k and shortft.chain_cost(chain)["grad"] == k
    for bad in (0, 11):
        with pytest.raises(ValueError, match="K"):
            shortft.draft_k(GRID, k=bad)


def test_alignprop_trains_a_random_contiguous_tail():
    rng = random.Random(0)
    lengths = []
    for _ in range(25):
        chain = shortft.alignprop(GRID, k_min=2, k_max=6, rng=rng)
        assert_connected(chain.trunk, GRID[0])
        flags = [seg.grad for seg in chain.trunk]
        k = sum(flags)
        assert flags == [False] * (10 - k) + [True] * k  # contiguous tail
        assert 2 <= k <= 6
        lengths.append(k)
    assert len(set(lengths)) >= 3  # varies across draws
    # same seed, same draws
    rng2 = random.Random(0)
    assert lengths == [sum(s.grad for s in shortft.alignprop(GRID, 2, 6, rng2).trunk) for _ in range(25)]
    log, _ = run(shortft.alignprop(GRID, 3, 3, random.Random(1)))
    assert grad_steps(log) == [("tuned", t, s) for t, s in zip(POINTS[7:], POINTS[8:])]
    with pytest.raises(ValueError, match="k_min"):
        shortft.alignprop(GRID, k_min=4, k_max=2)


def test_refl_one_late_step_returning_x0():
    rng, seen = random.Random(0), set()
    for _ in range(30):
        chain = shortft.refl(GRID, last=4, rng=rng)
        assert [seg.grad for seg in chain.trunk] == [False] * (len(chain.trunk) - 1) + [True]
        last = chain.trunk[-1]
        assert last.s is X0 and last.t in GRID[-4:]
        assert_connected(chain.trunk, GRID[0], X0)
        seen.add(last.t)
    assert seen == set(GRID[-4:])
    # the output is x̂_0 of the last evaluation
    chain = shortft.refl(GRID, last=4, rng=random.Random(3))
    sch = shortft.make_schedule()
    den, _ = probes()
    x_T = torch.randn(4, 2, dtype=torch.float64)
    x_t = shortft.run_chain(x_T, chain.trunk[:-1], den, sch)
    out = shortft.run_chain(x_T, chain.trunk, den, sch)
    t = chain.trunk[-1].t
    torch.testing.assert_close(out, shortft.predict_x0(x_t, den["tuned"](x_t, t, None), sch.alpha_bar(t)))
    log, _ = run(chain)
    assert grad_steps(log) == [("tuned", t, X0)]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_drtune_trains_k_evenly_spaced_steps_through_the_skip_path(k):
    rng = random.Random(k)
    offsets = set()
    for _ in range(10):
        chain = shortft.drtune(GRID, k=k, rng=rng)
        assert_connected(chain.trunk, GRID[0])
        x_T = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        log, _ = run(chain, x_T=x_T, reward=lambda x: x.sum(1))
        trained = [i for i, e in enumerate(log) if e["grad"]]
        stride = 10 // k
        assert len(trained) == k and all(b - a == stride for a, b in zip(trained, trained[1:]))
        offsets.add(trained[0])
        assert not any(e["input_requires_grad"] for e in log)  # every denoiser sees sg(x_t)
        # x_0 is linear in x_T through the skip path only: ∂x_0/∂x_T = Π √(ᾱ_s/ᾱ_t) = √(ᾱ_final/ᾱ_τN);
        # the loss is −mean over 4 samples of Σ x_0
        sch = shortft.make_schedule()
        coef = (sch.alpha_bar(CLEAN) / sch.alpha_bar(GRID[0])) ** 0.5
        torch.testing.assert_close(x_T.grad, torch.full_like(x_T, -coef / 4), rtol=1e-12, atol=0)
        cost = shortft.chain_cost(chain)
        assert cost == {"no_grad": 0, "grad": k, "skip_path_only": 10 - k, "checkpointed": k}
    if k < 5:
        assert len(offsets) > 1  # the offset is random


def test_draft_lv_branches():
    n = 3
    chain = shortft.draft_lv(GRID, n=n)
    assert len(chain.branches) == n
    assert not any(seg.grad for seg in chain.trunk) and len(chain.trunk) == 10
    log, loss = run(chain)
    t1 = GRID[-1]
    assert grad_steps(log) == [("tuned", t1, CLEAN)] * n  # only the last step, once per branch
    branch_inputs = [e["x"] for e in log if e["grad"]]
    assert not torch.allclose(branch_inputs[0], branch_inputs[1])  # fresh ε per branch
    # loss = −mean over branches of the mean reward (same RNG, same re-noising)
    sch = shortft.make_schedule()
    den, _ = probes()
    x_T = torch.randn(4, 2, dtype=torch.float64)
    torch.manual_seed(7)
    loss, r0 = shortft.reward_loss(x_T, chain, den, sch, lambda x: -(x**2).sum(1))
    torch.manual_seed(7)
    outs = shortft.chain_outputs(x_T, chain, den, sch)
    torch.testing.assert_close(loss, torch.stack([(x**2).sum(1).mean() for x in outs]).mean())
    torch.testing.assert_close(r0, -(outs[0] ** 2).sum(1))
    with pytest.raises(ValueError, match="n ≥ 1"):
        shortft.draft_lv(GRID, n=0)


# ----------------------------------------------------------------------------- ShortFT


@pytest.mark.parametrize("k", [0, 4, 7, 9])
@pytest.mark.parametrize("lora_in_shortcut", [False, True])
def test_shortft_trains_only_the_chosen_step(k, lora_in_shortcut):
    m = 3
    chain = shortft.shortft(GRID, k=k, jumps_before=2, jumps_after=m, lora_in_shortcut=lora_in_shortcut)
    assert_connected(chain.trunk, GRID[0])
    x_T = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    log, _ = run(chain, x_T=x_T)
    sc = "shortcut+tuned" if lora_in_shortcut else "shortcut"
    before = [e for e in log if e["t"] > GRID[k]]
    tuned = [e for e in log if e["model"] == "tuned"]
    after = log[len(before) + len(tuned):]
    assert len(before) == (2 if k > 0 else 0) and all(e["model"] == sc and not e["grad"] for e in before)
    assert [(e["t"], e["s"]) for e in tuned] == [(GRID[k], POINTS[k + 1])] and tuned[0]["grad"]
    assert len(after) == (m if k < 9 else 0)
    assert all(e["model"] == sc and e["grad"] for e in after)  # the jumps after carry gradient
    if after:
        assert [e["t"] for e in after] + [CLEAN] == shortft.jump_timesteps(POINTS[k + 1], CLEAN, m)
        assert all(seg.checkpoint for seg in chain.trunk if seg.grad)
    if k > 0:
        assert x_T.grad is None  # nothing flows above the trained step
    cost = shortft.chain_cost(chain)
    assert cost == {"no_grad": len(before), "grad": 1 + len(after), "skip_path_only": 0,
                    "checkpointed": 1 + len(after)}


def test_shortft_with_parameters():
    """Real parameters: the tuned model's weights get gradient, the frozen shortcut's do not; with
    lora_in_shortcut the tuned weights also get gradient through the jumps."""
    sch = shortft.make_schedule()
    tuned = torch.nn.Linear(2, 2).double()
    shortcut = torch.nn.Linear(2, 2).double().requires_grad_(False)
    x_T = torch.randn(4, 2, dtype=torch.float64)

    def grads(lora_in_shortcut):
        calls = {"tuned": 0, "shortcut+tuned": 0}

        def den(name):
            def f(x, t, s):
                calls[name] = calls.get(name, 0) + 1
                out = shortcut(x) if "shortcut" in name else 0
                return out + (tuned(x) if "tuned" in name else 0)
            return f

        tuned.zero_grad()
        chain = shortft.shortft(GRID, k=3, jumps_after=2, lora_in_shortcut=lora_in_shortcut, checkpoint=False)
        loss, _ = shortft.reward_loss(x_T, chain, {n: den(n) for n in ("tuned", "shortcut", "shortcut+tuned")},
                                      sch, lambda x: -(x**2).sum(1))
        loss.backward()
        return tuned.weight.grad.clone()

    g_plain, g_in = grads(False), grads(True)
    assert g_plain.abs().sum() > 0 and g_in.abs().sum() > 0
    assert not torch.allclose(g_plain, g_in)  # the jumps add their own contribution
    assert shortcut.weight.grad is None


def test_shortft_several_trained_steps():
    chain = shortft.shortft(GRID, k=2, trained_steps=3, jumps_after=2)
    assert_connected(chain.trunk, GRID[0])
    log, _ = run(chain)
    assert [(e["t"], e["s"]) for e in log if e["model"] == "tuned"] == list(zip(POINTS[2:5], POINTS[3:6]))
    assert all(e["grad"] for e in log if e["model"] == "tuned")
    # k is drawn so that all trained steps fit on the grid
    rng = random.Random(0)
    for _ in range(40):
        c = shortft.shortft(GRID, trained_steps=3, jumps_after=2, rng=rng)
        assert_connected(c.trunk, GRID[0])
        assert sum(seg.model == "tuned" for seg in c.trunk) == 3


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [4, 10, 50])
def test_shortft_every_k_builds_a_connected_chain(spacing, n):
    grid = shortft.ddim_timesteps(n, spacing=spacing)
    for k in range(n):
        for m in (1, 4):
            chain = shortft.shortft(grid, k=k, jumps_before=2, jumps_after=m)
            assert_connected(chain.trunk, grid[0])
            assert sum(seg.model == "tuned" for seg in chain.trunk) == 1
            for seg in chain.trunk:
                assert seg.s is not None and (seg.s == CLEAN or seg.s < seg.t)
            if k < n - 1:  # M jumps after the trained step, fewer only where fewer timesteps are left
                assert sum(seg.model == "shortcut" and seg.grad for seg in chain.trunk) == min(m, grid[k + 1] + 1)


def test_jump_timesteps():
    assert shortft.jump_timesteps(801, CLEAN, 1) == [801, CLEAN]
    assert shortft.jump_timesteps(801, CLEAN, 2) == [801, 400, CLEAN]
    assert shortft.jump_timesteps(999, 499, 4) == [999, 874, 749, 624, 499]
    assert shortft.jump_timesteps(501, CLEAN, 3) == [501, 334, 166, CLEAN]  # rounded, not truncated
    pts = shortft.jump_timesteps(21, CLEAN, 22)
    assert pts == list(range(21, -2, -1))
    with pytest.raises(ValueError, match="jumps"):
        shortft.jump_timesteps(801, 401, 0)
    with pytest.raises(ValueError, match="cannot split"):
        shortft.jump_timesteps(5, 3, 3)


def test_shortft_uniform_sampling_covers_the_grid():
    rng = random.Random(0)
    ks = [shortft.draw_trained_step(GRID, rng) for _ in range(300)]
    assert set(ks) == set(range(10))


def test_shortft_stratified_sampling_visits_every_range():
    boundaries = (700, 300)  # three timestep-aware LoRA ranges
    grid = shortft.ddim_timesteps(20)
    rng = random.Random(0)
    visited = {0: set(), 1: set(), 2: set()}
    for update in range(60):
        k = shortft.draw_trained_step(grid, rng, "stratified", boundaries, update)
        r = shortft.timestep_range_index(grid[k], boundaries)
        assert r == update % 3  # cycles over the ranges by update number
        visited[r].add(k)
        chain = shortft.shortft(grid, rng=random.Random(update), sampling="stratified", boundaries=boundaries,
                                update=update)
        t_trained = next(seg.t for seg in chain.trunk if seg.model == "tuned")
        assert shortft.timestep_range_index(t_trained, boundaries) == update % 3
    for r, ks in visited.items():
        assert ks and all(shortft.timestep_range_index(grid[k], boundaries) == r for k in ks)
    assert shortft.timestep_range_index(999, (500,)) == 0 and shortft.timestep_range_index(499, (500,)) == 1
    with pytest.raises(ValueError, match="sampling"):
        shortft.draw_trained_step(grid, rng, "weighted")


def test_shortft_bad_switches():
    with pytest.raises(ValueError, match="k=10"):
        shortft.shortft(GRID, k=10)
    with pytest.raises(ValueError, match="k=-1"):
        shortft.shortft(GRID, k=-1)
    with pytest.raises(ValueError, match="k=8"):
        shortft.shortft(GRID, k=8, trained_steps=3)
    with pytest.raises(ValueError, match="trained_steps"):
        shortft.shortft(GRID, trained_steps=0)
    with pytest.raises(ValueError, match="trained_steps"):
        shortft.shortft(GRID, trained_steps=11)
    with pytest.raises(ValueError, match="jumps"):
        shortft.shortft(GRID, k=2, jumps_after=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        shortft.shortft(GRID[::-1], k=2)


# ----------------------------------------------------------------------------- make_chain


def test_make_chain_dispatch_and_errors():
    rng = random.Random(0)
    assert shortft.make_chain("full", GRID).trunk == shortft.full(GRID).trunk
    assert shortft.make_chain("draft_k", GRID, k=2).trunk == shortft.draft_k(GRID, k=2).trunk
    assert shortft.make_chain("shortft", GRID, rng, k=3, jumps_after=2).trunk == \
        shortft.shortft(GRID, k=3, jumps_after=2).trunk
    for method in shortft.METHODS:
        chain = shortft.make_chain(method, GRID, rng)
        assert chain.trunk[0].t == GRID[0]
    with pytest.raises(ValueError, match="unknown method 'draft'.*shortft.*drtune"):
        shortft.make_chain("draft", GRID)
    with pytest.raises(ValueError, match="bad switch.*'full'"):
        shortft.make_chain("full", GRID, jumps_after=3)
    with pytest.raises(ValueError, match="bad switch.*'shortft'"):
        shortft.make_chain("shortft", GRID, rng, K=3)
