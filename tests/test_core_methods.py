"""Each method's chain sends the reward gradient exactly where its paper says (BASELINES.md table).

Paper Sec. 3 (ShortFT: segment 1 of the tuned model, then one shortcut jump and one stacked-LoRA step per
later segment; progressive stages) and the baselines DRaFT-K / DRaFT-LV (Clark et al. 2024),
AlignProp (Prabhudesai et al. 2023), ReFL (Xu et al. 2023), DRTune (Wu et al. 2024).

Trick: every denoiser evaluation multiplies its ε by a fresh scalar leaf p = 1, logged with
(model, t, s). After backward, p.grad ≠ 0 exactly for the evaluations the reward gradient passes
through, so "which steps train θ" is read off the log.

Notation: N grid steps, P = LoRA points p_1 > … > p_k, stage i of progressive training.

Run: python -m pytest -q tests/test_core_methods.py
"""

import random

import pytest
import torch

import chain_args
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
    return {n: Probe(n, log) for n in shortft.DENOISERS}, log


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
    with pytest.raises(ValueError, match=r"n .* must be in \[1, 10\], got 0"):
        shortft.draft_lv(GRID, n=0)


# ----------------------------------------------------------------------------- ShortFT

GRID50 = shortft.ddim_timesteps(50)
P10 = (701, 401, 201, 1)  # LoRA points on the 10-step grid 901, 801, …, 1


def test_shortft_default_is_the_papers_layout():
    """make_chain("shortft", 50-step grid) = the paper's chain: tuned steps 981 … 761 (only the last with
    gradient), shortcut 741→501, tuned 501→481, shortcut 481→261, tuned 261→241, shortcut 241→1, tuned 1→x_0."""
    chain = shortft.make_chain("shortft", GRID50)
    T, S = shortft.TUNED, shortft.SHORTCUT
    expected = [(T, t, t - 20, False) for t in range(981, 761, -20)] + [
        (T, 761, 741, True), (S, 741, 501, True), (T, 501, 481, True), (S, 481, 261, True),
        (T, 261, 241, True), (S, 241, 1, True), (T, 1, CLEAN, True)]
    assert [(seg.model, seg.t, seg.s, seg.grad) for seg in chain.trunk] == expected
    assert not any(seg.checkpoint for seg in chain.trunk)  # no gradient checkpointing by default
    assert shortft.chain_cost(chain)["grad"] == 7  # "about 7–8 evaluations"


def test_active_loras_stacked_and_shared():
    P = shortft.PAPER_LORA_POINTS
    got = {t: shortft.active_loras(t, P) for t in GRID50}
    assert all(got[t] == (0,) for t in GRID50 if t >= 761)  # segment 1: LoRA_1 at every step
    assert got[501] == (0, 1) and got[261] == (0, 1, 2) and got[1] == (0, 1, 2, 3)  # stacked
    assert all(got[t] == () for t in GRID50 if t < 761 and t not in P)  # the base between points
    shared = {t: shortft.active_loras(t, P, timestep_aware=False) for t in GRID50}
    assert all(shared[t] == ((0,) if got[t] else ()) for t in GRID50)  # same places, one LoRA
    assert all(shortft.active_loras(t) == (0,) for t in GRID50)  # the baselines: one LoRA everywhere
    assert shortft.num_loras(P) == 4 and shortft.num_loras(P, False) == 1 and shortft.num_loras(None) == 1
    assert shortft.lora_names(3) == ["tuned_1", "tuned_2", "tuned_3"]


def test_sampling_chain_uses_active_loras():
    chain = shortft.sampling_chain(GRID50, shortft.PAPER_LORA_POINTS)
    assert_connected(chain.trunk, 981)
    assert all(not seg.grad for seg in chain.trunk)
    assert [seg.t for seg in chain.trunk if seg.model == shortft.TUNED] == \
        [t for t in GRID50 if shortft.active_loras(t, shortft.PAPER_LORA_POINTS)]
    assert all(seg.model == shortft.TUNED for seg in shortft.sampling_chain(GRID50).trunk)
    assert all(seg.model == shortft.BASE for seg in shortft.sampling_chain(GRID50, model=shortft.BASE).trunk)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
@pytest.mark.parametrize("prefix", ["original", "shortcut"])
def test_shortft_stages(stage, prefix):
    """Stage i: no gradient above p_i; the original chain (or no-grad jumps) down to p_i; then a step at p_i and
    jump + step per later point, all with gradient; connected from 981 to x_0."""
    P = shortft.PAPER_LORA_POINTS
    chain = shortft.shortft(GRID50, P, stage=stage, prefix=prefix)
    assert_connected(chain.trunk, 981)
    p_i = P[stage - 1]
    x_T = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    log, _ = run(chain, x_T=x_T)
    assert x_T.grad is None  # truncated: nothing flows above the first gradient step
    grads = grad_steps(log)
    assert grads[0] == ("tuned", p_i, GRID50[GRID50.index(p_i) + 1] if p_i != 1 else CLEAN)
    tuned_after = [t for m, t, s in grads if m == "tuned"]
    assert tuned_after == list(P[stage - 1:])
    jumps = [(t, s) for m, t, s in grads if m == "shortcut"]
    assert jumps == [(GRID50[GRID50.index(a) + 1], b) for a, b in zip(P[stage - 1:], P[stage:])]
    before = [seg for seg in chain.trunk if not seg.grad]
    if prefix == "original" or stage == 1:  # the original chain: stacked LoRA at points, base in between
        assert [seg.t for seg in before] == [t for t in GRID50 if t > (761 if stage == 1 else p_i)]
        assert all(seg.model == ("tuned" if shortft.active_loras(seg.t, P) else "base") for seg in before)
    else:
        assert [seg.model for seg in before if seg.t < 761] == \
            ["shortcut", "tuned"] * (stage - 2) + ["shortcut"]


def test_shortft_segment1_grad_steps():
    chain = shortft.shortft(GRID50, segment1_grad_steps=12)
    assert all(seg.grad for seg in chain.trunk)  # the whole of segment 1 (981 … 761) carries gradient
    x_T = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    run(chain, x_T=x_T)
    assert x_T.grad is not None
    assert shortft.chain_cost(shortft.shortft(GRID50, segment1_grad_steps=3))["grad"] == 9


def test_shortft_stage_gradient_reaches_exactly_the_stage_loras():
    """A stand-in of the stacked LoRA: ε = (base + Σ_{i ∈ active_loras(t)} a_i) x, with one scalar a_i per branch,
    trainable only for trainable_loras(stage). Gradient reaches exactly LoRA_i … LoRA_k, never the shortcut or
    the base; and a branch whose timesteps all lie above the stage's first gradient step gets none."""
    P = shortft.PAPER_LORA_POINTS
    sch = shortft.make_schedule()
    x_T = torch.randn(8, 2, dtype=torch.float64)
    for aware in (True, False):
        for stage in range(1, shortft.num_loras(P, aware) + 1):
            branches = [torch.tensor(0.1 * (i + 1), dtype=torch.float64) for i in range(shortft.num_loras(P, aware))]
            for i in shortft.trainable_loras(stage, P, aware):
                branches[i].requires_grad_(True)
            base = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
            short = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
            den = {"base": lambda x, t, s: base * x,
                   "tuned": lambda x, t, s: (base + sum((branches[i] for i in shortft.active_loras(t, P, aware)),
                                                        torch.zeros((), dtype=torch.float64))) * x,
                   "shortcut": lambda x, t, s: short * x}
            base.requires_grad_(False), short.requires_grad_(False)
            loss, _ = shortft.reward_loss(x_T, shortft.shortft(GRID50, P, stage=stage), den, sch,
                                          lambda x: -(x**2).sum(1))
            loss.backward()
            got = [i for i, b in enumerate(branches) if b.grad is not None and float(b.grad) != 0]
            assert got == list(shortft.trainable_loras(stage, P, aware)), (aware, stage, got)
            assert base.grad is None and short.grad is None


def test_stage_schedule():
    assert [chain_args.stage_at(p, 4) for p in (0.0, 0.2, 0.26, 0.5, 0.8, 1.0)] == [1, 1, 2, 3, 4, 4]
    assert [chain_args.stage_at(p, 2, (3, 1)) for p in (0.0, 0.7, 0.76)] == [1, 1, 2]
    assert shortft.trainable_loras(1, shortft.PAPER_LORA_POINTS) == (0, 1, 2, 3)
    assert shortft.trainable_loras(3, shortft.PAPER_LORA_POINTS) == (2, 3)
    assert shortft.trainable_loras(2, shortft.PAPER_LORA_POINTS, timestep_aware=False) == (0,)
    import dataclasses

    args, sch = chain_args.ChainArgs(), shortft.make_schedule()

    def stage_of(a, p):
        return chain_args.stage_of(a, p, chain_args.num_stages(a, GRID50, sch))

    assert [stage_of(args, p) for p in (0.0, 0.3, 0.6, 0.9)] == [1, 2, 3, 4]
    assert stage_of(dataclasses.replace(args, progressive=False), 0.9) == 1
    assert stage_of(dataclasses.replace(args, method="full"), 0.9) == 1
    assert stage_of(dataclasses.replace(args, timestep_aware=False), 0.9) == 4  # one LoRA, chain still staged
    with pytest.raises(ValueError, match="stage .* must be in \\[1, 4\\], got 5"):
        shortft.trainable_loras(5, shortft.PAPER_LORA_POINTS)
    with pytest.raises(ValueError, match="4 positive numbers"):
        chain_args.stage_at(0.5, 4, (1, 1))


def test_shortft_bad_input_is_one_line():
    cases = [
        (dict(points=(760, 501, 261, 1)), "not on the 50-step grid"),
        (dict(points=(501, 761, 1)), "strictly decreasing"),
        (dict(points=(761, 501)), "last LoRA point must be the grid's last step"),
        (dict(points=()), "empty"),
        (dict(stage=0), "stage .* must be in \\[1, 4\\], got 0"),
        (dict(stage=5), "stage .* must be in \\[1, 4\\], got 5"),
        (dict(segment1_grad_steps=13), "segment1_grad_steps .* got 13"),
        (dict(segment1_grad_steps=0), "segment1_grad_steps .* got 0"),
        (dict(prefix="jumps"), "unknown prefix"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            shortft.shortft(GRID50, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="strictly decreasing"):
        shortft.shortft(GRID50[::-1])
    with pytest.raises(ValueError, match="unknown denoiser 'shortcut\\+tuned'"):
        shortft.Segment("shortcut+tuned", 981, 961)


@pytest.mark.parametrize("n", [4, 10, 20, 50])
def test_shortft_any_points_build_a_connected_chain(n):
    grid = shortft.ddim_timesteps(n)
    rng = random.Random(n)
    for _ in range(20):
        k = rng.randint(1, min(4, n))
        points = sorted(rng.sample(grid[:-1], k - 1), reverse=True) + [grid[-1]]
        for stage in range(1, k + 1):
            chain = shortft.shortft(grid, points, stage=stage)
            assert_connected(chain.trunk, grid[0])
            assert [s.t for s in chain.trunk if s.grad and s.model == "tuned"][-(k - stage + 1):] == points[stage - 1:]


def test_jump_timesteps():
    from shortcut import jump_timesteps

    assert jump_timesteps(801, CLEAN, 1) == [801, CLEAN]
    assert jump_timesteps(801, CLEAN, 2) == [801, 400, CLEAN]
    assert jump_timesteps(999, 499, 4) == [999, 874, 749, 624, 499]
    assert jump_timesteps(501, CLEAN, 3) == [501, 334, 166, CLEAN]  # rounded, not truncated
    pts = jump_timesteps(21, CLEAN, 22)
    assert pts == list(range(21, -2, -1))
    with pytest.raises(ValueError, match="jumps"):
        jump_timesteps(801, 401, 0)
    with pytest.raises(ValueError, match="cannot split"):
        jump_timesteps(5, 3, 3)


def test_check_chain_args():
    import dataclasses
    import chain_args

    args = chain_args.ChainArgs()
    before = random.getstate()
    for method in shortft.METHODS:  # checking draws nothing from the global RNG that a run has seeded
        chain_args.check_chain_args(dataclasses.replace(args, method=method))
    assert random.getstate() == before
    for kw, msg in [(dict(method="draft"), "--method draft"), (dict(lora_points=[760, 1]), "not on the"),
                    (dict(stage_fractions=[1, 2]), "4 positive"), (dict(segment1_grad_steps=0), "segment1"),
                    (dict(method="draft_k", draft_k=51), "K .* must be in \\[1, 50\\], got 51"),
                    (dict(num_steps=-1), "--num-steps -1"), (dict(num_steps=3), "--lora-points .*too short")]:
        with pytest.raises(ValueError, match=msg):
            chain_args.check_chain_args(dataclasses.replace(args, **kw))


# ----------------------------------------------------------------------------- make_chain


def test_make_chain_dispatch_and_errors():
    rng = random.Random(0)
    assert shortft.make_chain("full", GRID).trunk == shortft.full(GRID).trunk
    assert shortft.make_chain("draft_k", GRID, k=2).trunk == shortft.draft_k(GRID, k=2).trunk
    assert shortft.make_chain("shortft", GRID, rng, points=P10, stage=2).trunk == \
        shortft.shortft(GRID, P10, stage=2).trunk
    for method in shortft.METHODS:
        chain = shortft.make_chain(method, GRID, rng, **({"points": P10} if method == "shortft" else {}))
        assert chain.trunk[0].t == GRID[0]
    with pytest.raises(ValueError, match="unknown method 'draft'.*shortft.*drtune"):
        shortft.make_chain("draft", GRID)
    with pytest.raises(ValueError, match="bad switch.*'full'"):
        shortft.make_chain("full", GRID, stage=3)
    with pytest.raises(ValueError, match="bad switch.*'shortft'"):
        shortft.make_chain("shortft", GRID, rng, K=3)
