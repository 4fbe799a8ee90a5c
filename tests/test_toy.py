"""The toy world (toy.py), its training loop (train_toy.py) and main job (bench_toy.py) on tiny budgets: the tuned
denoiser against a hand sum of LoRA deltas, where each progressive stage's gradient reaches, the real entry points
end to end, bit-exact resume across a stage boundary, one-line errors, NaN rewards skipped, the toy rewards."""

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench_progressive
import bench_toy
import rewards
import runio
import shortft
import toy
import train_toy

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden=16, depth=1, pretrain_steps=30, pretrain_batch=64, shortcut_rank=4, distill_steps=10,
            distill_pairs=128, distill_batch=64)
P = shortft.PAPER_LORA_POINTS


def argv(d: dict) -> list[str]:
    """{'hidden': 16, 'lora_points': [761, 1]} → ['--hidden', '16', '--lora-points', '761', '1']."""
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, (list, tuple)) else [v])]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    toy.build_toy(toy.WorldArgs(cache_dir=str(path), **TINY), P)  # pretrain + distil once for the module
    return path


def world_args(cache) -> toy.WorldArgs:
    return toy.WorldArgs(cache_dir=str(cache), **TINY)


def randomise_loras(world: toy.Toy, seed: int = 0) -> None:
    """Non-zero B (and A) in every trainable branch, so that every LoRA delta and both gradients are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.tuned_params():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- the denoisers


@pytest.mark.parametrize("points, aware", [(P, True), (P, False), (None, True)])
def test_tuned_denoiser_is_base_plus_the_active_lora_deltas(cache, points, aware):
    """TUNED at t = the base MLP with W + Σ_{i ∈ active_loras(t)} (α/r) B_i A_i in every Linear (hand sum), with CFG."""
    world = toy.build_toy(world_args(cache), points, aware, lora_rank=2, lora_alpha=3.0)
    randomise_loras(world)
    model, x, c = world.model, torch.randn(5, 2), torch.tensor([0, 1, 2, 3, 0])
    den = toy.make_denoisers(world, c)

    def hand_eps(t: int, adapters: list[str]) -> torch.Tensor:
        def linear(name, h):
            layer = model.get_submodule(name)
            w = layer.base_layer.weight + sum((layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight
                                               for a in adapters if a in layer.lora_A), torch.zeros(()))
            return F.linear(h, w, layer.base_layer.bias)

        def eps(cls):
            tt = torch.full((5,), t)
            h = linear("inp", torch.cat([x, toy.timestep_embedding(tt), model.class_emb(cls)], 1))
            h = h + linear("inp_s", toy.timestep_embedding(tt))
            for i in range(len(model.hidden)):
                h = h + linear(f"hidden.{i}", F.silu(h))
            return linear("out", F.silu(h))

        return shortft.classifier_free_guidance(eps(torch.full_like(c, world.classes)), eps(c), world.guidance)

    with torch.no_grad():
        for t in (981, 861, 761, 741, 501, 481, 261, 241, 1):
            want = [world.names[i] for i in shortft.active_loras(t, points, aware)]
            assert world.active(t) == want
            torch.testing.assert_close(den[shortft.TUNED](x, t), hand_eps(t, want), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(den[shortft.BASE](x, t), hand_eps(t, []), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(den[shortft.TUNED](x, 501), den[shortft.BASE](x, 501))


def test_denoisers_switch_adapters_without_freezing(cache):
    world = toy.build_toy(world_args(cache), P)
    den = toy.make_denoisers(world, torch.zeros(3, dtype=torch.long))
    x = torch.randn(3, 2)
    randomise_loras(world)
    e_base, e_tuned = den["base"](x, 501), den["tuned"](x, 501)
    den["shortcut"](x, 501, 261)
    assert not torch.allclose(e_base, e_tuned)
    assert all(p.requires_grad for p in world.tuned_params())
    assert not any(p.requires_grad for n, p in world.model.named_parameters() if ".shortcut." in n or "lora_" not in n)


def test_lower_quality_shortcuts_are_the_bases_own_ddim_step(cache):
    """--shortcut base: a jump t → s is the base's one DDIM step with CFG; --shortcut zero: the same step without CFG
    (the shortcut LoRA at B = 0); the distilled shortcut differs from both."""
    x, c, t, s = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 0, 1]), 741, 501
    jumps = {}
    for kind in toy.SHORTCUTS:
        world = toy.build_toy(dataclasses.replace(world_args(cache), shortcut=kind), P)
        den = toy.make_denoisers(world, c)
        with torch.no_grad():
            jumps[kind] = shortft.apply_segment(x, shortft.Segment(shortft.SHORTCUT, t, s), den, world.schedule)
            guided = shortft.apply_segment(x, shortft.Segment(shortft.BASE, t, s), den, world.schedule)
            unguided = shortft.ddim_step(x, world.model(x, torch.full((6,), t), torch.full((6,), t), c), *(
                world.schedule.alpha_bar(u) for u in (t, s)))
    torch.testing.assert_close(jumps["base"], guided, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(jumps["zero"], unguided, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(jumps["distilled"], guided, atol=1e-4) and not torch.allclose(guided, unguided, atol=1e-4)


@pytest.mark.parametrize("aware", [True, False])
def test_each_stage_reaches_exactly_its_adapters(cache, aware):
    """With the loop's requires_grad switch, the stage-i chain's gradient reaches every parameter (A and B) of
    tuned_i … tuned_k and no other adapter, never the shortcut or the base weights."""
    world = toy.build_toy(world_args(cache), P, aware)
    randomise_loras(world)
    x_T, c = torch.randn(16, 2), torch.randint(0, 4, (16,))
    reward = toy.make_reward("region:1,quality:1", world_args(cache))
    for stage in range(1, shortft.num_loras(P, aware) + 1):
        trainable = train_toy.set_trainable(world, stage)
        chain = shortft.shortft(world.grid, P, stage=stage)
        loss, _ = shortft.reward_loss(x_T, chain, toy.make_denoisers(world, c), world.schedule, lambda x: reward(x, c))
        loss.backward()
        for name, p in world.model.named_parameters():
            reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
            owner = next((i for i, a in enumerate(world.names) if f".{a}." in name), None)
            assert reached == (owner in trainable), (stage, name)
            p.grad = None


# ----------------------------------------------------------------------------- train_toy.py


def test_train_toy_entry_point_end_to_end(cache, tmp_path):
    """`python train_toy.py …` in a subprocess: metrics.jsonl with the shared keys and every stage, the LoRA file."""
    cmd = [sys.executable, "train_toy.py", *argv(dict(TINY, cache_dir=cache, out_dir=tmp_path, name="run", budget=4,
                                                       budget_unit="updates", evals=2, eval_batch=16, batch_size=8))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in train_rows] == [1, 2, 3, 4] and [r["update"] for r in train_rows] == [1, 2, 3, 4]
    assert {"update", "stage", "loss", "reward/train", "grad/norm", "update/skipped", "time/update_s",
            "chain/grad_evals"} <= set(train_rows[0])
    assert [r["chain/grad_evals"] for r in train_rows] == [7, 5, 3, 1]
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert [r["update"] for r in evals] == [0, 2, 4]
    assert {"eval/reward_std", "eval/base_reward_mean", "eval/quality_mean"} <= set(evals[0])
    assert evals[0]["eval/reward_mean"] == evals[0]["eval/base_reward_mean"]  # B = 0: the tuned model is the base
    assert {re.search(r"\.(tuned_\d)\.", k).group(1) for k in runio.load_tensors(run / "lora.safetensors")} == \
        {"tuned_1", "tuned_2", "tuned_3", "tuned_4"}
    assert json.loads((run / "args.json").read_text())["lora_points"] == []  # the paper's, mapped to the grid:
    from safetensors import safe_open

    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        assert f.metadata()["points"] == str(list(P))


@pytest.mark.parametrize("method, resume_from", [("shortft", 3), ("shortft", 6), ("alignprop", 3)])
def test_resume_is_bit_exact_across_stage_boundaries(cache, tmp_path, method, resume_from):
    """8 updates in 4 stages of 2: resuming from update 3 (mid stage 2) or 6 (a boundary) ends bit-identical."""
    kw = dict(TINY, cache_dir=str(cache), out_dir=str(tmp_path), method=method, budget=8, budget_unit="updates",
              evals=2, eval_batch=16, batch_size=8, save_every=3)
    whole = train_toy.train(train_toy.Args(name="whole", **kw), log=lambda *a: None)
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / f"step_{resume_from:07d}", part / f"step_{resume_from:07d}")
    shutil.copy(tmp_path / "whole" / "args.json", tmp_path / "part" / "args.json")
    resumed = train_toy.train(train_toy.Args(name="part", resume=True, **kw), log=lambda *a: None)
    a, b = (runio.load_tensors(tmp_path / n / "lora.safetensors") for n in ("whole", "part"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["updates"] == whole["updates"] == 8
    losses = [[r["loss"] for r in runio.read_jsonl(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in ("whole", "part")]
    assert losses[1] == losses[0][resume_from:]


@pytest.mark.parametrize("args, msg", [
    (["--lora-points", "760", "501", "261", "1"], "not on the 50-step grid"),
    (["--lora-points", "261", "501", "761", "1"], "strictly decreasing"),
    (["--stage-fractions", "1", "2"], "4 positive numbers"),
    (["--method", "sgd"], "unknown method"),
    (["--reward", "beauty"], "unknown reward 'beauty'"),
    (["--budget-unit", "hours"], "--budget-unit hours"),
    (["--num-steps", "20"], "50-step grid"),
])
def test_bad_input_is_one_line_and_exit_2(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        train_toy.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and "\n" not in err and "Traceback" not in err


def test_nan_reward_is_a_counted_skip(cache, tmp_path, monkeypatch):
    world = toy.build_toy(world_args(cache), P)
    before = world.tuned_state()
    make = toy.make_reward
    nan_in_updates = lambda x, c: x.sum(1) * (math.nan if torch.is_grad_enabled() else 1.0)  # noqa: E731 (the
    # probe and the evaluations run without gradient: a reward that is NaN from the start stops the run at the probe)
    monkeypatch.setattr(toy, "make_reward", lambda spec, w: nan_in_updates if spec == "region" else make(spec, w))
    out = train_toy.train(train_toy.Args(**TINY, cache_dir=str(cache), out_dir=str(tmp_path), reward="region", budget=3,
                                         budget_unit="updates", evals=1, eval_batch=8, batch_size=8), log=lambda *a: None)
    assert out["skipped"] == 3 and out["updates"] == 3
    after = runio.load_tensors(Path(out["run_dir"]) / "lora.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- bench_toy.py


def test_bench_toy_end_to_end(cache, tmp_path):
    metrics = bench_toy.main(argv(dict(TINY, cache_dir=cache, out_dir=tmp_path, seeds=[0, 1], budget=2,
                                       budget_unit="updates", evals=1, eval_batch=16, grad_samples=8,
                                       chain_lengths=[5, 10])))
    out = tmp_path / "toy"
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["summary"]) == set(bench_toy.VARIANTS)
    for s in saved["summary"].values():
        assert s["updates"] == [2, 0] and len(s["seeds"]) == 2 and all(math.isfinite(v) for v in s["reward"])
    assert set(saved["chain_jump_error"]) == {"741->501", "481->261", "241->1"}
    assert set(saved["trajectory_error"]) == {"1", "2", "4", "8"}
    fid = next(iter(saved["gradient_fidelity"].values()))
    assert fid["cosine"]["stage 4"]["tuned_4"] == pytest.approx(1.0, abs=1e-6)  # the same single last step
    assert all(v == 0 for v in fid["a_share_of_exact"].values())  # B = 0 at init: no gradient into A
    assert len(saved["gradient_fidelity"]) == 4 and saved["gradient_norm"]["chain_length"] == [5, 10]
    md = (out / "tables.md").read_text()
    assert md.count("ShortFT > ") == 4 and "| ShortFT |" in md
    for f in metrics["figures"]:
        assert (out / f).stat().st_size > 0
    assert (out / "shortft-s1" / "lora.safetensors").is_file()


def test_bench_toy_reuses_finished_runs_and_times_to_target(cache, tmp_path):
    kw = dict(TINY, cache_dir=cache, out_dir=tmp_path, seeds=[0], budget=2, budget_unit="updates", evals=2,
              eval_batch=16, grad_samples=8, chain_lengths=[5], variants=["shortft", "refl"])
    first = bench_toy.main(argv(kw))
    (tmp_path / "toy" / "shortft-s0" / "metrics.jsonl").unlink()  # a reused run is not trained again
    lora = runio.load_tensors(tmp_path / "toy" / "refl-s0" / "lora.safetensors")
    shutil.rmtree(tmp_path / "toy" / "refl-s0")  # trained again, now in a worker process of its own
    again = bench_toy.main(argv(dict(kw, workers=2)))
    for key in ("reward", "quality", "updates", "gflop", "curves", "seeds"):  # bit-identical for any --workers
        assert [again["summary"][v][key] for v in kw["variants"]] == [first["summary"][v][key] for v in kw["variants"]]
    assert not (tmp_path / "toy" / "shortft-s0" / "metrics.jsonl").exists()
    retrained = runio.load_tensors(tmp_path / "toy" / "refl-s0" / "lora.safetensors")
    assert lora.keys() == retrained.keys() and all(torch.equal(lora[k], retrained[k]) for k in lora)
    assert bench_toy.first_reach([(0.0, -3.0), (2.0, -1.0), (4.0, 0.0)], -2.0) == pytest.approx(1.0)
    assert bench_toy.first_reach([(0.0, -3.0), (2.0, -2.5)], -2.0) is None
    summary = {"a": {"reward": (-1.0, 0.0), "base_reward": -3.0, "curves": [[(0.0, -3.0), (2.0, -1.0)]]},
               "b": {"reward": (-2.0, 0.0), "base_reward": -3.0, "curves": [[(0.0, -3.0), (2.0, -2.0)]]}}
    assert bench_toy.add_time_to_target(summary, 0.5) == -2.0
    assert summary["a"]["to_target"]["gflop"] == (1.0, 0.0) and summary["b"]["to_target"]["reached"] == 1


def test_bench_progressive_end_to_end(cache, tmp_path):
    metrics = bench_progressive.main(argv(dict(TINY, cache_dir=cache, out_dir=tmp_path, seeds=[0],
                                               conditions=["distilled", "zero", "seg1_4"], budget=0.05, evals=1,
                                               eval_batch=16)))
    conds = metrics["conditions"]
    assert set(conds) == {"distilled", "zero", "seg1_4"}
    assert conds["seg1_4"]["jump_error"] == conds["distilled"]["jump_error"]  # same shortcut, other chain
    for c in conds.values():
        assert c["prog"]["gap"]["stage 4"]["distance"] == (0.0, 0.0)  # the last stage's chain is the sampler
        assert c["ordering"] in "<>≈" and c["prog"]["updates"][0] > 0
    assert (tmp_path / "toy-progressive" / "tables.md").read_text().count("| distilled shortcut") == 2


def test_bench_toy_bad_variant(capsys):
    with pytest.raises(SystemExit) as e:
        bench_toy.main(["--variants", "shortft", "sgd"])
    assert e.value.code == 2 and "sgd" in capsys.readouterr().err


def test_orderings_need_the_difference_to_exceed_the_spread():
    a, b = {"reward": (1.0, 0.1)}, {"reward": (0.5, 0.3)}
    assert bench_toy.ordering(a, b) == ">" and bench_toy.ordering(b, a) == "<"
    assert bench_toy.ordering(a, {"reward": (0.7, 0.25)}) == "≈"
    assert bench_toy.spread([1.0, 2.0, 3.0]) == (2.0, 1.0) and bench_toy.spread([4.0]) == (4.0, 0.0)


# ----------------------------------------------------------------------------- toy rewards


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


def test_bench_run_that_diverges_is_a_row_not_the_end(cache, tmp_path, monkeypatch):
    """bench_toy's runs do not stop at --max-skipped: a method whose updates turn non-finite ends with its last finite
    weights and its skipped count, and a finished run is reused whatever that stop rule was."""
    make = toy.make_reward
    nan_in_updates = lambda x, c: x.sum(1) * (math.nan if torch.is_grad_enabled() else 1.0)  # noqa: E731
    monkeypatch.setattr(toy, "make_reward", lambda spec, w: nan_in_updates if spec == "region" else make(spec, w))
    args = bench_toy.BenchArgs(**TINY, cache_dir=str(cache), out_dir=str(tmp_path), reward="region", budget=25,
                               budget_unit="updates", evals=1, eval_batch=8)
    run = bench_toy.run_args(args, "shortft", 0)
    out = bench_toy.train_run(run)  # more non-finite updates in a row than train_toy.py's default --max-skipped 20
    assert out["skipped"] == out["updates"] == 25 > train_toy.Args.max_skipped
    assert bench_toy.finished_run(dataclasses.replace(run, max_skipped=20)) == bench_toy.finished_run(run) == out
    assert bench_toy.finished_run(dataclasses.replace(run, lr=run.lr / 2)) is None
    summary = {"shortft": bench_toy.summarise([out])}
    assert summary["shortft"]["skipped"] == [25]
    assert "Skipped updates (non-finite; the weights kept, the budget spent): ShortFT: seed 0 25." in \
        bench_toy.tables_markdown(summary, dataclasses.replace(args, seeds=[0], variants=["shortft"]))
