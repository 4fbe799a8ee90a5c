"""Why progressive training: ShortFT with and without it, on shortcuts of decreasing quality and with 1, 4 or 12
gradient steps in segment 1 (toy world).

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3 (progressive training) and Table 3 ("w/o progressive training"). The paper
motivates progressive training by the shortcut's approximation error: stage i trains LoRA_i … LoRA_k through a
chain whose jumps before p_i are replaced by the original chain, so the LoRAs trained last see the chain inference
runs. If that is why it helps, its benefit should grow as the shortcut gets worse. This script measures that.

    conditions   each a world setting (toy.WorldArgs) or a chain setting (--segment1-grad-steps), see CONDITIONS:
                 shortcuts of decreasing quality — distilled (4000 steps, the default), distilled for a fraction of the
                 steps (--distill-steps), the base's own one DDIM step with CFG over each jump (--shortcut base), the
                 zero shortcut LoRA, i.e. the base's one DDIM step without CFG (--shortcut zero) — and the default
                 shortcut with 4 or 12 of segment 1's 12 steps carrying gradient in stage 1
    per condition  the shortcut's error on the chain's three jumps (measure_toy.chain_jump_errors), then ShortFT
                 with and without progressive training (train_toy.train, same budget of GFLOP), seeds × 2 runs
    gap          the training/inference gap after training: on the fixed held-out x_T, the reward of the stage-1
                 training chain's x_0 (the chain --no-progressive trains through all along, and progressive training
                 in its first quarter) minus the 50-step sampler's, and ‖x_0(chain) − x_0(sampler)‖ / R. The last
                 stage's chain (original chain to p_k = 1, one tuned step) *is* the sampler: its gap is 0 by
                 construction
    benefit      held-out reward with progressive training − without; it counts only where
                 |Δmean| > std_a + std_b (std over seeds)

Writes runs/<name>/: metrics.json, tables.md, progressive.png and one train_toy run folder per condition, variant and
seed (a finished run of the same arguments is reused, so an interrupted bench continues).

The settings, fixed before any result was seen: reward `region` (the long run's headline, bench_toy.py), 20 GFLOP of
updates per run, the default bench's budget (ShortFT: 136 updates, 46, 35, 30, 25 in stages 1–4; without progressive
training: 183), 3 seeds, 8 evaluations. The budget was set by the time available on a shared 2-core machine.
The 400-step distillation was chosen as the middle rung by its jump error alone (mean over the three jumps, / R:
distilled 0.016, 400 steps 0.039, 100 steps 0.050, the base's step with CFG 0.100, without CFG 0.119; 0.039 is about
the geometric middle of 0.016 and 0.100).

Run: python bench_progressive.py        (36 runs: ≈ 6 CPU-minutes, one thread)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import bench_toy
import measure_toy
import rewards
import runio
import shortft
import toy
import train_toy

CONDITIONS = {  # name: (row label, toy.WorldArgs / train_toy.Args fields that differ from the defaults)
    "distilled": ("distilled shortcut (4000 steps)", {}),
    "distilled_400": ("distilled for 400 of 4000 steps", {"distill_steps": 400}),
    "base": ("base's one DDIM step, with CFG", {"shortcut": "base"}),
    "zero": ("zero shortcut LoRA (base's DDIM step, no CFG)", {"shortcut": "zero"}),
    "seg1_4": ("distilled, 4 grad steps in segment 1", {"segment1_grad_steps": 4}),
    "seg1_12": ("distilled, 12 grad steps in segment 1", {"segment1_grad_steps": 12}),
}
SHORTCUT_ROWS = ("distilled", "distilled_400", "base", "zero")
SEGMENT1_ROWS = ("distilled", "seg1_4", "seg1_12")  # "distilled" is segment1_grad_steps 1


@dataclass
class Args(toy.WorldArgs):
    """ShortFT with and without progressive training on shortcuts of decreasing quality and segment-1 gradient
    steps 1, 4, 12: the reward, the shortcut's jump error and the training/inference gap."""

    name: str = "toy-progressive"
    """output folder: <out-dir>/<name>/"""
    out_dir: str = "runs"
    """parent of the output folder"""
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    """conditions to run (names of CONDITIONS)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """fine-tuning seeds of every run"""
    reward: str = "region"
    """training reward (the long run's headline: smooth, its optimum 0, every sample in the disc, is far)"""
    budget: float = 20.0
    """GFLOP of updates per run (equal compute)"""
    evals: int = 8
    """held-out evaluations per run (plus one before training)"""
    eval_batch: int = train_toy.Args.eval_batch
    """fixed held-out batch of the evaluation and of the gap"""
    threads: int = 1
    """torch CPU threads"""


def run_args(args: Args, condition: str, progressive: bool, seed: int) -> train_toy.Args:
    """The train_toy.py arguments of one condition, variant and seed."""
    world = {**dataclasses.asdict(toy.world_args(args)), **{k: v for k, v in CONDITIONS[condition][1].items()
                                                            if k in toy.WorldArgs.__dataclass_fields__}}
    chain = {k: v for k, v in CONDITIONS[condition][1].items() if k not in toy.WorldArgs.__dataclass_fields__}
    variant = "prog" if progressive else "noprog"
    return train_toy.Args(**world, **chain, name=f"{condition}-{variant}-s{seed}", out_dir=str(Path(args.out_dir) / args.name),
                          seed=seed, reward=args.reward, budget=args.budget, budget_unit="gflop", evals=args.evals,
                          eval_batch=args.eval_batch, threads=args.threads, progressive=progressive)


def check_args(args: Args) -> None:
    """Every argument before anything is built: one line `--flag VALUE: what to do` (a ValueError)."""
    toy.check_world_args(args)
    runio.check_run_name(args.name, out_flag="--out-dir")
    runio.check_writable_dir("--out-dir", args.out_dir)
    unknown = [c for c in args.conditions if c not in CONDITIONS]
    runio.require(bool(args.conditions) and not unknown and len(set(args.conditions)) == len(args.conditions),
                  "conditions", args.conditions, f"give distinct names of {', '.join(CONDITIONS)}")
    runio.require(bool(args.seeds) and len(set(args.seeds)) == len(args.seeds), "seeds", args.seeds,
                  "give one or more distinct seeds")
    runio.check_arg("reward", args.reward, rewards.check_reward_spec, args.reward, rewards.TOY_REWARDS)
    runio.require_range("budget", args.budget, 0, low_open=True)
    runio.require_range("evals", args.evals, 1)
    runio.require_range("eval_batch", args.eval_batch, 2, toy.MAX_SIZE)
    runio.require_range("threads", args.threads, 1, os.cpu_count() or 1, what="at most this machine's CPU cores")
    for c in args.conditions:
        train_toy.check_args(run_args(args, c, True, args.seeds[0]))


@torch.no_grad()
def train_inference_gap(run: train_toy.Args, x_T: torch.Tensor, cond: torch.Tensor) -> dict:
    """With the run's trained LoRAs: reward(x_0 of the stage-i training chain) − reward(x_0 of the 50-step sampler),
    and the mean ‖Δx_0‖ / R, on the same x_T, for every stage i."""
    points = shortft.PAPER_LORA_POINTS
    world = toy.build_toy(toy.world_args(run), points, True)
    world.load_tuned_state(runio.load_tensors(train_toy.run_folder(run) / "lora.safetensors"))
    reward_fn, den = toy.make_reward(run.reward, run), toy.make_denoisers(world, cond)
    x_sampler = toy.sample(world, x_T, cond)
    r_sampler = reward_fn(x_sampler, cond).mean().item()
    out = {"sampler_reward": r_sampler}
    for stage in range(1, len(points) + 1):
        chain = shortft.shortft(world.grid, points, stage=stage, segment1_grad_steps=run.segment1_grad_steps)
        x0 = shortft.run_chain(x_T, chain.trunk, den, world.schedule)
        out[f"stage {stage}"] = {"reward_gap": reward_fn(x0, cond).mean().item() - r_sampler,
                                 "distance": ((x0 - x_sampler).norm(dim=1) / run.radius).mean().item()}
    return out


def bench(args: Args) -> dict:
    """Every step of the module docstring; returns metrics.json's content. The output folder is locked while the
    benchmark runs (one writer)."""
    with runio.run_lock(Path(args.out_dir) / args.name / ".lock", "benchmark folder"):
        return run_bench(args)


def run_bench(args: Args) -> dict:
    """`bench` in its locked output folder."""
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir) / args.name
    out.mkdir(parents=True, exist_ok=True)
    w0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    x_eval, c_eval = toy.eval_batch(args, args.eval_batch)
    metrics = {"args": dataclasses.asdict(args), "conditions": {}}
    for c in args.conditions:
        run0 = run_args(args, c, True, args.seeds[0])
        world = toy.build_toy(toy.world_args(run0), shortft.PAPER_LORA_POINTS)
        jumps = measure_toy.chain_jump_errors(world, x_eval, c_eval, args.radius)
        row = {"jump_error": jumps, "jump_error_mean": statistics.fmean(j["mean"] for j in jumps.values())}
        for progressive in (True, False):
            runs, gaps = [], []
            for seed in args.seeds:
                run = run_args(args, c, progressive, seed)
                runs.append(bench_toy.finished_run(run) or train_toy.train(run, log=lambda *a: None))
                gaps.append(train_inference_gap(run, x_eval, c_eval))
                print(f"  {c:>14} {'prog' if progressive else 'noprog':>6} seed {seed}: reward "
                      f"{runs[-1]['final']['eval/reward_mean']:.3f}, {runs[-1]['updates']} updates, stage-1 gap "
                      f"{gaps[-1]['stage 1']['reward_gap']:+.3f}", flush=True)
            s = bench_toy.summarise(runs)
            s["gap"] = {st: {k: bench_toy.spread([g[st][k] for g in gaps]) for k in ("reward_gap", "distance")}
                        for st in gaps[0] if st.startswith("stage")}
            row["prog" if progressive else "noprog"] = s
        row["benefit"] = (row["prog"]["reward"][0] - row["noprog"]["reward"][0],
                          row["prog"]["reward"][1] + row["noprog"]["reward"][1])
        row["ordering"] = bench_toy.ordering(row["prog"], row["noprog"])
        metrics["conditions"][c] = row
    metrics["time"] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                       "load_average_1_5_15min": {"start": load0, "end": os.getloadavg()}, "cpu_count": os.cpu_count()}
    md = tables_markdown(metrics, args)
    runio.write_text(md, out / "tables.md")
    metrics["figures"] = plot(out, metrics)
    runio.write_json(metrics, out / "metrics.json")
    print("\n" + md)
    print(f"total {metrics['time']['wall_s']:.0f} s wall, {metrics['time']['cpu_s']:.0f} s CPU; {out}")
    return metrics


def tables_markdown(metrics: dict, args: Args) -> str:
    """One table per study (shortcut quality, segment-1 gradient steps): jump error, reward with and without
    progressive training, the benefit and whether it exceeds the spread, the stage-1 chain's gap."""
    pm = bench_toy.pm
    conds = metrics["conditions"]
    lines = []
    for title, rows in (("Shortcut quality", SHORTCUT_ROWS), ("Segment-1 gradient steps", SEGMENT1_ROWS)):
        rows = [r for r in rows if r in conds]
        if not rows:
            continue
        lines += [f"**{title}**: {len(args.seeds)} seeds, {args.budget:g} GFLOP of updates per run, reward "
                  f"`{args.reward}`; jump error: mean over the chain's 3 jumps of ‖error‖ / R; gap: stage-1 chain's "
                  f"held-out reward − the 50-step sampler's, same x_T, after training", "",
                  "| shortcut / chain | jump error | with progressive ↑ | without progressive ↑ | benefit (Δ, std_a + std_b) "
                  "| beyond spread | gap, with | gap, without | ‖Δx_0‖ / R, without |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            c = conds[r]
            verdict = {">": "yes, helps", "<": "yes, hurts", "≈": "no"}[c["ordering"]]
            lines.append(f"| {CONDITIONS[r][0]} | {c['jump_error_mean']:.4f} | {pm(c['prog']['reward'])} | "
                         f"{pm(c['noprog']['reward'])} | {c['benefit'][0]:+.3f} ({c['benefit'][1]:.3f}) | {verdict} | "
                         f"{pm(c['prog']['gap']['stage 1']['reward_gap'])} | {pm(c['noprog']['gap']['stage 1']['reward_gap'])} | "
                         f"{pm(c['noprog']['gap']['stage 1']['distance'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(out: Path, metrics: dict) -> list[str]:
    """progressive.png: benefit of progressive training against the shortcut's jump error (left) and against the
    segment-1 gradient steps (right), bars = std_a + std_b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = metrics["conditions"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, rows, xs, xlabel in ((axes[0], SHORTCUT_ROWS, None, "shortcut's mean jump error / R"),
                                 (axes[1], SEGMENT1_ROWS, (1, 4, 12), "gradient steps in segment 1")):
        rows = [r for r in rows if r in conds]
        x = [conds[r]["jump_error_mean"] for r in rows] if xs is None else [xs[SEGMENT1_ROWS.index(r)] for r in rows]
        y = [conds[r]["benefit"][0] for r in rows]
        e = [conds[r]["benefit"][1] for r in rows]
        ax.errorbar(x, y, yerr=e, fmt="o", capsize=3)
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(r, (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.axhline(0, c="gray", lw=0.8)
        ax.set(xlabel=xlabel, ylabel="reward: with − without progressive", xscale="log")
    fig.tight_layout()
    fig.savefig(out / "progressive.png", dpi=90)
    plt.close(fig)
    return ["progressive.png"]


def main(argv: list[str] | None = None) -> dict:
    """The command line: bad arguments end in one line and exit status 2."""
    return runio.cli(bench, Args, check_args, argv)


if __name__ == "__main__":
    main()
