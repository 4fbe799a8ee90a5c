"""Where a ShortFT run gains or loses: the held-out reward after each progressive stage, and the cosine of each
stage's gradient with the exact gradient through the complete sampler, of one train_sd.py run on a miniature model.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3: the shortcut-based chain, stacked timestep-aware LoRA and progressive
training (stage i trains LoRA_i … LoRA_k). A ShortFT run that ends below its ablations can lose in one stage, or can
train with a gradient that points away from the one it stands for; this script tells the two apart.

    held-out     the run's held-out reward (its own evaluation: the N-step sampler with the branches
                 `shortft.active_loras` picks, the first --eval-samples prompts, seeds 0, 1, …) at update 0 (every B = 0:
                 the base), at the last update of each stage and at --updates, read from the run's per-update
                 checkpoints
    g*           ∇ of L = −mean r(x_0) through the complete sampler with every step carrying gradient (the exact
                 gradient of ShortFT's parametrisation: LoRA_1 on every step down to p_1, the stack Σ_i at p_i, the
                 base between), per branch LoRA_i
    g_i          ∇ of the same L through stage i's training chain (`shortft.shortft(stage=i)`), into the branches stage
                 i trains; stage 1 also with every step of segment 1 carrying gradient (--segment1-grad-steps 12)
    cos, rel     cos(g_i, g*) and ‖g_i‖ / ‖g*‖, per branch and over the stage's branches, on one fixed batch of
                 --grad-samples (x_T, prompt) pairs; the same for one LoRA at the same places (the ablation without
                 timestep-aware LoRA) and for DRaFT-1 (one gradient step at the end) as a truncated reference
    ‖g*_i‖       how strongly branch i can move the reward at all: LoRA_1 acts on every step down to p_1, LoRA_i (i ≥ 2)
                 on the one step at p_i and later points
    branches     a hook on the denoising network records the adapters active in each call of every stage's training
                 chain and of the evaluation sampler; each must be what `shortft.active_loras` picks (the shortcut
                 alone in the jumps)

The run must have been trained with --save-every 1 (a checkpoint per update). Writes <run>/stages.json.

Run: python bench_stages.py --run runs/diag/shortft_s0     (after train_sd.py … --method shortft --save-every 1)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

import chain_args
import rewards
import runio
import sd
import sd3
import shortcut
import shortft
import train_sd


@dataclass
class Args:
    """Per-stage held-out reward and gradient cosines of a train_sd.py ShortFT run (checkpoints every update)."""

    run: str = "runs/diag/shortft_s0"
    """a train_sd.py run folder (args.json, metrics.jsonl, checkpoints/step_N for every update)"""
    eval_samples: int = 0
    """held-out samples (0: the run's own --eval-samples)"""
    grad_states: list[str] = field(default_factory=lambda: ["0", "stage1"])
    """LoRA states at which gradients are compared: an update number (0: init) or 'stageI' (the last update of stage I)"""
    grad_samples: int = 40
    """(x_T, prompt) pairs of the fixed gradient batch (prompts: the digits in turn; x_T from seed 12345)"""
    micro_batch: int = 10
    """pairs per backward pass"""
    updates: list[int] = field(default_factory=list)
    """also score these updates (e.g. a run without progressive training, one stage long, at ShortFT's stage ends)"""
    skip_eval: bool = False
    """no held-out scores"""


def check_args(args: Args) -> None:
    """One line `--flag VALUE: what to do` for a run folder this script cannot read."""
    run = Path(args.run)
    runio.require((run / "args.json").is_file() and (run / "metrics.jsonl").is_file(), "run", args.run,
                  "not a train_sd.py run folder (args.json, metrics.jsonl): train one with --save-every 1")
    runio.require(json.loads((run / "args.json").read_text()).get("method") == "shortft", "run", args.run,
                  "is not a ShortFT run (--method shortft): only ShortFT has stages and stacked branches")
    runio.require((run / "checkpoints" / "step_0000001").is_dir(), "run", args.run,
                  "has no checkpoint of update 1: train it with --save-every 1")
    runio.require_range("eval_samples", args.eval_samples, 0)
    runio.require_range("grad_samples", args.grad_samples, 1)
    runio.require_range("micro_batch", args.micro_batch, 1)
    for u in args.updates:
        runio.require((run / "checkpoints" / f"step_{u:07d}").is_dir(), "updates", args.updates,
                      f"the run has no checkpoint of update {u}")


def main(args: Args) -> dict:
    torch.set_flush_denormal(True)
    run = Path(args.run)
    targs = train_sd.Args(**{k: v for k, v in json.loads((run / "args.json").read_text()).items()
                             if k in train_sd.Args.__dataclass_fields__})
    world = train_sd.world_of(targs)
    c = world.load_components(targs.model, **(dict(t5=targs.t5, t5_tokens=targs.t5_tokens) if world is sd3 else {}))
    net, vae = c[world.NETWORK], c["vae"]
    grid, schedule = sd.grid_from_diffusers(c["scheduler"].config, targs.num_steps), \
        sd.schedule_from_diffusers(c["scheduler"].config)
    points, aware = chain_args.layout(targs, grid, schedule)  # as train_sd.py: --lora-points snapped to the grid
    file, spec = shortcut.resolve_shortcut(targs.shortcut)
    shortcut.load_shortcut_lora(net, file, sd.SHORTCUT_ADAPTER,
                                spec.lora_scale if targs.shortcut_scale is None else targs.shortcut_scale)
    sc_guidance = spec.guidance if targs.shortcut_guidance is None else targs.shortcut_guidance
    names = world.add_tuned_loras(net, shortft.num_loras(points, aware), targs.lora_rank, targs.lora_alpha,
                                  targs.lora_targets)
    layers = shortcut.lora_layers(net)
    reward = rewards.make_reward(targs.reward, **{k: getattr(targs, k) for k in ("clip_model", "digit_classifier")
                                                  if getattr(targs, k)})
    rows = [r for r in runio.read_jsonl(run / "metrics.jsonl") if "stage" in r]
    ends = {s: max(r["update"] for r in rows if r["stage"] == s) for s in sorted({r["stage"] for r in rows})}
    print(f"run {run}: {len(rows)} updates, stage ends {ends}; LoRA points {[round(p, 1) for p in points]}", flush=True)
    named = dict(net.named_parameters())
    zero = {k: p.detach().clone() for k, p in sd.lora_weights(net, names).items()}

    def load(update: int) -> None:
        weights = zero if update == 0 else load_file(str(run / "checkpoints" / f"step_{update:07d}" / "weights.safetensors"))
        with torch.no_grad():
            for k, w in weights.items():
                named[k].copy_(w)

    cache: dict = {}
    out: dict = {"run": str(run), "stage_ends": ends, "held_out": [], "gradients": []}

    # --- held-out reward at init and after each stage ---
    if not args.skip_eval:
        n = args.eval_samples or targs.eval_samples
        prompts = sd.load_prompts(sd.find_file(targs.eval_prompts))[:n]
        stage_of = {r["update"]: r["stage"] for r in rows}
        scored = sorted({0, *ends.values(), *args.updates})
        for stage, update in [(stage_of.get(u, 0), u) for u in scored]:
            t0 = time.time()
            load(update)
            images = world.sample(c, prompts, list(range(n)), grid, guidance=targs.guidance, points=points,
                                  timestep_aware=aware, resolution=targs.resolution, batch=n, cache=cache)
            with torch.no_grad():
                r = reward(images, prompts).float()
            row = {"stage": stage, "update": update, "reward": r.mean().item(), "se": (r.std() / n**0.5).item()}
            out["held_out"].append(row)
            print(f"  held-out at update {update} (stage {stage}): {row['reward']:.4f} ± {row['se']:.4f} SE "
                  f"({time.time() - t0:.0f} s)", flush=True)

    # --- gradients: each stage's chain against the complete sampler ---
    b = args.grad_samples
    prompts = [f"a handwritten {i % 10}" for i in range(b)]
    x_T = torch.randn(b, net.config.in_channels, *(2 * [sd.latent_side(vae, targs.resolution)]),
                      generator=torch.Generator().manual_seed(12345))
    uncond = world.encode(c, [""], cache)

    def gradients(chain: shortft.Chain, branches: list[str], timestep_aware: bool) -> dict[str, torch.Tensor]:
        """∇ of L = −mean r through `chain` into `branches`, flattened per branch, over the whole fixed batch."""
        params = {n: sd.lora_parameters(net, [n]) for n in branches}
        sd.set_trainable(net, branches)
        flat = [p for n in branches for p in params[n]]
        total = [torch.zeros_like(p) for p in flat]
        for i in range(0, b, args.micro_batch):
            ps = prompts[i:i + args.micro_batch]
            den = world.make_denoisers(net, world.encode(c, ps, cache), uncond, targs.guidance, points,
                                       timestep_aware, sc_guidance, layers)
            loss, _ = shortft.reward_loss(x_T[i:i + args.micro_batch], chain, den, schedule,
                                          lambda z: reward(world.decode(vae, z, False), ps).float())
            grads = torch.autograd.grad(loss * len(ps) / b, flat, allow_unused=True)
            total = [t + g if g is not None else t for t, g in zip(total, grads)]
        it = iter(total)
        return {n: torch.cat([next(it).flatten() for _ in params[n]]) for n in branches}

    def cos(a: torch.Tensor, g: torch.Tensor) -> float:
        return (a @ g / (a.norm() * g.norm()).clamp_min(1e-30)).item()

    exact = shortft.Chain([shortft.Segment(s.model, s.t, s.s, grad=True)
                           for s in shortft.sampling_chain(grid, points).trunk])
    for state in args.grad_states:
        update = ends[int(state[5:])] if state.startswith("stage") else int(state)
        t0 = time.time()
        load(update)
        g_star = gradients(exact, names, aware)
        row = {"update": update, "exact_norm": {n: g_star[n].norm().item() for n in names}, "stages": {}}
        for stage in range(1, len(names) + 1 if aware else len(points) + 1):
            for steps in ((1, sum(t >= points[0] for t in grid)) if stage == 1 else (1,)):
                branches = sd.stage_adapters(stage, points, aware)
                g = gradients(shortft.shortft(grid, points, stage=stage, segment1_grad_steps=steps), branches, aware)
                a, e = torch.cat([g[n] for n in branches]), torch.cat([g_star[n] for n in branches])
                row["stages"][f"{stage}" + (f" ({steps} grad steps in segment 1)" if stage == 1 else "")] = {
                    "cos": cos(a, e), "rel_norm": (a.norm() / e.norm()).item(),
                    **{f"cos {n}": cos(g[n], g_star[n]) for n in branches}}
        g = gradients(shortft.draft_k(grid, 1), names[:1], False)
        one = gradients(exact, names[:1], False)
        row["draft_1 (one LoRA)"] = {"cos": cos(g[names[0]], one[names[0]])}
        out["gradients"].append(row)
        print(f"  gradients at update {update} ({time.time() - t0:.0f} s): exact norms "
              + ", ".join(f"{n} {v:.3g}" for n, v in row["exact_norm"].items()), flush=True)
        for k, v in row["stages"].items():
            print(f"    stage {k}: cos {v['cos']:.3f}, ‖g‖/‖g*‖ {v['rel_norm']:.3f}; "
                  + ", ".join(f"{a} {x:.3f}" for a, x in v.items() if a.startswith("cos ")), flush=True)

    # --- which branches act in each transformer / UNet call: training chains and the evaluation sampler ---
    seen: list[tuple[float, tuple[str, ...]]] = []
    tuned_layers = [layer for layer in layers if names[0] in layer.lora_A]

    def acting(layer, adapters) -> tuple[str, ...]:
        return () if layer.disable_adapters else tuple(a for a in adapters if a in layer.lora_A)

    def record(module, args_, kwargs):  # per layer holding the branches: the adapters that act in this call
        t = kwargs.get("timestep", args_[1] if len(args_) > 1 else None)
        seen.append((float(torch.as_tensor(t).flatten()[0]),
                     tuple(acting(layer, layer.active_adapters) for layer in tuned_layers)))

    def expected(model: str, t) -> tuple[tuple[str, ...], ...]:
        want = ((sd.SHORTCUT_ADAPTER,) if model == shortft.SHORTCUT else
                tuple(names[i] for i in shortft.active_loras(t, points, aware)) if model == shortft.TUNED else ())
        return tuple(acting(layer, want) for layer in tuned_layers)  # a layer the shortcut skips runs the base there

    hook = net.register_forward_pre_hook(record, with_kwargs=True)
    den = world.make_denoisers(net, world.encode(c, prompts[:1], cache), uncond, targs.guidance, points, aware,
                               sc_guidance, layers)
    wrong = []
    for stage in range(1, len(points) + 1):
        chain = shortft.shortft(grid, points, stage=stage).trunk
        seen.clear()
        with torch.no_grad():
            shortft.run_chain(x_T[:1], chain, den, schedule)
        wrong += [(f"stage {stage}", seg.t, got) for seg, (_, got) in zip(chain, seen) if got != expected(seg.model, seg.t)]
    seen.clear()
    world.sample(c, prompts[:1], [0], grid, guidance=targs.guidance, points=points, timestep_aware=aware,
                 resolution=targs.resolution, batch=1, cache=cache)
    wrong += [("sampler", t, got) for (_, got), t in zip(seen, grid) if got != expected(shortft.TUNED, t)]
    wrong = [(where, t, sorted(set(got))) for where, t, got in wrong]  # the distinct adapter sets seen
    hook.remove()
    out["branches"] = {"mismatches": [list(map(str, w)) for w in wrong], "sampler_calls": len(seen)}
    print(f"  branches: every training stage's chain and the sampler ({len(seen)} calls) "
          + ("use the branches shortft.active_loras picks, the shortcut alone in the jumps" if not wrong
             else f"MISMATCH at {wrong}"), flush=True)
    runio.write_json(out, run / "stages.json")
    return out


if __name__ == "__main__":
    runio.cli(main, Args, check_args)
