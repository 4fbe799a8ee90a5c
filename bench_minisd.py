"""The paper's Table 1 and Table 3 in miniature: every method trained by train_sd.py on the miniature SD of minisd.py.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Table 1 (ShortFT vs DRaFT-LV and DRTune at equal compute; here also full
backpropagation, DRaFT-K, AlignProp and ReFL on request) and Table 3 (ShortFT without timestep-aware LoRA, without
progressive training).

Each variant × seed is one `train_sd.py` process (the training loop is train_sd.py's, nothing is re-implemented),
all with the same settings except the method switches, and the same compute: `--budget` GFLOP of updates per run
(budget.py: the FLOPs of every update's forward and backward, counted once per kind of update; the same on every
machine, so the tables do not depend on the load; CPU-seconds and wall time are reported next to them). The score
is train_sd.py's held-out evaluation: the 50-step DDIM + CFG sampler on the fixed seeds 0 … n−1 of the evaluation
prompts, mean `digit` reward over them, a few times per run and at its end; the tables give its mean ± std over the
training seeds.

The settings of the long run on the miniature SD1.5, fixed before any of its results were seen (the defaults below):

    CFG               w = 2 for training chains and sampler, the scale the shortcut is distilled at (minisd.py
                      teacher_guidance, read from report.json), so that its jumps imitate the chain they replace
    batch             2 prompts per update
    budget            1500 GFLOP of updates per run. ShortFT's costliest stage (4: 49 no-grad + 1 gradient
                      evaluation) costs 3.60 GFLOP per update at batch 2, so each of its four stages (375 GFLOP) gets
                      at least 105 updates (stage 1, 1.78 GFLOP per update: 211). The plan step measures these again
    seeds             0, 1, 2
    held-out          1000 samples (prompts/digits_eval_1000.txt: each digit 100 times), evaluated at half of a run's
                      updates and at its end; the base model's score on them is the same for every run, so the plan
                      scores it once (train_sd.py --no-eval-base in the runs). The evaluation noise of a mean,
                      std/√1000, is reported beside the spread between seeds
    variants          ShortFT, DRaFT-LV, DRTune (Table 1) and both ablations (Table 3); full, DRaFT-K, AlignProp and
                      ReFL are the same command with --variants
    LoRA, optimiser   rank 4 (alpha 4) on attention + feed-forward, AdamW lr 2e-3, gradient clipping 1

Why these differ from the first plan (batch 8, 6000 GFLOP, 4 evaluations + the base's in every run, about 4 CPU-hours
estimated): the updates are overhead-bound, so what an update costs in CPU-seconds hardly depends on its batch (the
plan, on 2 CPU cores shared with other jobs: ShortFT 1.3–2.1 CPU-s per update at batch 2), and the issue's floor of
100 updates per progressive stage, not the batch, sets the cost. Batch 2 meets the floor at a quarter of the GFLOP;
two held-out evaluations per run (enough for a coarse "GFLOP to target") instead of four, and the base scored once
instead of in each of the 15 runs, remove about 60 % of the evaluation passes. Even so, the plan puts the 15 runs at
about 4.4 CPU-hours on this machine (`--plan-only` prints the estimate; it counts DRTune at its plan's 15 CPU-s per
update, both of whose updates were new kinds counted by a dry run, where about 2 is right, and so says 8): the floor of 100 updates per stage, 3 seeds and
5 variants cannot all fit in less. The runs are ordered seed by seed (seed 0 of every variant first) and each one is
reused once finished, so an interrupted bench resumes where it stopped.

The miniature SD3 (`--minisd runs/minisd3`: train_sd.py on minisd3.py's StableDiffusion3Pipeline, --t5-tokens 0 as
built, 28-step Euler + CFG at the build's w = 1.5, the scale its shortcut is distilled at), fixed likewise before its
results were seen, at a budget sized to about half an hour of CPU on the same machine:

    python bench_minisd.py --minisd runs/minisd3 --batch-size 2 --budget 150 --evals 1 --eval-samples 500

    150 GFLOP of updates per run at batch 2 (ShortFT 2.9–3.6 GFLOP and 0.7–0.8 CPU-s per update: about 11 updates
    per stage; DRaFT-LV 4.0 GFLOP: 38 updates), 3 seeds, the same five variants, 500 held-out samples (the first
    half of prompts/digits_eval_1000.txt: each digit 50 times) scored once, at the end of each run: on this machine
    one pass of 1000 samples of the 28-step sampler costs 61 CPU-s, against 0.7 CPU-s per update. This is a
    short budget (the SD1.5 bench's earlier 25-CPU-second regime, not the long run), chosen to finish within the
    hour left on 2 cores shared with other jobs

Steps: plan (one short train_sd.py run per variant: the GFLOP of each kind of update, per progressive stage, and the
updates the budget buys; FLOPs are deterministic, so this needs no reward and no long run), runs (each reused when
its folder holds a finished run of the same command), tables and figures.

Notation: variant = a method with its switches (Table 3 rows are ShortFT with --no-timestep-aware or
--no-progressive); Δ = held-out reward − the base model's on the same seeds; eval SE = std of the per-sample rewards
/ √n (how far the mean of n held-out samples moves on another n); target = base + fraction × (best final − base),
the best over the variants of the bench; "GFLOP to target" = where a seed's held-out curve first reaches it (linear
between evaluations).

Output (runs/minisd-bench/): table.md, metrics.json (every run's numbers), plan.json, reward_vs_gflop.png (held-out
and training reward vs GFLOP, mean ± std over seeds, ShortFT's stage changes marked), before_after.png (the base
row over each variant's tuned row, seed 0, the first 20 samples), grids/<variant>.png, runs/<variant>-s<seed>/
(train_sd.py's run folders).

Run: python bench_minisd.py --workers 2   (after python minisd.py; plan + 15 runs: 2 h 34 min wall on 2 CPU cores)
     python bench_minisd.py --plan-only     (the plan and the estimated CPU-hours, no training)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
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
LONG_RUN = ("shortft", "draft_lv", "drtune", "shortft_no_timestep_aware", "shortft_no_progressive")
"""The variants of the long run (the default); the other baselines are the same command with --variants."""
STAGES = {"shortft": 4, "shortft_no_timestep_aware": 4}
"""Progressive stages of a variant's plan run (one update each); every other variant is one stage."""
RANDOM_CHAINS = ("alignprop", "refl")
"""Variants whose chain (and so its FLOPs) is drawn afresh each update: their plan averages 8 updates."""


@dataclass
class Args:
    """Train every variant with train_sd.py on the miniature SD at equal GFLOP, 3 seeds; tabulate and plot."""

    minisd: str = "runs/minisd"
    """minisd.py's output folder (pipeline/, shortcut/, classifier.safetensors, report.json), or minisd3.py's
    (runs/minisd3: the miniature SD3, read from its model_index.json; trained with --t5-tokens 0, as it was built)"""
    out: str = ""
    """output folder (empty: <minisd>-bench, e.g. runs/minisd-bench, runs/minisd3-bench)"""
    variants: list[str] = field(default_factory=lambda: list(LONG_RUN))
    """variants to run (names of VARIANTS)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """training seeds (evaluation always uses the fixed seeds 0 … n−1 of the evaluation prompts)"""
    reward: str = "digit"
    """reward (train_sd.py --reward)"""
    guidance: float = 0.0
    """CFG scale of training chains and the evaluation sampler (0: the shortcut's teacher scale, report.json)"""
    budget: float = 1500.0
    """compute of every run's updates, in --budget-unit (train_sd.py --budget)"""
    budget_unit: str = "gflop"
    """gflop (the tables' unit: the same on every machine), cpu_seconds or seconds"""
    lr: float = 2e-3
    """AdamW learning rate (every variant)"""
    lora_rank: int = 4
    """LoRA rank (alpha = rank)"""
    batch_size: int = 2
    """prompts per update"""
    eval_prompts: str = "prompts/digits_eval_1000.txt"
    """held-out prompts, sample i with the fixed seed i"""
    eval_samples: int = 1000
    """held-out samples (the first ones of eval_prompts)"""
    eval_batch: int = 1000
    """samples per sampler batch in evaluation"""
    evals: int = 2
    """held-out evaluations per run, at about every 1/evals of its updates (the last at its end)"""
    fraction: float = 0.9
    """"GFLOP to target": target = base + fraction × (best final reward − base)"""
    workers: int = 1
    """train_sd.py processes at once (one thread each)"""
    plan_only: bool = False
    """stop after the plan: print each run's GFLOP and updates and the estimated CPU-seconds, train nothing"""


def check_args(args: Args) -> None:
    """One line per bad argument (ValueError) before anything runs."""
    root = Path(args.minisd)
    runio.require((root / "pipeline" / "model_index.json").is_file(), "minisd", args.minisd,
                  "no miniature SD there: build it with `python minisd.py`")
    bad = [v for v in args.variants if v not in VARIANTS]
    runio.require(not bad and bool(args.variants), "variants", args.variants, f"choose from {', '.join(VARIANTS)}")
    runio.require(len(set(args.variants)) == len(args.variants), "variants", args.variants, "name each variant once")
    runio.require(bool(args.seeds) and len(set(args.seeds)) == len(args.seeds), "seeds", args.seeds,
                  "give at least one seed, each once")
    runio.require_range("guidance", args.guidance, 0, 100, what="0: the shortcut's teacher scale")
    runio.require_range("budget", args.budget, 0, low_open=True)
    runio.require(args.budget_unit in ("gflop", "cpu_seconds", "seconds"), "budget_unit", args.budget_unit,
                  "use gflop, cpu_seconds or seconds")
    runio.require_range("eval_samples", args.eval_samples, 1)
    runio.require_range("eval_batch", args.eval_batch, 1)
    runio.require_range("evals", args.evals, 1, 100)
    runio.require_range("fraction", args.fraction, 0, 1, low_open=True)
    runio.require_range("workers", args.workers, 1, 16)


def is_sd3(args: Args) -> bool:
    """Whether --minisd is the miniature SD3 (minisd3.py's StableDiffusion3Pipeline folder)."""
    index = json.loads((Path(args.minisd) / "pipeline" / "model_index.json").read_text())
    return index.get("_class_name") == "StableDiffusion3Pipeline"


def out_dir(args: Args) -> Path:
    return Path(args.out or f"{Path(args.minisd)}-bench")


def sampler_name(args: Args) -> str:
    """The held-out sampler of train_sd.py's evaluation on this world (its training grid, with CFG)."""
    return "28-step Euler + CFG" if is_sd3(args) else "50-step DDIM + CFG"


def guidance(args: Args) -> float:
    """The CFG scale of the runs: --guidance, or the scale the build distilled its shortcut at."""
    if args.guidance:
        return args.guidance
    report = Path(args.minisd) / "report.json"
    try:
        teacher = json.loads(report.read_text()).get("shortcut", {}).get("teacher_guidance") if report.is_file() else None
    except (ValueError, OSError, AttributeError):
        raise runio.RunError(f"{report} is damaged: rebuild it with `python minisd.py`, or pass --guidance") from None
    if not (teacher is None or isinstance(teacher, (int, float)) and not isinstance(teacher, bool)
            and math.isfinite(teacher) and teacher >= 0):
        raise runio.RunError(f"{report} gives the shortcut's CFG scale as {teacher!r}: rebuild it with "
                             "`python minisd.py`, or pass --guidance")
    if teacher is None:
        raise runio.RunError(f"{report} does not say the shortcut's CFG scale (an older build): rebuild it with "
                             f"`python minisd.py`, or pass --guidance")
    return float(teacher)


def command(args: Args, variant: str, seed: int, folder: Path, name: str, budget: float, steps: int = 1_000_000,
            eval_every: int = 0, eval_samples: int | None = None, eval_base: bool = True) -> list[str]:
    """The train_sd.py command line of one run (the plan's runs stop at `steps`, the bench's at the budget; the
    bench's runs do not score the base, which the plan scores once for all of them)."""
    root = Path(args.minisd)
    n = args.eval_samples if eval_samples is None else eval_samples
    return [sys.executable, "train_sd.py", "--model", str(root / "pipeline"),
            "--shortcut", str(root / "shortcut" / "pytorch_lora_weights.safetensors"),
            "--reward", args.reward, "--digit-classifier", str(root / "classifier.safetensors"),
            "--resolution", "32", "--guidance", str(guidance(args)), "--lora-rank", str(args.lora_rank),
            "--lora-alpha", str(float(args.lora_rank)), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
            "--steps", str(steps), "--budget", str(budget), "--budget-unit", args.budget_unit,
            "--train-prompts", "prompts/digits_train.txt", "--eval-prompts", args.eval_prompts,
            "--eval-samples", str(n), "--eval-batch", str(min(n, args.eval_batch)), "--eval-every", str(eval_every),
            "--save-every", "0", "--seed", str(seed), "--out-dir", str(folder), "--name", name,
            *([] if eval_base else ["--no-eval-base"]), *(["--t5-tokens", "0"] if is_sd3(args) else []),
            *VARIANTS[variant]]


def train(cmd: list[str], run_dir: Path) -> tuple[list[dict], float, float]:
    """Run one train_sd.py command in a fresh folder, or reuse the folder if it holds a finished run of the same
    command (bench.json, written last). Returns its metrics rows, wall-seconds and the process's CPU-seconds (all of
    it: start-up, updates, evaluations; os.wait4's rusage)."""
    done, metrics = run_dir / "bench.json", run_dir / "metrics.jsonl"
    old = runio.read_json_cache(done, "the run is made again")
    if isinstance(old, dict) and old.get("command") == cmd[1:]:
        sha = runio.file_sha256(metrics) if metrics.is_file() else None  # records without a checksum: trusted
        if sha is not None and old.get("metrics_sha256", sha) == sha and isinstance(old.get("wall_s"), (int, float)):
            return runio.read_jsonl(metrics), old["wall_s"], old.get("process_cpu_s", float("nan"))
        print(f"{run_dir}: its metrics.jsonl or bench.json changed after the run finished: the run is made again",
              file=sys.stderr)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
    if proc.returncode:
        lines = (run_dir.parent / f"{run_dir.name}.log").read_text().strip().splitlines() or ["?"]
        raise runio.RunError(f"{run_dir.name} failed: {lines[-1]}")
    runio.write_json({"command": cmd[1:], "wall_s": wall, "process_cpu_s": cpu,
                      "metrics_sha256": runio.file_sha256(metrics)}, done)
    return runio.read_jsonl(metrics), wall, cpu


# ----------------------------------------------------------------------------- plan


def plan(args: Args) -> dict:
    """Per variant: the compute of one update in each progressive stage (one short run, two updates per stage; 8
    updates for the random chains), the updates the budget buys (each stage gets an equal share of it), the
    --eval-every that gives about `evals` evaluations, and this machine's CPU-seconds per update (each stage's
    cheapest update, without a dry run: a new kind of update also counts its FLOPs by one, and DRTune's offset gives
    up to n/K kinds) and per held-out evaluation, hence an estimate of the
    bench's CPU-seconds. GFLOP are deterministic, CPU-seconds are this machine's at this moment; no reward is read."""
    out, folder = {}, out_dir(args) / "plan"
    for v in args.variants:
        stages = STAGES.get(v, 1)
        steps = 8 if v in RANDOM_CHAINS else 2 * stages
        rows, _, cpu = train(command(args, v, 0, folder, v, 1e12, steps=steps, eval_samples=1), folder / v)
        per, cpu_per, before, cpu_before = {}, {}, 0.0, 0.0
        for r in (r for r in rows if "loss" in r):
            per.setdefault(r["stage"], []).append(r["budget/spent"] - before)
            cpu_per.setdefault(r["stage"], []).append(r["time/cpu_s"] - cpu_before)
            before, cpu_before = r["budget/spent"], r["time/cpu_s"]
        cost = {s: statistics.fmean(c) for s, c in per.items()}
        cpu_update = {s: (min(c) if v not in RANDOM_CHAINS else statistics.fmean(c)) for s, c in cpu_per.items()}
        updates = {s: math.ceil(args.budget / len(cost) / c) for s, c in cost.items()}
        total = sum(updates.values())
        out[v] = {"per_update": cost, "cpu_s_per_update": cpu_update, "updates": updates, "total_updates": total,
                  "eval_every": max(1, round(total / args.evals)), "plan_process_cpu_s": cpu,
                  "update_cpu_s": sum(updates[s] * cpu_update[s] for s in updates)}
    # the base's held-out score, once for every run (the same sampler, prompts and seeds), and the cost of one
    # held-out pass of n samples: a run of one update evaluated at its end (base + tuned: two sampler passes),
    # against the same run with one sample
    v = "shortft"  # whichever variants run: the same base score and runs for every call
    _, _, small = train(command(args, v, 0, folder, "eval-1", 1e12, steps=1, eval_samples=1), folder / "eval-1")
    rows, _, big = train(command(args, v, 0, folder, "eval-n", 1e12, steps=1), folder / "eval-n")
    pass_cpu = max(0.0, big - small) / 2
    per_run = {x: p["update_cpu_s"] + args.evals * pass_cpu + small for x, p in out.items()}
    out["cost"] = {"eval_pass_cpu_s": pass_cpu, "startup_cpu_s": small, "run_cpu_s": per_run,
                   "bench_cpu_s": len(args.seeds) * sum(per_run.values()) + big}
    return out


def base_score(args: Args) -> float:
    """The base model's held-out reward (the plan's eval-n run scored it; every run of the bench has the same)."""
    rows = runio.read_jsonl(out_dir(args) / "plan" / "eval-n" / "metrics.jsonl")
    return [r for r in rows if "eval/base_reward_mean" in r][-1]["eval/base_reward_mean"]


# ----------------------------------------------------------------------------- runs


def run_one(args: Args, variant: str, seed: int, eval_every: int) -> dict:
    """One train_sd.py run of the bench; its numbers and curves."""
    name = f"{variant}-s{seed}"
    run_dir = out_dir(args) / "runs" / name
    rows, wall, process_cpu = train(command(args, variant, seed, out_dir(args) / "runs", name, args.budget,
                                            eval_every=eval_every, eval_base=False), run_dir)
    updates = [r for r in rows if "loss" in r]
    at = {r["update"]: r for r in updates}
    evals = [r for r in rows if "eval/reward_mean" in r]
    base = base_score(args)
    final = evals[-1]
    n = args.eval_samples
    result = {
        "variant": variant, "seed": seed, "eval": final["eval/reward_mean"], "base": base,
        "eval_se": final["eval/reward_std"] / math.sqrt(n), "updates": len(updates),
        "stage_updates": {s: sum(r["stage"] == s for r in updates) for s in sorted({r["stage"] for r in updates})},
        "spent": updates[-1]["budget/spent"], "cpu_s": updates[-1]["time/cpu_s"], "wall_s": wall,
        "process_cpu_s": process_cpu,
        "held_out": [(0.0, base)] + [(at[e["update"]]["budget/spent"], e["eval/reward_mean"]) for e in evals],
        "train": [(r["budget/spent"], r["reward/train"], r["stage"]) for r in updates],
    }
    print(f"  {name:31s} eval {result['eval']:.4f} ± {result['eval_se']:.4f} (SE; base {base:.4f}), "
          f"{len(updates)} updates, {result['cpu_s']:.0f} CPU-s of updates, {wall:.0f} s wall", flush=True)
    return result


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The compute at which a held-out curve [(compute, reward), …] first reaches `target` (linear in between);
    None if it never does."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y0 >= target:
            return x0
        if y1 >= target:
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    return None


def summarise(args: Args, runs: list[dict]) -> dict:
    """Per variant: held-out reward mean ± std over seeds, Δ to the base, evaluation SE, updates, compute, CPU-s
    and the compute to reach the target (mean ± std over the seeds that reach it)."""
    out = {}
    for v in args.variants:
        rs = [r for r in runs if r["variant"] == v]
        m, s = mean_std([r["eval"] for r in rs])
        out[v] = {"eval_mean": m, "eval_std": s, "base": rs[0]["base"], "delta": m - rs[0]["base"],
                  "eval_se": statistics.fmean(r["eval_se"] for r in rs),
                  "updates": statistics.fmean(r["updates"] for r in rs),
                  "stage_updates": {k: statistics.fmean(r["stage_updates"].get(k, 0) for r in rs)
                                    for k in rs[0]["stage_updates"]},
                  "spent": statistics.fmean(r["spent"] for r in rs),
                  "cpu_s": statistics.fmean(r["cpu_s"] for r in rs), "seeds": len(rs)}
    base = statistics.fmean(s["base"] for s in out.values())
    best = max(s["eval_mean"] for s in out.values())
    target = base + args.fraction * (best - base)
    for v, s in out.items():
        hits = [first_reach(r["held_out"], target) for r in runs if r["variant"] == v]
        reached = [h for h in hits if h is not None]
        s["to_target"] = mean_std(reached) if reached else None
        s["reached"] = f"{len(reached)}/{len(hits)}"
    return {"variants": out, "target": target, "best": best, "base": base}


def orderings(summary: dict) -> list[str]:
    """The paper's orderings (ShortFT above each other variant), each marked as holding only where
    |Δmean| > std_a + std_b (as bench_toy.py), and each variant against the base (whose score has no spread)."""
    s = summary["variants"]
    lines = []
    for b in (*TABLE1[1:], *TABLE3[1:]):
        if "shortft" in s and b in s:
            d = s["shortft"]["eval_mean"] - s[b]["eval_mean"]
            spread = s["shortft"]["eval_std"] + s[b]["eval_std"]
            verdict = "holds" if d > spread else ("reversed" if -d > spread else "within the spread")
            lines.append(f"- shortft > {b}: {verdict} (difference {d:+.4f}, std_a + std_b {spread:.4f})")
    for v, x in s.items():
        verdict = "above" if x["delta"] > x["eval_std"] else ("below" if -x["delta"] > x["eval_std"] else "within")
        lines.append(f"- {v} vs the base: {verdict} the spread (Δ {x['delta']:+.4f}, std {x['eval_std']:.4f})")
    return lines


def unit_name(args: Args) -> str:
    return {"gflop": "GFLOP", "cpu_seconds": "CPU-s", "seconds": "s"}[args.budget_unit]


def table(args: Args, summary: dict, rows: tuple[str, ...], title: str) -> str:
    u = unit_name(args)
    head = (f"### {title}\n\n| variant | held-out reward (mean ± std, {len(args.seeds)} seeds) | Δ vs base | eval SE | "
            f"updates (per stage) | {u} to target ({summary['target']:.3f}; reached) | CPU-s of updates |\n"
            f"|---|---|---|---|---|---|---|\n")
    body = ""
    for v in rows:
        if (s := summary["variants"].get(v)) is None:
            continue
        stages = " + ".join(f"{n:.0f}" for n in s["stage_updates"].values()) if len(s["stage_updates"]) > 1 else ""
        reach = (f"{s['to_target'][0]:.0f} ± {s['to_target'][1]:.0f}" if s["to_target"] else "–") + f" ({s['reached']})"
        body += (f"| {v} | {s['eval_mean']:.4f} ± {s['eval_std']:.4f} | {s['delta']:+.4f} | {s['eval_se']:.4f} | "
                 f"{s['updates']:.0f}{f' ({stages})' if stages else ''} | {reach} | {s['cpu_s']:.0f} |\n")
    return head + body + "\n"


# ----------------------------------------------------------------------------- figures


def plot(args: Args, runs: list[dict], path: Path) -> None:
    """Left: held-out reward vs compute (mean ± std over seeds at each evaluation). Right: training reward (running
    mean of 20 updates) vs compute, mean ± std over seeds on a common grid; ShortFT's stage changes dotted."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    grid = np.linspace(0, args.budget, 80)
    for v in args.variants:
        rs = [r for r in runs if r["variant"] == v]
        k = min(len(r["held_out"]) for r in rs)
        x = np.mean([[p[0] for p in r["held_out"][:k]] for r in rs], 0)
        ys = np.array([[p[1] for p in r["held_out"][:k]] for r in rs])
        line, = ax.plot(x, ys.mean(0), marker="o", ms=3, label=v, lw=2.2 if v == "shortft" else 1.2)
        ax.fill_between(x, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(), alpha=0.15)
        curves = []
        for r in rs:
            t, y, _ = map(np.array, zip(*r["train"]))
            y = np.array([y[max(0, i - 19): i + 1].mean() for i in range(len(y))])
            curves.append(np.interp(grid, t, y))
        m, s = np.mean(curves, 0), np.std(curves, 0)
        ax2.plot(grid, m, color=line.get_color(), lw=2.2 if v == "shortft" else 1.2)
        ax2.fill_between(grid, m - s, m + s, color=line.get_color(), alpha=0.15)
    stages = [r for r in runs if r["variant"] == "shortft"]
    changes = sorted({c[2] for c in stages[0]["train"]})[1:] if stages else []
    for k in changes:  # the compute spent before ShortFT's first update of stage k, mean over seeds
        x = statistics.fmean(max([c[0] for c in r["train"] if c[2] < k], default=0.0) for r in stages)
        for a in (ax, ax2):
            a.axvline(x, color="k", ls=":", lw=0.8)
        ax2.text(x, 0.02, f" stage {k}", fontsize=7, transform=ax2.get_xaxis_transform())
    u = unit_name(args)
    ax.set_xlabel(f"{u} of updates")
    ax.set_ylabel(f"held-out reward ({args.reward}, {args.eval_samples} samples)")
    ax.legend(fontsize=7)
    ax2.set_xlabel(f"{u} of updates")
    ax2.set_ylabel("training reward (own chain), mean of 20 updates")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def before_after(args: Args, out: Path, columns: int = 20) -> None:
    """grids/<variant>.png: the tuned row of train_sd.py's last evaluation grid of seed `seeds[0]`, cut to the first
    `columns` samples; before_after.png: the base row (the plan's eval-n grid, top row), then each variant's row."""
    from PIL import Image

    with Image.open(sorted((out / "plan" / "eval-n").glob("eval_*.png"))[-1]) as im:
        side = im.height // 2
        rows = [im.crop((0, 0, min(im.width, columns * side), side))]
    for v in args.variants:
        with Image.open(sorted((out / "runs" / f"{v}-s{args.seeds[0]}").glob("eval_*.png"))[-1]) as im:
            rows.append(im.crop((0, 0, min(im.width, columns * side), side)))
        rows[-1].save(out / "grids" / f"{v}.png")
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
    for i, r in enumerate(rows):
        sheet.paste(r, (0, i * side))
    sheet.save(out / "before_after.png")


# ----------------------------------------------------------------------------- main


def main(args: Args) -> dict:
    """The benchmark (module docstring), its output folder locked while it runs (one writer)."""
    check_args(args)
    with runio.run_lock(out_dir(args) / ".lock", "benchmark folder"):
        return run(args)


def run(args: Args) -> dict:
    """`main` with checked arguments, in its locked output folder."""
    out = out_dir(args)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    w = guidance(args)
    t0, load0, clock0 = time.perf_counter(), os.getloadavg(), time.strftime("%Y-%m-%d %H:%M")
    print(f"plan: one short train_sd.py run per variant ({', '.join(args.variants)})", flush=True)
    steps = plan(args)
    runio.write_json(steps, out / "plan.json")
    for v in args.variants:
        p = steps[v]
        print(f"  {v:27s} " + ", ".join(f"stage {s}: {c:.2f} {unit_name(args)}/update ({p['cpu_s_per_update'][s]:.2f}"
                                         f" CPU-s) → {p['updates'][s]} updates" for s, c in p["per_update"].items())
              + f"; ≈ {steps['cost']['run_cpu_s'][v]:.0f} CPU-s per run", flush=True)
    print(f"  one held-out pass of {args.eval_samples} samples ≈ {steps['cost']['eval_pass_cpu_s']:.0f} CPU-s, "
          f"{args.evals} per run (the base: once); the bench ≈ {steps['cost']['bench_cpu_s'] / 3600:.2f} CPU-hours", flush=True)
    if args.plan_only:
        return steps
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    print(f"{len(jobs)} runs of train_sd.py, {args.budget:g} {unit_name(args)} of updates each, CFG {w}, "
          f"{args.workers} at once", flush=True)
    with ThreadPoolExecutor(args.workers) as pool:
        runs = list(pool.map(lambda j: run_one(args, j[0], j[1], steps[j[0]]["eval_every"]), jobs))
    wall, load = time.perf_counter() - t0, os.getloadavg()
    summary = summarise(args, runs)
    before_after(args, out)
    plot(args, runs, out / "reward_vs_gflop.png")
    settings = (f"reward `{args.reward}`, CFG {w}, LoRA rank {args.lora_rank}, lr {args.lr}, batch {args.batch_size}, "
                f"{args.budget:g} {unit_name(args)} of updates per run, seeds {args.seeds}, held-out {args.eval_samples} "
                f"samples ({args.eval_prompts}, {sampler_name(args)}, fixed seeds), {args.evals} evaluations per run; "
                f"base held-out reward {summary['base']:.4f}; target = base + {args.fraction} × (best − base). "
                f"Benchmark started {clock0}, {wall:.0f} s wall with {args.workers} process(es) on "
                f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average "
                f"{load0[0]:.1f} → {load[0]:.1f}; CPU-s of updates per run in the tables, "
                f"{sum(r['wall_s'] for r in runs):.0f} s wall for all runs")
    md = (f"Settings: {settings}\n\n" + table(args, summary, TABLE1, "Table 1 (methods)")
          + table(args, summary, TABLE3, "Table 3 (ablations)") + "Orderings (paper: ShortFT best):\n\n"
          + "\n".join(orderings(summary)) + "\n")
    runio.write_bytes(md.encode(), out / "table.md")
    runio.write_json({"args": dataclasses.asdict(args), "guidance": w, "wall_s": wall, "loadavg": [load0, load],
                      "plan": steps, "summary": summary, "runs": runs}, out / "metrics.json")
    print(md)
    return summary


if __name__ == "__main__":
    runio.cli(main, Args, check_args)
