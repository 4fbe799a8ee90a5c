"""The miniature Stable Diffusion of minisd.py, on its reduced build (--preset test, built once): the folder
loads as a StableDiffusionPipeline and through sd.load_components and samples as diffusers' own
pipeline does; the shortcut file loads with shortcut.load_shortcut_lora and lands closer to the teacher
than the base's one-step jump; the digit reward is the classifier's log-softmax, differentiable in the
images; a second build reuses every stage; bad input gives one line. train_sd.py's LoRA raising the digit reward in
a stock pipeline, and bench_minisd.py, are checked in tests/test_minisd_runs.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
def build(minisd_build):
    """The reduced build, once for the whole test run (conftest.py): (args, report)."""
    return minisd_build


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


def test_second_build_reuses_every_stage_and_other_arguments_fail(build, minisd_lock, capsys):
    args, report = build
    with minisd_lock:  # no other test process reads or builds the folder meanwhile
        again = minisd.main(minisd.Args(preset="test", out=args.out))
    assert capsys.readouterr().out.count(": reuse") == 6
    assert again["trajectory_error"] == report["trajectory_error"] and again["build_seconds"] == report["build_seconds"]
    with pytest.raises(ValueError, match="built with other arguments .*shortcut_steps") as e, minisd_lock:
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
