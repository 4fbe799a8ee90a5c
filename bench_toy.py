"""The toy world's main job: the paper's claims and its Tables 1 and 3 in miniature, on CPU.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Sec. 3 (shortcut-based chain, timestep-aware LoRA, progressive training) and the
comparisons of its Table 1 (ShortFT vs DRaFT-LV and DRTune at equal compute) and Table 3 (without timestep-aware
LoRA, without progressive training). Steps, each timed (wall-clock and CPU):

    world      base pretraining and shortcut distillation (toy.py; cached under runs/cache/)
    shortcut   trajectory error of 1/2/4/8 jumps from x_T and of the chain's jumps 741→501, 481→261, 241→1
    tables     every variant × seed trained by train_toy.train with the same budget of update time
    gradients  per-branch and per-stage cosine to the exact gradient (at init and after training), gradient norm
               vs chain length (measure_toy.py)

Writes runs/<name>/: metrics.json, tables.md, figures (*.png) and one run folder per variant and seed.

Notation (code -> paper): variant = a row of the tables; seed = fine-tuning seed (the world is shared);
mean ± std over seeds (sample std, n − 1).

The long run, `python bench_toy.py --long` (LONG_FLAGS; runs/toy-long/), its settings fixed before any of its
results were seen. Its first version used the reward `region`, which every method saturated within 1/20 of the
budget (docs/toy.md; `--long --reward region --name toy-long-region` repeats it). The reward was then replaced, before
any run of the new one, by one chosen from its definition for the properties `region` lacked:

    reward      `mode_shift`, r(x, c) = log Σ_{j ∈ sector(c + 2)} exp(−‖x − μ_j‖² / 2σ²): every class must leave
                its own two modes for the two modes of the class across the ring (a change of composition, decided by
                the early steps, where the paper says truncated chains lose their gradient), and land exactly on a
                mode: there is no flat top (r < 0 everywhere but at the 8 mode centres, quadratic around them), so
                a method cannot finish by parking samples anywhere inside a region. Off-ring samples lose reward,
                so it carries its own off-manifold check; ring quality is reported beside it
    budget      324 GFLOP of updates per run. ShortFT's costliest stage (4: 49 no-grad evaluations and one with
                gradient, batch 64) costs 0.2005 GFLOP per update, so each of its four stages (81 GFLOP) gets at
                least 404 updates (stages 1–3: 0.1094, 0.1410, 0.1689 GFLOP per update, 740, 574, 479 updates;
                2198 in all). Measured with 16-update runs, no reward read; the reward's element-wise work is not
                counted (budget.py), so the counts are the same for every toy reward
    seeds       0, 1, 2, 3, 4
    variants    the 7 methods of Table 1 and both ablations of Table 3
    evals       20 held-out evaluations per run (plus one before training), 512 fixed (x_T, class) pairs
    reported    reward vs GFLOP (mean ± std over seeds), the final tables, GFLOP / CPU-seconds / wall seconds per run,
                "GFLOP to target": where each seed first reaches base + 0.9 × (best final − base)

A finished run folder of the same arguments is reused (train_toy.py writes summary.json last), so an interrupted
bench continues where it stopped.

Run: python bench_toy.py            (4 min wall, 7 CPU-minutes on 2 CPU cores from an empty cache)
     python bench_toy.py --long     (the long run: 45 runs, 86 CPU-minutes measured, one thread: 0.03–0.3 CPU-s per
                                    update on a 2-core machine shared with other jobs)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import budget
import chain_args
import measure_toy
import rewards
import runio
import shortft
import toy
import train_toy

ARGS = chain_args.ChainArgs()
VARIANTS = {  # name: (row label, train_toy.Args fields that differ from the defaults)
    "shortft": ("ShortFT", {}),
    "draft_lv": (f"DRaFT-LV (n = {ARGS.draft_lv_n})", {"method": "draft_lv"}),
    "drtune": (f"DRTune (K = {ARGS.drtune_k})", {"method": "drtune"}),
    "full": ("full chain", {"method": "full"}),
    "draft_k": (f"DRaFT-K (K = {ARGS.draft_k})", {"method": "draft_k"}),
    "alignprop": (f"AlignProp (K ~ U[{ARGS.alignprop_k_min}, N])", {"method": "alignprop"}),
    "refl": (f"ReFL (last {ARGS.refl_last})", {"method": "refl"}),
    "no_timestep_aware": ("without timestep-aware LoRA", {"timestep_aware": False}),
    "no_progressive": ("without progressive training", {"progressive": False}),
    "shortft_stage1_long": ("ShortFT, stage shares 7:1:1:1", {"stage_fractions": [7.0, 1.0, 1.0, 1.0]}),
}
TABLE1 = ("shortft", "draft_lv", "drtune", "full", "draft_k", "alignprop", "refl")
TABLE3 = ("shortft", "no_timestep_aware", "no_progressive", "shortft_stage1_long")
LONG_VARIANTS = TABLE1 + ("no_timestep_aware", "no_progressive")
LONG_FLAGS = ["--name", "toy-long", "--seeds", "0", "1", "2", "3", "4", "--variants", *LONG_VARIANTS,
              "--reward", "mode_shift", "--budget", "324", "--evals", "20"]
"""The long run, fixed before any of its results were seen (module docstring): `python bench_toy.py --long`."""
PAPER_ORDERINGS = (("shortft", "draft_lv"), ("shortft", "drtune"), ("shortft", "no_timestep_aware"),
                   ("shortft", "no_progressive"))


@dataclass
class BenchArgs(toy.WorldArgs):
    """Measure the toy world and train every variant of the paper's Tables 1 and 3 at equal compute."""

    name: str = "toy"
    """output folder: <out-dir>/<name>/ (a rerun reuses each run folder that holds a finished run of the same
    arguments and retrains the others)"""
    out_dir: str = "runs"
    """parent of the output folder"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """fine-tuning seeds of every variant (LoRA init, x_T draws, chain draws); distinct"""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """rows to train (names of bench_toy.VARIANTS); distinct"""
    reward: str = train_toy.Args.reward
    """training reward of every variant (train_toy.py --reward)"""
    smooth_reward: str = "region"
    """a smooth reward on which gradient fidelity is measured as well"""
    budget: float = 20.0
    """budget of updates per run (equal compute), in --budget-unit"""
    budget_unit: str = train_toy.Args.budget_unit
    """gflop, updates, cpu_seconds or seconds (train_toy.py --budget-unit)"""
    evals: int = 8
    """held-out evaluations per run (plus one before training)"""
    eval_batch: int = train_toy.Args.eval_batch
    """fixed held-out batch of the evaluation"""
    grad_samples: int = 256
    """x_T samples of the gradient measurements"""
    chain_lengths: list[int] = field(default_factory=lambda: [10, 20, 50, 100, 200])
    """grids of the gradient-norm measurement (N steps; the paper's LoRA points are snapped to each, so N ≥ 4)"""
    threads: int = 1
    """torch CPU threads of each process"""
    workers: int = 0
    """runs trained at once, one process each (0: one per CPU core, at most the runs left). Each run is the same
    single-process computation whatever the number, so the tables are bit-identical for any --workers"""
    target_fraction: float = 0.9
    """"GFLOP to target": where a seed's held-out curve first reaches base + this × (best final − base), the best
    final mean over the bench's variants (linear between evaluations)"""
    long: bool = False
    """the long run fixed in advance: shorthand for LONG_FLAGS (flags given after --long override them)"""


def run_args(args: BenchArgs, variant: str, seed: int) -> train_toy.Args:
    """The train_toy.py arguments of one variant and seed. A run whose updates turn non-finite is not stopped
    (max_skipped 0): its skipped updates spend their budget and it ends with its last finite weights, so a method
    that diverges is a row of the table (its "skipped" count says so), not the end of the benchmark."""
    return train_toy.Args(**dataclasses.asdict(toy.world_args(args)), name=f"{variant}-s{seed}",
                          out_dir=str(Path(args.out_dir) / args.name), seed=seed, reward=args.reward,
                          budget=args.budget, budget_unit=args.budget_unit, evals=args.evals,
                          eval_batch=args.eval_batch, threads=args.threads, max_skipped=0, **VARIANTS[variant][1])


def train_run(run: train_toy.Args) -> dict:
    """One run, in a worker process of its own (`bench` trains --workers of them at once)."""
    return train_toy.train(run, log=lambda *a: None)


def finished_run(run: train_toy.Args) -> dict | None:
    """The summary of a run folder that holds a finished run of exactly these arguments (train_toy.py writes
    summary.json last), else None: an interrupted bench continues where it stopped."""
    folder = train_toy.run_folder(run)
    stop_rule = {"max_skipped": None}  # a finished run never reached it, so it is the same run under any value
    try:
        same = (json.loads((folder / "args.json").read_text()) | stop_rule
                == json.loads(json.dumps(dataclasses.asdict(run))) | stop_rule)
        return json.loads((folder / "summary.json").read_text()) if same and (folder / "lora.safetensors").is_file() else None
    except (OSError, ValueError):
        return None


def check_args(args: BenchArgs) -> None:
    """Every argument, in field order, before anything is built: one line `--flag VALUE: what to do` (a ValueError)."""
    toy.check_world_args(args)
    runio.check_run_name(args.name, out_flag="--out-dir")
    runio.check_writable_dir("--out-dir", args.out_dir)
    runio.require(bool(args.seeds) and len(set(args.seeds)) == len(args.seeds), "seeds", args.seeds,
                  "give one or more distinct seeds")
    for seed in args.seeds:
        runio.require_range("seeds", seed, 0, 2**32 - 1)
    unknown = [v for v in args.variants if v not in VARIANTS]
    runio.require(not unknown, "variants", args.variants, f"unknown variant {unknown[0] if unknown else ''!r}; "
                                                           f"choose from {', '.join(VARIANTS)}")
    runio.require(bool(args.variants) and len(set(args.variants)) == len(args.variants), "variants", args.variants,
                  "give one or more distinct variants")
    for flag in ("reward", "smooth_reward"):
        spec = getattr(args, flag)
        runio.check_arg(flag, spec, rewards.check_reward_spec, spec, rewards.TOY_REWARDS)
    runio.require_range("budget", args.budget, 0, low_open=True)
    runio.require(args.budget_unit in budget.UNITS, "budget_unit", args.budget_unit, f"use {', '.join(budget.UNITS)}")
    runio.require_range("evals", args.evals, 1)
    runio.require_range("eval_batch", args.eval_batch, 2, toy.MAX_SIZE)
    runio.require_range("grad_samples", args.grad_samples, 1, toy.MAX_SIZE)
    runio.require(bool(args.chain_lengths), "chain_lengths", args.chain_lengths, "give at least one N")
    for n in args.chain_lengths:
        runio.require_range("chain_lengths", n, 4, 1000, what="the paper's 4 LoRA points need 4 distinct steps")
        runio.check_arg("chain_lengths", n, measure_toy.snap_points, shortft.ddim_timesteps(n))
    runio.require_range("threads", args.threads, 1, os.cpu_count() or 1, what="at most this machine's CPU cores")
    runio.require_range("workers", args.workers, 0, 64, what="processes at once (0: one per CPU core)")
    runio.require_range("target_fraction", args.target_fraction, 0, 1, low_open=True,
                        what="a share of the best improvement over the base")
    for v in args.variants:  # what each run will be given
        train_toy.check_args(run_args(args, v, args.seeds[0]))


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample std over seeds; 0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ordering(a: dict, b: dict, key: str = "reward") -> str:
    """'>' or '<' where |Δmean| exceeds std_a + std_b, else '≈' (no difference beyond the spread)."""
    (ma, sa), (mb, sb) = a[key], b[key]
    return ">" if ma - mb > sa + sb else "<" if mb - ma > sa + sb else "≈"


def summarise(runs: list[dict]) -> dict:
    """Mean ± std over seeds of the final held-out reward, ring quality, updates and update time per update, and
    the mean evaluation curve (reward vs budget spent)."""
    finals = [r["final"] for r in runs]
    curve = [spread([r["evals"][i]["eval/reward_mean"] for r in runs]) for i in range(min(len(r["evals"]) for r in runs))]
    return {"reward": spread([f["eval/reward_mean"] for f in finals]), "quality": spread([f["eval/quality_mean"] for f in finals]),
            "updates": spread([r["updates"] for r in runs]), "spent_per_update": spread([r["per_update"]["cpu_seconds"] for r in runs]),
            "gflop_per_update": spread([r["per_update"]["gflop"] for r in runs]),
            "gflop": spread([r["spent"]["gflop"] for r in runs]), "skipped": [r["skipped"] for r in runs],
            "cpu_s": spread([r["spent"]["cpu_seconds"] for r in runs]),
            "wall_s": spread([r["spent"]["seconds"] for r in runs]),
            "curves": [[(e["compute/gflop"], e["eval/reward_mean"]) for e in r["evals"]] for r in runs],
            "base_reward": finals[0]["eval/base_reward_mean"], "curve_mean": [m for m, _ in curve], "curve_std": [s for _, s in curve],
            "curve_spent": [statistics.fmean(r["evals"][i]["budget/spent"] for r in runs) for i in range(len(curve))],
            "seeds": [f["eval/reward_mean"] for f in finals]}


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The GFLOP where a held-out curve [(GFLOP, reward), …] first reaches `target` (linear between evaluations);
    None if it never does."""
    for (g0, r0), (g1, r1) in zip(curve, curve[1:]):
        if r1 >= target:
            return g0 if r0 >= target else g0 + (g1 - g0) * (target - r0) / (r1 - r0)
    return curve[0][0] if curve and curve[0][1] >= target else None


def add_time_to_target(summary: dict, fraction: float) -> float:
    """Adds "to_target" (mean ± std over the seeds that reach it, how many do) to every variant's summary; returns
    the target base + fraction × (best final mean − base)."""
    base = next(iter(summary.values()))["base_reward"]
    target = base + fraction * (max(s["reward"][0] for s in summary.values()) - base)
    for s in summary.values():
        hits = [g for g in (first_reach(c, target) for c in s["curves"]) if g is not None]
        s["to_target"] = {"gflop": spread(hits) if hits else None, "reached": len(hits), "of": len(s["curves"])}
    return target


def pm(v: tuple[float, float], digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def tables_markdown(summary: dict, args: BenchArgs) -> str:
    """Tables 1 and 3 in miniature and the paper's orderings, as Markdown."""
    lines = []
    target = add_time_to_target(summary, args.target_fraction)
    for title, rows in (("Table 1 (equal compute)", TABLE1), ("Table 3 (ablation)", TABLE3)):
        rows = [v for v in rows if v in summary]
        if not rows:
            continue
        lines += [f"**{title}**: {len(args.seeds)} seeds, {args.budget:g} {args.budget_unit} of updates each, "
                  f"reward `{args.reward}`; GFLOP to target: first reach of {target:.3f} = base + "
                  f"{args.target_fraction:g} × (best final − base) (seeds that reach it)", "",
                  "| method | held-out reward ↑ | ring quality ↑ | updates | GFLOP / update | GFLOP to target | "
                  "CPU s / update | CPU s / run | wall s / run |",
                  "|---|---|---|---|---|---|---|---|---|"]
        base = summary[rows[0]]["base_reward"]
        lines.append(f"| base model | {base:.3f} | – | – | – | – | – | – | – |")
        for v in rows:
            s, hit = summary[v], summary[v]["to_target"]
            reach = "never" if not hit["reached"] else pm(hit["gflop"], 1) + (
                f" ({hit['reached']}/{hit['of']})" if hit["reached"] < hit["of"] else "")
            lines.append(f"| {VARIANTS[v][0]} | {pm(s['reward'])} | {pm(s['quality'], 2)} | {pm(s['updates'], 0)} | "
                         f"{pm(s['gflop_per_update'], 4)} | {reach} | {pm(s['spent_per_update'], 4)} | "
                         f"{pm(s['cpu_s'], 1)} | {pm(s['wall_s'], 1)} |")
        diverged = [f"{VARIANTS[v][0]}: " + ", ".join(f"seed {seed} {n}" for seed, n in zip(args.seeds, summary[v]["skipped"]) if n)
                    for v in rows if any(summary[v].get("skipped", ()))]
        if diverged:  # updates whose gradient or weights were non-finite: not applied, their budget spent
            lines += ["", "Skipped updates (non-finite; the weights kept, the budget spent): " + "; ".join(diverged) + "."]
        lines.append("")
    lines += ["**The paper's orderings** (held-out reward; '>' only where |Δmean| > std_a + std_b):", ""]
    for a, b in PAPER_ORDERINGS:
        if a in summary and b in summary:
            got = ordering(summary[a], summary[b])
            verdict = {">": "holds", "<": "reversed", "≈": "not shown (no difference beyond the spread)"}[got]
            lines.append(f"- {VARIANTS[a][0]} > {VARIANTS[b][0]}: {verdict} "
                         f"({pm(summary[a]['reward'])} {got} {pm(summary[b]['reward'])})")
    return "\n".join(lines) + "\n"


def plot(out: Path, metrics: dict, world: toy.Toy, samples: dict, args: BenchArgs) -> list[str]:
    """The figures: reward vs update time (mean ± std over seeds, ShortFT's stage boundaries), shortcut paths,
    gradient cosine per branch and stage, gradient norm vs chain length, samples before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)

    summary = metrics["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, rows, title in zip(axes, (TABLE1, TABLE3), ("Table 1 methods", "Table 3 ablations")):
        for v in (r for r in rows if r in summary):
            s = summary[v]
            mean, std = torch.tensor(s["curve_mean"]), torch.tensor(s["curve_std"])
            ax.plot(s["curve_spent"], mean, "o-", ms=3, lw=2.4 if v == "shortft" else 1.2, label=VARIANTS[v][0])
            ax.fill_between(s["curve_spent"], mean - std, mean + std, alpha=0.2)
        k = len(shortft.PAPER_LORA_POINTS)
        for i in range(1, k):  # ShortFT's stage boundaries (equal shares of the budget)
            ax.axvline(args.budget * i / k, c="gray", ls=":", lw=1)
        ax.set(xlabel=f"budget spent ({args.budget_unit}); dotted: ShortFT's stage boundaries", title=title)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out reward (50-step sampler)")
    save(fig, "reward_vs_time.png")

    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    x_T, c = toy.eval_batch(args, 12)
    path, den = measure_toy.base_trajectory(world, x_T, c), toy.make_denoisers(world, c)
    traj = torch.stack([path[t] for t in world.grid] + [path[shortft.CLEAN]])  # (51, 12, 2)
    ax.plot(traj[:, :, 0], traj[:, :, 1], "-", c="gray", lw=0.8)
    for seg in shortft.shortft(world.grid, world.points).trunk:
        if seg.model == shortft.SHORTCUT:  # each jump from the base trajectory's state at its start
            with torch.no_grad():
                end = shortft.apply_segment(path[seg.t], seg, den, world.schedule)
            ax.plot(torch.stack([path[seg.t][:, 0], end[:, 0]]), torch.stack([path[seg.t][:, 1], end[:, 1]]), "--", c="C3", lw=1)
            ax.plot(*end.T, "o", c="C3", ms=3)
    ax.plot(*path[shortft.CLEAN].T, "k*", ms=6)
    ax.set(title="base, 50 steps (gray); the chain's shortcut jumps (red)", aspect="equal")
    ax.title.set_fontsize(9)
    save(fig, "shortcut_jumps.png")

    fid = metrics["gradient_fidelity"]
    fig, axes = plt.subplots(2, (len(fid) + 1) // 2, figsize=(9, 6.4), squeeze=False, sharey=True)
    for ax, (label, f) in zip(axes.flat, fid.items()):
        rows = f["cosine"]
        for name in world.names:
            ax.plot(range(len(rows)), [r.get(name, float("nan")) for r in rows.values()], "o-", label=name)
        ax.set_xticks(range(len(rows)), [r.replace("stage ", "s").replace(", segment1_grad_steps ", "/") for r in rows])
        ax.set(ylim=(-0.1, 1.05), title=label, ylabel="cos to the exact gradient",
               xlabel="stage (s1/n: gradient through n steps of segment 1)")
        ax.title.set_fontsize(9)
    axes.flat[0].legend(fontsize=7)
    save(fig, "grad_cosine.png")

    gn = metrics["gradient_norm"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("full", "complete chain, one LoRA"), ("exact", "complete chain, ShortFT's LoRAs"),
                       ("shortft", "ShortFT stage 1")):
        ax.plot(gn["chain_length"], gn[key], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="DDIM steps N", ylabel="‖∇_LoRA L‖", title="gradient norm vs chain length")
    ax.legend(fontsize=8)
    save(fig, "grad_norm_vs_chain_length.png")

    cols = (len(samples) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 4.6), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (v, (before, after)) in zip(axes.flat, samples.items()):
        ax.scatter(*before.T, s=2, alpha=0.3, c="gray")
        ax.scatter(*after.T, s=2, alpha=0.5, c="C3")
        if "region" in args.reward:  # the region reward's disc
            ax.add_patch(plt.Circle((0.0, 2.0), 0.3, fill=False, color="k", lw=0.8))
        ax.set(xlim=(-3.2, 3.2), ylim=(-3.2, 3.2), aspect="equal")
        ax.set_title(VARIANTS[v][0], fontsize=7)
    save(fig, "samples_before_after.png")
    return files


def bench(args: BenchArgs) -> dict:
    """Every step of the module docstring with checked arguments; returns metrics.json's content. The output folder
    is locked while the benchmark runs (one writer)."""
    with runio.run_lock(Path(args.out_dir) / args.name / ".lock", "benchmark folder"):
        return run_bench(args)


def run_bench(args: BenchArgs) -> dict:
    """`bench` in its locked output folder."""
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir) / args.name
    out.mkdir(parents=True, exist_ok=True)
    parts, load = {}, {"start": os.getloadavg()}

    def cpu() -> float:  # this process and its finished workers
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def timed(part, fn, *a, **kw):
        w0, c0 = time.perf_counter(), cpu()
        result = fn(*a, **kw)
        parts[part] = {"wall_s": time.perf_counter() - w0, "cpu_s": cpu() - c0}
        print(f"[{part}] {parts[part]['wall_s']:.1f} s wall, {parts[part]['cpu_s']:.1f} s CPU", flush=True)
        return result

    world = timed("world", toy.build_toy, args, shortft.PAPER_LORA_POINTS)
    x_eval, c_eval = toy.eval_batch(args, args.eval_batch)
    metrics = {"args": dataclasses.asdict(args)}
    metrics["trajectory_error"] = timed("shortcut", measure_toy.trajectory_errors, world, x_eval, c_eval, args.radius)
    metrics["chain_jump_error"] = measure_toy.chain_jump_errors(world, x_eval, c_eval, args.radius)

    def train_all() -> dict:
        todo = {(v, seed): run_args(args, v, seed) for v in args.variants for seed in args.seeds}
        done = {key: finished_run(run) for key, run in todo.items()}
        left = [key for key, summary in done.items() if summary is None]
        workers = min(args.workers or os.cpu_count() or 1, len(left)) or 1
        print(f"  {len(todo) - len(left)} finished runs reused, {len(left)} to train, {workers} at a time", flush=True)
        if workers == 1:  # in this process, in order
            for key in left:
                done[key] = train_run(todo[key])
                report(key, done[key])
            return ordered(done)
        with concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_run, todo[key]): key for key in left}
            for future in concurrent.futures.as_completed(futures):
                done[futures[future]] = future.result()
                report(futures[future], done[futures[future]])
        return ordered(done)

    def report(key, run):
        v, seed = key
        print(f"  {v:>18} seed {seed}: reward {run['final']['eval/reward_mean']:.3f}, {run['updates']} updates"
              + (f" ({run['skipped']} skipped)" if run["skipped"] else ""), flush=True)

    def ordered(done: dict) -> dict:  # {variant: [summary per seed]} in the order of --variants and --seeds
        runs = {}
        for (v, _), summary in done.items():
            runs.setdefault(v, []).append(summary)
        return runs

    runs = timed("tables", train_all)
    metrics["summary"] = {v: summarise(r) for v, r in runs.items()}

    def gradients() -> tuple[dict, dict]:
        g = torch.Generator().manual_seed(args.world_seed + 5)
        x_T, cond = torch.randn(args.grad_samples, 2, generator=g), torch.randint(0, args.classes, (args.grad_samples,), generator=g)
        fid, specs = {}, dict.fromkeys([args.reward, args.smooth_reward])
        trained = toy.build_toy(args, shortft.PAPER_LORA_POINTS)
        lora = out / f"shortft-s{args.seeds[0]}" / "lora.safetensors"
        if lora.is_file():  # ShortFT's LoRAs after training (every B ≠ 0)
            trained.load_tuned_state(runio.load_tensors(lora))
        for label, w in (("init", world), ("after training", trained))[: 1 + lora.is_file()]:
            for spec in specs:
                fid[f"{spec}, LoRA {label}"] = measure_toy.gradient_fidelity(w, x_T, cond, toy.make_reward(spec, args))
        return fid, measure_toy.gradient_norms(world, x_T[:64], cond[:64], toy.make_reward(args.reward, args), args.chain_lengths)

    metrics["gradient_fidelity"], metrics["gradient_norm"] = timed("gradients", gradients)

    samples = {}
    for v in runs:
        points, aware = chain_args.layout(train_toy.Args(**VARIANTS[v][1]), world.grid, world.schedule)
        w = toy.build_toy(args, points, aware)
        before = toy.sample(w, x_eval, c_eval, shortft.BASE)
        w.load_tuned_state(runio.load_tensors(out / f"{v}-s{args.seeds[0]}" / "lora.safetensors"))
        samples[v] = (before, toy.sample(w, x_eval, c_eval))
    metrics["figures"] = timed("figures", plot, out, metrics, world, samples, args)
    load["end"] = os.getloadavg()
    metrics["time"] = {"parts": parts, "load_average_1_5_15min": load, "cpu_count": os.cpu_count()}
    md = tables_markdown(metrics["summary"], args)
    runio.write_text(md, out / "tables.md")
    runio.write_json(metrics, out / "metrics.json")
    print("\n" + md)
    te, cj = metrics["trajectory_error"], metrics["chain_jump_error"]
    print("shortcut error / R from x_T: " + ", ".join(f"M={m}: {v['mean']:.4f} (DDIM {v['ddim_mean']:.4f})" for m, v in te.items()))
    print("chain jumps / R: " + ", ".join(f"{j}: {v['mean']:.4f} (one DDIM step {v['ddim_mean']:.4f})" for j, v in cj.items()))
    for label, f in metrics["gradient_fidelity"].items():
        print(f"cosine to the exact gradient, {label}:")
        for row, cos in f["cosine"].items():
            print(f"  {row:>34}: " + ", ".join(f"{n} {c:.3f}" for n, c in cos.items()))
    print(f"total {sum(p['wall_s'] for p in parts.values()):.0f} s wall, {sum(p['cpu_s'] for p in parts.values()):.0f} s CPU; "
          f"load average {load['start'][0]:.1f} → {load['end'][0]:.1f} on {os.cpu_count()} cores; {out}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """The command line: bad arguments end in one line and exit status 2. `--long` puts LONG_FLAGS before the
    arguments given, so that those given win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--long" in argv:
        argv = LONG_FLAGS + argv
    return runio.cli(bench, BenchArgs, check_args, argv)


if __name__ == "__main__":
    main()
