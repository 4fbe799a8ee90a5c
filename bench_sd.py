"""Cost of one reward-backpropagation update for ShortFT (per progressive stage) and every baseline at SD1.5 size, or
at SD3.5-medium size (--arch sd3).

Guo et al., ICCV 2025, https://arxiv.org/abs/2507.22604 — the efficiency claim of Sec. 3: a shortcut-based chain of
a few evaluations with gradient costs a fraction of backpropagating through the complete 50-step chain.

What is timed (one optimizer update, all in one run so the ratios compare like with like): x_T → the method's chain
(`shortft.make_chain` over the model's grid with `chain_args.chain_switches`: SD1.5's 50-step DDIM grid, CFG 7.5 as one
batched UNet call per base/tuned step, the Hyper-SD-style shortcut without CFG; or SD3's 28-step Euler grid, CFG 7 as
one batched transformer call, the Hyper-SD3-style shortcut with its CFG 5) → VAE decode (checkpointed) → a CLIP
ViT-L/14-sized aesthetic reward → backward into the LoRA branches the stage trains → guarded AdamW step. ShortFT is timed in each
stage 1 … k (its chain changes with the stage) and averaged over the default stage schedule (each stage's share of
the updates, `--stage-fractions`). Weights are random: the cost of an update does not depend on their values. Peak
memory is CUDA's max_memory_allocated over the update.

SD3.5-medium's sizes (tiny.sd3_components(full_size=True)) are those of stabilityai/stable-diffusion-3.5-medium's
transformer/config.json (24 blocks, 24 heads of 64, joint_attention_dim 4096, caption_projection_dim 1536,
pooled_projection_dim 2048, patch 2, 16 latent channels, pos_embed_max_size 384, dual attention in blocks 0–12, QK
RMS-norm; ≈ 2.5 B parameters), SD3's VAE (128/256/512/512, 16 channels, scaling 1.5305, shift 0.0609) and the CLIP-L /
CLIP-G text towers; T5 is off (its 256 tokens are zeros), as in train_sd.py's default. docs/sd3.md says where these
numbers come from.

Notation: B batch size; ×ShortFT = seconds per update ÷ ShortFT's stage-schedule average at the same B.

Run: python bench_sd.py --tiny --device cpu          (smoke test; the real table: python bench_sd.py on a GPU;
     SD3.5-medium: python bench_sd.py --arch sd3 --resolution 1024)
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import chain_args
import rewards
import runio
import sd
import sd3
import shortcut
import shortft
import tiny

WORLDS = {"sd": sd, "sd3": sd3}
"""--arch: the world whose components, denoisers and decode are timed."""
SHORTCUT_TARGETS = {"sd": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
                    "sd3": sd3.LORA_TARGETS}
"""Where the stand-in shortcut LoRA sits (Hyper-SD's LoRAs cover attention, projections and feed-forward)."""


@dataclass
class Args(chain_args.ChainArgs):
    """Time one training update of every method at SD1.5 or SD3.5-medium size (random weights). The chain switches are
    train_sd.py's (--lora-points, --draft-k, …); --methods says what to time (--method is not used)."""

    arch: str = "sd"
    """sd: SD1.5's architecture (UNet, 50 DDIM steps); sd3: SD3.5-medium's (transformer, CLIP-L + CLIP-G, SD3 VAE, 28
    Euler steps with shift 3, T5 off)"""
    tiny: bool = False
    """tiny components instead of the full-size architecture (CPU smoke test)"""
    device: str = "cuda"
    """cuda or cpu"""
    methods: list[str] = field(default_factory=lambda: list(shortft.METHODS))
    """methods to time (shortft is always included: the ratios are to it)"""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    """batch sizes B"""
    mixed_precision: str = "bf16"
    """bf16 | fp16 | no: dtype of the frozen weights and of autocast"""
    resolution: int = 512
    """image side (tiny: 32)"""
    guidance: float | None = None
    """CFG scale of the base and tuned model (None: the pipeline's default, 7.5 for SD1.5, 7.0 for SD3)"""
    lora_rank: int = 128
    """rank of each LoRA branch (attention + feed-forward, as train_sd.py)"""
    shortcut_rank: int = 64
    """rank of the stand-in shortcut LoRA (Hyper-SD15 LoRAs are ~269 MB: rank 64 on the UNet; the same rank on SD3)"""
    warmup: int = 1
    """untimed updates per row"""
    repeats: int = 3
    """timed updates per row (mean reported)"""
    compile: bool = False
    """torch.compile the UNet / transformer"""
    channels_last: bool = True
    """channels_last UNet (or transformer) and VAE on CUDA"""
    seed: int = 0
    """seed of the chain draws"""
    out: str = "runs/bench_sd/bench"
    """writes <out>.json and <out>.md"""


def aesthetic_reward(tiny_size: bool, device, dtype):
    """Random-init stand-in of the LAION aesthetic predictor: CLIP ViT-L/14 vision tower (image 224, patch 14,
    24 layers, 1024 wide, projection 768) → L2-normalised embedding → MLP 768→1024→128→64→16→1.
    reward(images (B, 3, H, W) in [0, 1], prompts) → (B,)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if tiny_size:
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8, projection_dim=16)
    else:
        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=768)
    tower = CLIPVisionModelWithProjection(cfg).to(device, dtype).eval().requires_grad_(False)
    d = cfg.projection_dim
    head = torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.Linear(1024, 128), torch.nn.Linear(128, 64),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).to(device, dtype).requires_grad_(False)

    def reward(images, prompts):
        pixels = rewards.clip_preprocess(images.float(), cfg.image_size).to(dtype)
        emb = torch.nn.functional.normalize(tower(pixel_values=pixels).image_embeds.float(), dim=-1)
        return head(emb.to(dtype)).squeeze(-1).float()

    return reward


def build(args: Args):
    """Random SD1.5 or SD3.5-medium components on the device with a frozen stand-in shortcut adapter and ShortFT's k
    LoRA branches (the baselines use tuned_1). Returns (components, UNet / transformer to call, reward, dtype)."""
    from peft import LoraConfig

    world = WORLDS[args.arch]
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    c = (tiny.sd3_components if args.arch == "sd3" else tiny.sd_components)(full_size=not args.tiny)
    for k in (world.NETWORK, "vae", "text_encoder", "text_encoder_2"):
        if c.get(k) is not None:
            c[k].to(device, dtype).requires_grad_(False).eval()
    net = c[world.NETWORK]
    net.add_adapter(LoraConfig(r=args.shortcut_rank, lora_alpha=args.shortcut_rank, init_lora_weights="gaussian",
                               target_modules=list(SHORTCUT_TARGETS[args.arch])), adapter_name=sd.SHORTCUT_ADAPTER)
    grid, schedule = sd.grid_from_diffusers(c["scheduler"].config, args.num_steps), sd.schedule_from_diffusers(c["scheduler"].config)
    points, aware = chain_args.layout(dataclasses.replace(args, method="shortft"), grid, schedule)
    world.add_tuned_loras(net, shortft.num_loras(points, aware), args.lora_rank, args.lora_rank)
    if args.channels_last and device.type == "cuda":
        net.to(memory_format=torch.channels_last)
        c["vae"].to(memory_format=torch.channels_last)
    fwd = torch.compile(net) if args.compile else net
    return c, fwd, aesthetic_reward(args.tiny, device, dtype), dtype


def time_updates(args: Args, method: str, stage: int, batch: int, c, fwd, reward, dtype) -> dict:
    """Mean seconds per update and peak memory (GiB, CUDA) of `method` in progressive stage `stage` at batch size
    `batch`; the LoRA branches are restored afterwards."""
    world = WORLDS[args.arch]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    margs = dataclasses.replace(args, method=method)
    schedule = sd.schedule_from_diffusers(c["scheduler"].config)
    grid = sd.grid_from_diffusers(c["scheduler"].config, args.num_steps)
    points, aware = chain_args.layout(margs, grid, schedule)
    switches = chain_args.chain_switches(margs, points, stage)
    cache: dict = {}
    prompts = ["a photo of a cat"] * batch
    net = c[world.NETWORK]
    cond, uncond = world.encode(c, prompts, cache), world.encode(c, [""], cache)
    den = world.make_denoisers(fwd, cond, uncond, args.guidance, points, aware,
                               shortcut.SHORTCUTS[world.DEFAULT_SHORTCUT].guidance, shortcut.lora_layers(net))
    side = sd.latent_side(c["vae"], args.resolution)
    params = sd.set_trainable(net, sd.stage_adapters(stage, points, aware))
    snapshot = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    rng = random.Random(args.seed)

    def update():
        chain = shortft.make_chain(method, grid, rng, **switches)
        x_T = torch.randn(batch, net.config.in_channels, side, side, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = shortft.reward_loss(x_T, chain, den, schedule,
                                          lambda z: reward(world.decode(c["vae"], z, checkpoint=True), prompts))
        loss.backward()
        runio.guarded_step(optimizer, params, 1.0)
        return shortft.chain_cost(chain)

    for _ in range(args.warmup):
        update()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, costs = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        costs.append(update())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        for p, s in zip(params, snapshot):
            p.copy_(s)
    sd.set_trainable(net, [])
    return {"method": method, "stage": stage, "batch": batch, "s_per_update": sum(times) / len(times),
            "min_s": min(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "grad_evals": sum(c["grad"] for c in costs) / len(costs),
            "no_grad_evals": sum(c["no_grad"] for c in costs) / len(costs)}


def schedule_average(rows: list[dict], args: Args) -> dict:
    """ShortFT's cost per update averaged over a run of its stage schedule: Σ_i (share of updates in stage i) row_i."""
    k = len(rows)
    shares = [f / sum(args.stage_fractions) for f in args.stage_fractions] if k > 1 and args.stage_fractions \
        else [1 / k] * k
    keys = ("s_per_update", "grad_evals", "no_grad_evals")
    avg = {key: sum(s * r[key] for s, r in zip(shares, rows)) for key in keys}
    peaks = [r["peak_gib"] for r in rows]
    return {"method": "shortft", "stage": "avg", "batch": rows[0]["batch"], **avg,
            "min_s": min(r["min_s"] for r in rows), "peak_gib": max(peaks) if None not in peaks else None}


def markdown(rows: list[dict], args: Args, device_name: str) -> str:
    grid = f"{args.num_steps or 28}-step Euler grid (shift 3), T5 off" if args.arch == "sd3" else \
        f"{args.num_steps or 50}-step DDIM grid"
    model = ("tiny " if args.tiny else "") + ("SD3.5-medium" if args.arch == "sd3" else "SD1.5")
    lines = [f"Device: {device_name}; {model}, {args.mixed_precision}, {args.resolution}², CFG {args.guidance}, {grid}, "
             f"LoRA rank {args.lora_rank} (attention + FF), VAE decode + CLIP-L aesthetic reward + backward.", "",
             "| method | stage | B | s / update | ×ShortFT | peak GiB | grad evals | no-grad evals |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['stage']} | {r['batch']} | {r['error']} | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        ratio = f"{r['ratio_to_shortft']:.2f}×" if r.get("ratio_to_shortft") else "-"
        lines.append(f"| {r['method']} | {r['stage']} | {r['batch']} | {r['s_per_update']:.3f} | {ratio} | {peak} | "
                     f"{r['grad_evals']:.1f} | {r['no_grad_evals']:.1f} |")
    return "\n".join(lines) + "\n"


def check_args(args: Args) -> None:
    """Every argument, in field order, before anything is built: one line `--flag VALUE: what to do` (a ValueError)."""
    runio.require(args.method == "shortft", "method", args.method, "is not used by the benchmark: list the methods "
                                                                   "to time with --methods")
    runio.require(args.arch in WORLDS, "arch", args.arch, "use sd (SD1.5) or sd3 (SD3.5-medium)")
    config = WORLDS[args.arch].SCHEDULER  # a --num-steps out of range is refused by check_chain_args itself
    chain_args.check_chain_args(args, sd.grid_from_diffusers(config, args.num_steps if 0 <= args.num_steps <= 1000
                                                             else 0), sd.schedule_from_diffusers(config))
    runio.require(args.device == "cpu" or args.device.split(":")[0] == "cuda", "device", args.device, "use cuda or cpu")
    runio.require(args.device == "cpu" or torch.cuda.is_available(), "device", args.device,
                  "no CUDA device: run on a GPU machine, or smoke-test with --tiny --device cpu")
    unknown = [m for m in args.methods if m not in shortft.METHODS]
    runio.require(not unknown, "methods", args.methods, f"unknown method {unknown[0] if unknown else ''!r}: choose "
                                                        f"from {', '.join(shortft.METHODS)}")
    runio.require(bool(args.batch_sizes), "batch_sizes", args.batch_sizes, "give at least one batch size")
    for b in args.batch_sizes:
        runio.require_range("batch_sizes", b, 1, 1024)
    runio.require(args.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", args.mixed_precision,
                  "use no, bf16 or fp16")
    runio.require_range("resolution", args.resolution, 8, 4096)
    runio.require(args.resolution % 8 == 0, "resolution", args.resolution, "must be a multiple of 8 (SD1.5: of 64)")
    if args.guidance is not None:
        runio.require_range("guidance", args.guidance, 0, 100)
    runio.require_range("lora_rank", args.lora_rank, 1, 4096)
    runio.require_range("shortcut_rank", args.shortcut_rank, 1, 4096)
    runio.require_range("warmup", args.warmup, 0)
    runio.require_range("repeats", args.repeats, 1)
    runio.require_range("seed", args.seed, 0, 2**32 - 1)
    out = Path(args.out)
    runio.check_name_length("out", out.name, len(".json"))
    runio.require(bool(out.name) and not out.is_dir(), "out", args.out, "is a folder: give a file name without "
                                                                       "suffix, e.g. runs/bench_sd/bench")
    runio.check_writable_dir("--out", out.parent)


def main(args: Args) -> list[dict]:
    """Time every row; returns the rows (also written to <out>.json and <out>.md, locked by <out>.lock meanwhile)."""
    torch.set_flush_denormal(True)  # random tiny models make denormal floats, 10-100x slower on x86 CPUs
    check_args(args)
    out = Path(args.out)
    with runio.run_lock(out.with_name(out.name + ".lock"), "benchmark output"):  # one writer per output
        return run(args)


def run(args: Args) -> list[dict]:
    """`main` with checked arguments and its output locked."""
    if args.tiny and args.resolution == Args.resolution:
        args = dataclasses.replace(args, resolution=32)
    if args.device == "cpu" and args.mixed_precision == Args.mixed_precision:
        args = dataclasses.replace(args, mixed_precision="no")  # bf16 autocast on CPU is slower, not faster
    if args.guidance is None:
        args = dataclasses.replace(args, guidance=WORLDS[args.arch].GUIDANCE)
    torch.manual_seed(args.seed)
    built = build(args)
    config = built[0]["scheduler"].config
    k = chain_args.num_stages(dataclasses.replace(args, method="shortft"), sd.grid_from_diffusers(config, args.num_steps),
                              sd.schedule_from_diffusers(config))
    step = WORLDS[args.arch].resolution_step(built[0]["vae"], built[1])
    runio.require(args.resolution % step == 0, "resolution", args.resolution,
                  f"must be a multiple of {step} for this model (its VAE's and UNet's downsampling)")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    size = {"sd": "SD1.5", "sd3": "SD3.5-medium"}[args.arch]
    print(f"benchmark on {device_name}: {'tiny ' + size if args.tiny else size + '-size'} random weights, "
          f"{args.mixed_precision}, {args.resolution}px, batches {args.batch_sizes}, {args.repeats} timed updates; "
          f"ShortFT in stages 1 … {k}")
    rows = []
    for batch in args.batch_sizes:
        todo = [("shortft", s) for s in range(1, k + 1)] + [(m, 1) for m in args.methods if m != "shortft"]
        done = []
        for method, stage in todo:
            try:
                row = time_updates(args, method, stage, int(batch), *built)
            except torch.OutOfMemoryError:
                row = {"method": method, "stage": stage, "batch": batch, "error": "out of memory"}
                torch.cuda.empty_cache()
            if method != "shortft":
                row["stage"] = "-"
            done.append(row)
            print(f"  {method:>10} stage {row['stage']} B={batch}: "
                  + (row.get("error") or f"{row['s_per_update']:.3f} s/update"), flush=True)
            if method == "shortft" and stage == k and not any("error" in r for r in done):
                done.append(schedule_average(done, args))
        ref = next((r for r in done if r["stage"] == "avg"), None)
        for r in done:
            if ref is not None and "error" not in r:
                r["ratio_to_shortft"] = r["s_per_update"] / ref["s_per_update"]
        rows += done
    table = markdown(rows, args, device_name)
    print(table)
    out = Path(args.out)
    runio.write_json({"device": device_name, "args": dataclasses.asdict(args), "rows": rows}, out.with_suffix(".json"))
    runio.write_text(table, out.with_suffix(".md"))
    return rows


if __name__ == "__main__":
    runio.cli(main, Args, check_args)
