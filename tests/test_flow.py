"""The rectified-flow step (SD3, FLUX) against diffusers, and every method's chain on a flow grid.

Paper Sec. 3 calls ShortFT architecture-agnostic and shows it on SD3. Only the step changes: x_σ = (1 − σ) x_0 + σ ε,
the model predicts v ≈ ε − x_0, and one Euler step is x_s = x_t + (σ_s − σ_t) v (FlowMatchEulerDiscreteScheduler).
Each flow form of a method (DRaFT-LV's re-noising, ReFL's x̂_0, DRTune's skip path) is checked here against its
closed form, and the paper's layout is mapped onto SD3's 28-step grid by noise level (shortft.paper_points).

Run: python -m pytest -q tests/test_flow.py
"""

import math
import random

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import sd
import shortft
from shortft import CLEAN, X0, Segment

FLOW = shortft.FlowSchedule()
SD3_GRID = shortft.flow_timesteps(28, 3.0)


def scheduler(shift=3.0, **kw):
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **kw)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 28, 50, 100])
def test_flow_timesteps_equal_diffusers(shift, n):
    ref = scheduler(shift)
    ref.set_timesteps(n)
    assert shortft.flow_timesteps(n, shift) == [float(t) for t in ref.timesteps]
    assert sd.grid_from_diffusers(ref.config, n) == [float(t) for t in ref.timesteps]


def test_sd3_grid_and_defaults():
    assert [round(t, 1) for t in SD3_GRID[:3] + SD3_GRID[-3:]] == [1000.0, 987.4, 974.1, 199.8, 110.9, 8.9]
    assert sd.grid_from_diffusers(scheduler().config) == SD3_GRID  # N = 0: SD3's own 28 steps
    assert isinstance(sd.schedule_from_diffusers(scheduler().config), shortft.FlowSchedule)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        sd.grid_from_diffusers(scheduler(use_dynamic_shifting=True).config, 28)
    with pytest.raises(ValueError, match="shift must be a positive number"):
        shortft.flow_timesteps(28, -1.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("shape", [(3, 2), (2, 16, 8, 8)])
def test_flow_step_equals_diffusers_step(shift, shape):
    """Every step of a 28-step grid, float64: x_s = x_t + (σ_s − σ_t) v, the last step to σ = 0 (CLEAN)."""
    ref = scheduler(shift)
    ref.set_timesteps(28)
    ref.sigmas = ref.sigmas.double()
    grid = shortft.flow_timesteps(28, shift)
    g = torch.Generator().manual_seed(0)
    for i, (t, s) in enumerate(zip(grid, grid[1:] + [CLEAN])):
        x, v = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
        ref._step_index = i
        want = ref.step(v, ref.timesteps[i], x).prev_sample
        torch.testing.assert_close(FLOW.step(x, v, t, s), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(shortft.flow_step(x, v, FLOW.sigma(t), FLOW.sigma(s)), want, rtol=0, atol=1e-6)


def test_flow_add_noise_equals_scale_noise_and_x0_inverts_it():
    ref = scheduler()
    ref.set_timesteps(28)
    x0, eps = torch.randn(4, 16, 4, 4, dtype=torch.float64), torch.randn(4, 16, 4, 4, dtype=torch.float64)
    for t in (SD3_GRID[0], SD3_GRID[10], SD3_GRID[-1]):
        want = ref.scale_noise(x0.float(), torch.tensor([t]), eps.float()).double()
        torch.testing.assert_close(FLOW.add_noise(x0, eps, t), want, rtol=0, atol=1e-6)
        x_t, v = FLOW.add_noise(x0, eps, t), eps - x0  # the exact velocity of this pair
        torch.testing.assert_close(FLOW.step(x_t, v, t, X0), x0)  # x̂_0 = x_σ − σ v
        torch.testing.assert_close(shortft.flow_predict_x0(x_t, v, FLOW.sigma(t)), x0)
        s = SD3_GRID[-1]  # with the exact v every Euler step lands on the same straight line
        if s < t:
            torch.testing.assert_close(FLOW.step(x_t, v, t, s), FLOW.add_noise(x0, eps, s))


def test_flow_step_is_ddim_in_the_flows_parametrisation():
    """x_s = (1 − σ_s) x̂_0 + σ_s ε̂ with x̂_0 = x_t − σ_t v, ε̂ = x_t + (1 − σ_t) v (the DDIM reading)."""
    x, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for st, ss in ((0.9, 0.6), (0.3, 0.0), (1.0, 0.5)):
        x0, eps = x - st * v, x + (1 - st) * v
        torch.testing.assert_close(shortft.flow_step(x, v, st, ss), (1 - ss) * x0 + ss * eps)


def test_flow_step_gradcheck():
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, v_: shortft.flow_step(x_, v_, 0.7, 0.2), (x, v))


def test_flow_sigma_and_noise_level():
    assert FLOW.sigma(1000) == 1.0 and FLOW.sigma(CLEAN) == 0.0 and FLOW.sigma(X0) == 0.0
    assert FLOW.sigma(SD3_GRID[5]) == pytest.approx(SD3_GRID[5] / 1000)
    assert FLOW.log_snr(500) == pytest.approx(0.0) and FLOW.log_snr(CLEAN) == math.inf
    assert FLOW.log_snr(1000) == -math.inf
    for bad in (1000.5, -2, float("nan")):
        with pytest.raises(ValueError):
            FLOW.sigma(bad)


# ----------------------------------------------------------------------------- the paper's layout on SD3's grid


def test_paper_points_on_sd1_5_are_the_papers_and_on_sd3_match_noise_levels():
    assert shortft.paper_points(shortft.ddim_timesteps(50), shortft.make_schedule()) == shortft.PAPER_LORA_POINTS
    points = shortft.paper_points(SD3_GRID, FLOW)
    assert [SD3_GRID.index(p) for p in points] == [11, 18, 22, 27]
    ddim = shortft.make_schedule()
    for p, q in zip(shortft.PAPER_LORA_POINTS[:-1], points):
        best = min(abs(FLOW.log_snr(t) - ddim.log_snr(p)) for t in SD3_GRID)
        assert abs(FLOW.log_snr(q) - ddim.log_snr(p)) == best  # the nearest noise level on the grid
    with pytest.raises(ValueError, match="too short"):
        shortft.paper_points(shortft.flow_timesteps(3, 3.0), FLOW)


def test_shortft_on_sd3_grid_is_the_documented_layout():
    chain = shortft.make_chain("shortft", SD3_GRID, schedule=FLOW)
    got = [(s.model, round(s.t, 1), s.s if s.s == CLEAN else round(s.s, 1), s.grad) for s in chain.trunk]
    g = [round(t, 1) for t in SD3_GRID]
    assert got[:11] == [("tuned", g[i], g[i + 1], False) for i in range(11)]  # segment 1 without gradient
    assert got[11:] == [("tuned", 814.3, 790.4, True), ("shortcut", 790.4, 602.2, True),
                        ("tuned", 602.2, 560.6, True), ("shortcut", 560.6, 409.3, True),
                        ("tuned", 409.3, 347.4, True), ("shortcut", 347.4, 8.9, True), ("tuned", 8.9, CLEAN, True)]
    with pytest.raises(ValueError, match="outside the schedule"):  # SD1.5's schedule does not fit a flow grid
        shortft.make_chain("shortft", SD3_GRID)


@pytest.mark.parametrize("method", shortft.METHODS)
def test_every_method_runs_on_a_flow_grid(method):
    """Every method's chain on SD3's grid: connected from τ_N to x_0 (or x̂_0), and differentiable."""
    points = shortft.paper_points(SD3_GRID, FLOW)
    chain = shortft.make_chain(method, SD3_GRID, random.Random(0), **({"points": points} if method == "shortft" else {}))
    t = SD3_GRID[0]
    for seg in chain.trunk:
        assert seg.t == t
        t = seg.s
    assert t in (CLEAN, X0)
    w = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
    den = {n: (lambda x, t_, s_: w * x + t_ / 1000) for n in shortft.DENOISERS}
    loss, r = shortft.reward_loss(torch.randn(3, 2, dtype=torch.float64), chain, den, FLOW, lambda x: -(x**2).sum(1))
    loss.backward()
    assert torch.isfinite(loss) and r.shape == (3,) and w.grad is not None and float(w.grad) != 0


def test_draft_lv_renoises_along_the_flow():
    """DRaFT-LV's NOISE segment on a flow grid: x_σ1 = (1 − σ_1) x_0 + σ_1 ε with fresh ε."""
    chain = shortft.draft_lv(SD3_GRID, n=1)
    noise_seg = chain.branches[0][0]
    x0 = torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(3)
    got = shortft.apply_segment(x0, noise_seg, {}, FLOW)
    torch.manual_seed(3)
    eps = torch.randn_like(x0)
    s1 = SD3_GRID[-1] / 1000
    torch.testing.assert_close(got, (1 - s1) * x0 + s1 * eps)


def test_refl_returns_the_velocity_models_x0():
    x, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t = SD3_GRID[20]
    got = shortft.apply_segment(x, Segment("tuned", t, X0), {"tuned": lambda *_: v}, FLOW)
    torch.testing.assert_close(got, x - t / 1000 * v)


def test_drtune_flow_skip_path_is_the_identity():
    """With sg(x_t) inside the velocity, the Euler step's Jacobian in x_t is exactly I (the x_t term)."""
    seg = Segment("tuned", SD3_GRID[3], SD3_GRID[4], detach_input=True)
    w = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(
        lambda x_: shortft.apply_segment(x_, seg, {"tuned": lambda y, *_: torch.tanh(y @ w)}, FLOW), x)
    torch.testing.assert_close(jac.reshape(6, 6), torch.eye(6, dtype=torch.float64))
