"""The SD3 world (sd3.py) on tiny random components (CPU), against diffusers' own StableDiffusion3Pipeline.

Paper Sec. 3 calls ShortFT architecture-agnostic and shows it on SD3. Here the same chains run on a rectified-flow
transformer: the prompt encoding equals the pipeline's `encode_prompt` (T5 off and on); the repo's Euler sampler equals
the stock pipeline; a stock pipeline driven by `sd3.prepare_pipeline` samples the saved stacked branches exactly as the
repo's sampler (and a switch one step late does not); the saved folder loads with `load_lora_weights` and changes the
stock pipeline's output; each progressive stage's gradient reaches exactly its branches, never the shortcut or the
base weights; a shortcut jump is one Euler step with the shortcut adapter's CFG velocity; the LoRA branches sit on the
joint attention and feed-forward layers; `train_sd.py --tiny-sd3` runs every method and resumes exactly. Layout used
for speed: SD3's 10-step grid (shift 3) 1000.0, 960.1, 913.3, 857.7, 790.4, 707.3, 602.2, 464.9, 278.0, 8.9 with LoRA
points 913.3, 707.3, 464.9, 8.9 (three jumps); the 28-step default runs once, through `python train_sd.py --tiny-sd3`.

Run: python -m pytest -q tests/test_sd3.py
"""

import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chain_args
import sd
import sd3
import shortcut
import shortft
import tiny
import train_sd

ROOT = Path(__file__).resolve().parent.parent
GRID = shortft.flow_timesteps(10, 3.0)
POINTS = (GRID[2], GRID[5], GRID[7], GRID[9])  # 913.3, 707.3, 464.9, 8.9
TYPED = [913.3, 707.3, 464.9, 8.9]  # what a user types: grid timesteps to one decimal
FLOW = shortft.FlowSchedule()
RUN_KEYS = {"update", "stage", "loss", "reward/train", "grad/norm", "update/skipped", "time/update_s", "budget/spent",
            "time/cpu_s", "chain/grad_evals"}
EVAL_KEYS = {"update", "eval/reward_mean", "eval/reward_std", "eval/base_reward_mean"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Tiny SD3 (with T5 on disk), tiny CLIP and a stand-in SD3 shortcut LoRA, built once (what --tiny-sd3 builds)."""
    torch.set_flush_denormal(True)  # as train_sd.main does: random tiny models make denormals
    root = tmp_path_factory.mktemp("tiny3")
    tiny.tiny_sd3(root / "sd3")
    tiny.tiny_clip(root / "clip")
    tiny.tiny_shortcut_lora(root / "shortcut_sd3_lora.safetensors", root / "sd3" / "transformer")
    return root


def pipeline(tiny_dir, t5=False):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_dir / "sd3"),
                                                    **({} if t5 else dict(text_encoder_3=None, tokenizer_3=None)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quick(tiny_dir, tmp_path, **kw) -> train_sd.Args:
    """--tiny-sd3 on the 10-step grid, 4 updates (one per stage), for speed."""
    base = dict(tiny_sd3=True, tiny_dir=str(tiny_dir), out_dir=str(tmp_path), name="run", num_steps=10,
                lora_points=TYPED, steps=4, save_every=2, eval_samples=2, eval_batch=2, refl_last=3, drtune_k=2)
    return train_sd.Args(**{**base, **kw})


def components(tiny_dir, n=4, seed=1, scale=0.3):
    """Tiny SD3 components with the shortcut (scale 1) and n LoRA branches (rank 4, alpha 8) whose A and B are random
    and non-zero, so that every branch changes v and every matrix can receive gradient."""
    c = sd3.load_components(str(tiny_dir / "sd3"))
    shortcut.load_shortcut_lora(c["transformer"], tiny_dir / "shortcut_sd3_lora.safetensors", sd3.SHORTCUT_ADAPTER)
    names = sd3.add_tuned_loras(c["transformer"], n, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sd3.lora_parameters(c["transformer"], names):
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return c, names


DEAD = "transformer_blocks.1.attn.add_q_proj."
"""The one LoRA target that can never get a gradient: the last block's text-stream query. The last MMDiT block ends
the text stream (context_pre_only): diffusers' attention still computes the text tokens' queries but drops their
output, so a branch there stays at its init (B = 0: no effect). docs/sd3.md says so."""


def grads_by_adapter(model):
    """{adapter or 'base': [has a non-zero gradient, per parameter]}; the dead target (DEAD) is checked apart."""
    out = {}
    for n, p in model.named_parameters():
        key = next((a for a in [*model.peft_config] if f".{a}." in n), "base")
        got = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if DEAD in n and key != "base":
            assert not got, f"{n} got a gradient"
            continue
        out.setdefault(key, []).append(got)
    return out


def chain_loss(c, chain, points=POINTS, aware=True, shortcut_guidance=5.0):
    cache = {}
    den = sd3.make_denoisers(c["transformer"], sd3.encode(c, ["a cat"], cache), sd3.encode(c, [""], cache), 7.0,
                             points, aware, shortcut_guidance)
    loss, _ = shortft.reward_loss(torch.randn(1, 16, 16, 16), chain, den,
                                  sd3.schedule_from_diffusers(c["scheduler"].config),
                                  lambda z: sd3.decode(c["vae"], z, checkpoint=True).mean((1, 2, 3)))
    return loss


# ----------------------------------------------------------------------------- against the stock pipeline


@pytest.mark.parametrize("t5", [False, True])
def test_prompt_encoding_equals_the_pipelines(tiny_dir, t5):
    """sd3.encode = StableDiffusion3Pipeline.encode_prompt: token embeddings (CLIP-L | CLIP-G penultimate states,
    zero-padded, then T5's 256 tokens or zeros) and pooled embeddings, of the prompts and of the empty prompt."""
    pipe = pipeline(tiny_dir, t5)
    c = sd3.load_components(str(tiny_dir / "sd3"), t5=t5)
    assert (c["text_encoder_3"] is not None) == t5
    prompts, cache = ["a red fox in the snow", "a lighthouse at night"], {}
    cond, uncond = sd3.encode(c, prompts, cache), sd3.encode(c, ["", ""], cache)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True)
    assert cond.embeds.shape == (2, 77 + sd3.T5_TOKENS, 32) and cond.pooled.shape == (2, 16)
    for ours, theirs in ((cond.embeds, embeds), (cond.pooled, pooled), (uncond.embeds, neg),
                         (uncond.pooled, neg_pooled)):
        torch.testing.assert_close(ours, theirs)
    assert (cond.embeds[:, 77:].abs().sum() == 0) != t5  # without T5 its tokens are zeros
    assert sd3.encode(c, prompts[:1], cache).embeds.equal(cond.embeds[:1])  # from the cache, the same


@pytest.mark.parametrize("t5, tokens", [(False, 0), (False, 7), (True, 7)])
def test_t5_tokens_is_the_pipelines_max_sequence_length(tiny_dir, tmp_path, t5, tokens):
    """`--t5-tokens N` (a model trained with N T5 tokens, or none, as the miniature SD3): the encoding equals
    encode_prompt(max_sequence_length=N), and a saved folder hands N to the stock pipeline through prepare_pipeline."""
    pipe = pipeline(tiny_dir, t5)
    c = sd3.load_components(str(tiny_dir / "sd3"), t5=t5, t5_tokens=tokens)
    cond = sd3.encode(c, ["a red fox"], {})
    embeds, _, pooled, _ = pipe.encode_prompt("a red fox", None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=tokens)
    assert cond.embeds.shape == (1, 77 + tokens, 32)
    torch.testing.assert_close(cond.embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    sd3.add_tuned_loras(c["transformer"], 1, rank=2, alpha=2.0)
    sd3.save_lora(c["transformer"], tmp_path / "lora", GRID, t5=t5, t5_tokens=tokens)
    assert sd3.prepare_pipeline(pipe, tmp_path / "lora")["max_sequence_length"] == tokens
    with pytest.raises(ValueError, match="t5_tokens must be in"):
        sd3.load_components(str(tiny_dir / "sd3"), t5=True, t5_tokens=0)


def test_sampler_matches_the_stock_pipeline(tiny_dir):
    """Our base sampler (SD3's flow grid, CFG as one batched call, Euler steps on σ, VAE decode with shift) equals
    StableDiffusion3Pipeline on the same latents."""
    c = sd3.load_components(str(tiny_dir / "sd3"))
    prompts = ["a red fox", "a lighthouse"]
    ours = sd3.sample(c, prompts, [3, 4], GRID, 7.0, model=shortft.BASE, resolution=32, batch=2)
    latents = torch.stack([torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    ref = pipeline(tiny_dir)(prompts, height=32, width=32, num_inference_steps=10, guidance_scale=7.0, latents=latents,
                             output_type="pt").images
    assert ours.std() > 0.05
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_stock_pipeline_switching_equals_our_sampler(tiny_dir, tmp_path):
    """sd3.prepare_pipeline makes a stock StableDiffusion3Pipeline (its own flow-matching scheduler,
    callback_on_step_end) sample exactly what our sampler does with random non-zero stacked branches; switching one
    step late, or wrong only at the first step, gives something else; another step count is refused."""
    c, names = components(tiny_dir)
    prompts, seeds = ["a red fox", "a lighthouse"], [3, 4]
    ours = sd3.sample(c, prompts, seeds, GRID, 7.0, POINTS, resolution=32, batch=2)
    base = sd3.sample(c, prompts, seeds, GRID, 7.0, model=shortft.BASE, resolution=32, batch=2)
    sd3.save_lora(c["transformer"], tmp_path / "lora", GRID, POINTS, True, 7.0)
    layout = sd3.read_lora_layout(tmp_path / "lora")
    assert layout["grid"] == [shortft.timestep(t) for t in GRID] and isinstance(layout["grid"][1], float)

    pipe = pipeline(tiny_dir)
    kwargs = sd3.prepare_pipeline(pipe, tmp_path / "lora")
    assert kwargs["num_inference_steps"] == 10 and kwargs["guidance_scale"] == 7.0
    latents = torch.stack([torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])

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
        set_for(shortft.timestep(t))
        return kw

    set_for(GRID[0])
    assert (run(callback_on_step_end=late) - ours).abs().max() > 1e-3
    pipe.disable_lora()  # right everywhere except the first step
    assert (run() - ours).abs().max() > 1e-3
    with pytest.raises(ValueError, match="flow-matching Euler grid .*num_inference_steps=10"):
        run(num_inference_steps=5)


def test_saved_lora_loads_in_stock_pipeline(tiny_dir, tmp_path):
    """train_sd.py --tiny-sd3 writes a folder whose every file loads with load_lora_weights into a stock
    StableDiffusion3Pipeline (scale alpha/r kept, weights = the checkpoint's) and changes its output; sd3.load_lora
    reads it back into a bare transformer identically."""
    out = train_sd.main(quick(tiny_dir, tmp_path, lr=3e-2))
    lora = out["run_dir"] / "lora"
    pipe = pipeline(tiny_dir)

    def image():
        return pipe("a red fox", height=32, width=32, num_inference_steps=5, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    ckpt = load_file(str(out["run_dir"] / "checkpoints" / "step_0000004" / "weights.safetensors"))
    for name in sd3.read_lora_layout(lora)["adapters"]:
        pipe.load_lora_weights(str(lora), weight_name=f"{name}.safetensors", adapter_name=name)
        assert all(l.scaling[name] == pytest.approx(1.0) for l in shortcut.lora_layers(pipe.transformer))  # 4 / 4
        assert (image() - before).abs().max() > 1e-4, f"{name} does not change the output"
    loaded = dict(pipe.transformer.named_parameters())
    assert ckpt and all(torch.equal(loaded[k], w) for k, w in ckpt.items())

    transformer = sd3.load_components(str(tiny_dir / "sd3"))["transformer"]
    layout = sd3.load_lora(transformer, lora)
    assert layout["timestep_aware"] and layout["t5"] is False
    assert all(torch.equal(dict(transformer.named_parameters())[k], w) for k, w in ckpt.items())
    with pytest.warns(UserWarning, match="trained without T5"):  # sampling it with T5 would be another model
        sd3.prepare_pipeline(pipeline(tiny_dir, t5=True), lora)


def test_denoisers_activate_exactly_the_stacked_branches(tiny_dir):
    """On one LoRA layer of the text stream (attn.add_q_proj): output = W x + b + Σ_{a active} (α_a / r_a) B_a A_a x,
    the active set written out by hand for the layout (TUNED), none (BASE) and the shortcut alone (SHORTCUT)."""
    c, names = components(tiny_dir)
    transformer = c["transformer"]
    layer = dict(transformer.named_modules())["transformer_blocks.0.attn.add_q_proj"]
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    cache = {}
    cond, uncond = sd3.encode(c, ["a cat"], cache), sd3.encode(c, [""], cache)
    x = torch.randn(1, 16, 16, 16)
    cases = [(shortft.TUNED, GRID[0], names[:1]), (shortft.TUNED, GRID[2], names[:1]), (shortft.TUNED, GRID[3], []),
             (shortft.TUNED, GRID[5], names[:2]), (shortft.TUNED, GRID[7], names[:3]), (shortft.TUNED, GRID[9], names),
             (shortft.BASE, GRID[5], []), (shortft.SHORTCUT, GRID[3], [sd3.SHORTCUT_ADAPTER])]
    with torch.no_grad():
        for model, t, active in cases:
            sd3.make_denoisers(transformer, cond, uncond, 7.0, POINTS)[model](x, t, None)
            h = seen["x"]
            ref = torch.nn.functional.linear(h, layer.base_layer.weight, layer.base_layer.bias)
            for a in active:
                scale = 2.0 if a in names else layer.scaling[a]  # tuned: alpha 8 / rank 4
                ref = ref + scale * h @ layer.lora_A[a].weight.T @ layer.lora_B[a].weight.T
            torch.testing.assert_close(seen["y"], ref, rtol=1e-5, atol=1e-6, msg=f"{model} at t={t}: {active}")
    hook.remove()


def test_shortcut_jump_is_one_euler_step_with_the_shortcut_velocity(tiny_dir):
    """A jump Segment(SHORTCUT, t, s) = x_t + (σ_s − σ_t) ṽ_φ with ṽ_φ = v_∅ + w_φ (v_c − v_∅) of the transformer with
    only the shortcut LoRA, computed by a peer: the stock pipeline's transformer with the same file loaded and fused by
    diffusers at the same scale (Hyper-SD3's recipe, 0.125), the CFG and Euler step by hand."""
    c = sd3.load_components(str(tiny_dir / "sd3"))
    sc_file = tiny_dir / "shortcut_sd3_lora.safetensors"
    shortcut.load_shortcut_lora(c["transformer"], sc_file, sd3.SHORTCUT_ADAPTER, 0.125)
    sd3.add_tuned_loras(c["transformer"], 4, rank=4, alpha=4.0)  # present and inactive in a jump
    cache = {}
    cond, uncond = sd3.encode(c, ["a red fox"], cache), sd3.encode(c, [""], cache)
    den = sd3.make_denoisers(c["transformer"], cond, uncond, 7.0, POINTS, True, shortcut_guidance=5.0)
    x, t, s = torch.randn(1, 16, 16, 16), GRID[3], GRID[5]
    with torch.no_grad():
        ours = shortft.apply_segment(x, shortft.Segment(shortft.SHORTCUT, t, s), den, FLOW)

        pipe = pipeline(tiny_dir)
        pipe.load_lora_weights(str(sc_file))
        pipe.fuse_lora(lora_scale=0.125)
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a red fox", None, None, do_classifier_free_guidance=True)

        def v(e, p):
            return pipe.transformer(hidden_states=x, encoder_hidden_states=e, pooled_projections=p,
                                    timestep=torch.tensor([t])).sample

        v_c, v_u = v(embeds, pooled), v(neg, neg_pooled)
        want = x + (s - t) / 1000 * (v_u + 5.0 * (v_c - v_u))
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
        base = shortft.apply_segment(x, shortft.Segment(shortft.BASE, t, s), den, FLOW)
        assert (ours - base).abs().max() > 1e-4  # the shortcut adapter acts in the jump


def test_lora_branches_sit_on_joint_attention_and_feed_forward():
    """add_tuned_loras wraps exactly the joint attention's projections of both streams (incl. SD3.5's attn2) and both
    streams' feed-forward layers; not the AdaLN modulation, embedders or proj_out."""
    transformer = tiny.sd3_components()["transformer"]
    suffixes = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    targets = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)}
    names = sd3.add_tuned_loras(transformer, 4, rank=4, alpha=4.0)
    layers = {id(m) for m in shortcut.lora_layers(transformer)}
    wrapped = {n for n, m in transformer.named_modules() if id(m) in layers}
    assert wrapped == targets and len(wrapped) == 16 + 9  # block 0: attn, attn2, ff, ff_context; last: no to_add_out, ff_context
    assert not any("norm" in n or "embed" in n or "proj_out" in n for n in wrapped)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in transformer.parameters())
    assert sum(p.numel() for p in sd3.lora_parameters(transformer, names[:1])) == sum(
        4 * (m.in_features + m.out_features) for n, m in transformer.named_modules() if n in targets)


# ----------------------------------------------------------------------------- gradients reach the right adapters


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_gradient_reaches_exactly_its_branches(tiny_dir, stage):
    """Progressive stage i on the flow grid: every matrix of tuned_i … tuned_k gets a non-zero gradient (but the
    dead target, DEAD); tuned_1 … tuned_{i−1} (which act in the stage's chain), the shortcut LoRA and the base weights
    get none."""
    c, names = components(tiny_dir)
    trained = sd3.set_trainable(c["transformer"], sd3.stage_adapters(stage, POINTS))
    chain = shortft.shortft(GRID, POINTS, stage)
    assert [s.model for s in chain.trunk if s.grad].count(shortft.SHORTCUT) == 4 - stage
    chain_loss(c, chain).backward()
    got = grads_by_adapter(c["transformer"])
    assert trained and all(all(got[a]) for a in names[stage - 1 :])
    assert not any(any(got[a]) for a in [*names[: stage - 1], sd3.SHORTCUT_ADAPTER, "base"])


@pytest.mark.parametrize("method", [m for m in shortft.METHODS if m != "shortft"])
def test_baseline_gradient_reaches_exactly_its_lora(tiny_dir, method):
    """Every baseline on the flow grid: one LoRA (tuned_1) at every step gets gradient in every matrix; the shortcut
    and the base none."""
    c, names = components(tiny_dir, n=1)
    sd3.set_trainable(c["transformer"], sd3.stage_adapters(1, None))
    args = chain_args.ChainArgs(method=method, num_steps=10, refl_last=3, drtune_k=2)
    chain = shortft.make_chain(method, GRID, random.Random(0), **chain_args.chain_switches(args, None))
    chain_loss(c, chain, points=None, aware=False).backward()
    got = grads_by_adapter(c["transformer"])
    assert all(got["tuned_1"]) and not any(got[sd3.SHORTCUT_ADAPTER]) and not any(got["base"])


def test_gradient_checkpointing_gives_the_same_gradient(tiny_dir):
    """Checkpointing inside the transformer (--gradient-checkpointing: shortcut.enable_adapter_checkpointing) and
    ShortFT's --checkpoint-segments recompute the same gradient into the stage's branches; diffusers' plain
    enable_gradient_checkpointing recomputes each block with the adapters left active by the last call (peft trap 3)
    and fails."""

    def grad(inside=None, segments=False):
        c, names = components(tiny_dir)
        if inside is not None:
            inside(c["transformer"])
        params = sd3.set_trainable(c["transformer"], sd3.stage_adapters(1, POINTS))
        torch.manual_seed(0)
        chain_loss(c, shortft.shortft(GRID, POINTS, 1, checkpoint=segments)).backward()
        return torch.cat([p.grad.flatten() for p in params])

    plain = grad()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(grad(shortcut.enable_adapter_checkpointing), plain, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(grad(segments=True), plain, rtol=1e-4, atol=1e-8)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        grad(lambda m: m.enable_gradient_checkpointing())


# ----------------------------------------------------------------------------- the layout, the defaults


def test_sd3_defaults_and_the_layout_on_its_grid():
    """SD3's defaults (28 Euler steps, shift 3; the paper's points mapped by noise level; Hyper-SD3 8-step CFG shortcut;
    CFG 7; SD3's LoRA targets; T5 off) and which branches the sampler runs at each of the 28 steps."""
    args = train_sd.with_world(train_sd.Args(tiny_sd3=True), sd3)
    assert train_sd.world_of(train_sd.Args(tiny_sd3=True)) is sd3
    assert (args.shortcut, args.guidance, tuple(args.lora_targets), args.t5) == (
        "hyper-sd3-8-cfg", 7.0, sd3.LORA_TARGETS, False)
    spec = shortcut.SHORTCUTS[args.shortcut]
    assert (spec.guidance, spec.lora_scale, spec.steps, spec.base) == (5.0, 0.125, 8, "sd3")
    grid, schedule = train_sd.model_grid(args, sd3)
    assert grid == shortft.flow_timesteps(28, 3.0) and isinstance(schedule, shortft.FlowSchedule)
    points, aware = chain_args.layout(args, grid, schedule)
    assert [round(p, 1) for p in points] == [814.3, 602.2, 409.3, 8.9] and aware
    acting = [shortft.active_loras(t, points) for t in grid]
    assert acting == [(0,)] * 12 + [()] * 6 + [(0, 1)] + [()] * 3 + [(0, 1, 2)] + [()] * 4 + [(0, 1, 2, 3)]
    typed = dataclasses.replace(args, lora_points=[814.3, 602.2, 409.3, 8.9])  # one decimal names the grid step
    assert chain_args.layout(typed, grid, schedule)[0] == points
    with pytest.raises(ValueError, match=r"\[814\] are not on the 28-step grid.*the grid: 1000.0 987.4"):
        chain_args.check_chain_args(dataclasses.replace(args, lora_points=[814, 8.9]), grid, schedule)


def test_registry_keeps_the_sd1_5_default_and_names_the_sd3_files():
    assert shortcut.DEFAULT_SHORTCUT == sd.DEFAULT_SHORTCUT == "hyper-sd-4"
    assert {n: (s.weight_name, s.guidance, s.lora_scale) for n, s in shortcut.SHORTCUTS.items() if s.base == "sd3"} == {
        "hyper-sd3-4-cfg": ("Hyper-SD3-4steps-CFG-lora.safetensors", 3.0, 0.125),
        "hyper-sd3-8-cfg": ("Hyper-SD3-8steps-CFG-lora.safetensors", 5.0, 0.125),
        "hyper-sd3-16-cfg": ("Hyper-SD3-16steps-CFG-lora.safetensors", 7.0, 0.125)}
    with pytest.raises(FileNotFoundError, match="hf download ByteDance/Hyper-SD Hyper-SD3-8steps-CFG-lora"):
        shortcut.resolve_shortcut("hyper-sd3-8-cfg", local_files_only=True)
    with pytest.raises(ValueError, match="a shortcut of sd1.5 models, not of this sd3 model: choose from hyper-sd3"):
        sd.check_shortcut("shortcut", "hyper-sd-4", "sd3")


def test_a_registry_file_fetched_by_hand_keeps_its_settings(tmp_path):
    """`hf download ByteDance/Hyper-SD Hyper-SD3-8steps-CFG-lora.safetensors` and --shortcut <that file> (the offline
    route the errors give) samples with the registry's CFG 5 and scale 0.125; a file of another name gets none."""
    for name, want in (("Hyper-SD3-8steps-CFG-lora.safetensors", shortcut.SHORTCUTS["hyper-sd3-8-cfg"]),
                       ("my_shortcut.safetensors", shortcut.ShortcutSpec("", "my_shortcut.safetensors"))):
        (tmp_path / name).write_bytes(b"")
        assert shortcut.resolve_shortcut(str(tmp_path / name)) == (tmp_path / name, want)


def test_shortcut_loaded_unfused_frozen_with_its_scale(tiny_dir):
    """The SD3 shortcut is a separate peft adapter on the transformer (not fused), frozen, at the requested scale;
    a UNet LoRA file is refused in one line."""
    c = sd3.load_components(str(tiny_dir / "sd3"))
    params = shortcut.load_shortcut_lora(c["transformer"], tiny_dir / "shortcut_sd3_lora.safetensors", "shortcut", 0.125)
    layers = shortcut.lora_layers(c["transformer"])
    assert params and not any(p.requires_grad for p in params)
    assert layers and all(not getattr(l, "merged", False) for l in layers)
    assert all(l.scaling["shortcut"] == pytest.approx(0.125 * l.lora_alpha["shortcut"] / l.r["shortcut"])
               for l in layers if "shortcut" in l.scaling)
    other = tiny_dir / "unet_lora.safetensors"
    tiny.tiny_sd(tiny_dir / "sd")
    tiny.tiny_shortcut_lora(other, tiny_dir / "sd" / "unet")
    with pytest.raises(ValueError, match="holds no SD3 transformer LoRA weights") as e:
        shortcut.load_shortcut_lora(sd3.load_components(str(tiny_dir / "sd3"))["transformer"], other)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the script, end to end


def test_newcomer_command(tmp_path):
    """`python train_sd.py --tiny-sd3` as the docs write it: SD3's 28-step grid with the paper's layout mapped by
    noise level, 4 updates = one per stage, a LoRA folder with float grid timesteps."""
    r = subprocess.run([sys.executable, "train_sd.py", "--tiny-sd3", "--out-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "sd3-tiny"
    layout = json.loads((run / "lora" / sd.LORA_JSON).read_text())
    grid = shortft.flow_timesteps(28, 3.0)
    assert layout["grid"] == grid and layout["lora_points"] == list(shortft.paper_points(grid, FLOW))
    assert layout["guidance_scale"] == 7.0 and layout["t5"] is False
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "stage" in row]
    assert [row["stage"] for row in train] == [1, 2, 3, 4]
    assert [row["chain/grad_evals"] for row in train] == [7, 5, 3, 1]
    assert all(set(row) == RUN_KEYS for row in train) and set(rows[-1]) == EVAL_KEYS
    assert "StableDiffusion3Pipeline, T5 off" in r.stdout and "shortcut_sd3_lora.safetensors (scale 1.0, CFG 5.0)" \
        in r.stdout


@pytest.mark.parametrize("method", shortft.METHODS)
def test_every_method_end_to_end(tiny_dir, tmp_path, method):
    out = train_sd.main(quick(tiny_dir, tmp_path, method=method, steps=4 if method == "shortft" else 2))
    run, n = out["run_dir"], 4 if method == "shortft" else 1
    assert out["update"] == out["args"].steps and out["skipped"] == 0
    layout = sd3.read_lora_layout(run / "lora")
    assert layout["adapters"] == shortft.lora_names(n) and layout["method"] == method
    assert layout["lora_points"] == (list(POINTS) if method == "shortft" else None)
    for f in layout["files"]:
        ups = [v for k, v in load_file(str(run / "lora" / f)).items() if "lora_B" in k]
        assert ups and all(k.startswith("transformer.") for k in load_file(str(run / "lora" / f)))
        assert any(v.abs().sum() > 0 for v in ups), f"{f} did not move"
    ckpt = run / "checkpoints" / f"step_{out['update']:07d}"
    assert sd3.read_lora_layout(ckpt) == layout  # every checkpoint is a LoRA folder too
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) == RUN_KEYS for r in rows[:-1]) and set(rows[-1]) == EVAL_KEYS
    assert [r["stage"] for r in rows[:-1]] == ([1, 2, 3, 4] if method == "shortft" else [1, 1])


def test_t5_on_and_bf16_run(tiny_dir, tmp_path):
    """--t5 loads the T5 encoder and conditions on it (the saved folder says so); --mixed-precision bf16 (CPU
    autocast here, frozen weights in bf16, branches in float32) trains without a skipped update."""
    out = train_sd.main(quick(tiny_dir, tmp_path, name="t5", t5=True, steps=2, method="draft_k"))
    assert sd3.read_lora_layout(out["run_dir"] / "lora")["t5"] is True
    r = subprocess.run([sys.executable, "train_sd.py", "--tiny-sd3", "--tiny-dir", str(tiny_dir), "--out-dir",
                        str(tmp_path), "--name", "bf16", "--mixed-precision", "bf16", "--num-steps", "10",
                        "--lora-points", *map(str, TYPED), "--steps", "2", "--eval-samples", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]  # (accelerate fixes the precision once per process)
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert [row["update/skipped"] for row in rows if "stage" in row] == [0, 0]
    w = load_file(str(tmp_path / "bf16" / "lora" / "tuned_1.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())


def test_resume_is_exact_across_a_stage_boundary(tiny_dir, tmp_path):
    """A run stopped after its checkpoint at update 2 (stages 1, 2) and resumed to update 4 (stages 3, 4) ends bit for
    bit where an uninterrupted run does."""
    full = train_sd.main(quick(tiny_dir, tmp_path, name="full", lr=1e-2))
    part = quick(tiny_dir, tmp_path, name="part", lr=1e-2)
    run = train_sd.main(part)["run_dir"]
    shutil.rmtree(run / "checkpoints" / "step_0000004")  # what a crash between updates 2 and 4 leaves behind
    shutil.rmtree(run / "lora")
    (run / "metrics.jsonl").write_text("".join((run / "metrics.jsonl").read_text().splitlines(True)[:2]))
    assert train_sd.main(dataclasses.replace(part, resume=True))["update"] == 4
    for i in (1, 2, 3, 4):
        a = load_file(str(full["run_dir"] / "lora" / f"tuned_{i}.safetensors"))
        b = load_file(str(run / "lora" / f"tuned_{i}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


@pytest.mark.gpu
def test_bf16_chain_close_to_fp32(tiny_dir):
    """bf16 weights + autocast give nearly the same ShortFT loss as float32 on CUDA (SD3 world)."""
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        c = sd3.load_components(str(tiny_dir / "sd3"), "cuda", dtype)
        shortcut.load_shortcut_lora(c["transformer"], tiny_dir / "shortcut_sd3_lora.safetensors")
        sd3.add_tuned_loras(c["transformer"], 4, rank=4, alpha=4.0)
        torch.manual_seed(0)
        cache = {}
        grid = shortft.flow_timesteps(28, 3.0)
        den = sd3.make_denoisers(c["transformer"], sd3.encode(c, ["a cat"], cache), sd3.encode(c, [""], cache), 7.0,
                                 shortft.paper_points(grid, FLOW))
        x = torch.randn(1, 16, 16, 16, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            z = shortft.run_chain(x, shortft.shortft(grid, schedule=FLOW).trunk, den, FLOW)
        losses.append(sd3.decode(c["vae"], z).mean().float().item())
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)


def test_bench_stages_takes_a_shortft_run_apart(tiny_dir, tmp_path):
    """bench_stages.py on a --tiny-sd3 ShortFT run with a checkpoint per update: a held-out score at init and after each
    stage; the last stage's gradient is the exact one (its chain is the complete sampler with gradient into LoRA_k,
    which acts only at the last step), the earlier stages' point the same way; every call uses the branches
    shortft.active_loras picks."""
    import bench_stages

    run = train_sd.main(quick(tiny_dir, tmp_path, save_every=1, lr=1e-2))["run_dir"]
    out = bench_stages.main(bench_stages.Args(run=str(run), eval_samples=2, grad_states=["0", "stage2"],
                                              grad_samples=2, micro_batch=1))
    assert [r["update"] for r in out["held_out"]] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(r["reward"]) for r in out["held_out"])
    for row in out["gradients"]:
        assert row["stages"]["4"]["cos"] == pytest.approx(1.0, abs=1e-4)
        assert row["stages"]["4"]["rel_norm"] == pytest.approx(1.0, abs=1e-3)
        assert all(v["cos"] > 0 for v in row["stages"].values())
    assert out["branches"]["mismatches"] == [] and out["branches"]["sampler_calls"] == 10
