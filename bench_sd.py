"""Cost of one reward-backpropagation update for ShortFT and every baseline at Stable Diffusion 1.5 size.

Guo et al., ICCV 2025, https://arxiv.org/abs/2507.22604 — the efficiency claim of Sec. 3/4: a shortcut-based
chain of a few evaluations costs a fraction of backpropagating through the complete 50-step chain.

What is timed (one optimizer update, all in one run so the ratios compare like with like): x_T → the
method's chain (`shortft.make_chain` over the 50-step DDIM grid, CFG 7.5 as one batched UNet call per
tuned step, the Hyper-SD-style shortcut without CFG) → VAE decode (checkpointed) → a CLIP ViT-L/14-sized
aesthetic reward → backward into the trainable LoRA → guarded AdamW step. Weights are random: the cost of
an update does not depend on their values. Peak memory is CUDA's max_memory_allocated over the update.

Notation: B batch size; ×ShortFT = seconds per update ÷ ShortFT's at the same B.

Run: python bench_sd.py --tiny --device cpu          (smoke test; the real table: python bench_sd.py on a GPU)
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import rewards
import runio
import shortcut
import shortft
import tiny
import train_sd


@dataclass
class Args:
    """Time one training update of every method at SD1.5 size (random weights)."""

    tiny: bool = False
    """tiny components instead of the full SD1.5 architecture (CPU smoke test)"""
    device: str = "cuda"
    """cuda or cpu"""
    methods: list = field(default_factory=lambda: list(shortft.METHODS))
    """methods to time (shortft is always included: the ratios are to it)"""
    batch_sizes: list = field(default_factory=lambda: [1, 4])
    """batch sizes B"""
    mixed_precision: str = "bf16"
    """bf16 | fp16 | no: dtype of the frozen weights and of autocast"""
    resolution: int = 512
    """image side (tiny: 32)"""
    num_steps: int = 50
    """DDIM steps of the chain"""
    guidance: float = 7.5
    """CFG scale of the tuned model"""
    lora_rank: int = 8
    """rank of the trainable LoRA"""
    shortcut_rank: int = 64
    """rank of the stand-in shortcut LoRA (Hyper-SD15 LoRAs are ~269 MB: rank 64 on the UNet)"""
    warmup: int = 1
    """untimed updates per method and batch size"""
    repeats: int = 3
    """timed updates (mean reported)"""
    compile: bool = False
    """torch.compile the UNet"""
    channels_last: bool = True
    """channels_last UNet/VAE on CUDA"""
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
    """Random SD components on the device with a frozen shortcut adapter and the trainable LoRA."""
    from peft import LoraConfig

    device = torch.device(args.device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    c = tiny.sd_components(full_size=not args.tiny)
    for k in ("unet", "vae", "text_encoder"):
        c[k].to(device, dtype).requires_grad_(False).eval()
    unet = c["unet"]
    unet.add_adapter(LoraConfig(r=args.shortcut_rank, lora_alpha=args.shortcut_rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                "ff.net.0.proj", "ff.net.2"]), adapter_name="shortcut")
    names, _ = train_sd.add_trainable_lora(unet, args.lora_rank, args.lora_rank)
    params = train_sd.trainable_parameters(unet, names)
    if args.channels_last and device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        c["vae"].to(memory_format=torch.channels_last)
    fwd = torch.compile(unet) if args.compile else unet
    return c, fwd, names, params, aesthetic_reward(args.tiny, device, dtype), dtype


def time_updates(args: Args, method: str, batch: int, c, fwd, names, params, reward, dtype) -> dict:
    """Mean seconds per update and peak memory (GiB, CUDA) of `method` at batch size `batch`."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    schedule = shortft.schedule_from_diffusers(c["scheduler"].config)
    grid = shortft.ddim_timesteps(args.num_steps)
    switches = train_sd.chain_switches(dataclasses.replace(train_sd.Args(), method=method,
                                                           refl_last=min(10, args.num_steps)))
    cache: dict = {}
    prompts = ["a photo of a cat"] * batch
    cond = train_sd.encode_prompts(prompts, c["tokenizer"], c["text_encoder"], cache)
    uncond = train_sd.encode_prompts([""], c["tokenizer"], c["text_encoder"], cache)
    layers = shortcut.lora_layers(c["unet"])
    den = train_sd.make_denoisers(fwd, cond, uncond, args.guidance, names, (), "shortcut", 0.0, layers)
    side = args.resolution // (2 ** (len(c["vae"].config.block_out_channels) - 1))
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    rng = random.Random(args.seed)

    def update():
        chain = shortft.make_chain(method, grid, rng, **switches)
        x_T = torch.randn(batch, 4, side, side, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = shortft.reward_loss(x_T, chain, den, schedule,
                                          lambda z: reward(train_sd.decode(c["vae"], z, checkpoint=True), prompts))
        loss.backward()
        shortft.guarded_step(optimizer, params, 1.0)
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
    return {"method": method, "batch": batch, "s_per_update": sum(times) / len(times), "min_s": min(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "grad_evals": sum(c["grad"] for c in costs) / len(costs),
            "no_grad_evals": sum(c["no_grad"] for c in costs) / len(costs)}


def markdown(rows: list[dict], args: Args, device_name: str) -> str:
    lines = [f"Device: {device_name}; {args.mixed_precision}, {args.resolution}², CFG {args.guidance}, "
             f"{args.num_steps}-step DDIM grid, VAE decode + CLIP-L aesthetic reward + backward.", "",
             "| method | B | s / update | ×ShortFT | peak GiB | grad evals | no-grad evals |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch']} | {r['error']} | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        ratio = f"{r['ratio_to_shortft']:.1f}×" if r.get("ratio_to_shortft") else "-"
        lines.append(f"| {r['method']} | {r['batch']} | {r['s_per_update']:.3f} | {ratio} | {peak} | "
                     f"{r['grad_evals']:.1f} | {r['no_grad_evals']:.1f} |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> list[dict]:
    if args.tiny and args.resolution == Args.resolution:
        args = dataclasses.replace(args, resolution=32)
    if args.device == "cpu" and args.mixed_precision == Args.mixed_precision:
        args = dataclasses.replace(args, mixed_precision="no")  # bf16 autocast on CPU is slower, not faster
    unknown = [m for m in args.methods if m not in shortft.METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}: choose from {', '.join(shortft.METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("no CUDA device: run on a GPU machine, or smoke-test with --tiny --device cpu")
    methods = ["shortft"] + [m for m in args.methods if m != "shortft"]
    torch.manual_seed(args.seed)
    built = build(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"benchmark on {device_name}: {'tiny' if args.tiny else 'SD1.5-size'} random weights, "
          f"{args.mixed_precision}, {args.resolution}px, batches {args.batch_sizes}, {args.repeats} timed updates")
    rows = []
    for batch in args.batch_sizes:
        for method in methods:
            try:
                row = time_updates(args, method, int(batch), *built)
            except torch.OutOfMemoryError:
                row = {"method": method, "batch": batch, "error": "out of memory"}
                torch.cuda.empty_cache()
            ref = next((r for r in rows if r["method"] == "shortft" and r["batch"] == batch and "error" not in r), row)
            if "error" not in row and "error" not in ref:
                row["ratio_to_shortft"] = row["s_per_update"] / ref["s_per_update"]
            rows.append(row)
            print(f"  {method:>10} B={batch}: " + (row.get("error") or
                  f"{row['s_per_update']:.3f} s/update ({row['ratio_to_shortft']:.1f}× ShortFT)"), flush=True)
    table = markdown(rows, args, device_name)
    print(table)
    out = Path(args.out)
    runio.write_json({"device": device_name, "args": dataclasses.asdict(args), "rows": rows}, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(table)
    return rows


if __name__ == "__main__":
    import sys

    try:
        main(runio.parse_args(Args))
    except ValueError as e:
        sys.exit(f"error: {e}")
