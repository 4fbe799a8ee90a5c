"""The miniature SD's two longest checks, in a file of their own so that test processes can run them beside the rest
of tests/test_minisd.py: train_sd.py raises the digit reward (its LoRA read by a stock pipeline), and bench_minisd.py
spends equal GFLOP and reuses finished runs. Not part of the paper's method: the digits world's contract (minisd.py)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import minisd
import rewards
import sd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def build(minisd_build):
    """The reduced build, once for the whole test run (conftest.py): (args, report)."""
    return minisd_build


def test_train_sd_lora_raises_the_digit_reward_in_a_stock_pipeline(build, tmp_path):
    """train_sd.py (DRaFT-K, the cheapest chain, 30 updates) on the reduced build; its LoRA folder, loaded with
    sd.prepare_pipeline into a StableDiffusionPipeline from the build's folder, raises the mean digit reward of
    the pipeline's samples on fixed seeds (never used in training) over the same pipeline with the LoRA off."""
    from diffusers import StableDiffusionPipeline

    import train_sd

    args, report = build
    root = Path(args.out)
    classifier = str(root / "classifier.safetensors")
    run = train_sd.main(train_sd.Args(
        model=str(root / "pipeline"), reward="digit", digit_classifier=classifier, method="draft_k",
        resolution=32, guidance=report["guidance"]["chosen"], lora_rank=4, lora_alpha=4.0, lr=5e-2, steps=30,
        batch_size=4, train_prompts=str(ROOT / "prompts/digits_train.txt"),
        eval_prompts=str(ROOT / "prompts/digits_eval.txt"), eval_samples=1, eval_every=0, save_every=0,
        out_dir=str(tmp_path), name="digit"))
    reward = rewards.make_reward("digit", digit_classifier=classifier)
    prompts = [minisd.prompt(d) for d in range(10)] * 2
    pipe = StableDiffusionPipeline.from_pretrained(root / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = sd.prepare_pipeline(pipe, run["run_dir"] / "lora")

    def mean_reward(**kw):
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
        with torch.no_grad():
            return reward(pipe(prompts, generator=gens, output_type="pt", **kw).images, prompts).mean().item()

    tuned = mean_reward(**kwargs)
    pipe.disable_lora()
    base = mean_reward(num_inference_steps=50, guidance_scale=kwargs["guidance_scale"])
    assert tuned > base + 0.15, (base, tuned)  # about half the rise measured on this build (README)


class ForkedTrainSd:
    """Stands in for bench_minisd.train's `subprocess.Popen(["python", "train_sd.py", …])`: the same argv, through what
    train_sd.py's __main__ runs (runio.cli), in a forked copy of this process, its output into the run's log, so that
    bench_minisd's os.wait4 reads the exit status and the CPU-seconds of a real child process. What is saved is
    starting Python and importing torch and diffusers four times; the bench's logic is unchanged."""

    def __init__(self, cmd, env, stdout, stderr, text):
        import runio
        import train_sd

        assert Path(cmd[1]).name == "train_sd.py" and stderr is subprocess.STDOUT, cmd
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.environ.clear()
                os.environ.update(env)
                sys.stdout = sys.stderr = stdout
                runio.cli(train_sd.main, train_sd.Args, train_sd.check_args, cmd[2:])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                stdout.flush()
                os._exit(code)


@pytest.mark.slow
def test_bench_minisd_spends_equal_gflop_and_reuses_finished_runs(build, tmp_path, monkeypatch):
    """bench_minisd.py on the reduced build at a small GFLOP budget (ShortFT, four times its costliest update): the
    plan's per-stage costs (its run has seed 0) are exactly what the bench's run (seed 1) spends per update, since
    FLOPs depend on the chain alone; the run stops at the first update that reaches the budget, after all four
    stages; it is evaluated at --eval-every and at the end; the table and the before/after sheet are written; a
    second call reuses the plan and the finished run and gives the same summary."""
    import bench_minisd

    monkeypatch.setattr(bench_minisd, "subprocess", SimpleNamespace(Popen=ForkedTrainSd, STDOUT=subprocess.STDOUT))
    args, _ = build
    bench = bench_minisd.Args(minisd=args.out, out=str(tmp_path / "bench"), variants=["shortft"], seeds=[1],
                              eval_samples=3, evals=2)
    cost = bench_minisd.plan(bench)["shortft"]["per_update"]
    assert sorted(cost) == [1, 2, 3, 4] and cost[1] < cost[4]  # stage 4 runs the most no-grad steps
    bench = dataclasses.replace(bench, budget=4 * max(cost.values()))  # each stage's share buys at least one update
    summary = bench_minisd.main(bench)
    out = Path(bench.out)
    rows = [json.loads(line) for line in (out / "runs" / "shortft-s1" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    spent = [r["budget/spent"] for r in train]
    assert spent[-1] >= bench.budget > spent[-2]
    assert [r["stage"] for r in train] == sorted(r["stage"] for r in train) and {r["stage"] for r in train} == {1, 2, 3, 4}
    steps = [b - a for a, b in zip([0.0] + spent, spent)]
    assert all(d == pytest.approx(cost[r["stage"]], rel=1e-9) for d, r in zip(steps, train))
    evals = [r["update"] for r in rows if "eval/reward_mean" in r]
    assert len(evals) >= 2 and evals[-1] == len(train)
    s = summary["variants"]["shortft"]
    assert s["seeds"] == 1 and s["updates"] == len(train) and s["spent"] == spent[-1]
    assert "| shortft |" in (out / "table.md").read_text()
    from PIL import Image

    with Image.open(out / "before_after.png") as im:
        assert im.size == (3 * 32, 2 * 32)  # the base row and ShortFT's row, 3 samples
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/bench.json")}
    assert len(stamps) == 4 and bench_minisd.main(bench) == summary  # plan: shortft, eval-1, eval-n; the run
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/bench.json")} == stamps
