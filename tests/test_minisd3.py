"""The miniature Stable Diffusion 3 of minisd3.py, on its reduced build (--preset test, built once): the folder loads
in a stock StableDiffusion3Pipeline with SD3's latent normalisation; the repo's Euler sampler (shortft.sampling_chain +
run_chain on a FlowSchedule) equals the pipeline's samples; the prompt encoding is the pipeline's; the shortcut file
loads with load_lora_weights and its jumps land closer to the teacher than the base's one Euler step; the
flow-matching loss and the σ sampling are what their docstrings say (closed forms); a second build reuses every stage;
bad input gives one line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minisd
import minisd3
import sd
import shortcut
import shortft

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """The reduced build, once per test session: (args, report)."""
    args = minisd3.Args(preset="test", out=str(tmp_path_factory.mktemp("minisd3") / "test"))
    return minisd3.apply_preset(args), minisd3.main(args)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_folder_loads_in_a_stock_pipeline_with_sd3_latent_normalisation(build):
    """StableDiffusion3Pipeline.from_pretrained reads the folder (no T5); the scheduler is SD3's flow-matching Euler
    with the chosen shift; the shapes fit together; and the VAE's shift_factor and scaling_factor normalise the
    training latents: (z − shift_factor) · scaling_factor has mean 0 and std 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    args, report = build
    pipe = StableDiffusion3Pipeline.from_pretrained(Path(args.out) / "pipeline", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == args.shift
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    t = pipe.transformer.config
    assert t.patch_size == 1 and pipe.vae_scale_factor * t.sample_size == 32 and t.in_channels == 4
    assert t.joint_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    projections = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert t.pooled_projection_dim == projections
    assert pipe.tokenizer.model_max_length == args.prompt_tokens
    vae = pipe.vae.config
    assert (vae.shift_factor, vae.scaling_factor) == pytest.approx((report["vae"]["shift_factor"],
                                                                    report["vae"]["scaling_factor"]))
    (x, _), _ = minisd.load_digits_split(args.seed)
    with torch.no_grad():
        z = pipe.vae.encode(x[:512] * 2 - 1).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    scaled = (z - vae.shift_factor) * vae.scaling_factor
    assert abs(scaled.mean().item()) < 0.05 and scaled.std().item() == pytest.approx(1.0, abs=0.05)


def test_embed_is_the_two_clips_side_by_side(build):
    """encode_prompt without T5: the two CLIPs' penultimate hidden states side by side (then t5_tokens zero tokens,
    none with max_sequence_length 0); pooled = their projected outputs side by side."""
    args, _ = build
    pipe = minisd3.load_pipeline(Path(args.out) / "pipeline")
    prompts = [minisd.prompt(4), ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=args.prompt_tokens, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        outs = [te(ids, output_hidden_states=True) for te in (pipe.text_encoder, pipe.text_encoder_2)]
        tokens, pooled = minisd3.embed(pipe, prompts, 0)
        padded, _ = minisd3.embed(pipe, prompts, 3)
    torch.testing.assert_close(tokens, torch.cat([o.hidden_states[-2] for o in outs], -1))
    torch.testing.assert_close(pooled, torch.cat([o.text_embeds for o in outs], -1))
    assert padded.shape[1] == args.prompt_tokens + 3 and torch.equal(padded[:, :args.prompt_tokens], tokens)
    assert not padded[:, args.prompt_tokens:].any()


@pytest.mark.parametrize("w", [None, 1.0])  # None: the build's CFG scale
def test_euler_sampler_is_the_stock_pipeline(build, w):
    """The repo's sampler (shortft.sampling_chain + run_chain, FlowSchedule's Euler step, the guided velocity of
    minisd3) and minisd3.euler_trajectory equal StableDiffusion3Pipeline's 28-step Euler (+ CFG) on the same x_T,
    in latents and in images decoded by sd.decode (with the VAE's shift_factor)."""
    args, report = build
    pipe = minisd3.load_pipeline(Path(args.out) / "pipeline")
    w = report["guidance"]["chosen"] if w is None else w
    prompts = [minisd.prompt(3), minisd.prompt(8)]
    x_T = torch.randn(2, 4, 4, 4)
    kw = dict(num_inference_steps=args.num_steps, guidance_scale=w, max_sequence_length=args.t5_tokens, latents=x_T)
    ref = pipe(prompts, output_type="latent", **kw).images
    images = pipe(prompts, output_type="pt", **kw).images
    with torch.no_grad():
        cond, uncond = minisd3.embed(pipe, prompts, args.t5_tokens), minisd3.embed(pipe, [""], args.t5_tokens)
        grid = shortft.flow_timesteps(args.num_steps, pipe.scheduler.config.shift)
        denoisers = {shortft.BASE: lambda x, t, s: minisd3.guided_velocity(pipe.transformer, x, t, cond, uncond, w)}
        z = shortft.run_chain(x_T, shortft.sampling_chain(grid, model=shortft.BASE).trunk, denoisers,
                              shortft.FlowSchedule())
        traj = minisd3.euler_trajectory(pipe.transformer, x_T, cond, uncond, w, grid)
        decoded = sd.decode(pipe.vae, z)
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(traj[-1], z)
    assert len(traj) == args.num_steps + 1 and torch.equal(traj[0], x_T)
    torch.testing.assert_close(decoded, images, rtol=1e-4, atol=1e-4)


def test_shortcut_loads_in_a_stock_pipeline(build):
    """pipe.load_lora_weights places every tensor of the shortcut file on the transformer; distillation moved every
    B matrix off its zero init except the last block's text-query projection, whose output SD3 discards."""
    args, _ = build
    pipe = minisd3.load_pipeline(Path(args.out) / "pipeline")
    pipe.load_lora_weights(Path(args.out) / "shortcut", adapter_name="shortcut")
    tensors = load_file(str(Path(args.out) / "shortcut" / "pytorch_lora_weights.safetensors"))
    loaded = dict(pipe.transformer.named_parameters())
    for k, v in tensors.items():
        assert k.startswith("transformer.")
        assert torch.equal(loaded[k.removeprefix("transformer.").replace(".weight", ".shortcut.weight")], v), k
    assert len([n for n in loaded if ".shortcut." in n]) == len(tensors)
    last = f"transformer.transformer_blocks.{args.layers - 1}.attn.add_q_proj.lora_B.weight"
    assert [k for k, v in tensors.items() if "lora_B" in k and not v.any()] == [last]


def test_shortcut_jumps_land_closer_than_the_base_euler_step(build):
    """The shortcut file, loaded frozen as train_sd.py loads a shortcut, lands closer to the teacher's x_p than the base's one Euler + CFG step over
    the same interval, on fresh trajectories (summed over the chain's three jumps next(p_{j−1}) → p_j)."""
    args, report = build
    pipe = minisd3.load_pipeline(Path(args.out) / "pipeline")
    params = shortcut.load_shortcut_lora(pipe.transformer,
                                         Path(args.out) / "shortcut" / "pytorch_lora_weights.safetensors")
    assert params and not any(p.requires_grad for p in params)
    shortcut.set_active_adapters(pipe.transformer, [])
    w, grid = report["guidance"]["chosen"], minisd3.sampler_grid(args)
    points = minisd3.lora_points(args, grid)
    assert points == pytest.approx((814.3, 602.2, 409.3, 8.9), abs=0.05)  # the paper's layout on SD3's grid
    assert minisd3.lora_points(minisd3.Args(lora_points=[814.3, 602.2, 409.3, 8.9]), grid) == points
    labels = torch.arange(20) % 10
    with torch.no_grad():
        cond = minisd3.embed(pipe, [minisd.prompt(int(d)) for d in labels], args.t5_tokens)
        uncond = minisd3.embed(pipe, [""], args.t5_tokens)
    traj = minisd3.euler_trajectory(pipe.transformer, torch.randn(20, 4, 4, 4), cond, uncond, w, grid)
    errors = minisd3.jump_errors(pipe.transformer, traj, cond, uncond, w, grid, points)
    assert list(errors) == ["790.4->602.2", "560.6->409.3", "347.4->8.9"]
    total = {k: sum(e[k]["of_displacement"] for e in errors.values()) for k in ("shortcut", "base_cfg")}
    assert total["shortcut"] < total["base_cfg"], errors


@pytest.mark.slow
def test_train_sd_shortft_lora_switches_branches_in_a_stock_sd3_pipeline(build, tmp_path):
    """train_sd.py (ShortFT with the build's shortcut, all four progressive stages, no T5 tokens as built) on the
    reduced build; its LoRA folder, loaded with sd3.prepare_pipeline (sd.prepare_pipeline: per-step branch
    switching) into a StableDiffusion3Pipeline from the build's folder, samples the 28-step Euler + CFG chain at the
    trained scale with the tuned branches on: its images differ from the base's on the same seeds, and the
    pipeline's last step ran with LoRA_4 alone, the branch of the last segment (shortft.active_loras). Whether the
    branches raise the digit reward is not asserted: on this reduced build they did not, measurably (docs/minisd3.md:
    ShortFT, 24 updates, lr 5e-2: −3.861 → −3.832 on 20 fixed seeds; 40 updates: −3.864; lr 0.1: −3.933)."""
    from diffusers import StableDiffusion3Pipeline

    import rewards
    import sd3
    import train_sd

    args, report = build
    root = Path(args.out)
    classifier = str(root / "classifier.safetensors")
    run = train_sd.main(train_sd.Args(
        model=str(root / "pipeline"), shortcut=str(root / "shortcut" / "pytorch_lora_weights.safetensors"),
        t5_tokens=0, reward="digit", digit_classifier=classifier, method="shortft", resolution=32,
        guidance=report["guidance"]["chosen"], lora_rank=4, lora_alpha=4.0, lr=5e-2, steps=24, batch_size=4,
        train_prompts=str(ROOT / "prompts/digits_train.txt"), eval_prompts=str(ROOT / "prompts/digits_eval.txt"),
        eval_samples=1, eval_every=0, save_every=0, seed=0, out_dir=str(tmp_path), name="digit"))
    rows = [json.loads(line) for line in (run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows if "loss" in r} == {1, 2, 3, 4}
    reward = rewards.make_reward("digit", digit_classifier=classifier)
    prompts = [minisd.prompt(d) for d in range(10)]
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "pipeline", text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = sd3.prepare_pipeline(pipe, run["run_dir"] / "lora")
    assert kwargs["max_sequence_length"] == 0 and kwargs["num_inference_steps"] == args.num_steps
    assert kwargs["guidance_scale"] == report["guidance"]["chosen"]

    def images(**kw):
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
        with torch.no_grad():
            return pipe(prompts, generator=gens, output_type="pt", **kw).images

    tuned = images(**kwargs)
    assert pipe.get_active_adapters() == ["tuned_1"]  # after the last step: the first step's branches, for the next call
    pipe.disable_lora()
    base = images(num_inference_steps=args.num_steps, guidance_scale=kwargs["guidance_scale"], max_sequence_length=0)
    assert (tuned - base).abs().max() > 1e-3
    assert torch.isfinite(reward(tuned, prompts)).all()


def test_flow_matching_loss_closed_form():
    """L = mean ‖v(x_σ, 1000σ, c) − (ε − x_0)‖², x_σ = (1 − σ) x_0 + σ ε, on numbers worked by hand; the model sees
    x_σ and 1000σ; the true velocity ε − x_0 gives 0."""
    x0, eps = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor([[0.0, -1.0], [2.0, 1.0]])
    sigma = torch.tensor([0.25, 0.5])
    seen = {}

    def doubled(x, t, c):
        seen.update(x=x, t=t, c=c)
        return 2 * x

    loss = minisd3.flow_matching_loss(doubled, x0, eps, sigma, "c")
    # x_σ: [0.75, 1.25], [0.5, 0.75]; 2x_σ − (ε − x_0): [1.5 + 1, 2.5 + 3], [1 − 3, 1.5 − 0.5]
    assert loss.item() == pytest.approx((2.5**2 + 5.5**2 + 2**2 + 1**2) / 4)
    torch.testing.assert_close(seen["x"], torch.tensor([[0.75, 1.25], [0.5, 0.75]]))
    torch.testing.assert_close(seen["t"], torch.tensor([250.0, 500.0]))
    assert seen["c"] == "c"
    assert minisd3.flow_matching_loss(lambda x, t, c: eps - x0, x0, eps, sigma, None).item() == 0


def test_sample_sigmas_follow_their_closed_form_quantiles():
    """σ = shift(σ_0) with σ_0 = sigmoid(N(0, 1)) or U(0, 1): the empirical q-quantile of σ is
    shift(sigmoid(Φ⁻¹(q))) or shift(q), shift(σ) = sσ / (1 + (s − 1)σ)."""
    g = torch.Generator().manual_seed(0)
    shift = lambda s, k: k * s / (1 + (k - 1) * s)  # noqa: E731
    for kind, inverse_cdf in [("logit_normal", lambda q: 1 / (1 + math.exp(-math.sqrt(2) * torch.erfinv(
            torch.tensor(2 * q - 1)).item()))), ("uniform", lambda q: q)]:
        for k in (1.0, 3.0):
            sigma = minisd3.sample_sigmas(200_000, g, kind, k)
            assert 0 < sigma.min() and sigma.max() < 1
            for q in (0.1, 0.5, 0.9):
                assert sigma.quantile(q).item() == pytest.approx(shift(inverse_cdf(q), k), abs=4e-3), (kind, k, q)
    with pytest.raises(ValueError, match="unknown sigma_sampling 'beta'") as e:
        minisd3.sample_sigmas(1, g, "beta")
    one_line(e)


def test_second_build_reuses_every_stage_and_other_arguments_fail(build, capsys):
    args, report = build
    again = minisd3.main(minisd3.Args(preset="test", out=args.out))
    assert capsys.readouterr().out.count(": reuse") == 6
    assert again["trajectory_error"] == report["trajectory_error"] and again["build_seconds"] == report["build_seconds"]
    with pytest.raises(ValueError, match="built with other arguments .*shortcut_steps") as e:
        minisd3.main(minisd3.Args(preset="test", out=args.out, shortcut_steps=1))
    one_line(e)


BAD = [(["--preset", "huge"], "--preset huge: choose full or test"),
       (["--sigma-sampling", "beta"], "--sigma-sampling beta: unknown sigma_sampling"),
       (["--t5-tokens", "600"], "--t5-tokens 600: must be a finite number in [0, 512]"),
       (["--lora-points", "800", "8.9"], "--lora-points 800.0 8.9: LoRA point(s)")]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_arguments_exit_with_one_line(argv, message, tmp_path):
    """Checked before anything is imported beyond torch or written."""
    r = subprocess.run([sys.executable, "minisd3.py", "--out", str(tmp_path / "x"), *argv], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"minisd3.py: error: {message}")
    assert not (tmp_path / "x").exists()
