"""Stable Diffusion LoRA fine-tuning by reward backpropagation: ShortFT (paper defaults) and every baseline, on SD1.5
or on SD3 / SD3.5 (chosen from the model folder).

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3 (shortcut-based chain, timestep-aware LoRA, progressive training).

One update: draw prompts c and x_T ~ N(0, I) (B, C, H/8, W/8); build the method's chain for the current stage with
`shortft.make_chain` over the model's grid (SD1.5: 50 DDIM steps 981 … 1; SD3: 28 Euler steps 1000.0 … 8.9); run it
with the world's denoisers (`sd.make_denoisers`: ε, or `sd3.make_denoisers`: v); decode x_0 with the VAE;
loss = −r(decode(x_0), c); backpropagate into the LoRA branches of the stage only. What differs between SD1.5 and SD3
lives in `sd.py` / `sd3.py` (the "world", picked once from model_index.json); this loop is the same for both.

Notation (code -> paper):
    tuned_1 … tuned_k  LoRA_1 … LoRA_k (rank 128, attention + feed-forward); stacked at the LoRA points p_i
    stage              progressive training: stage i (by update number) trains LoRA_i … LoRA_k
    shortcut           the frozen Hyper-SD 4-step LoRA (SD3: Hyper-SD3 8-step CFG LoRA); a jump next(p_{i−1}) → p_i
                       replaces the base model's steps

Run: python train_sd.py --tiny        (CPU, under a minute: tiny random SD, 4 updates = 4 stages, runs/sd-tiny/;
     --tiny-sd3: the same on a tiny random SD3, runs/sd3-tiny/)
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

import budget
import chain_args
import rewards
import runio
import sd
import sd3
import shortcut
import shortft


@dataclass
class Args(chain_args.ChainArgs):
    """Fine-tune Stable Diffusion (1.5, 3 or 3.5) LoRA branches with ShortFT or a baseline (reward backpropagation)."""

    name: str = "sd"
    """run folder: runs/<name>/ (args.json, metrics.jsonl, checkpoints/, lora/, eval PNG grids); a new run refuses a
    folder that holds another run's checkpoints (--resume it, or choose another name)"""
    out_dir: str = "runs"
    """parent folder of run folders"""
    tiny: bool = False
    """build tiny random SD components, a tiny CLIP reward and a stand-in shortcut LoRA (no downloads)"""
    tiny_sd3: bool = False
    """--tiny with a tiny random SD3 (rectified-flow transformer, two CLIP encoders and T5) instead of SD1.5"""
    tiny_dir: str = ""
    """where --tiny builds (or reuses) its files (empty: runs/<name>/tiny)"""
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local folder of an SD1.5 pipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or of an
    SD3 / SD3.5 pipeline (transformer/, vae/, text_encoder/, text_encoder_2/, …, e.g.
    stabilityai/stable-diffusion-3.5-medium); which one is read from its model_index.json"""
    t5: bool = False
    """SD3: also load the T5 text encoder (text_encoder_3); off: its tokens of the prompt embedding are zeros, as in
    StableDiffusion3Pipeline(text_encoder_3=None) (T5-XXL is 4.7 B parameters)"""
    t5_tokens: int = 256
    """SD3: length of T5's part of the prompt embedding (the pipeline's max_sequence_length, at most 512); 0 for a model
    trained without it, such as the miniature SD3 (python minisd3.py)"""
    reward: str = "aesthetic"
    """reward name or weighted sum, e.g. 'pickscore:10,hpsv2:2,aesthetic:0.05' (rewards.REWARDS)"""
    clip_model: str | None = None
    """CLIP backbone for CLIP-based rewards (None: each reward's default)"""
    digit_classifier: str | None = None
    """weights (.safetensors, config beside it as .json) of the `digit` reward's classifier (None: the reward's
    default, runs/minisd/classifier.safetensors)"""
    shortcut: str = ""
    """shortcut LoRA: a name in shortcut.SHORTCUTS or a local .safetensors file (ShortFT only; empty: the model's,
    hyper-sd-4 for SD1.5 — the paper's —, hyper-sd3-8-cfg for SD3)"""
    shortcut_guidance: float | None = None
    """CFG scale inside shortcut jumps (None: the shortcut's recommendation, 0 for Hyper-SD, 3 / 5 / 7 for
    Hyper-SD3; ≤ 1 means no CFG)"""
    shortcut_scale: float | None = None
    """LoRA scale of the shortcut (None: the shortcut's recommendation)"""
    train_prompts: str = "prompts/train.txt"
    """training prompts, one per line ('#' starts a comment)"""
    eval_prompts: str = "prompts/eval.txt"
    """held-out prompts for evaluation"""
    resolution: int = 512
    """image side in pixels (latents are resolution / 8); a multiple of the model's VAE × UNet downsampling
    (SD1.5: 64) or VAE downsampling × patch size (SD3: 16)"""
    steps: int = 200
    """optimizer updates (progressive stages are fractions of them)"""
    budget: float = 0.0
    """also stop once the updates have spent this much of --budget-unit (update time only: evaluation and saving
    excluded); progressive stages are then fractions of the larger of the two spent shares (0: --steps only)"""
    budget_unit: str = "gflop"
    """what --budget counts: gflop (the FLOPs of the updates, budget.py: the same on every machine), cpu_seconds
    (time.process_time) or seconds (wall-clock); several processes: GFLOP and CPU-seconds of all of them together, the
    wall-seconds of the slowest"""
    batch_size: int = 1
    """prompts per micro-batch and process"""
    grad_accum: int = 1
    """micro-batches per update"""
    lr: float = 3e-4
    """AdamW learning rate of the LoRA branches (at most 1)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (0: none); NaN/inf gradients, or weights an update makes NaN/inf, skip the update"""
    lora_rank: int = 128
    """rank r of each LoRA branch (paper: 128)"""
    lora_alpha: float = 128.0
    """LoRA alpha: each branch adds (alpha / r) B A (alpha = r: scale 1, as diffusers' LoRA training script)"""
    lora_targets: list[str] = field(default_factory=list)
    """modules of the UNet / transformer that get the LoRA branches (paper: attention and feed-forward; empty: the
    model's, sd.LORA_TARGETS or sd3.LORA_TARGETS)"""
    guidance: float | None = None
    """classifier-free guidance scale w of the base and tuned model (training chains and sampler; None: the
    pipeline's default, 7.5 for SD1.5, 7.0 for SD3)"""
    mixed_precision: str = "no"
    """no | bf16 | fp16 (accelerate); frozen weights are stored in this dtype, the LoRA branches in float32"""
    gradient_checkpointing: bool = False
    """also checkpoint inside the UNet / transformer"""
    checkpoint_decode: bool = True
    """recompute the VAE decode in backward instead of storing its activations"""
    channels_last: bool = True
    """channels_last memory format for the UNet and VAE on CUDA"""
    compile: bool = False
    """torch.compile the UNet / transformer (CUDA; recompiles once per adapter combination)"""
    seed: int = 0
    """seed of prompts, noise and chain draws"""
    eval_every: int = 100
    """evaluate on the held-out prompts every this many updates (0: only at the end)"""
    eval_samples: int = 12
    """held-out prompts evaluated (one fixed seed each)"""
    eval_batch: int = 4
    """images per sampler batch during evaluation"""
    eval_base: bool = True
    """also sample and score the base model on the held-out prompts (once, at the first evaluation; --no-eval-base:
    not, e.g. when a benchmark scores the base once for all its runs; the evaluation grids then hold the tuned row
    only)"""
    save_every: int = 100
    """checkpoint (LoRA + optimizer + RNG) every this many updates, and at the end (0: only at the end)"""
    resume: bool = False
    """continue from the run folder's newest checkpoint that loads (optimizer, update and RNG restored exactly); the
    settings of the model and the method (RESUME_KEYS) must be the saved run's"""
    log_with: str = ""
    """extra trackers through accelerate: tensorboard, wandb (metrics.jsonl is always written)"""
    overwrite: bool = False
    """a new run replaces the run the folder holds (a finished lora/, checkpoints); without it such a folder is refused"""
    max_skipped: int = 20
    """stop (one line, exit 2) after this many updates in a row skipped for NaN/inf gradients or weights (0: never)"""


RESUME_KEYS = tuple(f.name for f in dataclasses.fields(chain_args.ChainArgs)) + (
    "model", "t5", "t5_tokens", "reward", "clip_model", "digit_classifier", "shortcut", "shortcut_guidance", "shortcut_scale",
    "resolution", "lora_rank", "lora_alpha", "lora_targets", "guidance", "seed")
"""What --resume keeps: the settings that make the model, the LoRA branches and the method (a resumed run may
change --steps, --lr, --batch-size, --save-every, …)."""
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive")
"""--log-with values (accelerate trackers), each the name of the package it needs (tensorboard: or tensorboardX)."""

TINY = dict(resolution=32, steps=4, eval_every=0, eval_samples=4, save_every=2, name="sd-tiny", lora_rank=4,
            lora_alpha=4.0)
"""--tiny replaces these defaults (fields set to anything other than their default are kept)."""
TINY_SD3 = dict(TINY, name="sd3-tiny", shortcut_guidance=shortcut.SHORTCUTS[sd3.DEFAULT_SHORTCUT].guidance)
"""--tiny-sd3's: the same, and the stand-in shortcut gets the SD3 default shortcut's CFG inside its jumps."""
WORLDS = {sd.PIPELINE: sd, sd3.PIPELINE: sd3}
"""The model's world by its pipeline class (model_index.json): the module with its components, denoisers, sampler
and saved model. Everything else in this script is the same for both."""


def world_of(args: Args):
    """The world of the model being fine-tuned: `sd3` for an SD3 / SD3.5 pipeline, `sd` for SD1.5 (--tiny-sd3 /
    --tiny build theirs unless --model is given), read from the folder or hub cache before anything is built (a
    model that cannot be read yet counts as SD1.5, or SD3 with --tiny-sd3: checking its folder says what is missing).
    ArgError for another pipeline."""
    if (args.tiny or args.tiny_sd3) and args.model == Args.model:
        return sd3 if args.tiny_sd3 else sd
    kind = sd.pipeline_class(args.model)
    runio.require(kind is None or kind in WORLDS, "model", args.model,
                  f"a {kind} folder: train_sd.py fine-tunes {sd.PIPELINE} (SD1.5) and {sd3.PIPELINE} (SD3, SD3.5) "
                  "models")
    return WORLDS.get(kind, sd3 if args.tiny_sd3 else sd)


def with_world(args: Args, world) -> Args:
    """The settings left to the model (--guidance, --shortcut, --lora-targets) filled in with the world's own."""
    return dataclasses.replace(args, guidance=world.GUIDANCE if args.guidance is None else args.guidance,
                               shortcut=args.shortcut or world.DEFAULT_SHORTCUT,
                               lora_targets=list(args.lora_targets or world.LORA_TARGETS))


def model_grid(args: Args, world) -> tuple[list[float], object]:
    """(grid, schedule) of the model's sampler from its scheduler config, read before anything is built: the local
    folder's or the hub cache's, the world's own (sd.SCHEDULER, sd3.SCHEDULER) for --tiny or a model not fetched."""
    config = None if (args.tiny or args.tiny_sd3) and args.model == Args.model else sd.scheduler_config(args.model)
    config = config or world.SCHEDULER
    steps = args.num_steps if 0 <= args.num_steps <= 1000 else 0  # a bad --num-steps: check_chain_args says so
    return sd.grid_from_diffusers(config, steps), sd.schedule_from_diffusers(config)


def check_args(args: Args) -> None:
    """Every argument, in field order, before any model is built or downloaded: one line `--flag VALUE: what to do`
    (a ValueError). Local paths are checked without any network round trip; a hub id must be in the local cache or
    the hub reachable (if it is not, the process goes offline: see sd.hub_offline). The chain arguments are checked
    against the model's own grid (its scheduler config, read from the folder)."""
    import importlib.util

    tiny, own_shortcut = args.tiny or args.tiny_sd3, args.shortcut
    world = world_of(args)
    try:
        grid, schedule = model_grid(args, world)
    except ValueError as e:  # a scheduler this repo cannot run (FLUX's dynamic shift)
        raise runio.ArgError("model", args.model, " ".join(str(e).split())) from None
    chain_args.check_chain_args(args, grid, schedule)  # checked again against the loaded model's config
    args = with_world(args, world)
    runio.check_run_name(args.name, out_flag="--out-dir")
    runio.check_writable_dir("--out-dir", args.out_dir)
    if args.tiny_dir:
        runio.check_writable_dir("--tiny-dir", args.tiny_dir)
    default = Args()
    if not tiny or args.model != default.model:  # --tiny builds its own model unless one is given
        sd.check_source("model", args.model, world.PIPELINE_FILES, world.FOLDER)
    if args.t5:
        runio.require(world is sd3, "t5", args.t5, "SD1.5 has no T5 text encoder: drop --t5")
        runio.require(tiny and args.model == default.model or sd.model_file(args.model, "text_encoder_3/config.json")
                      is not None, "t5", args.t5, "the model has no text_encoder_3/ (T5): drop --t5")
    if world is sd3:
        runio.require_range("t5_tokens", args.t5_tokens, 1 if args.t5 else 0, 512,
                            what="StableDiffusion3Pipeline's max_sequence_length (0: no T5 tokens; not with --t5)")
    else:
        runio.require(args.t5_tokens == default.t5_tokens, "t5_tokens", args.t5_tokens,
                      "SD1.5 has no T5 prompt tokens: drop --t5-tokens")
    images = [n for n in rewards.REWARDS if n not in rewards.TOY_REWARDS]
    runio.check_arg("reward", args.reward, rewards.check_reward_spec, args.reward, images)
    if args.digit_classifier is not None:
        runio.require(Path(args.digit_classifier).is_file(), "digit_classifier", args.digit_classifier,
                      "no such file: pass the .safetensors that minisd.py writes (runs/minisd/classifier.safetensors)")
    if args.clip_model is not None:
        sd.check_source("clip_model", args.clip_model, ("config.json",), "a CLIP model folder (config.json, …)")
    if args.method == "shortft" and (not tiny or own_shortcut):  # --tiny: a stand-in unless one is given
        sd.check_shortcut("shortcut", args.shortcut, shortcut.SHORTCUTS[world.DEFAULT_SHORTCUT].base)
    if args.shortcut_guidance is not None:
        runio.require_range("shortcut_guidance", args.shortcut_guidance, 0, 100)
    if args.shortcut_scale is not None:
        runio.require_range("shortcut_scale", args.shortcut_scale, 0, 10, low_open=True)
    for flag in ("train_prompts", "eval_prompts"):
        runio.check_arg(flag, getattr(args, flag), sd.load_prompts, sd.find_file(getattr(args, flag)))
    runio.require_range("resolution", args.resolution, 8, 4096)
    runio.require(args.resolution % 8 == 0, "resolution", args.resolution,
                  "must be a multiple of 8 (SD1.5: of 64, SD3: of 16)")
    runio.require_range("steps", args.steps, 1)
    runio.require_range("budget", args.budget, 0, what="0: --steps only")
    runio.require(args.budget_unit in budget.UNITS and args.budget_unit != "updates", "budget_unit", args.budget_unit,
                  "use gflop, cpu_seconds or seconds (updates: --steps)")
    runio.require(not (args.compile and args.budget and args.budget_unit == "gflop"), "budget_unit", args.budget_unit,
                  "FLOPs are counted in eager mode: drop --compile, or count cpu_seconds or seconds")
    runio.require_range("batch_size", args.batch_size, 1, 1024, what="for more, use --grad-accum")
    runio.require_range("grad_accum", args.grad_accum, 1)
    runio.require_range("lr", args.lr, 0, 1, low_open=True, what="Adam moves each weight by about lr per update")
    runio.require_range("weight_decay", args.weight_decay, 0, 1)
    runio.require_range("max_grad_norm", args.max_grad_norm, 0, what="0: no clipping")
    runio.require_range("lora_rank", args.lora_rank, 1, 4096)
    runio.require_range("lora_alpha", args.lora_alpha, 0, 1e4, low_open=True)
    runio.require(all(args.lora_targets), "lora_targets", args.lora_targets,
                  f"an empty module name: name modules of the model, e.g. {' '.join(world.LORA_TARGETS)}")
    runio.require_range("guidance", args.guidance, 0, 100)
    runio.require(args.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", args.mixed_precision,
                  "use no, bf16 or fp16")
    runio.require_range("seed", args.seed, 0, 2**32 - 1)
    runio.require_range("eval_every", args.eval_every, 0, what="0: only at the end")
    runio.require_range("eval_samples", args.eval_samples, 1)
    runio.require_range("eval_batch", args.eval_batch, 1, 1024)
    runio.require_range("save_every", args.save_every, 0, what="0: only at the end")
    runio.require_range("max_skipped", args.max_skipped, 0, what="0: never stop")
    if "digit" in dict(rewards.parse_reward_spec(args.reward)):  # a prompt the digit reward cannot read: now, not later
        for flag, n in (("train_prompts", None), ("eval_prompts", args.eval_samples)):
            for prompt in sd.load_prompts(sd.find_file(getattr(args, flag)))[:n]:
                runio.check_arg(flag, getattr(args, flag), rewards.digit_in_prompt, prompt)
    if args.log_with:
        runio.require(args.log_with in TRACKERS, "log_with", args.log_with, f"use one of {', '.join(TRACKERS)}")
        found = any(importlib.util.find_spec(m) for m in ((args.log_with, "tensorboardX")
                                                          if args.log_with == "tensorboard" else (args.log_with,)))
        runio.require(found, "log_with", args.log_with, f"the package is not installed: pip install {args.log_with}")
    if not tiny:
        sd.hub_offline()  # the rewards' hub models are loaded later: offline at once if the hub is unreachable


def apply_tiny(args: Args, build: bool = True) -> Args:
    """--tiny / --tiny-sd3: point the args at tiny SD (or SD3), CLIP and shortcut files under runs/<name>/tiny/ (or
    --tiny-dir), built there unless they exist (build=False: only the paths)."""
    import tiny

    defaults = Args()
    keep = lambda k: getattr(args, k) != getattr(defaults, k)  # noqa: E731
    args = dataclasses.replace(args, **{k: v for k, v in (TINY_SD3 if args.tiny_sd3 else TINY).items() if not keep(k)})
    root = Path(args.tiny_dir) if args.tiny_dir else Path(args.out_dir) / args.name / "tiny"
    model, sc = (root / "sd3", root / "shortcut_sd3_lora.safetensors") if args.tiny_sd3 else \
        (root / "sd", root / "shortcut_lora.safetensors")
    if build:
        tiny_part(model, "model_index.json", tiny.tiny_sd3 if args.tiny_sd3 else tiny.tiny_sd)
        tiny_part(root / "clip", "config.json", tiny.tiny_clip)
        if not sc.is_file():
            tiny.tiny_shortcut_lora(sc, model / ("transformer" if args.tiny_sd3 else "unet"))
    tiny_files = dict(model=str(model), reward="clipscore", clip_model=str(root / "clip"), shortcut=str(sc))
    return dataclasses.replace(args, **{k: v for k, v in tiny_files.items() if not keep(k)})


def tiny_part(path: Path, marker: str, build) -> None:
    """A folder of --tiny's files, kept between runs: reused when whole — its MANIFEST.json matches every file, or,
    built before manifests, it holds `marker` —, else built by `build(folder)` as a whole (runio.atomic_folder, with a
    manifest); a damaged one is rebuilt with one line saying so (the build is seeded: the same files again)."""
    if (path / "MANIFEST.json").is_file():
        problem = runio.folder_problem(path)
        if problem is None:
            return
        print(f"--tiny: {path} is damaged ({problem}): rebuilding it", file=sys.stderr)
        shutil.rmtree(path)
    elif (path / marker).is_file():
        return
    shutil.rmtree(path, ignore_errors=True)  # a build killed half-way
    with runio.atomic_folder(path) as tmp:
        build(tmp)


def user_error(e: Exception) -> runio.RunError:
    """A one-line error about something the user passed (a file, a folder, a hub id) as a RunError for `runio.cli`."""
    return runio.RunError(" ".join(str(e).split()))


def check_state(state: dict, k: int) -> None:
    """What --resume reads from a checkpoint's state.json besides the RNG and optimizer (runio.check_checkpoint): the
    loop's counters (runio.check_run_state) and the stage, one of 1 … k. ValueError or KeyError: the checkpoint is
    skipped for the previous one."""
    runio.check_run_state(state, ("stage",))
    if state["stage"] is not None and not (isinstance(state["stage"], int) and 1 <= state["stage"] <= k):
        raise ValueError(f"its stage {state['stage']!r} is not one of 1 … {k}")


def main(args: Args) -> dict:
    """Train; returns {"run_dir", "update", "skipped", "eval", "args", "spent", "weights"} (weights: this process's
    LoRA branches by parameter name; several processes hold the same ones)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one progress bar to watch: the updates'

    # x86 CPUs run 10-100x slower on denormal floats, which random tiny models produce in abundance. The flag is
    # per thread and worker threads copy it when they start, so it is set before any parallel work.
    torch.set_flush_denormal(True)
    check_args(args)
    world = world_of(args)  # sd (SD1.5) or sd3 (SD3, SD3.5): components, denoisers, sampler, saved model
    if args.tiny or args.tiny_sd3:
        args = apply_tiny(args, build=False)
    args = with_world(args, world)
    args = dataclasses.replace(args, train_prompts=str(sd.find_file(args.train_prompts)),
                               eval_prompts=str(sd.find_file(args.eval_prompts)))
    run_dir = Path(args.out_dir) / args.name

    def checks():  # before anything is built or written, and again once the folder is locked
        if args.resume:  # something to resume, made with these settings
            runio.check_resume(run_dir, args, RESUME_KEYS)
        elif not args.overwrite:  # a new run never mixes into, nor replaces by accident, another run's folder
            runio.check_fresh(run_dir, "--name")
            runio.check_not_finished(run_dir, ("lora",), args.overwrite)

    sd.launched_processes()  # a launch that started one process where several were asked for: one line, now
    # one writer per run folder (the main process holds the lock); the first SIGINT / SIGTERM stops after the update
    with runio.run_lock(run_dir / ".lock", check=checks, enabled=os.environ.get("RANK", "0") == "0"), \
            runio.graceful_stop():
        return train(args, world, run_dir)


def train(args: Args, world, run_dir: Path) -> dict:
    """`main`'s training, once the arguments are checked and the run folder is locked."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = sd.make_accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
                                      log_with=args.log_with or None, project_dir=str(run_dir))
    device, main_proc = accelerator.device, accelerator.is_main_process
    if args.tiny or args.tiny_sd3:  # built by the main process alone, then read by all
        if main_proc:
            apply_tiny(args)
        accelerator.wait_for_everyone()
    train_prompts, eval_prompts = sd.load_prompts(args.train_prompts), sd.load_prompts(args.eval_prompts)
    eval_prompts = eval_prompts[: args.eval_samples]
    try:
        sc_file, sc_spec = shortcut.resolve_shortcut(args.shortcut) if args.method == "shortft" else (None, None)
    except (OSError, ValueError) as e:
        raise user_error(e) from None

    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    set_seed(args.seed)  # python, numpy, torch: every draw below comes from these, the same on every process

    try:
        c = world.load_components(args.model, device, dtype,
                                  **(dict(t5=args.t5, t5_tokens=args.t5_tokens) if world is sd3 else {}))
    except (OSError, ValueError) as e:
        raise user_error(e) from None
    net, vae = c[world.NETWORK], c["vae"]  # the denoising network: SD1.5's UNet or SD3's transformer
    world.check_model(net, vae, args.resolution, args.lora_targets)
    schedule = sd.schedule_from_diffusers(c["scheduler"].config)
    grid = sd.grid_from_diffusers(c["scheduler"].config, args.num_steps)
    try:
        chain_args.check_chain_args(args, grid, schedule)
    except ValueError as e:
        raise user_error(e) from None
    points, aware = chain_args.layout(args, grid, schedule)
    k = chain_args.num_stages(args, grid, schedule)
    sc_guidance = 0.0
    if sc_file is not None:
        if not sc_spec.trajectory_preserving:
            print(f"warning: shortcut {args.shortcut!r} is not trajectory-preserving (it re-noises at every step); "
                  f"ShortFT assumes it lands where the {len(grid)}-step chain lands", file=sys.stderr)
        sc_scale = sc_spec.lora_scale if args.shortcut_scale is None else args.shortcut_scale
        sc_guidance = sc_spec.guidance if args.shortcut_guidance is None else args.shortcut_guidance
        try:
            shortcut.load_shortcut_lora(net, sc_file, sd.SHORTCUT_ADAPTER, sc_scale)
        except (OSError, ValueError) as e:
            raise runio.ArgError("shortcut", args.shortcut, " ".join(str(e).split())) from None
    names = world.add_tuned_loras(net, shortft.num_loras(points, aware), args.lora_rank, args.lora_alpha,
                                  args.lora_targets)
    lora_params = sd.lora_parameters(net, names)
    if args.gradient_checkpointing:  # each block recomputed with the adapters of its forward (peft trap 3)
        shortcut.enable_adapter_checkpointing(net)
    if args.channels_last and device.type == "cuda":
        net.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    layers = shortcut.lora_layers(net)
    forward_net = torch.compile(net) if args.compile else net
    if args.compile and device.type == "cpu":
        print(f"--compile: torch.compile compiles the {world.NETWORK} at the first call of each adapter combination; "
              "on a CPU each compilation takes minutes", flush=True)
    try:
        reward = rewards.make_reward(args.reward, device=device, dtype=dtype,
                                     **({"clip_model": args.clip_model} if args.clip_model else {}),
                                     **({"digit_classifier": args.digit_classifier} if args.digit_classifier else {}))
    except (OSError, ValueError, ImportError) as e:
        raise user_error(e) from None
    # one optimizer over every branch: AdamW skips the parameters a stage leaves without gradient
    optimizer = accelerator.prepare(torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay))
    cache: dict[str, torch.Tensor] = {}
    uncond = world.encode(c, [""], cache)
    side = sd.latent_side(vae, args.resolution)
    probe = (train_prompts * args.batch_size)[: args.batch_size]  # fail fast, before anything is written
    x_probe = torch.randn(len(probe), net.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    with accelerator.autocast():
        chain_args.probe_chain(
            shortft.make_chain(args.method, grid, random.Random(0), **chain_args.chain_switches(args, points, 1)),
            x_probe.to(device), world.make_denoisers(forward_net, world.encode(c, probe, cache), uncond, args.guidance,
                                                     points, aware, sc_guidance, layers),
            schedule, lambda images: reward(images, probe).float(), lambda z: world.decode(vae, z, False))

    skipped, spent = 0, budget.Spent()  # spent: what the updates have used so far (--steps, --budget)
    if args.resume:  # the newest checkpoint that loads, with exactly this run's LoRA keys and shapes
        _, weights, state = runio.resume_checkpoint(run_dir, optimizer.optimizer, expect=sd.lora_weights(net, names),
                                                    check_state=partial(check_state, k=k))
        named = dict(net.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                named[n].copy_(w)
        skipped, spent = state["skipped"], budget.Spent(**state["spent"])
        sd.check_processes_agree(accelerator, sd.lora_weights(net, names), spent.updates)  # the same checkpoint
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = run_dir / "metrics.jsonl"
        if args.resume:  # rows logged after the checkpoint are logged again
            runio.keep_jsonl_until(metrics_file, spent.updates)
        else:
            metrics_file.unlink(missing_ok=True)
            for old in ("checkpoints", "lora"):  # --overwrite: nothing of the old run is left to mix with this one
                shutil.rmtree(run_dir / old, ignore_errors=True)
        runio.write_json(dataclasses.asdict(args), run_dir / "args.json")
        if args.log_with:
            accelerator.init_trackers(args.name, config={k: str(v) for k, v in dataclasses.asdict(args).items()})

    stages = range(1, k + 1)
    costs = {s: shortft.chain_cost(shortft.make_chain(args.method, grid, random.Random(0),
                                                      **chain_args.chain_switches(args, points, s))) for s in stages}
    if args.budget == 0 and (gaps := chain_args.stage_gaps(args, k, args.steps)) and main_proc:
        print(gaps, file=sys.stderr)
    print_main = print if main_proc else (lambda *a, **k: None)  # the header once, from the main process
    print_main(f"run {run_dir}  method {args.method}  reward {args.reward}  model {args.model} ({world.PIPELINE}"
          f"{', T5 ' + ('on' if args.t5 else 'off') if world is sd3 else ''})\n"
          f"  grid {len(grid)} {type(schedule).__name__} steps ({grid[0]:g} … {grid[-1]:g}), CFG {args.guidance}, {args.resolution}px, "
          f"{args.mixed_precision} on {device} × {accelerator.num_processes}\n"
          f"  LoRA points {[round(p, 1) for p in points] if points else 'none (one LoRA at every step)'}, branches {names}, "
          f"rank {args.lora_rank}, alpha {args.lora_alpha}: {sum(p.numel() for p in lora_params):,} parameters\n"
          f"  shortcut {f'{args.shortcut} (scale {sc_scale}, CFG {sc_guidance})' if sc_file else '-'}\n"
          f"  effective batch {args.batch_size * args.grad_accum * accelerator.num_processes}, updates {spent.updates} → "
          f"{args.steps}; per stage: " + ", ".join(f"{s}: {sd.stage_adapters(s, points, aware)} "
                                                    f"{costs[s]['grad']} grad + {costs[s]['no_grad']} no-grad evals"
                                                    for s in stages))

    def evaluate():
        kw = dict(seeds=list(range(len(eval_prompts))), resolution=args.resolution, batch=args.eval_batch, cache=cache)
        if "base" not in evaluate.__dict__ and args.eval_base:
            evaluate.base = world.sample(c, eval_prompts, grid=grid, guidance=args.guidance, model=shortft.BASE, **kw)
            with torch.no_grad():
                evaluate.base_r = reward(evaluate.base.to(device), eval_prompts).float().cpu()
        tuned = world.sample(c, eval_prompts, grid=grid, guidance=args.guidance, points=points, timestep_aware=aware, **kw)
        with torch.no_grad():
            r = reward(tuned.to(device), eval_prompts).float().cpu()
        sd.save_grid([evaluate.base, tuned] if args.eval_base else [tuned], run_dir / f"eval_{spent.updates:06d}.png")
        out = {"update": spent.updates, "eval/reward_mean": r.mean().item(), "eval/reward_std": r.std(unbiased=False).item(),
               **({"eval/base_reward_mean": evaluate.base_r.mean().item()} if args.eval_base else {})}
        runio.append_jsonl(out, run_dir / "metrics.jsonl")
        print(f"  eval @ {spent.updates}: reward {out['eval/reward_mean']:.4f} ± {out['eval/reward_std']:.4f}"
              + (f" (base {out['eval/base_reward_mean']:.4f})" if args.eval_base else ""))
        return out

    lora_kw = dict(grid=grid, points=points, timestep_aware=aware, guidance=args.guidance, method=args.method,
                   **(dict(t5=args.t5, t5_tokens=args.t5_tokens) if world is sd3 else {}))

    def save():  # checkpoint step_N: the LoRA folder's files (as runs/<name>/lora) + optimizer + RNG
        tmp = run_dir / ".checkpoint-lora.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        world.write_lora(net, tmp, **lora_kw)
        state = {"skipped": skipped, "spent": dataclasses.asdict(spent), "stage": stage, "args": dataclasses.asdict(args)}
        runio.save_checkpoint(run_dir, spent.updates, sd.lora_weights(net, names), optimizer.optimizer, state,
                              {f.name: f for f in tmp.iterdir()})
        shutil.rmtree(tmp)

    mine = sd.batch_share(accelerator, args.batch_size)
    last_eval, stage, params, in_a_row = None, None, [], 0
    bar = tqdm(total=args.steps, initial=spent.updates, disable=not main_proc, desc=args.method)
    meter, watch, gflop = budget.FlopMeter(), budget.Stopwatch(), 0.0
    count_flops = args.budget_unit == "gflop" and args.budget > 0  # each new kind of update costs a dry run

    def progress():
        return max(spent.updates / args.steps, spent.of(args.budget_unit) / args.budget if args.budget else 0.0)

    while progress() < 1:
        if chain_args.stage_of(args, progress(), k) != stage:  # progressive training: stage i trains LoRA_i … LoRA_k
            stage, prev = chain_args.stage_of(args, progress(), k), stage
            if args.budget and main_proc and (jump := chain_args.stage_jump(prev, stage, spent.updates)):
                print(jump, file=sys.stderr)
            trained = sd.stage_adapters(stage, points, aware)
            params = sd.set_trainable(net, trained)
            switches = chain_args.chain_switches(args, points, stage)
        with accelerator.accumulate(net):
            # --- sample --- (the whole batch of every process, from the same streams; this process keeps its share)
            whole = args.batch_size * accelerator.num_processes
            prompts = [random.choice(train_prompts) for _ in range(whole)][mine]
            cond = world.encode(c, prompts, cache)
            den = world.make_denoisers(forward_net, cond, uncond, args.guidance, points, aware, sc_guidance, layers)
            chain = shortft.make_chain(args.method, grid, None, **switches)
            x_T = torch.randn(whole, net.config.in_channels, side, side)[mine].to(device)  # CPU stream: checkpointed

            # --- reward ---
            def reward_fn(latents):
                return reward(world.decode(vae, latents, args.checkpoint_decode), prompts).float()

            def forward_backward():
                with accelerator.autocast():
                    loss, r = shortft.reward_loss(x_T, chain, den, schedule, reward_fn)
                accelerator.backward(loss)
                return loss, r

            if count_flops:  # the FLOPs of this kind of micro-batch, counted once by a dry run (budget.py)
                gflop += meter.gflop(budget.update_kind(chain, args.batch_size, tuple(trained)), forward_backward,
                                     params)
            loss, r = forward_backward()

            # --- update ---
            if not accelerator.sync_gradients:
                continue
            applied, norm = sd.guarded_update(accelerator, optimizer, params, args.max_grad_norm)
        skipped += not applied
        in_a_row = 0 if applied else in_a_row + 1
        runio.check_skipped(in_a_row, args.max_skipped, spent.updates + 1)  # the same on every process
        wall = watch.add_to(spent, gflop, partial(sd.update_cost, accelerator))  # all micro-batches, all processes
        step = spent.updates
        loss, reward_train = sd.gather_mean(accelerator, loss), sd.gather_mean(accelerator, r)  # the whole batch's
        bar.update(1)
        bar.set_postfix(stage=stage, reward=f"{reward_train:.4f}", grad=f"{norm:.3g}")
        metrics = {"update": step, "stage": stage, "loss": loss, "reward/train": reward_train,
                   "grad/norm": norm, "update/skipped": skipped,
                   "time/update_s": wall, "budget/spent": spent.of(args.budget_unit), "time/cpu_s": spent.cpu_seconds,
                   **({"compute/gflop": spent.gflop} if count_flops else {}),
                   "chain/grad_evals": shortft.chain_cost(chain)["grad"]}
        checkpoint = (args.save_every and step % args.save_every == 0) or progress() >= 1
        if checkpoint:
            sd.check_processes_agree(accelerator, sd.lora_weights(net, names), step)
        if main_proc:  # the other processes go on to the next update and wait for this one in its all-reduce
            runio.append_jsonl(metrics, run_dir / "metrics.jsonl")
            if args.log_with:
                accelerator.log(metrics, step=step)
            if args.eval_every and step % args.eval_every == 0:
                last_eval = evaluate()
            if checkpoint:
                save()
        stop = runio.stop_requested() is not None  # SIGINT / SIGTERM during this update or its bookkeeping
        if accelerator.num_processes > 1:  # every process stops after the same update
            stop = accelerator.reduce(torch.tensor([float(stop)], device=device), "sum").item() > 0
        if stop:  # this update checkpointed, one line, exit 130 / 143
            if not checkpoint:
                sd.check_processes_agree(accelerator, sd.lora_weights(net, names), step)
                if main_proc:
                    save()
            accelerator.wait_for_everyone()  # the main process has written the checkpoint
            bar.close()
            raise runio.interrupted(f"update {step} (checkpoint {run_dir / 'checkpoints' / f'step_{step:07d}'})",
                                    main_proc)
        watch, gflop = budget.Stopwatch(), 0.0
    bar.close()
    if runio.stop_requested() is not None:  # signalled after the last update: its checkpoint is written
        raise runio.interrupted(f"the last update ({spent.updates}; lora/ and the final evaluation not written)",
                                main_proc)
    if main_proc:
        if last_eval is None or last_eval["update"] != spent.updates:
            last_eval = evaluate()
        world.save_lora(net, run_dir / "lora", **lora_kw)  # always rewritten, as a whole (runio.atomic_folder)
        print(f"LoRA: {run_dir / 'lora'} ({world.__name__}.load_lora, or {world.__name__}.prepare_pipeline for a stock "
              f"{world.PIPELINE})")
    accelerator.wait_for_everyone()  # every process ends once the main one has written the run
    accelerator.end_training()
    return {"run_dir": run_dir, "update": spent.updates, "skipped": skipped, "eval": last_eval, "args": args,
            "spent": dataclasses.asdict(spent),
            "weights": {n: w.detach() for n, w in sd.lora_weights(net, names).items()}}


if __name__ == "__main__":
    runio.cli(main, Args, check_args)
