"""bench_sd.py on tiny components on CPU: every method runs one timed update, ratios are to ShortFT,
evaluation counts match the chains, the table is written as JSON and Markdown. (No timing asserts.)"""

import json

import pytest
import torch

import bench_sd
import shortft




def test_bench_tiny_cpu_every_method(tmp_path):
    out = tmp_path / "bench"
    rows = bench_sd.main(bench_sd.Args(tiny=True, device="cpu", batch_sizes=[1], warmup=0, repeats=1, num_steps=10,
                                       out=str(out)))
    assert [r["method"] for r in rows] == list(shortft.METHODS)
    by = {r["method"]: r for r in rows}
    assert by["shortft"]["ratio_to_shortft"] == 1.0
    assert all(r["s_per_update"] > 0 and r["ratio_to_shortft"] > 0 for r in rows)
    assert by["full"]["grad_evals"] == 10 and by["full"]["no_grad_evals"] == 0
    assert by["draft_k"]["grad_evals"] == 1 and by["draft_k"]["no_grad_evals"] == 9
    assert by["shortft"]["grad_evals"] <= 5  # 1 trained step + ≤ 4 jumps
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["rows"]) == len(shortft.METHODS)
    assert "| shortft | 1 |" in out.with_suffix(".md").read_text()


def test_bench_bad_input():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        bench_sd.main(bench_sd.Args(tiny=True, device="cpu", methods=["nope"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            bench_sd.main(bench_sd.Args(tiny=True, device="cuda"))
