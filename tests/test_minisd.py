"""The miniature Stable Diffusion of minisd.py, on its reduced build (--preset test, built once): the folder
loads as a StableDiffusionPipeline and through sd.load_components and samples as diffusers' own
pipeline does; the shortcut file loads with shortcut.load_shortcut_lora and lands closer to the teacher
than the base's one-step jump; the digit reward is the classifier's log-softmax, differentiable in the
images; a LoRA that train_sd.py trains on the digit reward loads in a stock StableDiffusionPipeline and raises
the reward of its samples; a second build reuses every stage; bad input gives one line."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import minisd
import rewards
import shortcut
import shortft
import sd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """The reduced build, once per test session: (args, report)."""
    args = minisd.Args(preset="test", out=str(tmp_path_factory.mktemp("minisd") / "test"))
    return minisd.apply_preset(args), minisd.main(args)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def conditioning(c, prompts):
    with torch.no_grad():
        return minisd.embed(c["tokenizer"], c["text_encoder"], prompts)


def test_pipeline_folder_loads_in_diffusers_and_train_sd(build):
    from diffusers import StableDiffusionPipeline

    args, report = build
    pipe = StableDiffusionPipeline.from_pretrained(Path(args.out) / "pipeline", safety_checker=None)
    c = sd.load_components(str(Path(args.out) / "pipeline"))
    sched = c["scheduler"].config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule, sched.num_train_timesteps) == (0.00085, 0.012, "scaled_linear", 1000)
    assert (sched.set_alpha_to_one, sched.steps_offset, sched.clip_sample) == (False, 1, False)
    assert c["vae"].config.scaling_factor == pytest.approx(report["vae"]["scaling_factor"])
    assert pipe.vae_scale_factor * c["unet"].config.sample_size == 32
    assert c["unet"].config.cross_attention_dim == c["text_encoder"].config.hidden_size
    for name in ("unet", "vae", "text_encoder"):  # the same weights through both loaders
        for (k, a), (_, b) in zip(getattr(pipe, name).state_dict().items(), c[name].state_dict().items()):
            assert torch.equal(a, b), (name, k)


def test_minisd_sampler_is_diffusers_pipeline(build):
    """minisd.ddim_trajectory (scores the guidance scales, makes the teacher) = StableDiffusionPipeline's
    50-step DDIM + CFG on the same x_T."""
    from diffusers import StableDiffusionPipeline

    args, report = build
    pipe = StableDiffusionPipeline.from_pretrained(Path(args.out) / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    w, prompts = report["guidance"]["chosen"], [minisd.prompt(3), minisd.prompt(8)]
    x_T = torch.randn(2, 4, 4, 4)
    ref = pipe(prompts, num_inference_steps=50, guidance_scale=w, latents=x_T, output_type="latent").images
    c = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    schedule, grid = sd.schedule_from_diffusers(pipe.scheduler.config), shortft.ddim_timesteps(50)
    z = minisd.ddim_trajectory(pipe.unet, x_T, conditioning(c, prompts), conditioning(c, [""]), w, grid, schedule)[-1]
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-4)


def test_shortcut_loads_and_jumps_closer_than_the_base(build):
    """The LoRA file, loaded as train_sd.py loads a shortcut, lands closer to the teacher's x_p than the base's
    one-step DDIM + CFG jump on fresh trajectories at the teacher's CFG scale w_T (the benchmark's, not the
    guidance stage's), summed over the three jumps, and it is frozen; minisd.shortcut_error is the build's
    trajectory-error stage."""
    args, report = build
    c = sd.load_components(str(Path(args.out) / "pipeline"))
    file = Path(args.out) / "shortcut" / "pytorch_lora_weights.safetensors"
    params = shortcut.load_shortcut_lora(c["unet"], file)
    assert params and not any(p.requires_grad for p in params)
    loaded = dict(c["unet"].named_parameters())
    for k, v in load_file(str(file)).items():  # every tensor of the file is in the UNet, none dropped
        assert torch.equal(loaded[k.removeprefix("unet.").replace(".weight", ".shortcut.weight")], v), k
    shortcut.set_active_adapters(c["unet"], [])
    w, grid = report["shortcut"]["teacher_guidance"], shortft.ddim_timesteps(50)
    assert w == args.teacher_guidance != report["guidance"]["chosen"] and report["trajectory_error"]["guidance"] == w
    schedule = sd.schedule_from_diffusers(c["scheduler"].config)
    labels = torch.arange(20) % 10
    cond, uncond = conditioning(c, [minisd.prompt(int(d)) for d in labels]), conditioning(c, [""])
    traj = minisd.ddim_trajectory(c["unet"], torch.randn(20, 4, 4, 4), cond, uncond, w, grid, schedule)
    errors = minisd.jump_errors(c["unet"], traj, cond, uncond, w, grid, schedule, args.lora_points)
    assert list(errors) == ["741->501", "481->261", "241->1"]
    total = {k: sum(e[k]["of_displacement"] for e in errors.values()) for k in ("shortcut", "base_cfg")}
    assert total["shortcut"] < total["base_cfg"], errors
    again = minisd.shortcut_error(Path(args.out) / "pipeline", file, w, args.eval_trajectories, args.seed + 9,
                                  args.lora_points)
    assert again == report["trajectory_error"]["jumps"]


def test_shortcut_loads_in_a_stock_pipeline(build):
    from diffusers import StableDiffusionPipeline

    args, _ = build
    pipe = StableDiffusionPipeline.from_pretrained(Path(args.out) / "pipeline", safety_checker=None)
    pipe.load_lora_weights(Path(args.out) / "shortcut")
    tensors = load_file(str(Path(args.out) / "shortcut" / "pytorch_lora_weights.safetensors"))
    lora = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(lora) == len(tensors) and all(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)


def test_train_sd_lora_raises_the_digit_reward_in_a_stock_pipeline(build, tmp_path):
    """train_sd.py (DRaFT-K, the cheapest chain, 30 updates) on the reduced build; its LoRA folder, loaded with
    sd.prepare_pipeline into a StableDiffusionPipeline from the build's folder, raises the mean digit reward of
    the pipeline's samples on fixed seeds (never used in training) over the same pipeline with the LoRA off."""
    from diffusers import StableDiffusionPipeline

    import train_sd

    args, report = build
    root = Path(args.out)
    classifier = str(root / "classifier.safetensors")
    run = train_sd.main(train_sd.Args(
        model=str(root / "pipeline"), reward="digit", digit_classifier=classifier, method="draft_k",
        resolution=32, guidance=report["guidance"]["chosen"], lora_rank=4, lora_alpha=4.0, lr=5e-2, steps=30,
        batch_size=4, train_prompts=str(ROOT / "prompts/digits_train.txt"),
        eval_prompts=str(ROOT / "prompts/digits_eval.txt"), eval_samples=1, eval_every=0, save_every=0,
        out_dir=str(tmp_path), name="digit"))
    reward = rewards.make_reward("digit", digit_classifier=classifier)
    prompts = [minisd.prompt(d) for d in range(10)] * 2
    pipe = StableDiffusionPipeline.from_pretrained(root / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = sd.prepare_pipeline(pipe, run["run_dir"] / "lora")

    def mean_reward(**kw):
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
        with torch.no_grad():
            return reward(pipe(prompts, generator=gens, output_type="pt", **kw).images, prompts).mean().item()

    tuned = mean_reward(**kwargs)
    pipe.disable_lora()
    base = mean_reward(num_inference_steps=50, guidance_scale=kwargs["guidance_scale"])
    assert tuned > base + 0.15, (base, tuned)  # about half the rise measured on this build (README)


def test_segment_pairs_follow_the_lora_points():
    grid = shortft.ddim_timesteps(50)
    pairs = [(grid[i], grid[j]) for i, j in minisd.segment_pairs(grid, [761, 501, 261, 1])]
    assert (741, 501) in pairs and (481, 261) in pairs and (241, 1) in pairs and (981, 761) in pairs
    assert all(t not in (761, 501, 261, 1) for t, _ in pairs) and len(pairs) == 46
    assert all(max(p for p in (761, 501, 261, 1) if p < t) == s for t, s in pairs)


def test_digit_reward_is_log_softmax_of_the_classifier(build):
    args, report = build
    path = Path(args.out) / "classifier.safetensors"
    reward = rewards.make_reward("digit", digit_classifier=str(path))
    model = rewards.DigitClassifier(**json.loads(path.with_suffix(".json").read_text()))
    model.load_state_dict(load_file(str(path)))
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    prompts = ["a handwritten 7", "3", "a handwritten Nine"]
    r = reward(x, prompts)
    small = torch.nn.functional.interpolate(x.detach(), size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    manual = torch.log_softmax(model.features(small).flatten(1) @ model.head.weight.T + model.head.bias, -1)
    torch.testing.assert_close(r.detach(), manual[torch.arange(3), torch.tensor([7, 3, 9])])
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert not any(p.requires_grad for p in reward.models[0].parameters())


def test_digit_reward_errors(build, tmp_path):
    with pytest.raises(FileNotFoundError, match="python minisd.py") as e:
        rewards.make_reward("digit", digit_classifier=str(tmp_path / "none.safetensors"))
    one_line(e)
    args, _ = build
    reward = rewards.make_reward("digit", digit_classifier=str(Path(args.out) / "classifier.safetensors"))
    with pytest.raises(ValueError, match="names no digit") as e:
        reward(torch.rand(1, 3, 32, 32), ["a cat"])
    one_line(e)


def test_second_build_reuses_every_stage_and_other_arguments_fail(build, capsys):
    args, report = build
    again = minisd.main(minisd.Args(preset="test", out=args.out))
    assert capsys.readouterr().out.count(": reuse") == 6
    assert again["trajectory_error"] == report["trajectory_error"] and again["build_seconds"] == report["build_seconds"]
    with pytest.raises(ValueError, match="built with other arguments .*shortcut_steps") as e:
        minisd.main(minisd.Args(preset="test", out=args.out, shortcut_steps=1))
    one_line(e)


def test_bad_preset_exits_with_one_line():
    r = subprocess.run([sys.executable, "minisd.py", "--preset", "huge"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("minisd.py: error: unknown preset 'huge'")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Where `train_sd.py --tiny` builds its tiny SD, CLIP and shortcut files: built by the first run, reused after."""
    return tmp_path_factory.mktemp("tiny")


@pytest.mark.parametrize("unit, amount", [("cpu_seconds", 2.0), ("gflop", 1.2)])
def test_budget_stops_at_the_budget_and_walks_the_stages(tiny_dir, tmp_path, unit, amount):
    """train_sd.py --budget: the run stops at the first update whose cumulative spending (CPU-seconds, or GFLOP
    counted by budget.py) reaches the budget (long before --steps), and ShortFT's progressive stages follow the spent
    share of it (how many stages a 2 s budget reaches depends on the machine's speed, so the test checks the rule).
    In GFLOP the run is the same on every machine: the number of updates is fixed by the chains alone (on the 10-step
    grid, 1.2 GFLOP buys two updates in each of the four stages). The 10-step grid and its LoRA points: each new kind
    of update counts its FLOPs by a dry run, which costs a fifth of the 50-step grid's."""
    import chain_args
    import train_sd

    run = train_sd.main(train_sd.Args(tiny=True, tiny_dir=str(tiny_dir), out_dir=str(tmp_path), name="budget",
                                      steps=100000, budget=amount, budget_unit=unit, save_every=0, num_steps=10,
                                      lora_points=[701, 401, 201, 1]))
    rows = [json.loads(line) for line in (run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    spent = [r["budget/spent"] for r in rows if "loss" in r]
    assert run["update"] == len(spent) < 100000
    assert spent[-1] >= amount and all(s < amount for s in spent[:-1])
    assert spent == sorted(spent)
    stages = [r["stage"] for r in rows if "loss" in r]
    before = [0.0] + spent[:-1]  # the stage of an update is decided by the budget spent before it
    assert stages == [chain_args.stage_of(train_sd.Args(), b / amount, 4) for b in before]
    assert stages == sorted(stages) and stages[0] == 1 and len(set(stages)) > 1
    if unit == "gflop":  # the FLOPs of an update depend on its stage's chain only
        per = {}
        for r, b in zip((r for r in rows if "loss" in r), [0.0] + spent):
            per.setdefault(r["stage"], set()).add(round(r["budget/spent"] - b, 9))
        assert all(len(v) == 1 for v in per.values()) and len(per) == len(set(stages))


class ForkedTrainSd:
    """Stands in for bench_minisd.train's `subprocess.Popen(["python", "train_sd.py", …])`: the same argv, through what
    train_sd.py's __main__ runs (runio.cli), in a forked copy of this process, its output into the run's log, so that
    bench_minisd's os.wait4 reads the exit status and the CPU-seconds of a real child process. What is saved is
    starting Python and importing torch and diffusers four times; the bench's logic is unchanged."""

    def __init__(self, cmd, env, stdout, stderr, text):
        import runio
        import train_sd

        assert Path(cmd[1]).name == "train_sd.py" and stderr is subprocess.STDOUT, cmd
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.environ.clear()
                os.environ.update(env)
                sys.stdout = sys.stderr = stdout
                runio.cli(train_sd.main, train_sd.Args, train_sd.check_args, cmd[2:])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                stdout.flush()
                os._exit(code)


@pytest.mark.slow
def test_bench_minisd_spends_equal_gflop_and_reuses_finished_runs(build, tmp_path, monkeypatch):
    """bench_minisd.py on the reduced build at a small GFLOP budget (ShortFT, four times its costliest update): the
    plan's per-stage costs (its run has seed 0) are exactly what the bench's run (seed 1) spends per update, since
    FLOPs depend on the chain alone; the run stops at the first update that reaches the budget, after all four
    stages; it is evaluated at --eval-every and at the end; the table and the before/after sheet are written; a
    second call reuses the plan and the finished run and gives the same summary."""
    import bench_minisd

    monkeypatch.setattr(bench_minisd, "subprocess", SimpleNamespace(Popen=ForkedTrainSd, STDOUT=subprocess.STDOUT))
    args, _ = build
    bench = bench_minisd.Args(minisd=args.out, out=str(tmp_path / "bench"), variants=["shortft"], seeds=[1],
                              eval_samples=3, evals=2)
    cost = bench_minisd.plan(bench)["shortft"]["per_update"]
    assert sorted(cost) == [1, 2, 3, 4] and cost[1] < cost[4]  # stage 4 runs the most no-grad steps
    bench = dataclasses.replace(bench, budget=4 * max(cost.values()))  # each stage's share buys at least one update
    summary = bench_minisd.main(bench)
    out = Path(bench.out)
    rows = [json.loads(line) for line in (out / "runs" / "shortft-s1" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    spent = [r["budget/spent"] for r in train]
    assert spent[-1] >= bench.budget > spent[-2]
    assert [r["stage"] for r in train] == sorted(r["stage"] for r in train) and {r["stage"] for r in train} == {1, 2, 3, 4}
    steps = [b - a for a, b in zip([0.0] + spent, spent)]
    assert all(d == pytest.approx(cost[r["stage"]], rel=1e-9) for d, r in zip(steps, train))
    evals = [r["update"] for r in rows if "eval/reward_mean" in r]
    assert len(evals) >= 2 and evals[-1] == len(train)
    s = summary["variants"]["shortft"]
    assert s["seeds"] == 1 and s["updates"] == len(train) and s["spent"] == spent[-1]
    assert "| shortft |" in (out / "table.md").read_text()
    from PIL import Image

    with Image.open(out / "before_after.png") as im:
        assert im.size == (3 * 32, 2 * 32)  # the base row and ShortFT's row, 3 samples
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/bench.json")}
    assert len(stamps) == 4 and bench_minisd.main(bench) == summary  # plan: shortft, eval-1, eval-n; the run
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/bench.json")} == stamps
