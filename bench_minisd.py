"""The paper's Table 1 and Table 3 in miniature: every method trained by train_sd.py on the miniature SD of minisd.py.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Table 1 (ShortFT vs DRaFT-LV and DRTune; here also full backpropagation,
DRaFT-K, AlignProp and ReFL) and Table 3 (ShortFT without timestep-aware LoRA, without progressive training).

Each variant × seed is one `train_sd.py` process (the training loop is train_sd.py's, nothing is re-implemented),
all with the same settings except the method switches, and the same compute: `--budget-s` CPU-seconds of update
time per run (time.process_time of a one-thread process; evaluation and saving are not counted). The score is
train_sd.py's held-out evaluation: the 50-step DDIM + CFG sampler on the fixed seeds 0 … n−1 of the evaluation
prompts, mean reward over them; the table gives its mean ± std over the seeds.

Notation: variant = a method with its switches (Table 3 rows are ShortFT with --no-timestep-aware or
--no-progressive); Δ = evaluation reward − the base model's on the same seeds.

Output (runs/minisd-bench/): table.md, metrics.json (every run's numbers), reward_vs_cpu.png (training reward of
each update vs CPU-seconds, mean ± std over seeds, ShortFT's stage changes marked), grids/<variant>.png (base row
over tuned row, seed 0), runs/<variant>-s<seed>/ (train_sd.py's run folders).

Run: python bench_minisd.py            (after python minisd.py; under 15 min on 2 CPU cores)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import runio

VARIANTS = {
    # Table 1
    "shortft": ["--method", "shortft"],
    "draft_lv": ["--method", "draft_lv"],
    "drtune": ["--method", "drtune"],
    "full": ["--method", "full"],
    "draft_k": ["--method", "draft_k"],
    "alignprop": ["--method", "alignprop"],
    "refl": ["--method", "refl"],
    # Table 3
    "shortft_no_timestep_aware": ["--method", "shortft", "--no-timestep-aware"],
    "shortft_no_progressive": ["--method", "shortft", "--no-progressive"],
}
"""variant name → the train_sd.py switches that make it (everything else is shared)."""
TABLE1 = ("shortft", "draft_lv", "drtune", "full", "draft_k", "alignprop", "refl")
TABLE3 = ("shortft", "shortft_no_timestep_aware", "shortft_no_progressive")


@dataclass
class Args:
    """Train every variant with train_sd.py on the miniature SD at equal CPU-seconds, 3 seeds; tabulate."""

    minisd: str = "runs/minisd"
    """minisd.py's output folder (pipeline/, shortcut/, classifier.safetensors, report.json)"""
    out: str = "runs/minisd-bench"
    """output folder"""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """variants to run (names of VARIANTS)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """training seeds (evaluation always uses the fixed seeds 0 … n−1 of the evaluation prompts)"""
    reward: str = "digit"
    """reward (train_sd.py --reward)"""
    guidance: float = 2.0
    """CFG scale of training chains and the evaluation sampler"""
    budget_s: float = 30.0
    """CPU-seconds of update time per run (train_sd.py --budget-s)"""
    lr: float = 2e-3
    """AdamW learning rate (every variant)"""
    lora_rank: int = 4
    """LoRA rank (alpha = rank)"""
    batch_size: int = 2
    """prompts per update"""
    eval_samples: int = 50
    """held-out samples (prompts/digits_eval.txt: each digit five times)"""
    workers: int = 2
    """train_sd.py processes at once (one thread each)"""


def check_args(args: Args) -> None:
    """One line per bad argument (ValueError) before anything runs."""
    root = Path(args.minisd)
    runio.require((root / "pipeline" / "model_index.json").is_file(), "minisd", args.minisd,
                  "no miniature SD there: build it with `python minisd.py`")
    bad = [v for v in args.variants if v not in VARIANTS]
    runio.require(not bad and bool(args.variants), "variants", args.variants, f"choose from {', '.join(VARIANTS)}")
    runio.require(bool(args.seeds), "seeds", args.seeds, "give at least one seed")
    runio.require_range("budget_s", args.budget_s, 0, low_open=True)
    runio.require_range("workers", args.workers, 1, 16)


def command(args: Args, variant: str, seed: int) -> list[str]:
    """The train_sd.py command line of one run."""
    root = Path(args.minisd)
    return [sys.executable, "train_sd.py", "--model", str(root / "pipeline"),
            "--shortcut", str(root / "shortcut" / "pytorch_lora_weights.safetensors"),
            "--reward", args.reward, "--digit-classifier", str(root / "classifier.safetensors"),
            "--resolution", "32", "--guidance", str(args.guidance), "--lora-rank", str(args.lora_rank),
            "--lora-alpha", str(float(args.lora_rank)), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
            "--steps", "100000", "--budget-s", str(args.budget_s),
            "--train-prompts", "prompts/digits_train.txt", "--eval-prompts", "prompts/digits_eval.txt",
            "--eval-samples", str(args.eval_samples), "--eval-batch", str(args.eval_samples), "--eval-every", "0",
            "--save-every", "0", "--seed", str(seed), "--out-dir", str(Path(args.out) / "runs"),
            "--name", f"{variant}-s{seed}", *VARIANTS[variant]]


def run_one(args: Args, variant: str, seed: int) -> dict:
    """One train_sd.py process (fresh run folder); its metrics rows and its wall/CPU seconds."""
    run_dir = Path(args.out) / "runs" / f"{variant}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(command(args, variant, seed), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise runio.RunError(f"{variant} seed {seed} failed: {proc.stderr.strip().splitlines()[-1]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    ev = [r for r in rows if "eval/reward_mean" in r][-1]
    print(f"  {variant:27s} seed {seed}: eval {ev['eval/reward_mean']:.4f} (base {ev['eval/base_reward_mean']:.4f})"
          f", {len(train)} updates, {wall:.0f} s wall", flush=True)
    return {"variant": variant, "seed": seed, "eval": ev["eval/reward_mean"], "base": ev["eval/base_reward_mean"],
            "updates": len(train), "wall_s": wall, "update_cpu_s": train[-1]["time/spent"],
            "curve": [(r["time/spent"], r["reward/train"], r["stage"]) for r in train]}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(args: Args, runs: list[dict]) -> dict:
    """Per variant: eval reward mean ± std over seeds, Δ to the base, updates, CPU-seconds."""
    out = {}
    for v in args.variants:
        rs = [r for r in runs if r["variant"] == v]
        m, s = mean_std([r["eval"] for r in rs])
        out[v] = {"eval_mean": m, "eval_std": s, "base": rs[0]["base"], "delta": m - rs[0]["base"],
                  "updates": statistics.fmean(r["updates"] for r in rs),
                  "update_cpu_s": statistics.fmean(r["update_cpu_s"] for r in rs), "seeds": len(rs)}
    return out


def orderings(summary: dict) -> list[str]:
    """The paper's orderings, each marked as holding only where |Δmean| > std_a + std_b (as bench_toy.py)."""
    pairs = [("shortft", o) for o in TABLE1[1:]] + [("shortft", o) for o in TABLE3[1:]]
    lines = []
    for a, b in pairs:
        if a in summary and b in summary:
            d = summary[a]["eval_mean"] - summary[b]["eval_mean"]
            spread = summary[a]["eval_std"] + summary[b]["eval_std"]
            verdict = "holds" if d > spread else ("reversed" if -d > spread else "within the spread")
            lines.append(f"- {a} > {b}: {verdict} (difference {d:+.4f}, std_a + std_b {spread:.4f})")
    return lines


def table(args: Args, summary: dict, rows: tuple[str, ...], title: str) -> str:
    head = (f"### {title}\n\n| variant | eval reward (mean ± std, {len(args.seeds)} seeds) | Δ vs base | updates | "
            f"update CPU-s |\n|---|---|---|---|---|\n")
    return head + "".join(
        f"| {v} | {s['eval_mean']:.4f} ± {s['eval_std']:.4f} | {s['delta']:+.4f} | {s['updates']:.0f} | "
        f"{s['update_cpu_s']:.1f} |\n" for v in rows if (s := summary.get(v))) + "\n"


def plot(args: Args, runs: list[dict], path: Path) -> None:
    """Training reward (running mean of 10 updates) vs CPU-seconds, mean ± std over seeds on a common grid."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, args.budget_s, 60)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v in args.variants:
        ys = []
        for r in (r for r in runs if r["variant"] == v):
            t, y, _ = map(np.array, zip(*r["curve"]))
            y = np.array([y[max(0, i - 9): i + 1].mean() for i in range(len(y))])
            ys.append(np.interp(grid, t, y))
        m, s = np.mean(ys, 0), np.std(ys, 0)
        line, = ax.plot(grid, m, label=v, lw=2.2 if v == "shortft" else 1.2)
        ax.fill_between(grid, m - s, m + s, color=line.get_color(), alpha=0.15)
    stages = [r for r in runs if r["variant"] == "shortft"]
    if stages:  # where ShortFT's stage changes, mean over seeds
        for k in sorted({c[2] for c in stages[0]["curve"]})[1:]:
            x = statistics.fmean(next(c[0] for c in r["curve"] if c[2] >= k) for r in stages)
            ax.axvline(x, color="k", ls=":", lw=0.8)
            ax.text(x, ax.get_ylim()[0], f" stage {k}", fontsize=7, va="bottom")
    ax.set_xlabel("CPU-seconds of update time (one thread)")
    ax.set_ylabel(f"training reward ({args.reward}), running mean of 10")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(args: Args) -> dict:
    check_args(args)
    out = Path(args.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    print(f"{len(jobs)} runs of train_sd.py, {args.budget_s} CPU-s of updates each, {args.workers} at once")
    t0, load0 = time.perf_counter(), os.getloadavg()
    with ThreadPoolExecutor(args.workers) as pool:
        runs = list(pool.map(lambda j: run_one(args, *j), jobs))
    wall, load = time.perf_counter() - t0, os.getloadavg()
    summary = summarise(args, runs)
    for v in args.variants:  # base row over tuned row, seed of the first run
        png = sorted((out / "runs" / f"{v}-s{args.seeds[0]}").glob("eval_*.png"))[-1]
        shutil.copyfile(png, out / "grids" / f"{v}.png")
    plot(args, runs, out / "reward_vs_cpu.png")
    settings = (f"reward `{args.reward}`, CFG {args.guidance}, LoRA rank {args.lora_rank}, lr {args.lr}, batch "
                f"{args.batch_size}, {args.budget_s} CPU-s of updates per run, seeds {args.seeds}, held-out "
                f"{args.eval_samples} samples (50-step DDIM, fixed seeds); benchmark {wall:.0f} s wall with "
                f"{args.workers} processes, load average {load0[0]:.1f} → {load[0]:.1f}")
    md = (f"Settings: {settings}\n\n" + table(args, summary, TABLE1, "Table 1 (methods)")
          + table(args, summary, TABLE3, "Table 3 (ablations)") + "Orderings (paper: ShortFT best):\n\n"
          + "\n".join(orderings(summary)) + "\n")
    runio.write_bytes(md.encode(), out / "table.md")
    runio.write_json({"args": dataclasses.asdict(args), "wall_s": wall, "loadavg": [load0, load],
                      "summary": summary, "runs": runs}, out / "metrics.json")
    print(md)
    return summary


if __name__ == "__main__":
    runio.cli(main, Args, check_args)
