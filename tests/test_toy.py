"""train_toy.py end to end on tiny budgets through the real script: metrics and figures, exact
resume, bad input (one-line errors, NaN rewards skipped without touching the LoRA), toy rewards."""

import json
import math

import pytest
import torch

import rewards
import runio
import shortft
import train_toy as T



TINY = dict(hidden=16, depth=1, pretrain_steps=30, pretrain_batch=64, shortcut_rank=4, distill_steps=10,
            distill_pairs=128, distill_batch=64, batch=8, budget=2, budget_unit="updates", evals=1, eval_batch=32,
            grad_samples=4, cosine_steps=[4, 44, 49], chain_lengths=[5, 10])


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_main_compare_end_to_end(out):
    metrics = T.main(T.Args(out=str(out), name="cmp", **TINY))
    run = out / "cmp"
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved["methods"]) == set(shortft.METHODS)
    for m in shortft.METHODS:
        v = saved["methods"][m]
        assert v["updates"] == 2 and math.isfinite(v["reward_after"]) and v["seconds"] > 0
        assert {"reward_before", "seconds_per_update", "reward_gain_per_second"} <= set(v)
    assert set(saved["trajectory_error"]) == {"1", "2", "4", "8"}
    assert saved["grad_cosine"]["draft_k"][str(shortft.ddim_timesteps(50)[4])] is None
    assert abs(saved["grad_cosine"]["shortft"]["1"]["lora"] - 1) < 1e-6  # last step: no jumps after it
    assert len(saved["grad_norm"]["full"]) == 2
    for f in metrics["figures"]:
        assert (run / f).stat().st_size > 0
    assert json.loads((run / "args.json").read_text())["budget"] == 2


def test_resume_equals_uninterrupted(out):
    kw = dict(TINY, compare=False, method="shortft", measure=False, budget=4, evals=2)
    T.main(T.Args(out=str(out), name="whole", **kw))
    T.main(T.Args(out=str(out), name="parts", **dict(kw, budget=2, save_every=2)))
    T.main(T.Args(out=str(out), name="parts", resume=True, **dict(kw, save_every=2)))
    a, _ = runio.load_checkpoint(runio.latest_checkpoint(out / "whole"), restore_rng=False)
    b, state = runio.load_checkpoint(runio.latest_checkpoint(out / "parts"), restore_rng=False)
    assert state["update"] == 4 and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw, msg", [
    (dict(method="sgd"), "unknown method 'sgd'"),
    (dict(reward="beauty"), "unknown reward 'beauty'"),
    (dict(jumps_after=50), "must be in \\[1, 49\\]"),
    (dict(budget_unit="hours"), "budget-unit"),
    (dict(resume=True), "single-method"),
])
def test_bad_input_one_line_error(out, kw, msg):
    with pytest.raises(SystemExit, match=msg) as e:
        T.main(T.Args(out=str(out), name="bad", **dict(TINY, **kw)))
    assert "\n" not in str(e.value)


def test_nan_reward_is_a_counted_skip(out):
    args = T.Args(out=str(out), **dict(TINY, budget=3))
    toy, _ = T.build_toy(args, progress=False)
    before = T.tuned_weights(toy)
    x, c = torch.randn(8, 2), torch.randint(0, 4, (8,))

    def nan_reward(x0, cond):
        return x0.sum(1) * float("nan")

    state = T.finetune(toy, "shortft", args, nan_reward, (x, c), progress=False)
    assert state["skipped"] == 3 and state["update"] == 3
    after = T.tuned_weights(toy)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_denoisers_switch_adapters_without_freezing(out):
    args = T.Args(out=str(out), **TINY)
    toy, _ = T.build_toy(args, progress=False)
    den = T.make_denoisers(toy, torch.zeros(3, dtype=torch.long))
    x = torch.randn(3, 2)
    with torch.no_grad():
        for p in toy.tuned_params():
            p.add_(0.1)
    e_base, e_tuned = den["base"](x, 500), den["tuned"](x, 500)
    den["shortcut"](x, 500, 200)
    assert not torch.allclose(e_base, e_tuned)
    assert all(p.requires_grad for p in toy.tuned_params())
    assert not any(p.requires_grad for n, p in toy.model.named_parameters() if ".shortcut." in n)


def test_toy_rewards():
    kw = dict(ring_radius=2.0, modes=8, classes=4)
    mu = rewards.mode_centers(2.0, 8)
    q = rewards.make_reward("quality", **kw)(mu, None)
    assert torch.allclose(q, torch.zeros(8), atol=1e-3)
    reg = rewards.make_reward("region", **kw)
    assert reg(torch.tensor([[0.0, 2.1], [0.0, 0.0]]), None).tolist() == pytest.approx([0.0, -(1.7**2)])
    agree = rewards.make_reward("class_agreement", **kw)
    x = torch.tensor([[1.0, 0.4]]).repeat(4, 1)  # in class 0's sector
    logp = agree(x, torch.arange(4))
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-5) and logp.argmax().item() == 0
    x = torch.randn(5, 2, requires_grad=True)
    rewards.make_reward("region:1,class_agreement:0.5,quality:0.1", **kw)(x, torch.zeros(5, dtype=torch.long)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_shift_rewards_closed_form():
    kw = dict(ring_radius=2.0, modes=8, classes=4)
    mu = rewards.mode_centers(2.0, 8)
    ms = rewards.make_reward("mode_shift", **kw)  # class c's target modes: those of class (c + 2) mod 4
    c0 = torch.zeros(3, dtype=torch.long)
    r = ms(torch.stack([mu[4], torch.zeros(2), mu[0]]), c0)
    d2_45 = (mu[4] - mu[5]).pow(2).sum() / (2 * 0.25**2)  # a target mode also sees its neighbour target mode
    d2_05 = (mu[0] - mu[5]).pow(2).sum() / (2 * 0.25**2)
    want = [math.log1p(math.exp(-d2_45)), math.log(2) - 4.0 / (2 * 0.25**2), torch.logaddexp(-d2_05, torch.tensor(-128.0)).item()]
    assert r.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert ms(mu[[4, 5, 6, 7, 0, 1, 2, 3]], torch.arange(4).repeat_interleave(2)).abs().max() < 1e-6  # all on target
    cs, agree = rewards.make_reward("class_shift", **kw), rewards.make_reward("class_agreement", **kw)
    x, c = torch.randn(16, 2), torch.randint(0, 4, (16,))
    assert torch.allclose(cs(x, c), agree(x, (c + 2) % 4))
    x = torch.cat([torch.zeros(1, 2), 5 * torch.randn(7, 2)]).requires_grad_(True)  # the origin and far points
    rewards.make_reward("mode_shift:1,class_shift:1,quality:1", **kw)(x, torch.arange(8) % 4).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_seconds_to_interpolates_the_crossing():
    curve = [{"seconds": 0.0, "reward/mean": -4.0}, {"seconds": 1.0, "reward/mean": -2.0}, {"seconds": 2.0, "reward/mean": 0.0}]
    assert T.seconds_to(curve, -1.0) == 2.0
    assert T.seconds_to(curve, -1.0, interpolate=True) == pytest.approx(1.5)
    assert T.seconds_to(curve, -5.0, interpolate=True) == 0.0 and T.seconds_to(curve, 1.0, interpolate=True) is None
    s = T.summarise({"full": {"curve": curve, "seconds": 2.0, "update": 4, "skipped": 0},
                     "shortft": {"curve": [dict(p, seconds=p["seconds"] / 4) for p in curve], "seconds": 0.5,
                                 "update": 4, "skipped": 0}})
    assert s["full"]["target_reward"] == pytest.approx(-0.04)
    assert s["shortft"]["seconds_to_target"] == pytest.approx(0.25 * (1 + 1.96 / 2))
    assert s["shortft"]["fraction_of_full_seconds"] == pytest.approx(s["shortft"]["seconds_to_target"] / 2.0)


def test_lora_decay_norm_matches_peft(out):
    args = T.Args(out=str(out), **TINY)
    toy, _ = T.build_toy(args, progress=False)
    assert T.lora_delta_norm2(toy).item() == 0.0  # B = 0 at init
    with torch.no_grad():
        for p in toy.tuned_params():
            p.add_(0.1)
    want = sum(layer.get_delta_weight(a).pow(2).sum() for layer in toy.layers for a in toy.tuned)
    assert T.lora_delta_norm2(toy).item() == pytest.approx(want.item(), rel=1e-5)
    state = T.finetune(toy, "draft_k", T.Args(out=str(out), **dict(TINY, lora_decay=1.0)), rewards.make_reward("region"),
                       (torch.randn(8, 2), torch.zeros(8, dtype=torch.long)), progress=False)
    assert state["skipped"] == 0
