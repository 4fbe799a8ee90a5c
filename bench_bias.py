"""Gradient bias of every method on the toy world: how far the gradient each method trains with points from the
exact gradient of its own parametrisation through the complete 50-step chain.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 1 and 3: the paper's central argument is that truncated or stop-gradient
chains (DRaFT-K / DRaFT-LV, AlignProp, ReFL, DRTune; Clark et al. 2024, Prabhudesai et al. 2023, Xu et al. 2023,
Wu et al. 2024) give *biased* reward gradients, while ShortFT's shortcut-based chain gives a "nearly complete" one,
short because the shortcut replaces whole intervals rather than because gradient is cut.

For each method, at each measurement point of its own training run and on each x_T batch:

    g*           ∇_θ L through the complete 50-step chain, every step with gradient (`measure_toy.exact_chain`), θ the
                 method's own LoRA parametrisation: one LoRA at every step for the baselines; ShortFT's LoRA_1 on
                 981 … 761 and the stacked LoRA_1 + … + LoRA_i at p_i (base between) for ShortFT and its ablations
    g_d          ∇_θ L through the chain of one draw d of the method, into the branches it trains (ShortFT: stage i's
                 LoRA_i … LoRA_k, every stage measured at every point; `measure_toy.gradient_bias`)
    one draw     cos(g_d, g*), ‖g_d‖ / ‖g*‖: mean ± std over every draw on every batch (the method's noise)
    expectation  ḡ = mean_d g_d, cos(ḡ, g*), ‖ḡ‖ / ‖g*‖: mean ± std over the batches (1 − cos is the method's bias)

Draws: AlignProp's K, ReFL's graded step and DRTune's offset are enumerated over their whole support (each chain
equally likely, so ḡ is the exact expectation); DRaFT-LV's re-noising ε is drawn `noise_draws` times (ḡ is a Monte
Carlo mean, whose leftover noise lowers its cosine a little); full, DRaFT-K and ShortFT are deterministic.

Settings, fixed before any result was looked at: the toy world's defaults; every method and ablation trained by
`train_toy.train` with its defaults (reward `region:1,quality:1`, Adam lr 1e-3, batch 64, seed 0) for 200 updates
(`--budget-unit updates`, bit-reproducible; ShortFT: 50 updates per stage), measured at initialisation and after 10,
50 and 200 updates; 8 batches of 64 (x_T, class) pairs drawn from seed world_seed + 6, the same for every method;
32 re-noising draws for DRaFT-LV. At initialisation every B = 0, so no method's A matrices get gradient (nor do the
exact chain's): the init cosines are those of the B matrices alone; at 10 updates and later A and B both count.
Verdicts (also fixed in advance): a method is *biased* at a point where the cosine of its expectation is below 0.99
beyond the spread over batches (mean + std < 0.99); it is *noisy* where one draw's cosine is below its
expectation's beyond the spread (one-draw mean + std < expectation mean − std).

Writes runs/<name>/: table.md, metrics.json, grad_bias.png and one train_toy run folder per method.

Notation (code -> paper): points p_1 > … > p_k (761, 501, 261, 1); stage i; LoRA_i = tuned_i.

Run: python bench_bias.py          (≈ 8 CPU-minutes, one thread, from an empty cache)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import chain_args
import measure_toy
import rewards
import runio
import shortft
import toy
import train_toy

ARGS = chain_args.ChainArgs()
CONFIGS = {  # name: (row label, train_toy.Args fields that differ from the defaults)
    "full": ("full chain", {"method": "full"}),
    "draft_k": (f"DRaFT-K (K = {ARGS.draft_k})", {"method": "draft_k"}),
    "draft_lv": (f"DRaFT-LV (n = {ARGS.draft_lv_n})", {"method": "draft_lv"}),
    "alignprop": (f"AlignProp (K ~ U[{ARGS.alignprop_k_min}, N])", {"method": "alignprop"}),
    "refl": (f"ReFL (last {ARGS.refl_last})", {"method": "refl"}),
    "drtune": (f"DRTune (K = {ARGS.drtune_k})", {"method": "drtune"}),
    "shortft": ("ShortFT", {}),
    "no_timestep_aware": ("without timestep-aware LoRA", {"timestep_aware": False}),
    "no_progressive": ("without progressive training", {"progressive": False}),
}
BIASED_BELOW = 0.99
"""A method is biased at a point where cos(ḡ, g*) is below this beyond the spread over batches."""


@dataclass
class BenchArgs(toy.WorldArgs):
    """Cosine and relative norm of every method's gradient against the exact complete-chain gradient."""

    name: str = "bias"
    """output folder: <out-dir>/<name>/ (table.md, metrics.json, grad_bias.png, one run folder per method)"""
    out_dir: str = "runs"
    """parent of the output folder"""
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    """methods and ablations to measure (names of bench_bias.CONFIGS); distinct"""
    reward: str = train_toy.Args.reward
    """training reward, and the reward whose gradient is measured"""
    seed: int = 0
    """fine-tuning seed of every run (LoRA init, x_T draws, chain draws)"""
    points: list[int] = field(default_factory=lambda: [10, 50, 200])
    """updates after which the gradients are measured (besides initialisation); the runs train max(points) updates"""
    batches: int = 8
    """x_T batches per measurement (the spread)"""
    batch_size: int = 64
    """(x_T, class) pairs per batch (the training batch)"""
    noise_draws: int = 32
    """draws of DRaFT-LV's re-noising ε per batch"""
    reuse: bool = False
    """measure the checkpoints already in the run folders when their args.json matches, instead of training again"""
    threads: int = 1
    """torch CPU threads"""


def run_args(args: BenchArgs, config: str) -> train_toy.Args:
    """The train_toy.py arguments of one method's run: updates as the budget, a checkpoint at every point."""
    return train_toy.Args(**dataclasses.asdict(toy.world_args(args)), name=config,
                          out_dir=str(Path(args.out_dir) / args.name), seed=args.seed, reward=args.reward,
                          batch_size=args.batch_size, budget=float(max(args.points)), budget_unit="updates",
                          evals=1, save_every=math.gcd(*args.points), threads=args.threads, **CONFIGS[config][1])


def check_args(args: BenchArgs) -> None:
    """Every argument, in field order, before anything is built: one line `--flag VALUE: what to do` (a ValueError)."""
    toy.check_world_args(args)
    runio.check_run_name(args.name, out_flag="--out-dir")
    runio.check_writable_dir("--out-dir", args.out_dir)
    unknown = [c for c in args.configs if c not in CONFIGS]
    runio.require(not unknown, "configs", args.configs, f"unknown config {unknown[0] if unknown else ''!r}; "
                                                         f"choose from {', '.join(CONFIGS)}")
    runio.require(bool(args.configs) and len(set(args.configs)) == len(args.configs), "configs", args.configs,
                  "give one or more distinct configs")
    runio.check_arg("reward", args.reward, rewards.check_reward_spec, args.reward, rewards.TOY_REWARDS)
    runio.require_range("seed", args.seed, 0, 2**32 - 1)
    runio.require(bool(args.points) and sorted(set(args.points)) == list(args.points), "points", args.points,
                  "give one or more update counts, increasing")
    for p in args.points:
        runio.require_range("points", p, 1, 10**6)
    runio.require_range("batches", args.batches, 1, 1000)
    runio.require_range("batch_size", args.batch_size, 1, toy.MAX_SIZE)
    runio.require_range("noise_draws", args.noise_draws, 1, 10**4)
    runio.require_range("threads", args.threads, 1, os.cpu_count() or 1, what="at most this machine's CPU cores")
    for c in args.configs:
        train_toy.check_args(run_args(args, c))


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def measurement_batches(args: BenchArgs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_T, class) batches every method is measured on: (B, 2) and (B,) each."""
    g = torch.Generator().manual_seed(args.world_seed + 6)
    return [(torch.randn(args.batch_size, 2, generator=g), torch.randint(0, args.classes, (args.batch_size,), generator=g))
            for _ in range(args.batches)]


def train_run(args: BenchArgs, config: str) -> dict:
    """Train one method's run (or, with --reuse, keep a finished one made with the same arguments)."""
    run = run_args(args, config)
    folder = train_toy.run_folder(run)
    saved = folder / "args.json"
    if args.reuse and saved.is_file() and json.loads(saved.read_text()) == json.loads(json.dumps(dataclasses.asdict(run))) \
            and all(checkpoint(run, p).is_dir() for p in args.points):
        return {"reused": True, "run_dir": str(folder)}
    out = train_toy.train(run, log=lambda *a: None)
    return {"reused": False, "run_dir": out["run_dir"], "updates": out["updates"], "skipped": out["skipped"],
            "final_reward": out["final"]["eval/reward_mean"]}


def checkpoint(run: train_toy.Args, update: int) -> Path:
    return train_toy.run_folder(run) / "checkpoints" / f"step_{update:07d}"


def measure(args: BenchArgs, config: str, batches, reward_fn) -> dict:
    """{stage: {point: per-batch gradient_bias rows}} of one method (every stage of its progressive training; stage 1
    only for the baselines and without progressive training), the exact gradient computed once per batch and point."""
    run = run_args(args, config)
    grid, schedule = shortft.ddim_timesteps(toy.NUM_STEPS), shortft.make_schedule()
    points, aware = chain_args.layout(run, grid, schedule)
    k = chain_args.num_stages(run, grid, schedule)
    stages = range(1, k + 1)
    world = toy.build_toy(args, points, aware, run.lora_rank, run.lora_alpha, args.seed)
    init = world.tuned_state()
    draws = {s: measure_toy.method_draws(run.method, grid, chain_args.chain_switches(run, points, s), args.noise_draws)
             for s in stages}
    names = {s: [world.names[i] for i in shortft.trainable_loras(s, points, aware)] for s in stages}
    out = {s: {} for s in stages}
    active = {}
    for update in [0, *args.points]:
        if update == 0:
            world.load_tuned_state(init)
        else:
            weights, _ = runio.load_checkpoint(checkpoint(run, update), restore_rng=False, expect=world.tuned_state())
            world.load_tuned_state(weights)
        active[update] = chain_args.stage_of(run, update / max(args.points), k)
        rows = {s: [] for s in stages}
        for x_T, cond in batches:
            exact = measure_toy.branch_gradients(world, measure_toy.exact_chain(grid, points), x_T, cond, reward_fn)
            for s in stages:
                rows[s].append(measure_toy.gradient_bias(world, draws[s], names[s], x_T, cond, reward_fn, exact))
        for s in stages:
            out[s][update] = rows[s]
    return {"stages": out, "active_stage": active, "draws_per_batch": {s: len(d) for s, d in draws.items()},
            "trained_branches": names}


def summarise(rows: list[dict]) -> dict:
    """Mean ± std of one draw (over every draw of every batch) and of the expectation (over batches)."""
    draw_cos = [c for r in rows for c in r["draw_cos"]]
    draw_norm = [n for r in rows for n in r["draw_rel_norm"]]
    s = {"draw_cos": spread(draw_cos), "draw_rel_norm": spread(draw_norm),
         "mean_cos": spread([r["mean_cos"] for r in rows]), "mean_rel_norm": spread([r["mean_rel_norm"] for r in rows]),
         "exact_norm": spread([r["exact_norm"] for r in rows]), "draws": rows[0]["draws"],
         "mean_cos_min": min(r["mean_cos"] for r in rows)}
    s["biased"] = s["mean_cos"][0] + s["mean_cos"][1] < BIASED_BELOW
    s["noisy"] = s["draws"] > 1 and s["draw_cos"][0] + s["draw_cos"][1] < s["mean_cos"][0] - s["mean_cos"][1]
    return s


def row_label(config: str, stage: int, stages: int) -> str:
    label = CONFIGS[config][0]
    return f"{label}, stage {stage}" if stages > 1 else label if config != "no_progressive" else f"{label} (stage 1)"


def pm(v, digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def pm_ratio(v) -> str:
    """A norm ratio to 3 significant digits (they span 0.001 … 10)."""
    return f"{v[0]:#.3g} ± {v[1]:#.2g}"


def table_markdown(summary: dict, args: BenchArgs, wall: float, cpu: float) -> str:
    """The cosine table, the relative-norm table and the headline table, as Markdown."""
    cols = [0, *args.points]
    head = "| method | draws | " + " | ".join("init" if u == 0 else f"{u} updates" for u in cols) + " |"
    rule = "|---|---|" + "---|" * len(cols)
    lines = [f"Reward `{args.reward}`; {args.batches} batches of {args.batch_size} x_T; seed {args.seed}; "
             f"command `python bench_bias.py`; {wall / 60:.1f} min wall, {cpu / 60:.1f} CPU-min, one thread on a "
             f"2-core CPU shared with other jobs.", "",
             "**Cosine to the exact gradient** (one draw: mean ± std over draws and batches; E: the cosine of the mean "
             "gradient over draws, mean ± std over batches; deterministic chains have one draw; `*` the stage ShortFT "
             "trains at that point):", "", head, rule]
    for row, s in summary.items():
        cells = []
        for u in cols:
            c = s["points"][str(u)]
            mark = "*" if s["active"].get(str(u)) else ""
            cells.append(f"{pm(c['draw_cos'])}{mark}" if c["draws"] == 1 else
                         f"{pm(c['draw_cos'])}; E {pm(c['mean_cos'])}{mark}")
        lines.append(f"| {row} | {s['draws']} | " + " | ".join(cells) + " |")
    lines += ["", "**Relative norm ‖g‖ / ‖g*‖** (one draw; E: of the mean gradient):", "", head, rule]
    for row, s in summary.items():
        cells = []
        for u in cols:
            c = s["points"][str(u)]
            cells.append(f"{pm_ratio(c['draw_rel_norm'])}" if c["draws"] == 1 else
                         f"{pm_ratio(c['draw_rel_norm'])}; E {pm_ratio(c['mean_rel_norm'])}")
        lines.append(f"| {row} | {s['draws']} | " + " | ".join(cells) + " |")
    first, last = str(cols[0]), str(cols[-1])
    lines += ["", f"**Headline** (cos(g, g*) of one draw / of the expectation; biased: E mean + std < {BIASED_BELOW}; "
                  "noisy: one draw below E beyond the spread):", "",
              f"| method | init: one draw | init: E | {cols[-1]} updates: one draw | {cols[-1]} updates: E | verdict |",
              "|---|---|---|---|---|---|"]
    for row, s in summary.items():
        a, b = s["points"][first], s["points"][last]
        verdict = sorted({v for c in s["points"].values() for v, on in (("biased", c["biased"]), ("noisy", c["noisy"])) if on})
        lines.append(f"| {row} | {a['draw_cos'][0]:.3f} | {a['mean_cos'][0]:.3f} | {b['draw_cos'][0]:.3f} | "
                     f"{b['mean_cos'][0]:.3f} | {', '.join(verdict) or 'neither'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, args: BenchArgs, path: Path) -> None:
    """Cosine of one draw, cosine of the expectation and relative norm of the expectation, per method and point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [0, *args.points]
    rows = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.34 * len(rows) + 1.6), sharey=True)
    for j, u in enumerate(cols):
        y = [i + (j - (len(cols) - 1) / 2) * 0.17 for i in range(len(rows))]
        label = "init" if u == 0 else f"{u} updates"
        for ax, key in zip(axes, ("draw_cos", "mean_cos", "mean_rel_norm")):
            m = [summary[r]["points"][str(u)][key][0] for r in rows]
            e = [summary[r]["points"][str(u)][key][1] for r in rows]
            low = [min(s, 0.9 * v) if key == "mean_rel_norm" else s for v, s in zip(m, e)]  # a log axis has no 0
            ax.errorbar(m, y, xerr=[low, e], fmt="o", ms=3.5, lw=1, capsize=2, color=f"C{j}", label=label)
    axes[0].set_yticks(range(len(rows)), rows, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set(xlabel="cos(g_one draw, g*)", title="one draw (mean ± std over draws and batches)")
    axes[1].set(xlabel="cos(E g, g*)", title="expectation over draws (± std over batches)")
    axes[2].set(xlabel="‖E g‖ / ‖g*‖", xscale="log", title="relative norm of the expectation (− std cut at 0.1×)")
    for ax in axes[:2]:
        ax.axvline(1.0, c="gray", lw=0.8, ls=":")
        ax.set_xlim(min(-0.2, ax.get_xlim()[0]), 1.05)
    axes[2].axvline(1.0, c="gray", lw=0.8, ls=":")
    for ax in axes:
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench(args: BenchArgs) -> dict:
    """Train, measure and write every output of the module docstring; returns metrics.json's content. The output
    folder is locked while the benchmark runs (one writer)."""
    with runio.run_lock(Path(args.out_dir) / args.name / ".lock", "benchmark folder"):
        return run_bench(args)


def run_bench(args: BenchArgs) -> dict:
    """`bench` in its locked output folder."""
    torch.set_num_threads(args.threads)
    w0, c0 = time.perf_counter(), time.process_time()
    out = Path(args.out_dir) / args.name
    out.mkdir(parents=True, exist_ok=True)
    toy.build_toy(args)  # pretrain and distil once (cached), outside every method's timing
    reward_fn, batches = toy.make_reward(args.reward, args), measurement_batches(args)
    metrics = {"args": dataclasses.asdict(args), "runs": {}, "measured": {}, "time": {}}
    summary = {}
    for config in args.configs:
        t0, p0 = time.perf_counter(), time.process_time()
        metrics["runs"][config] = train_run(args, config)
        t1, p1 = time.perf_counter(), time.process_time()
        m = measure(args, config, batches, reward_fn)
        metrics["time"][config] = {"train_wall_s": t1 - t0, "train_cpu_s": p1 - p0,
                                   "measure_wall_s": time.perf_counter() - t1, "measure_cpu_s": time.process_time() - p1}
        metrics["measured"][config] = {"active_stage": m["active_stage"], "draws_per_batch": m["draws_per_batch"],
                                       "trained_branches": m["trained_branches"],
                                       "per_batch": {s: {u: rows for u, rows in by_point.items()}
                                                     for s, by_point in m["stages"].items()}}
        for s, by_point in m["stages"].items():
            row = row_label(config, s, len(m["stages"]))
            summary[row] = {"config": config, "stage": s, "draws": m["draws_per_batch"][s],
                            "active": {str(u): len(m["stages"]) > 1 and m["active_stage"][u] == s for u in by_point},
                            "points": {str(u): summarise(rows) for u, rows in by_point.items()}}
            last = summary[row]["points"][str(args.points[-1])]
            print(f"{row:>48}: one draw {pm(last['draw_cos'])}, E {pm(last['mean_cos'])} at {args.points[-1]} updates",
                  flush=True)
        tm = metrics["time"][config]
        print(f"  [{config}] train {tm['train_cpu_s']:.1f} CPU-s, measure {tm['measure_cpu_s']:.1f} CPU-s", flush=True)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    metrics["summary"] = summary
    metrics["time"]["total"] = {"wall_s": wall, "cpu_s": cpu, "load_average_1_5_15min": os.getloadavg(),
                                "cpu_count": os.cpu_count()}
    md = table_markdown(summary, args, wall, cpu)
    runio.write_text(md, out / "table.md")
    runio.write_json(metrics, out / "metrics.json")
    plot(summary, args, out / "grad_bias.png")
    print("\n" + md + f"\ntotal {wall:.0f} s wall, {cpu:.0f} s CPU; {out}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """The command line: bad arguments end in one line and exit status 2."""
    return runio.cli(bench, BenchArgs, check_args, argv)


if __name__ == "__main__":
    main()
