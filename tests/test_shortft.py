"""Tests of the DDIM equations and the chain runner in shortft.py against peer implementations.

Paper Sec. 3 (reward backpropagation through a DDIM chain): the schedule, grid, DDIM step (Song et
al. 2021, Eq. 12), forward process and classifier-free guidance are checked against diffusers'
DDIMScheduler / DDPMScheduler; the chain runner is checked against plain autograd through a
hand-unrolled loop of `ddim_step`, and DRTune's stop-gradient against its closed-form Jacobian.
The guarded update (`runio.guarded_step`, NaN/inf never reaches the weights) is checked beside the loss.

Notation: ᾱ_t = alphas_cumprod[t]; τ_N > … > τ_1 the grid; CLEAN = −1 the chain's end (ᾱ_final);
X0 = None "return x̂_0" (ᾱ = 1); (B, …) batch-first tensors.

Run: python -m pytest -q tests/test_shortft.py
"""

import random

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import measure_toy
import runio
import sd
import shortft
from shortft import CLEAN, X0, Segment

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            set_alpha_to_one=False, clip_sample=False, steps_offset=1)


def ddim_scheduler(**kw) -> DDIMScheduler:
    return DDIMScheduler(**{**SD15, **kw})


# ----------------------------------------------------------------------------- schedule and grid


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_make_schedule_matches_diffusers(beta_schedule, set_alpha_to_one):
    ref = ddim_scheduler(beta_schedule=beta_schedule, set_alpha_to_one=set_alpha_to_one)
    ours = shortft.make_schedule(beta_schedule=beta_schedule, set_alpha_to_one=set_alpha_to_one)
    # diffusers works in float32, this repo in float64: agreement to float32 rounding
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-6)
    assert ours.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-6)
    assert ours.alpha_bar(CLEAN) == ours.final_alpha_cumprod
    if not set_alpha_to_one:  # SD1.5: the chain ends at ᾱ_0, not at 1
        assert ours.alpha_bar(CLEAN) == ours.alpha_bar(0) < 1
    assert sd.schedule_from_diffusers(ref.config).final_alpha_cumprod == ours.final_alpha_cumprod
    torch.testing.assert_close(sd.schedule_from_diffusers(ref.config).alphas_cumprod, ours.alphas_cumprod)


def test_alpha_bar_special_points_and_errors():
    sch = shortft.make_schedule()
    assert sch.alpha_bar(X0) == 1.0
    assert sch.alpha_bar(CLEAN) == pytest.approx(float(sch.alphas_cumprod[0]))
    assert sch.alpha_bar(999) == float(sch.alphas_cumprod[999])
    for bad in (1000, -2, 5000):
        with pytest.raises(ValueError, match="outside the schedule"):
            sch.alpha_bar(bad)
    with pytest.raises(ValueError, match="beta_schedule"):
        shortft.make_schedule(beta_schedule="cosine")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 10, 30, 50, 200])
def test_ddim_timesteps_match_diffusers(spacing, n):
    ref = ddim_scheduler(timestep_spacing=spacing)
    ref.set_timesteps(n)
    assert shortft.ddim_timesteps(n, spacing=spacing) == ref.timesteps.tolist()


def test_ddim_timesteps_offset_zero_and_errors():
    ref = ddim_scheduler(steps_offset=0)
    ref.set_timesteps(25)
    assert shortft.ddim_timesteps(25, steps_offset=0) == ref.timesteps.tolist()
    assert shortft.ddim_timesteps(50)[:3] == [981, 961, 941] and shortft.ddim_timesteps(50)[-1] == 1
    with pytest.raises(ValueError, match="num_steps"):
        shortft.ddim_timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        shortft.ddim_timesteps(10, spacing="linspace")


# ----------------------------------------------------------------------------- DDIM equations


def _successor(grid, i):
    return grid[i + 1] if i + 1 < len(grid) else CLEAN


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (5, 2)])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(shape, spacing, eta):
    n = 10
    ref = ddim_scheduler(timestep_spacing=spacing)
    ref.set_timesteps(n)
    sch = sd.schedule_from_diffusers(ref.config)
    grid = shortft.ddim_timesteps(n, spacing=spacing)
    for i in (0, 3, n - 2, n - 1):  # first, middle, last-but-one and the final step to CLEAN
        t, s = grid[i], _successor(grid, i)
        x, eps, z = torch.randn(shape), torch.randn(shape), torch.randn(shape)
        out = ref.step(eps, t, x, eta=eta, variance_noise=z if eta else None)
        ours = shortft.ddim_step(x, eps, sch.alpha_bar(t), sch.alpha_bar(s), eta=eta, noise=z)
        torch.testing.assert_close(ours, out.prev_sample, rtol=1e-4, atol=1e-5)
        # ᾱ_s = 1 (X0) returns the scheduler's x̂_0
        x0 = shortft.ddim_step(x, eps, sch.alpha_bar(t), sch.alpha_bar(X0))
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shortft.predict_x0(x, eps, sch.alpha_bar(t)), out.pred_original_sample,
                                   rtol=1e-4, atol=1e-5)


def test_ddim_step_eta_needs_noise():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="noise"):
        shortft.ddim_step(x, x, 0.5, 0.7, eta=1.0)


def test_ddim_step_per_sample_alpha_bar():
    sch = shortft.make_schedule()
    ts, ss = [901, 501, 41], [801, 401, CLEAN]
    a_t = torch.tensor([sch.alpha_bar(t) for t in ts], dtype=torch.float64)
    a_s = torch.tensor([sch.alpha_bar(s) for s in ss], dtype=torch.float64)
    for shape in [(3, 4, 8, 8), (3, 2)]:
        x, eps, z = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
        for eta in (0.0, 0.7):
            batched = shortft.ddim_step(x, eps, a_t, a_s, eta=eta, noise=z)
            single = torch.stack([
                shortft.ddim_step(x[i : i + 1], eps[i : i + 1], sch.alpha_bar(ts[i]), sch.alpha_bar(ss[i]),
                                  eta=eta, noise=z[i : i + 1])[0]
                for i in range(3)
            ])
            torch.testing.assert_close(batched, single)
        torch.testing.assert_close(shortft.predict_x0(x, eps, a_t),
                                   torch.stack([shortft.predict_x0(x[i], eps[i], float(a_t[i])) for i in range(3)]))


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
def test_add_noise_matches_diffusers(scheduler_cls):
    kw = {k: v for k, v in SD15.items() if k != "set_alpha_to_one" or scheduler_cls is DDIMScheduler}
    ref = scheduler_cls(**kw)
    sch = sd.schedule_from_diffusers(ref.config)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    ts = torch.tensor([0, 250, 781, 999])
    expected = ref.add_noise(x0, noise, ts)
    torch.testing.assert_close(shortft.add_noise(x0, noise, sch.alphas_cumprod[ts]), expected, rtol=1e-5, atol=1e-5)
    # scalar ᾱ
    torch.testing.assert_close(shortft.add_noise(x0[:1], noise[:1], sch.alpha_bar(781)),
                               ref.add_noise(x0[:1], noise[:1], ts[2:3]), rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_closed_form():
    u, c = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.0, 0.5])
    torch.testing.assert_close(shortft.classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(shortft.classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(shortft.classifier_free_guidance(u, c, 7.5), torch.tensor([16.0, 13.0, 0.5]))


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_step_gradcheck(eta):
    x, eps, z = (torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a_t, a_s = 0.31, 0.87
    assert torch.autograd.gradcheck(lambda x, e, n: shortft.ddim_step(x, e, a_t, a_s, eta=eta, noise=n), (x, eps, z))
    a_t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    a_s = torch.tensor([0.4, 0.95, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, e: shortft.ddim_step(x, e, a_t, a_s), (x, eps))


# ----------------------------------------------------------------------------- chain runner


class TinyDenoiser(torch.nn.Module):
    """ε_θ(x_t, t) for (B, 2) points: a float64 MLP of (x, t/1000)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)).double()

    def forward(self, x, t, s=None):
        tt = torch.full((x.shape[0], 1), t / 1000.0, dtype=x.dtype)
        return self.net(torch.cat([x, tt], dim=1))


def _unrolled(x, grid, net, sch):
    points = list(grid) + [CLEAN]
    for t, s in zip(points, points[1:]):
        x = shortft.ddim_step(x, net(x, t, s), sch.alpha_bar(t), sch.alpha_bar(s))
    return x


def _loss_and_grads(fn, x_T, net):
    x = x_T.clone().requires_grad_(True)
    out = fn(x)
    loss = (out**2).sum() + out.sum()
    grads = torch.autograd.grad(loss, [x, *net.parameters()])
    return out.detach(), grads


@pytest.mark.parametrize("checkpoint", [False, True])
def test_run_chain_equals_unrolled_autograd(checkpoint):
    sch, grid, net = shortft.make_schedule(), shortft.ddim_timesteps(6), TinyDenoiser()
    x_T = torch.randn(5, 2, dtype=torch.float64)
    chain = shortft.full(grid, checkpoint=checkpoint)
    assert all(seg.checkpoint == checkpoint for seg in chain.trunk)
    out, grads = _loss_and_grads(lambda x: shortft.run_chain(x, chain.trunk, {"tuned": net}, sch), x_T, net)
    ref_out, ref_grads = _loss_and_grads(lambda x: _unrolled(x, grid, net, sch), x_T, net)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)


def test_grad_false_segments_cut_the_graph():
    sch, grid, net = shortft.make_schedule(), shortft.ddim_timesteps(6), TinyDenoiser()
    x_T = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    chain = shortft.draft_k(grid, k=2)
    out = shortft.run_chain(x_T, chain.trunk, {"tuned": net}, sch)
    torch.testing.assert_close(out, _unrolled(x_T, grid, net, sch).detach())  # same forward as the full chain
    out.sum().backward()
    assert x_T.grad is None  # nothing flows upstream of the no-grad part
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    # a chain made only of grad=False segments does not build a graph at all
    out = shortft.run_chain(x_T, shortft.sampling_chain(grid).trunk, {"tuned": net}, sch)
    assert not out.requires_grad


@pytest.mark.parametrize("detach_output", [False, True])
def test_detach_input_leaves_only_the_skip_path(detach_output):
    """DRTune: with sg(x_t) as denoiser input, ∂x_s/∂x_t = √ᾱ_s/√ᾱ_t · I exactly."""
    sch, net = shortft.make_schedule(), TinyDenoiser()
    t, s = 741, 501
    x_t = torch.randn(3, 2, dtype=torch.float64)
    seg = Segment("tuned", t, s, detach_input=True, detach_output=detach_output)
    jac = torch.autograd.functional.jacobian(lambda x: shortft.apply_segment(x, seg, {"tuned": net}, sch), x_t)
    coef = (sch.alpha_bar(s) / sch.alpha_bar(t)) ** 0.5
    torch.testing.assert_close(jac.reshape(6, 6), coef * torch.eye(6, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # without the stop-gradient the Jacobian also has the ε-path term, so the test above can fail
    plain = Segment("tuned", t, s)
    jac_plain = torch.autograd.functional.jacobian(lambda x: shortft.apply_segment(x, plain, {"tuned": net}, sch), x_t)
    assert (jac_plain.reshape(6, 6) - coef * torch.eye(6, dtype=torch.float64)).abs().max() > 1e-3
    # detach_output: the parameters get nothing; detach_input alone: they do
    net.zero_grad()
    shortft.apply_segment(x_t.clone().requires_grad_(True), seg, {"tuned": net}, sch).sum().backward()
    got = [p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()]
    assert not any(got) if detach_output else all(got)


def test_checkpointed_detach_segments_match_plain():
    sch, grid, net = shortft.make_schedule(), shortft.ddim_timesteps(8), TinyDenoiser()
    x_T = torch.randn(5, 2, dtype=torch.float64)
    a = shortft.drtune(grid, k=2, rng=random.Random(1), checkpoint=True)
    b = shortft.drtune(grid, k=2, rng=random.Random(1), checkpoint=False)
    assert any(seg.checkpoint for seg in a.trunk) and not any(seg.checkpoint for seg in b.trunk)
    out_a, g_a = _loss_and_grads(lambda x: shortft.run_chain(x, a.trunk, {"tuned": net}, sch), x_T, net)
    out_b, g_b = _loss_and_grads(lambda x: shortft.run_chain(x, b.trunk, {"tuned": net}, sch), x_T, net)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for u, v in zip(g_a, g_b):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_missing_denoiser_is_named():
    sch = shortft.make_schedule()
    with pytest.raises(KeyError, match="shortcut"):
        shortft.apply_segment(torch.zeros(1, 2), Segment("shortcut", 981, 501), {"tuned": TinyDenoiser()}, sch)


# ----------------------------------------------------------------------------- reward loss and the guarded update


def _toy_update(reward_scale: float):
    sch, grid, net = shortft.make_schedule(), shortft.ddim_timesteps(4), TinyDenoiser()
    x_T = torch.randn(5, 2, dtype=torch.float64)
    chain = shortft.draft_k(grid, k=2)
    loss, rewards = shortft.reward_loss(x_T, chain, {"tuned": net}, sch, lambda x: -reward_scale * (x**2).sum(1))
    return net, loss, rewards


def test_guarded_step_skips_nan_and_leaves_weights_bit_identical():
    net, loss, rewards = _toy_update(float("nan"))
    assert torch.isnan(loss) and rewards.shape == (5,)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in net.parameters()]
    loss.backward()
    applied, norm = runio.guarded_step(opt, list(net.parameters()))
    assert applied is False and norm != norm  # NaN
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters())
    assert len(opt.state) == 0  # Adam's moments were not touched either


@pytest.mark.parametrize("lr", [float("inf"), float("nan")])
def test_guarded_step_restores_weights_that_a_step_made_non_finite(lr):
    """A finite gradient with an absurd learning rate: the step is taken, its non-finite result is undone."""
    net, loss, _ = _toy_update(1.0)
    params = list(net.parameters())
    loss.backward()
    before = [p.detach().clone() for p in params]
    applied, norm = runio.guarded_step(torch.optim.SGD(params, lr=lr), params)
    assert applied is False and norm == norm and norm > 0
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)


def test_guarded_step_reads_a_parameter_generator_once():
    """`model.parameters()` is a generator: the gradient norm must not use it up before clipping, the NaN/inf guard
    and the step see it (a norm-2e6 gradient applied unclipped, or lr = inf weights reported as applied)."""
    net, loss, _ = _toy_update(1e6)
    params = list(net.parameters())
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    norm = float(torch.stack([g.norm() for g in grads]).norm())
    before = [p.detach().clone() for p in params]
    applied, got = runio.guarded_step(torch.optim.SGD(params, lr=0.1), net.parameters(), max_grad_norm=1.0)
    assert applied is True and got == pytest.approx(norm, rel=1e-6) and norm > 1e3
    step = torch.cat([(b - p.detach()).flatten() for p, b in zip(params, before)]).norm()
    assert float(step) == pytest.approx(0.1, rel=1e-5)  # clipped to norm 1, times lr
    net, loss, _ = _toy_update(1.0)
    loss.backward()
    before = [p.detach().clone() for p in net.parameters()]
    applied, _ = runio.guarded_step(torch.optim.SGD(net.parameters(), lr=float("inf")), net.parameters())
    assert applied is False and all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("bad, error", [(float("nan"), ValueError), (-1.0, ValueError), ("1", ValueError),
                                        (float("inf"), ValueError)])
def test_guarded_step_refuses_a_meaningless_clip(bad, error):
    net, loss, _ = _toy_update(1.0)
    loss.backward()
    with pytest.raises(error, match="max_grad_norm"):
        runio.guarded_step(torch.optim.SGD(net.parameters(), lr=0.1), net.parameters(), max_grad_norm=bad)
    with pytest.raises(TypeError, match="parameters must be tensors"):
        runio.guarded_step(torch.optim.SGD(net.parameters(), lr=0.1), [1.0, 2.0])


def test_guarded_step_applies_clipped_update():
    net, loss, _ = _toy_update(1.0)
    params = list(net.parameters())
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    norm = torch.stack([g.norm() for g in grads]).norm()
    max_norm = float(norm) / 4  # force clipping
    before = [p.detach().clone() for p in params]
    applied, got = runio.guarded_step(torch.optim.SGD(params, lr=0.1), params, max_grad_norm=max_norm)
    assert applied is True and got == pytest.approx(float(norm), rel=1e-6)
    for p, b, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g * (max_norm / norm), rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in params)


def test_reward_loss_is_minus_mean_reward():
    sch, grid, net = shortft.make_schedule(), shortft.ddim_timesteps(4), TinyDenoiser()
    x_T = torch.randn(5, 2, dtype=torch.float64)
    chain = shortft.full(grid)

    def reward_fn(x):
        return -(x**2).sum(1)

    loss, rewards = shortft.reward_loss(x_T, chain, {"tuned": net}, sch, reward_fn)
    expected = reward_fn(_unrolled(x_T, grid, net, sch))
    torch.testing.assert_close(rewards, expected.detach())
    torch.testing.assert_close(loss, -expected.mean())
    assert not rewards.requires_grad and loss.requires_grad
    for bad in (lambda x: -(x**2).sum(), lambda x: -(x**2), lambda x: [0.0] * len(x)):
        with pytest.raises(ValueError, match="one value per sample, shape \\(5,\\)"):
            shortft.reward_loss(x_T, chain, {"tuned": net}, sch, bad)


def test_cosine_and_grad_norm():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert measure_toy.cosine(a, b) == pytest.approx(2**-0.5)
    assert measure_toy.cosine(a, -a) == pytest.approx(-1.0)
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    p.grad, q.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert float(runio.grad_norm([p, q])) == pytest.approx(5.0)
