"""bench_sd.py on tiny components on CPU: ShortFT runs one timed update per progressive stage and their schedule
average, every baseline one; ratios are to the average; evaluation counts match the chains; the table is written as
JSON and Markdown. (No timing asserts.)

Run: python -m pytest -q tests/test_bench_sd.py
"""

import json

import pytest
import torch

import bench_sd
import shortft

GRID = shortft.ddim_timesteps(10)
POINTS = [701, 401, 201, 1]


def test_bench_tiny_cpu_every_method_and_stage(tmp_path):
    out = tmp_path / "bench"
    args = bench_sd.Args(tiny=True, device="cpu", batch_sizes=[1], warmup=0, repeats=1, num_steps=10,
                         lora_points=POINTS, refl_last=3, lora_rank=4, out=str(out))
    rows = bench_sd.main(args)
    assert [(r["method"], r["stage"]) for r in rows] == [("shortft", s) for s in (1, 2, 3, 4, "avg")] + \
        [(m, "-") for m in shortft.METHODS if m != "shortft"]
    by = {(r["method"], r["stage"]): r for r in rows}
    for stage in (1, 2, 3, 4):  # each stage's own chain was timed
        cost = shortft.chain_cost(shortft.shortft(GRID, POINTS, stage))
        row = by["shortft", stage]
        assert (row["grad_evals"], row["no_grad_evals"]) == (cost["grad"], cost["no_grad"])
    avg = by["shortft", "avg"]
    assert avg["ratio_to_shortft"] == 1.0
    assert avg["s_per_update"] == pytest.approx(sum(by["shortft", s]["s_per_update"] for s in (1, 2, 3, 4)) / 4)
    assert avg["grad_evals"] == pytest.approx((7 + 5 + 3 + 1) / 4)
    assert all(r["s_per_update"] > 0 and r["ratio_to_shortft"] > 0 for r in rows)
    assert by["full", "-"]["grad_evals"] == 10 and by["full", "-"]["no_grad_evals"] == 0
    assert by["draft_k", "-"]["grad_evals"] == 1 and by["draft_k", "-"]["no_grad_evals"] == 9
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert "| shortft | avg | 1 |" in out.with_suffix(".md").read_text()


def test_bench_stage_schedule_weights(tmp_path):
    """--stage-fractions weights the average; --no-progressive times stage 1 only."""
    rows = bench_sd.main(bench_sd.Args(tiny=True, device="cpu", batch_sizes=[1], warmup=0, repeats=1, num_steps=10,
                                       lora_points=POINTS, stage_fractions=[1, 1, 1, 5], methods=["shortft"],
                                       lora_rank=4, out=str(tmp_path / "a")))
    by = {r["stage"]: r for r in rows}
    assert by["avg"]["grad_evals"] == pytest.approx((7 + 5 + 3 + 5 * 1) / 8)
    rows = bench_sd.main(bench_sd.Args(tiny=True, device="cpu", batch_sizes=[1], warmup=0, repeats=1, num_steps=10,
                                       lora_points=POINTS, progressive=False, methods=["shortft"], lora_rank=4,
                                       out=str(tmp_path / "b")))
    assert [r["stage"] for r in rows] == [1, "avg"] and rows[1]["grad_evals"] == 7


def test_bench_bad_input():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        bench_sd.main(bench_sd.Args(tiny=True, device="cpu", methods=["nope"]))
    with pytest.raises(ValueError, match="--method full: is not used by the benchmark"):
        bench_sd.main(bench_sd.Args(tiny=True, device="cpu", method="full"))
    with pytest.raises(ValueError, match="not on the 10-step grid"):
        bench_sd.main(bench_sd.Args(tiny=True, device="cpu", num_steps=10, lora_points=[761, 1]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            bench_sd.main(bench_sd.Args(tiny=True, device="cuda"))


def test_bench_tiny_sd3_cpu(tmp_path):
    """--arch sd3 --tiny: the same rows on a tiny SD3 (flow grid, transformer, CFG jumps); the chains are the flow
    grid's and the table says which model and grid it timed."""
    grid = shortft.flow_timesteps(10, 3.0)
    points = [913.3, 707.3, 464.9, 8.9]  # grid steps 2, 5, 7, 9, typed to one decimal
    out = tmp_path / "bench3"
    rows = bench_sd.main(bench_sd.Args(arch="sd3", tiny=True, device="cpu", batch_sizes=[1], warmup=0, repeats=1,
                                       num_steps=10, lora_points=points, methods=["shortft", "draft_k", "full"],
                                       lora_rank=4, out=str(out)))
    assert [(r["method"], r["stage"]) for r in rows] == [("shortft", s) for s in (1, 2, 3, 4, "avg")] + \
        [("draft_k", "-"), ("full", "-")]
    exact = (grid[2], grid[5], grid[7], grid[9])
    for r in rows[:4]:
        cost = shortft.chain_cost(shortft.shortft(grid, exact, r["stage"]))
        assert (r["grad_evals"], r["no_grad_evals"]) == (cost["grad"], cost["no_grad"])
    assert rows[-1]["grad_evals"] == 10 and all(r["s_per_update"] > 0 for r in rows)
    table = out.with_suffix(".md").read_text()
    assert "tiny SD3.5-medium" in table and "10-step Euler grid (shift 3), T5 off" in table and "CFG 7.0" in table
