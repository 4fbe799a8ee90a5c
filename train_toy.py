"""Fine-tune the toy world with one reward-backpropagation method: ShortFT (paper Sec. 3) or a baseline.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604. The loop maximises E_{c, x_T} r(Sample(θ, c, x_T), c) by gradient ascent, where
Sample is the method's training chain (`shortft.make_chain`) and, for evaluation and for the saved model, the
ordinary 50-step DDIM sampler (`shortft.sampling_chain`). With ShortFT the k stacked LoRA branches are trained in
k progressive stages: stage i trains LoRA_i … LoRA_k through the chain of stage i.

Notation (code -> paper): `names[i]` = tuned_{i+1} = LoRA_{i+1}; `stage` = i; progress = share of the budget spent;
r(x_0, c) the reward; world / base / shortcut: toy.py.

Run: python train_toy.py --method shortft --budget 10       (writes runs/toy-shortft/; --help lists every switch)
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import budget
import chain_args
import rewards
import runio
import shortft
import toy


@dataclass
class Args(toy.WorldArgs, chain_args.ChainArgs):
    """Fine-tune the 2D toy diffusion with one reward-backpropagation method (ShortFT or a baseline)."""

    name: str = ""
    """run folder: <out-dir>/<name>/ (args.json, metrics.jsonl, checkpoints/, lora.safetensors, summary.json); empty:
    toy-<method>.
    A new run refuses a folder that holds another run's checkpoints (--resume it, or choose another name)"""
    out_dir: str = "runs"
    """parent of run folders"""
    seed: int = 0
    """seed of the fine-tuning: LoRA init, x_T and class draws, chain draws (the world has --world-seed)"""
    reward: str = "region:1,quality:1"
    """reward spec (rewards.py, toy names: region, quality, class_agreement, class_shift, mode_shift; 'a:1,b:2'
    sums them): the default pulls every class into a disc at the top mode while keeping samples on the ring"""
    lr: float = 1e-3
    """Adam learning rate of the trainable LoRA branches (at most 1)"""
    max_grad_norm: float = 1.0
    """clip the gradient norm (0: no clipping); NaN/inf gradients, or weights an update makes NaN/inf, skip it"""
    lora_rank: int = 4
    """rank of each trainable LoRA branch"""
    lora_alpha: float = 4.0
    """LoRA α (the update is scaled by α/rank)"""
    batch_size: int = 64
    """x_T samples (with random classes) per update"""
    budget: float = 50.0
    """training budget in --budget-unit"""
    budget_unit: str = "gflop"
    """what the budget counts, updates only (evaluation excluded): gflop (the FLOPs of the updates, budget.py: the same
    on every machine, so a run is bit-reproducible), updates, cpu_seconds (this process's CPU time, one thread) or
    seconds (wall-clock)"""
    evals: int = 10
    """held-out evaluations, evenly spaced over the budget (plus one before training)"""
    eval_batch: int = 512
    """size of the fixed held-out batch (x_T, class) of the evaluation (50-step sampler)"""
    save_every: int = 0
    """save a checkpoint every this many updates (0: only at the end)"""
    resume: bool = False
    """continue from the run folder's newest checkpoint that loads (bit-exact with --budget-unit gflop or updates); the
    settings of the model and the method (RESUME_KEYS) must be the saved run's"""
    threads: int = 1
    """torch CPU threads (one is as fast for this small MLP, and robust on a shared machine)"""
    overwrite: bool = False
    """a new run replaces the run the folder holds (a finished model, checkpoints); without it such a folder is refused"""
    max_skipped: int = 20
    """stop (one line, exit 2) after this many updates in a row skipped for NaN/inf gradients or weights (0: never)"""


RESUME_KEYS = tuple(f.name for f in dataclasses.fields(chain_args.ChainArgs)) + \
    tuple(f.name for f in dataclasses.fields(toy.WorldArgs) if f.name != "cache_dir") + \
    ("seed", "reward", "lora_rank", "lora_alpha", "budget_unit")
"""What --resume keeps: the settings that make the model, the LoRA branches and the method (a resumed run may
change --lr, --batch-size, --budget, --evals, …)."""


def check_args(args: Args) -> None:
    """Every argument, in field order, before anything is built: one line `--flag VALUE: what to do` (a ValueError)."""
    if args.method in shortft.METHODS:
        runio.require(args.num_steps in (0, toy.NUM_STEPS), "num_steps", args.num_steps,
                      f"the toy world runs SD1.5's {toy.NUM_STEPS}-step grid (its shortcut is distilled on it)")
    chain_args.check_chain_args(args)
    toy.check_world_args(args)
    if args.name:
        runio.check_run_name(args.name, out_flag="--out-dir")
    runio.check_writable_dir("--out-dir", args.out_dir)
    runio.require_range("seed", args.seed, 0, 2**32 - 1)
    runio.check_arg("reward", args.reward, rewards.check_reward_spec, args.reward, rewards.TOY_REWARDS)
    runio.require_range("lr", args.lr, 0, 1, low_open=True, what="Adam moves each weight by about lr per update")
    runio.require_range("max_grad_norm", args.max_grad_norm, 0, what="0: no clipping")
    runio.require_range("lora_rank", args.lora_rank, 1, 1024)
    runio.require_range("lora_alpha", args.lora_alpha, 0, 1e4, low_open=True)
    runio.require_range("batch_size", args.batch_size, 1, toy.MAX_SIZE)
    runio.require_range("budget", args.budget, 0, low_open=True)
    runio.require(args.budget_unit in budget.UNITS, "budget_unit", args.budget_unit, f"use {', '.join(budget.UNITS)}")
    runio.require_range("evals", args.evals, 1)
    runio.require_range("eval_batch", args.eval_batch, 2, toy.MAX_SIZE)
    runio.require_range("save_every", args.save_every, 0, what="0: only at the end")
    runio.require_range("threads", args.threads, 1, os.cpu_count() or 1, what="at most this machine's CPU cores")
    runio.require_range("max_skipped", args.max_skipped, 0, what="0: never stop")


def check_state(state: dict) -> None:
    """What --resume reads from a checkpoint's state.json besides the RNG and optimizer (runio.check_checkpoint): the
    loop's counters (runio.check_run_state), the evaluations done (a count) and the chain RNG (a Python random state).
    ValueError or KeyError: the checkpoint is skipped for the previous one."""
    runio.check_run_state(state, ("evals", "chain_rng"))
    if not (isinstance(state["evals"], int) and not isinstance(state["evals"], bool) and state["evals"] >= 0):
        raise ValueError(f"its evaluation count {state['evals']!r} is not a count")
    runio.check_python_random_state(state["chain_rng"], "its chain RNG state")


def set_trainable(world: toy.Toy, stage: int) -> tuple[int, ...]:
    """Progressive training: requires_grad exactly on LoRA_i … LoRA_k of stage i (all other adapters, the shortcut and
    the base frozen). Returns the trainable branch indices."""
    trainable = shortft.trainable_loras(stage, world.points, world.timestep_aware)
    for i, name in enumerate(world.names):
        for p in world.tuned_params([name]):
            p.requires_grad_(i in trainable)
    return trainable


def train(args: Args, log=print, check=lambda: None) -> dict:
    """Fine-tune one method for `args.budget`; writes the run folder and returns its summary (final evaluation,
    updates, what they spent, the evaluation rows). A new run (not --resume) replaces whatever run the folder held,
    checkpoints included; the command line (`run`) refuses such a folder instead (`check`). The folder is locked for
    the whole run (one writer); the first SIGINT / SIGTERM stops it after the update, with a checkpoint."""
    run_dir = run_folder(args)

    def checks():  # before anything is built or written, and again once the folder is locked
        check()
        if args.resume:  # something to resume, made with these settings
            runio.check_resume(run_dir, args, RESUME_KEYS)

    with runio.run_lock(run_dir / ".lock", check=checks), runio.graceful_stop():
        return _train(args, log, run_dir)


def _train(args: Args, log, run_dir: Path) -> dict:
    torch.set_num_threads(args.threads)
    grid, schedule = shortft.ddim_timesteps(toy.NUM_STEPS), shortft.make_schedule()
    points, aware = chain_args.layout(args, grid, schedule)
    k = chain_args.num_stages(args, grid, schedule)
    world = toy.build_toy(args, points, aware, args.lora_rank, args.lora_alpha, args.seed)
    names, params = world.names, world.tuned_params()
    reward_fn, quality = toy.make_reward(args.reward, args), toy.make_reward("quality", args)
    x_eval, c_eval = toy.eval_batch(args, args.eval_batch)
    probe = x_eval[:8], c_eval[:8]  # fail fast: every denoiser, the chain and the reward finite, before anything is written
    chain_args.probe_chain(shortft.make_chain(args.method, grid, random.Random(0),
                                              **chain_args.chain_switches(args, points, 1)),
                           probe[0], toy.make_denoisers(world, probe[1]), world.schedule,
                           lambda x0: reward_fn(x0, probe[1]))
    opt = torch.optim.Adam(params, lr=args.lr)
    torch.manual_seed(args.seed)
    chain_rng = random.Random(args.seed)
    spent, state = budget.Spent(), {"skipped": 0, "evals": 0}
    if args.resume:  # weights, optimizer, torch/python/numpy RNGs, loop state, chain RNG
        ckpt, weights, saved = runio.resume_checkpoint(run_dir, opt, expect=world.tuned_state(),
                                                       check_state=check_state)
        world.load_tuned_state(weights)
        state = {k_: saved[k_] for k_ in state}
        spent = budget.Spent(**saved["spent"])
        chain_rng.setstate(runio.check_python_random_state(saved["chain_rng"], "its chain RNG state"))
        runio.keep_jsonl_until(run_dir / "metrics.jsonl", spent.updates)  # rows after the checkpoint come again
        log(f"resumed from {ckpt} at update {spent.updates}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for old in ("metrics.jsonl", "lora.safetensors"):
            (run_dir / old).unlink(missing_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)  # written again when this run finishes
    runio.write_json(dataclasses.asdict(args), run_dir / "args.json")
    base_reward = reward_fn(toy.sample(world, x_eval, c_eval, shortft.BASE), c_eval).mean().item()
    grad_evals = {s: shortft.chain_cost(shortft.make_chain(args.method, grid, random.Random(0),
                                                           **chain_args.chain_switches(args, points, s)))["grad"]
                  for s in range(1, k + 1)}
    log(f"{args.method}: LoRA branches {names} ({sum(p.numel() for p in params)} params) at points {points or 'every step'}; "
        f"gradient evaluations per update by stage {grad_evals}; budget {args.budget:g} {args.budget_unit}; "
        f"base's held-out reward {base_reward:.3f}")
    if args.budget_unit == "updates" and (gaps := chain_args.stage_gaps(args, k, math.ceil(args.budget))):
        print(gaps, file=sys.stderr)
    meter, in_a_row = budget.FlopMeter(), 0

    def progress() -> float:
        return min(spent.of(args.budget_unit) / args.budget, 1.0)

    def evaluate() -> dict:  # the ordinary 50-step sampler on the fixed held-out batch, no RNG drawn
        x0 = toy.sample(world, x_eval, c_eval)
        r = reward_fn(x0, c_eval)
        row = {"update": spent.updates, "stage": stage, "budget/spent": spent.of(args.budget_unit),
               "compute/gflop": spent.gflop, "time/cpu_s": spent.cpu_seconds,
               "eval/reward_mean": r.mean().item(), "eval/reward_std": r.std().item(),
               "eval/base_reward_mean": base_reward, "eval/quality_mean": quality(x0, c_eval).mean().item()}
        runio.append_jsonl(row, run_dir / "metrics.jsonl")
        state["evals"] = int(progress() * args.evals) + 1  # the next evaluation is due at progress evals / E
        return row

    def save() -> Path:
        version, internal, gauss = chain_rng.getstate()
        return runio.save_checkpoint(run_dir, spent.updates, world.tuned_state(), opt,
                                     {**state, "spent": dataclasses.asdict(spent),
                                      "chain_rng": [version, list(internal), gauss]})

    stage, trainable = chain_args.stage_of(args, progress(), k), None
    if state["evals"] == 0:
        evaluate()
    while progress() < 1.0:
        stage, prev = chain_args.stage_of(args, progress(), k), stage
        if args.budget_unit != "updates" and (jump := chain_args.stage_jump(prev, stage, spent.updates)):
            print(jump, file=sys.stderr)
        if trainable != shortft.trainable_loras(stage, points, aware):
            trainable = set_trainable(world, stage)
        watch = budget.Stopwatch()
        # --- sample ---: x_T ~ N(0, I), random classes (the "prompts"), and this update's chain
        x_T = torch.randn(args.batch_size, 2)
        cond = torch.randint(0, args.classes, (args.batch_size,))
        chain = shortft.make_chain(args.method, grid, chain_rng, **chain_args.chain_switches(args, points, stage))

        # --- reward ---: L = −mean r(x_0, c), x_0 the end of the training chain, and its gradient
        def forward_backward():
            loss, r = shortft.reward_loss(x_T, chain, toy.make_denoisers(world, cond), world.schedule,
                                          lambda x0: reward_fn(x0, cond))
            loss.backward()
            return loss, r

        gflop = meter.gflop(budget.update_kind(chain, args.batch_size, trainable), forward_backward, params)
        loss, r = forward_backward()
        # --- update ---: one Adam step on the stage's branches; NaN/inf never reaches the weights
        applied, gnorm = runio.guarded_step(opt, params, args.max_grad_norm)
        state["skipped"] += not applied
        in_a_row = 0 if applied else in_a_row + 1
        runio.check_skipped(in_a_row, args.max_skipped, spent.updates + 1)
        wall = watch.add_to(spent, gflop)
        runio.append_jsonl({"update": spent.updates, "stage": stage, "loss": loss.item(), "reward/train": r.mean().item(),
                            "grad/norm": gnorm, "update/skipped": state["skipped"], "time/update_s": wall,
                            "budget/spent": spent.of(args.budget_unit), "compute/gflop": spent.gflop,
                            "time/cpu_s": spent.cpu_seconds, "chain/grad_evals": shortft.chain_cost(chain)["grad"]},
                           run_dir / "metrics.jsonl")
        if progress() >= state["evals"] / args.evals:
            evaluate()
        saved = save() if args.save_every and spent.updates % args.save_every == 0 else None
        if runio.stop_requested():  # SIGINT / SIGTERM: this update is done; checkpoint it and stop
            raise runio.interrupted(f"update {spent.updates} (checkpoint {saved or save()})")
    save()
    runio.save_tensors(world.tuned_state(), run_dir / "lora.safetensors",
                       {"points": str(list(points or [])), "timestep_aware": str(aware), "names": ",".join(names)})
    rows = [row for row in runio.read_jsonl(run_dir / "metrics.jsonl") if "eval/reward_mean" in row]
    n = max(spent.updates, 1)
    summary = {"final": rows[-1], "updates": spent.updates, "spent": dataclasses.asdict(spent),
               "skipped": state["skipped"], "per_update": {u: spent.of(u) / n for u in budget.UNITS if u != "updates"},
               "evals": rows, "run_dir": str(run_dir)}
    runio.write_json(summary, run_dir / "summary.json")  # last: its presence marks a finished run
    return summary


def run_folder(args: Args) -> Path:
    """<out-dir>/<name>, the name defaulting to toy-<method>."""
    return Path(args.out_dir) / (args.name or f"toy-{args.method}")


def run(args: Args) -> dict:
    """The command line's run, with checked arguments: a new run refuses a folder that holds another run's checkpoints
    (pass --resume, or choose another --name); train, then print the summary line."""
    def fresh():  # a new run never mixes into, nor replaces by accident, another run's folder
        if not (args.resume or args.overwrite):
            runio.check_fresh(run_folder(args), "--name")
            runio.check_not_finished(run_folder(args), ("lora.safetensors",), args.overwrite)

    out = train(args, check=fresh)
    f = out["final"]
    print(f"{args.method}: {out['updates']} updates, {out['spent']['gflop']:.1f} GFLOP, "
          f"{out['spent']['cpu_seconds']:.1f} CPU-s "
          f"({out['skipped']} skipped); held-out reward {f['eval/reward_mean']:.3f} ± {f['eval/reward_std']:.3f} "
          f"(base {f['eval/base_reward_mean']:.3f}), ring quality {f['eval/quality_mean']:.2f}; {out['run_dir']}")
    return out


def main(argv: list[str] | None = None) -> dict:
    """The command line: bad arguments, and runs that cannot be resumed, end in one line and exit status 2."""
    return runio.cli(run, Args, check_args, argv)


if __name__ == "__main__":
    main()
