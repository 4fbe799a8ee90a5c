"""Stable Diffusion path on tiny random components (CPU): the samplers against diffusers' own pipeline, the
denoisers against peft's LoRA closed form, gradients reach exactly the LoRA branches of each stage, the saved
LoRA folder loads in a stock pipeline that switches branches per timestep, exact resume across a stage boundary,
and one-line errors for bad input. Timestep layout used here: the 10-step grid 901, 801, …, 1 with LoRA points
701, 401, 201, 1 (the paper's layout on SD1.5's 50-step grid costs 5× more evaluations and is run once, through
`python train_sd.py --tiny`).

Run: python -m pytest -q tests/test_sd.py
"""

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sd
import shortcut
import shortft
import tiny
import train_sd

ROOT = Path(__file__).resolve().parent.parent
GRID = shortft.ddim_timesteps(10)  # 901, 801, …, 1
POINTS = (701, 401, 201, 1)
RUN_KEYS = {"update", "stage", "loss", "reward/train", "grad/norm", "update/skipped", "time/update_s", "budget/spent",
            "time/cpu_s", "chain/grad_evals"}
EVAL_KEYS = {"update", "eval/reward_mean", "eval/reward_std", "eval/base_reward_mean"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Tiny SD, tiny CLIP and a stand-in shortcut LoRA, built once (what --tiny builds)."""
    torch.set_flush_denormal(True)  # as train_sd.main does: random tiny models make denormals
    root = tmp_path_factory.mktemp("tiny")
    tiny.tiny_sd(root / "sd")
    tiny.tiny_clip(root / "clip")
    tiny.tiny_shortcut_lora(root / "shortcut_lora.safetensors", root / "sd" / "unet")
    return root


def quick(tiny_dir, tmp_path, **kw) -> train_sd.Args:
    """--tiny on the 10-step grid, 4 updates (one per stage), for speed."""
    base = dict(tiny=True, tiny_dir=str(tiny_dir), out_dir=str(tmp_path), name="run", num_steps=10,
                lora_points=list(POINTS), steps=4, save_every=2, eval_samples=2, eval_batch=2, refl_last=3,
                drtune_k=2)
    return train_sd.Args(**{**base, **kw})


def components(tiny_dir, n=4, seed=1):
    """Tiny components with the shortcut and n LoRA branches (rank 4, alpha 8) whose A and B are random and
    non-zero, so that every branch changes ε and every matrix can receive gradient."""
    c = sd.load_components(str(tiny_dir / "sd"))
    shortcut.load_shortcut_lora(c["unet"], tiny_dir / "shortcut_lora.safetensors", sd.SHORTCUT_ADAPTER, 1.0)
    names = sd.add_tuned_loras(c["unet"], n, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sd.lora_parameters(c["unet"], names):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return c, names


def chain_loss(c, chain, points=POINTS, aware=True):
    cache, tok, te = {}, c["tokenizer"], c["text_encoder"]
    den = sd.make_denoisers(c["unet"], sd.encode_prompts(["a cat"], tok, te, cache),
                            sd.encode_prompts([""], tok, te, cache), 7.5, points, aware)
    loss, _ = shortft.reward_loss(torch.randn(1, 4, 16, 16), chain, den,
                                  sd.schedule_from_diffusers(c["scheduler"].config),
                                  lambda z: sd.decode(c["vae"], z, checkpoint=True).mean((1, 2, 3)))
    return loss


def grads_by_adapter(unet):
    """{adapter or 'base': [has a non-zero gradient, per parameter]}."""
    out = {}
    for n, p in unet.named_parameters():
        key = next((a for a in [*unet.peft_config] if f".{a}." in n), "base")
        out.setdefault(key, []).append(p.grad is not None and bool(p.grad.abs().sum() > 0))
    return out


def test_newcomer_command(tmp_path):
    """`python train_sd.py --tiny` as written in the README: the paper's layout on the 50-step grid, 4 updates, one
    per progressive stage, each training on the stage's chain."""
    r = subprocess.run([sys.executable, "train_sd.py", "--tiny", "--out-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "sd-tiny"
    layout = json.loads((run / "lora" / sd.LORA_JSON).read_text())
    assert layout["lora_points"] == list(shortft.PAPER_LORA_POINTS) and layout["grid"] == shortft.ddim_timesteps(50)
    assert all((run / "lora" / f"tuned_{i}.safetensors").is_file() for i in (1, 2, 3, 4))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "stage" in row]
    assert [row["stage"] for row in train] == [1, 2, 3, 4]
    costs = [shortft.chain_cost(shortft.shortft(shortft.ddim_timesteps(50), stage=s))["grad"] for s in (1, 2, 3, 4)]
    assert [row["chain/grad_evals"] for row in train] == costs
    assert all(set(row) == RUN_KEYS for row in train) and set(rows[-1]) == EVAL_KEYS


def test_script_bad_input_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "train_sd.py", "--lora-points", "760", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "LoRA point(s) [760] are not on the 50-step grid" in r.stderr


def test_paper_defaults():
    import chain_args

    args = train_sd.with_world(train_sd.Args(), train_sd.world_of(train_sd.Args(tiny=True)))  # SD1.5's own
    assert train_sd.world_of(train_sd.Args(tiny=True)) is sd and args.guidance == 7.5
    assert (args.method, args.shortcut, args.lora_points, args.num_steps) == ("shortft", "hyper-sd-4", [], 0)
    grid = sd.grid_from_diffusers(tiny.sd_components()["scheduler"].config, args.num_steps)
    assert grid == shortft.ddim_timesteps(50)  # num_steps 0: SD1.5's own 50-step sampler
    assert chain_args.layout(args, grid, shortft.make_schedule()) == (shortft.PAPER_LORA_POINTS, True)
    assert args.lora_rank == 128 and args.timestep_aware and args.progressive and not args.checkpoint_segments
    assert shortcut.SHORTCUTS[args.shortcut].guidance == 0  # no CFG inside the jumps
    assert set(args.lora_targets) == {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"}


def test_lora_branches_sit_on_attention_and_feed_forward():
    """add_tuned_loras wraps exactly the attention and feed-forward Linear layers, with k frozen float32 branches."""
    unet = tiny.sd_components()["unet"]
    targets = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
               and (n.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")))}
    names = sd.add_tuned_loras(unet, 4, rank=4, alpha=4.0)
    layers = {id(m) for m in shortcut.lora_layers(unet)}
    wrapped = {n for n, m in unet.named_modules() if id(m) in layers}
    assert names == ["tuned_1", "tuned_2", "tuned_3", "tuned_4"]
    assert wrapped == targets and any("ff.net.2" in n for n in wrapped) and any("attn2.to_k" in n for n in wrapped)
    params = sd.lora_parameters(unet, names)
    assert params and all(p.dtype == torch.float32 and not p.requires_grad for p in unet.parameters())
    trainable = sd.set_trainable(unet, ["tuned_2"])
    assert [id(p) for p in trainable] == [id(p) for p in sd.lora_parameters(unet, ["tuned_2"])]
    assert sum(p.requires_grad for p in unet.parameters()) == len(params) // 4


# ----------------------------------------------------------------------------- maths against diffusers and peft


def test_sampler_matches_diffusers_pipeline(tiny_dir):
    """Our base sampler (SD grid, CFG as one batched call, DDIM steps, VAE decode) = StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir / "sd"), safety_checker=None)
    c = sd.load_components(str(tiny_dir / "sd"))
    prompts = ["a red fox", "a lighthouse"]
    ours = sd.sample(c, prompts, [3, 4], GRID, 7.5, model=shortft.BASE, resolution=32, batch=2)
    latents = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    ref = pipe(prompts, height=32, width=32, num_inference_steps=10, guidance_scale=7.5, latents=latents,
               output_type="pt").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_stock_pipeline_switching_equals_our_sampler(tiny_dir, tmp_path):
    """sd.prepare_pipeline makes a stock StableDiffusionPipeline (DDIM, callback_on_step_end) sample exactly what our
    sampler does with the stacked timestep-aware branches; the same pipeline with a switching that is off by one
    step, or wrong only at the first step, gives something else."""
    from diffusers import StableDiffusionPipeline

    c, names = components(tiny_dir)
    prompts, seeds = ["a red fox", "a lighthouse"], [3, 4]
    ours = sd.sample(c, prompts, seeds, GRID, 7.5, POINTS, resolution=32, batch=2)
    base = sd.sample(c, prompts, seeds, GRID, 7.5, model=shortft.BASE, resolution=32, batch=2)
    sd.save_lora(c["unet"], tmp_path / "lora", GRID, POINTS, True, 7.5)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir / "sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(FileNotFoundError, match="has no shortft.json") as e:
        sd.prepare_pipeline(pipe, tiny_dir / "sd")
    assert "\n" not in str(e.value)
    kwargs = sd.prepare_pipeline(pipe, tmp_path / "lora")
    latents = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def run(**kw):
        return pipe(prompts, height=32, width=32, latents=latents, output_type="pt", **{**kwargs, **kw}).images

    assert (ours - base).abs().max() > 0.05  # the branches matter
    torch.testing.assert_close(run(), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(), ours, atol=1e-5, rtol=1e-5)  # a second call starts right again

    def set_for(t):
        active = [names[i] for i in shortft.active_loras(t, POINTS)]
        if active:
            pipe.enable_lora()
            pipe.set_adapters(active)
        else:
            pipe.disable_lora()

    def late(p, i, t, kw):  # the branches of the step just taken, i.e. one step late
        set_for(int(t))
        return kw

    set_for(GRID[0])
    assert (run(callback_on_step_end=late) - ours).abs().max() > 1e-3
    pipe.disable_lora()  # right everywhere except the first step
    assert (run() - ours).abs().max() > 1e-3
    with pytest.raises(ValueError, match="num_inference_steps=10"):
        run(num_inference_steps=5)


def test_denoisers_activate_exactly_the_stacked_branches(tiny_dir):
    """On one LoRA layer: output = W x + b + Σ_{a active} (α_a / r_a) B_a A_a x, with the active set written out by
    hand for the paper's layout (TUNED), none (BASE), the shortcut alone (SHORTCUT), one shared LoRA (ablation) and
    one LoRA everywhere (baselines)."""
    c, names = components(tiny_dir)
    unet = c["unet"]
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn1.to_q") and m in shortcut.lora_layers(unet))
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    cond, uncond, x = torch.randn(1, 77, 8), torch.randn(1, 77, 8), torch.randn(1, 4, 16, 16)
    paper, t1, t12, t123, t1234 = shortft.PAPER_LORA_POINTS, ["tuned_1"], ["tuned_1", "tuned_2"], names[:3], names
    cases = [  # (points, timestep_aware, denoiser, t, adapters that must act)
        (paper, True, shortft.TUNED, 981, t1), (paper, True, shortft.TUNED, 761, t1),
        (paper, True, shortft.TUNED, 741, []), (paper, True, shortft.TUNED, 501, t12),
        (paper, True, shortft.TUNED, 481, []), (paper, True, shortft.TUNED, 261, t123),
        (paper, True, shortft.TUNED, 1, t1234), (paper, True, shortft.BASE, 501, []),
        (paper, True, shortft.SHORTCUT, 741, [sd.SHORTCUT_ADAPTER]), (paper, False, shortft.TUNED, 261, t1),
        (paper, False, shortft.TUNED, 481, []), (None, False, shortft.TUNED, 481, t1)]
    with torch.no_grad():
        for points, aware, model, t, active in cases:
            sd.make_denoisers(unet, cond, uncond, 7.5, points, aware)[model](x, t, None)
            h = seen["x"]
            ref = torch.nn.functional.linear(h, layer.base_layer.weight, layer.base_layer.bias)
            for a in active:
                scale = 2.0 if a in names else layer.scaling[a]  # tuned: alpha 8 / rank 4
                ref = ref + scale * h @ layer.lora_A[a].weight.T @ layer.lora_B[a].weight.T
            torch.testing.assert_close(seen["y"], ref, rtol=1e-5, atol=1e-6, msg=f"{model} at t={t}: {active}")
    hook.remove()


# ----------------------------------------------------------------------------- gradients reach the right adapters


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_gradient_reaches_exactly_its_branches(tiny_dir, stage):
    """Progressive stage i: every matrix of tuned_i … tuned_k gets a non-zero gradient; tuned_1 … tuned_{i−1}
    (which do act in the stage's chain), the shortcut LoRA and the base weights get none."""
    c, names = components(tiny_dir)
    trained = sd.set_trainable(c["unet"], sd.stage_adapters(stage, POINTS))
    chain_loss(c, shortft.shortft(GRID, POINTS, stage)).backward()
    got = grads_by_adapter(c["unet"])
    assert trained and all(all(got[a]) for a in names[stage - 1 :])
    assert not any(any(got[a]) for a in [*names[: stage - 1], sd.SHORTCUT_ADAPTER, "base"])
    if stage > 1:  # the earlier branches are in the gradient's path: only requires_grad keeps them out
        sd.set_trainable(c["unet"], names)
        c["unet"].zero_grad(set_to_none=True)
        chain_loss(c, shortft.shortft(GRID, POINTS, stage)).backward()
        assert all(grads_by_adapter(c["unet"])["tuned_1"])


def test_gradient_checkpointing_inside_the_unet_keeps_each_steps_adapters(tiny_dir):
    """--gradient-checkpointing (shortcut.enable_adapter_checkpointing) recomputes each UNet block with the adapters of
    its forward: the stage-1 gradient equals the one without checkpointing; diffusers' plain checkpointing recomputes
    with the adapters the last call left active (peft trap 3) and fails."""

    def grad(inside=None):
        c, _ = components(tiny_dir)
        if inside is not None:
            inside(c["unet"])
        params = sd.set_trainable(c["unet"], sd.stage_adapters(1, POINTS))
        torch.manual_seed(0)
        chain_loss(c, shortft.shortft(GRID, POINTS, 1)).backward()
        return torch.cat([p.grad.flatten() for p in params])

    plain = grad()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(grad(shortcut.enable_adapter_checkpointing), plain, rtol=1e-4, atol=1e-8)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        grad(lambda m: m.enable_gradient_checkpointing())


@pytest.mark.parametrize("method", [m for m in shortft.METHODS if m != "shortft"])
def test_baseline_gradient_reaches_exactly_its_lora(tiny_dir, method):
    """Every baseline: one LoRA (tuned_1) at every step gets gradient in every matrix; the shortcut and base none."""
    c, names = components(tiny_dir, n=1)
    sd.set_trainable(c["unet"], sd.stage_adapters(1, None))
    import chain_args

    args = chain_args.ChainArgs(method=method, num_steps=10, refl_last=3, drtune_k=2)
    chain = shortft.make_chain(method, GRID, random.Random(0), **chain_args.chain_switches(args, None))
    chain_loss(c, chain, points=None, aware=False).backward()
    got = grads_by_adapter(c["unet"])
    assert all(got["tuned_1"]) and not any(got[sd.SHORTCUT_ADAPTER]) and not any(got["base"])


def test_shortcut_loaded_unfused_with_its_scale(tiny_dir):
    """The shortcut is a separate peft adapter (not fused) at the requested scale, and it changes ε."""
    c = sd.load_components(str(tiny_dir / "sd"))
    unet = c["unet"]
    x, emb = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 8)
    base = unet(x, 500, encoder_hidden_states=emb).sample
    shortcut.load_shortcut_lora(unet, tiny_dir / "shortcut_lora.safetensors", "shortcut", 0.5)
    layers = shortcut.lora_layers(unet)
    assert layers and all(not getattr(l, "merged", False) for l in layers)
    assert all(l.scaling["shortcut"] == pytest.approx(0.5 * l.lora_alpha["shortcut"] / l.r["shortcut"])
               for l in layers if "shortcut" in l.scaling)
    shortcut.set_active_adapters(unet, ["shortcut"])
    assert not torch.allclose(unet(x, 500, encoder_hidden_states=emb).sample, base)
    shortcut.set_active_adapters(unet, [])
    torch.testing.assert_close(unet(x, 500, encoder_hidden_states=emb).sample, base)


# ----------------------------------------------------------------------------- the script, end to end


@pytest.mark.parametrize("method", shortft.METHODS)
def test_every_method_end_to_end(tiny_dir, tmp_path, method):
    out = train_sd.main(quick(tiny_dir, tmp_path, method=method, steps=4 if method == "shortft" else 2))
    run, n = out["run_dir"], 4 if method == "shortft" else 1
    assert out["update"] == out["args"].steps and out["skipped"] == 0
    layout = sd.read_lora_layout(run / "lora")
    assert layout["adapters"] == shortft.lora_names(n) and layout["method"] == method
    assert layout["lora_points"] == (list(POINTS) if method == "shortft" else None)
    for f in layout["files"]:
        ups = [v for k, v in load_file(str(run / "lora" / f)).items() if "lora_B" in k]
        assert ups and any(v.abs().sum() > 0 for v in ups), f"{f} did not move"
    ckpt = run / "checkpoints" / f"step_{out['update']:07d}"
    assert sd.read_lora_layout(ckpt) == layout  # every checkpoint is a LoRA folder too
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) == RUN_KEYS for r in rows[:-1]) and set(rows[-1]) == EVAL_KEYS
    assert [r["stage"] for r in rows[:-1]] == ([1, 2, 3, 4] if method == "shortft" else [1, 1])
    assert list(run.glob("eval_*.png")) and out["eval"]["eval/reward_std"] >= 0


def test_saved_lora_loads_in_stock_pipeline(tiny_dir, tmp_path):
    """Each file of the saved folder loads with load_lora_weights (scale alpha/r kept, weights = the checkpoint's)
    and changes the stock pipeline's output; sd.load_lora reads the folder back into a bare UNet identically."""
    from diffusers import StableDiffusionPipeline

    out = train_sd.main(quick(tiny_dir, tmp_path, lr=3e-2))
    lora = out["run_dir"] / "lora"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir / "sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a red fox", height=32, width=32, num_inference_steps=5, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    ckpt = load_file(str(out["run_dir"] / "checkpoints" / "step_0000004" / "weights.safetensors"))
    for name in sd.read_lora_layout(lora)["adapters"]:
        pipe.load_lora_weights(str(lora), weight_name=f"{name}.safetensors", adapter_name=name)
        assert all(l.scaling[name] == pytest.approx(1.0) for l in shortcut.lora_layers(pipe.unet))  # alpha 4 / r 4
        assert (image() - before).abs().max() > 1e-4, f"{name} does not change the output"
    loaded = dict(pipe.unet.named_parameters())
    assert ckpt and all(torch.equal(loaded[k], w) for k, w in ckpt.items())

    unet = sd.load_components(str(tiny_dir / "sd"))["unet"]
    layout = sd.load_lora(unet, lora)
    assert layout["timestep_aware"] and all(torch.equal(dict(unet.named_parameters())[k], w) for k, w in ckpt.items())


def test_resume_is_exact_across_a_stage_boundary(tiny_dir, tmp_path, capsys):
    """A run resumed from its checkpoint at update 2 (stages 1, 2) to update 4 (stages 3, 4) ends bit for bit where an
    uninterrupted run does. Its newest checkpoint (update 4) was damaged by hand — `update` edited in state.json — and
    a line of metrics.jsonl is garbage: --resume falls back to update 2 with one line, and drops the line with one."""
    full = train_sd.main(quick(tiny_dir, tmp_path, name="full", lr=1e-2))
    part = quick(tiny_dir, tmp_path, name="part", lr=1e-2)
    run = train_sd.main(part)["run_dir"]
    state = json.loads((run / "checkpoints" / "step_0000004" / "state.json").read_text())
    state["spent"]["updates"] = 3
    (run / "checkpoints" / "step_0000004" / "state.json").write_text(json.dumps(state))
    shutil.rmtree(run / "lora")
    lines = (run / "metrics.jsonl").read_text().splitlines(True)
    (run / "metrics.jsonl").write_text("".join(lines[:1] + ['{"update": 1, "lo\n'] + lines[1:2]))
    capsys.readouterr()
    resumed = train_sd.main(dataclasses.replace(part, resume=True))
    err = capsys.readouterr().err.splitlines()
    assert sum("skipping checkpoint:" in line and "state.json was changed" in line for line in err) == 1
    assert sum("dropped 1 damaged line(s)" in line for line in err) == 1
    assert resumed["update"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if "stage" in r] == [1, 2, 3, 4]
    for i in (1, 2, 3, 4):
        a = load_file(str(full["run_dir"] / "lora" / f"tuned_{i}.safetensors"))
        b = load_file(str(run / "lora" / f"tuned_{i}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, error, words", [
    (dict(reward="nope"), ValueError, "unknown reward 'nope'"),
    (dict(method="nope"), ValueError, "unknown method"),
    (dict(shortcut="nope"), ValueError, "unknown shortcut 'nope'"),
    (dict(shortcut="missing/shortcut.safetensors"), ValueError, "does not exist"),
    (dict(train_prompts="EMPTY"), ValueError, "has no prompts"),
    (dict(tiny=False, model="/no/such/model", reward="clipscore", method="draft_k"), ValueError, "does not exist"),
    (dict(lora_points=[701, 450, 1]), ValueError, r"LoRA point\(s\) \[450\] are not on the 10-step grid"),
    (dict(lora_points=[701, 401]), ValueError, "must be the grid's last step 1"),
    (dict(stage_fractions=[0.5, 0.5]), ValueError, "must be 4 positive numbers"),
])
def test_bad_input_one_line_errors(tiny_dir, tmp_path, change, error, words):
    if change.get("train_prompts") == "EMPTY":
        (tmp_path / "empty.txt").write_text("# nothing here\n\n")
        change = dict(train_prompts=str(tmp_path / "empty.txt"))
    with pytest.raises(error, match=words) as e:
        train_sd.main(quick(tiny_dir, tmp_path, **change))
    assert "\n" not in str(e.value)


def test_stage_out_of_range_and_lora_folder_without_json(tmp_path):
    with pytest.raises(ValueError, match=r"stage .* must be in \[1, 4\], got 5") as e:
        sd.stage_adapters(5, POINTS)
    assert "\n" not in str(e.value)
    unet = tiny.sd_components()["unet"]
    for folder, words in [(tmp_path / "none", "does not exist"), (tmp_path, "has no shortft.json")]:
        with pytest.raises(FileNotFoundError, match=words) as e:
            sd.load_lora(unet, folder)
        assert "\n" not in str(e.value)


def test_registry_names_and_offline_message():
    assert shortcut.DEFAULT_SHORTCUT == "hyper-sd-4" and not shortcut.SHORTCUTS["lcm"].trajectory_preserving
    with pytest.raises(FileNotFoundError, match="hf download ByteDance/Hyper-SD Hyper-SD15-4steps-lora.safetensors"):
        shortcut.resolve_shortcut("hyper-sd-4", local_files_only=True)


# ----------------------------------------------------------------------------- the update guard


def test_nan_gradient_never_reaches_the_weights_and_lowers_the_fp16_scale():
    """guarded_update: a NaN/inf gradient is dropped and reported; a finite one is clipped and applied. With fp16's
    GradScaler (accelerate enables it on CUDA only, so a stand-in with accelerate's own optimizer wrapper and a real
    CPU GradScaler here), gradients are unscaled before the check and a skipped update lowers the loss scale."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    acc = Accelerator(cpu=True)
    p = torch.nn.Parameter(torch.ones(3))
    opt = acc.prepare(torch.optim.AdamW([p], lr=0.1))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    applied, norm = sd.guarded_update(acc, opt, [p], 1.0)
    assert not applied and norm != norm and torch.equal(p.detach(), torch.ones(3)) and p.grad is None
    p.grad = torch.tensor([30.0, 40.0, 0.0])
    applied, norm = sd.guarded_update(acc, opt, [p], 1.0)
    assert applied and norm == pytest.approx(50.0) and not torch.equal(p.detach(), torch.ones(3))

    class FP16:  # what guarded_update uses of an fp16 Accelerator
        num_processes = 1
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)

        def unscale_gradients(self):
            self.scaler.unscale_(opt.optimizer)

    acc = FP16()
    p = torch.nn.Parameter(torch.ones(3))
    opt = AcceleratedOptimizer(torch.optim.AdamW([p], lr=0.1), device_placement=False, scaler=acc.scaler)
    for grad, scale in (([1.0, float("inf"), 0.0], 512.0), ([30.0, 40.0, 0.0], 512.0)):
        acc.scaler.scale(torch.ones(()))  # what a scaled loss's backward does first
        p.grad = torch.tensor(grad) * acc.scaler.get_scale()
        before = p.detach().clone()
        applied, norm = sd.guarded_update(acc, opt, [p], 1.0)
        assert acc.scaler.get_scale() == scale and applied == (norm == pytest.approx(50.0))
        assert torch.equal(p.detach(), before) != applied


@pytest.mark.gpu
def test_bf16_chain_close_to_fp32(tiny_dir):
    """bf16 weights + autocast give nearly the same ShortFT loss as float32 on CUDA."""
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        c = sd.load_components(str(tiny_dir / "sd"), "cuda", dtype)
        shortcut.load_shortcut_lora(c["unet"], tiny_dir / "shortcut_lora.safetensors")
        sd.add_tuned_loras(c["unet"], 4, rank=4, alpha=4.0)
        torch.manual_seed(0)
        cache, tok, te = {}, c["tokenizer"], c["text_encoder"]
        den = sd.make_denoisers(c["unet"], sd.encode_prompts(["a cat"], tok, te, cache),
                                sd.encode_prompts([""], tok, te, cache), 7.5, shortft.PAPER_LORA_POINTS)
        x = torch.randn(1, 4, 16, 16, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            z = shortft.run_chain(x, shortft.shortft(shortft.ddim_timesteps(50)).trunk, den,
                                  sd.schedule_from_diffusers(c["scheduler"].config))
        losses.append(sd.decode(c["vae"], z).mean().float().item())
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)
