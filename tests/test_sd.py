"""Stable Diffusion path on tiny random components (CPU): the sampler against diffusers' own pipeline,
every method end to end through train_sd.main, gradients reach exactly the trainable LoRA, the saved
LoRA loads in a stock pipeline, exact resume, and one-line errors for bad input."""

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import shortcut
import shortft
import tiny
import train_sd

ROOT = Path(__file__).resolve().parent.parent




@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Tiny SD, tiny CLIP and a stand-in shortcut LoRA, built once (what --tiny builds)."""
    root = tmp_path_factory.mktemp("tiny")
    tiny.tiny_sd(root / "sd")
    tiny.tiny_clip(root / "clip")
    tiny.tiny_shortcut_lora(root / "shortcut_lora.safetensors", root / "sd" / "unet")
    return root


def quick(tiny_dir, tmp_path, **kw) -> train_sd.Args:
    """--tiny with a 10-step grid and 2 updates, for speed."""
    base = dict(tiny=True, tiny_dir=str(tiny_dir), out_dir=str(tmp_path), name="run", num_steps=10, steps=2,
                save_every=2, eval_samples=2, eval_batch=2, refl_last=3, drtune_k=2)
    return train_sd.Args(**{**base, **kw})


def components(tiny_dir, boundaries=(), lora_in_shortcut=False):
    c = train_sd.load_components(str(tiny_dir / "sd"))
    sc = shortcut.load_shortcut_lora(c["unet"], tiny_dir / "shortcut_lora.safetensors", "shortcut", 1.0)
    names, params = train_sd.add_trainable_lora(c["unet"], 4, 8.0, boundaries=boundaries)
    with torch.no_grad():  # B ≠ 0 so that A receives gradient too
        for n, p in c["unet"].named_parameters():
            if "lora_B" in n and "tuned" in n:
                p.normal_(0, 0.1)
    return c, names, params, sc


def chain_loss(c, names, chain, boundaries=()):
    cache = {}
    unet, tok, te = c["unet"], c["tokenizer"], c["text_encoder"]
    schedule = shortft.schedule_from_diffusers(c["scheduler"].config)
    cond = train_sd.encode_prompts(["a cat"], tok, te, cache)
    uncond = train_sd.encode_prompts([""], tok, te, cache)
    den = train_sd.make_denoisers(unet, cond, uncond, 7.5, names, boundaries, "shortcut", 0.0)
    x_T = torch.randn(1, 4, 16, 16)
    loss, _ = shortft.reward_loss(x_T, chain, den, schedule,
                                  lambda z: train_sd.decode(c["vae"], z, checkpoint=True).mean((1, 2, 3)))
    return loss


def test_newcomer_command(tmp_path):
    """`python train_sd.py --tiny` as written in the README (run folder under --out-dir)."""
    r = subprocess.run([sys.executable, "train_sd.py", "--tiny", "--out-dir", str(tmp_path), "--steps", "2", "--num-steps", "10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # the CPU is shared with this process
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "sd-tiny"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "tiny" / "sd" / "model_index.json").is_file()
    assert (run / "metrics.jsonl").read_text().count("\n") >= 2


# ----------------------------------------------------------------------------- maths against diffusers


def test_sampler_matches_diffusers_pipeline(tiny_dir):
    """Our chain (SD grid, CFG as one batched call, DDIM steps, VAE decode) = StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir / "sd"), safety_checker=None)
    c = train_sd.load_components(str(tiny_dir / "sd"))
    schedule = shortft.schedule_from_diffusers(c["scheduler"].config)
    grid = shortft.ddim_timesteps(10)
    prompts = ["a red fox", "a lighthouse"]
    ours = train_sd.sample(c["unet"], c["vae"], c["tokenizer"], c["text_encoder"], {}, prompts, grid, schedule, 7.5,
                           [], seeds=[3, 4], resolution=32, batch=2)
    latents = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    ref = pipe(prompts, height=32, width=32, num_inference_steps=10, guidance_scale=7.5, latents=latents,
               output_type="pt").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- gradients reach the right adapters


@pytest.mark.parametrize("method", shortft.METHODS)
def test_only_trainable_lora_gets_gradient(tiny_dir, method):
    """Every method: each trainable LoRA matrix gets a non-zero gradient, the shortcut LoRA and the base
    weights none (fails if an adapter switch froze the trainable LoRA or unfroze the shortcut)."""
    c, names, params, sc = components(tiny_dir)
    switches = dict(shortft=dict(k=3, lora_in_shortcut=True), refl=dict(last=3), drtune=dict(k=2)).get(method, {})
    chain = shortft.make_chain(method, shortft.ddim_timesteps(10), random.Random(0), **switches)
    chain_loss(c, names, chain).backward()
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert sc and all(not p.requires_grad and p.grad is None for p in sc)
    trainable = {id(p) for p in params}
    assert all(p.grad is None for p in c["unet"].parameters() if id(p) not in trainable)


def test_timestep_aware_lora_trains_the_owner_of_the_step(tiny_dir):
    """Timestep-aware LoRA: the adapter whose range holds the trained step gets gradient, the other none."""
    c, names, params, _ = components(tiny_dir, boundaries=(500,))
    grid = shortft.ddim_timesteps(10)  # 901, 801, …, 1
    k = 7  # trained step 201 → 101: range 1 (t < 500); jumps use the shortcut only
    chain_loss(c, names, shortft.shortft(grid, k=k), (500,)).backward()
    named = dict(c["unet"].named_parameters())
    owner = [p for n, p in named.items() if ".tuned_1." in n]
    other = [p for n, p in named.items() if ".tuned_0." in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in owner)
    assert all(p.grad is None for p in other)


def test_shortcut_loaded_unfused_with_its_scale(tiny_dir):
    """The shortcut is a separate peft adapter (not fused) at the requested scale, and it changes ε."""
    c = train_sd.load_components(str(tiny_dir / "sd"))
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
    out = train_sd.main(quick(tiny_dir, tmp_path, method=method))
    run = out["run_dir"]
    assert out["step"] == 2 and out["skipped"] == 0
    lora = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups), "the trainable LoRA did not move"
    assert (run / "checkpoints" / "step_0000002" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "metrics.jsonl").is_file() and list(run.glob("eval_*.png"))
    assert out["eval"]["eval/reward_std"] >= 0


def test_saved_lora_loads_in_stock_pipeline(tiny_dir, tmp_path):
    """The LoRA written by train_sd loads with load_lora_weights (scale alpha/r kept) and changes images."""
    from diffusers import StableDiffusionPipeline

    out = train_sd.main(quick(tiny_dir, tmp_path, lr=3e-2, lora_rank=4, lora_alpha=8.0, steps=3))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir / "sd"), safety_checker=None)

    def image():
        return pipe("a red fox", height=32, width=32, num_inference_steps=5, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    pipe.load_lora_weights(str(out["run_dir"] / "lora"), adapter_name="tuned")
    layers = shortcut.lora_layers(pipe.unet)
    assert layers and all(l.scaling["tuned"] == pytest.approx(2.0) for l in layers)
    ckpt = load_file(str(out["run_dir"] / "checkpoints" / "step_0000003" / "weights.safetensors"))
    loaded = dict(pipe.unet.named_parameters())
    for name, w in ckpt.items():
        torch.testing.assert_close(loaded[name], w)
    assert (image() - before).abs().max() > 1e-4


def test_resume_is_exact(tiny_dir, tmp_path):
    """Interrupted after 2 updates and resumed to 4 = 4 uninterrupted updates, bit for bit."""
    full = train_sd.main(quick(tiny_dir, tmp_path, name="full", steps=4, lr=1e-2))
    part = quick(tiny_dir, tmp_path, name="part", steps=2, lr=1e-2)
    train_sd.main(part)
    resumed = train_sd.main(dataclasses.replace(part, steps=4, resume=True))
    assert resumed["step"] == 4
    a = load_file(str(full["run_dir"] / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed["run_dir"] / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, error, words", [
    (dict(reward="nope"), ValueError, "unknown reward 'nope'"),
    (dict(method="nope"), ValueError, "unknown method 'nope'"),
    (dict(shortcut="nope"), ValueError, "unknown shortcut 'nope'"),
    (dict(shortcut="missing/shortcut.safetensors"), FileNotFoundError, "does not exist"),
    (dict(train_prompts="EMPTY"), ValueError, "has no prompts"),
    (dict(tiny=False, model="/no/such/model", reward="clipscore", method="draft_k"), FileNotFoundError, "does not exist"),
])
def test_bad_input_one_line_errors(tiny_dir, tmp_path, change, error, words):
    if change.get("train_prompts") == "EMPTY":
        (tmp_path / "empty.txt").write_text("# nothing here\n\n")
        change = dict(train_prompts=str(tmp_path / "empty.txt"))
    args = quick(tiny_dir, tmp_path, **change)
    with pytest.raises(error, match=words) as e:
        train_sd.main(args)
    assert "\n" not in str(e.value)


def test_registry_names_and_offline_message():
    assert shortcut.DEFAULT_SHORTCUT in shortcut.SHORTCUTS
    assert not shortcut.SHORTCUTS["lcm"].trajectory_preserving
    with pytest.raises(FileNotFoundError, match="hf download ByteDance/Hyper-SD Hyper-SD15-8steps-lora.safetensors"):
        shortcut.resolve_shortcut("hyper-sd-8", local_files_only=True)


@pytest.mark.gpu
def test_bf16_chain_close_to_fp32(tiny_dir):
    """bf16 weights + autocast give nearly the same ShortFT loss as float32 on CUDA."""
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        c = train_sd.load_components(str(tiny_dir / "sd"), "cuda", dtype)
        shortcut.load_shortcut_lora(c["unet"], tiny_dir / "shortcut_lora.safetensors")
        names, _ = train_sd.add_trainable_lora(c["unet"], 4, 4.0)
        torch.manual_seed(0)
        cache, tok, te = {}, c["tokenizer"], c["text_encoder"]
        den = train_sd.make_denoisers(c["unet"], train_sd.encode_prompts(["a cat"], tok, te, cache),
                                      train_sd.encode_prompts([""], tok, te, cache), 7.5, names, (), "shortcut", 0.0)
        x = torch.randn(1, 4, 16, 16, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            z = shortft.run_chain(x, shortft.shortft(shortft.ddim_timesteps(50), k=10).trunk, den,
                                  shortft.schedule_from_diffusers(c["scheduler"].config))
        losses.append(train_sd.decode(c["vae"], z).mean().float().item())
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)


def test_nan_gradient_never_reaches_the_weights():
    """guarded_update: a NaN/inf gradient is dropped and reported; a finite one is clipped and applied."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    p = torch.nn.Parameter(torch.ones(3))
    opt = acc.prepare(torch.optim.AdamW([p], lr=0.1))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    applied, norm = train_sd.guarded_update(acc, opt, [p], 1.0)
    assert not applied and norm != norm and torch.equal(p.detach(), torch.ones(3)) and p.grad is None
    p.grad = torch.tensor([30.0, 40.0, 0.0])
    applied, norm = train_sd.guarded_update(acc, opt, [p], 1.0)
    assert applied and norm == pytest.approx(50.0) and not torch.equal(p.detach(), torch.ones(3))
