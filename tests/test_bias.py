"""Gradient bias (measure_toy.gradient_bias, bench_bias.py) on a tiny toy world: the complete chain's gradient is the
exact one, ShortFT's last stage is exact, a method's draws are its whole support with equal weight (so their mean is
its exact expectation), the mean of an unbiased estimator's draws is the exact gradient while AlignProp's is not,
and the benchmark script runs end to end on a tiny budget."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench_bias
import measure_toy
import shortft
import toy

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden=16, depth=1, pretrain_steps=30, pretrain_batch=64, shortcut_rank=4, distill_steps=10,
            distill_pairs=128, distill_batch=64)
P = shortft.PAPER_LORA_POINTS


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    toy.build_toy(toy.WorldArgs(cache_dir=str(path), **TINY), P)  # pretrain + distil once for the module
    return path


def world(cache, points=None, aware=True) -> toy.Toy:
    """The tiny world with every trainable A and B drawn non-zero, so that A and B both get gradient."""
    w = toy.build_toy(toy.WorldArgs(cache_dir=str(cache), **TINY), points, aware)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in w.tuned_params():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return w


def batch(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, generator=g), torch.randint(0, 4, (n,), generator=g)


REWARD = toy.make_reward("region:1,quality:1", toy.WorldArgs())


def test_complete_chain_gradient_is_the_exact_one(cache):
    """`full` (checkpointed, as it trains) sends exactly the gradient of the complete chain: cosine 1, norm ratio 1."""
    w = world(cache)
    x_T, c = batch()
    out = measure_toy.gradient_bias(w, [(shortft.full(w.grid, checkpoint=True), None)], w.names, x_T, c, REWARD)
    assert out["mean_cos"] == pytest.approx(1.0, abs=1e-6) and out["mean_rel_norm"] == pytest.approx(1.0, abs=1e-5)
    draws = measure_toy.method_draws("full", w.grid, {})
    assert len(draws) == 1 and draws[0][1] is None


def test_shortft_last_stage_is_exact_and_stage_one_is_not(cache):
    """Stage k trains LoRA_k, which acts only at the last step p_k: everything before it is independent of LoRA_k, so
    the no-grad prefix loses nothing and stage k's gradient is the exact one. Stage 1 truncates segment 1 and jumps
    with the shortcut, so its gradient into LoRA_1 … LoRA_k is not."""
    w = world(cache, P)
    x_T, c = batch()
    exact = measure_toy.branch_gradients(w, measure_toy.exact_chain(w.grid, P), x_T, c, REWARD)
    k = len(P)
    last = measure_toy.method_draws("shortft", w.grid, dict(points=P, stage=k))
    out = measure_toy.gradient_bias(w, last, [w.names[-1]], x_T, c, REWARD, exact)
    assert out["mean_cos"] == pytest.approx(1.0, abs=1e-6) and out["mean_rel_norm"] == pytest.approx(1.0, abs=1e-5)
    first = measure_toy.method_draws("shortft", w.grid, dict(points=P, stage=1))
    out = measure_toy.gradient_bias(w, first, w.names, x_T, c, REWARD, exact)
    assert out["mean_cos"] < 1 - 1e-4


@pytest.mark.parametrize("method, switches, size", [("alignprop", {}, 50), ("refl", dict(last=10), 10),
                                                    ("drtune", dict(k=5), 10)])
def test_draws_enumerate_the_whole_support_once(method, switches, size):
    """Each value the builder can draw gives exactly one chain, so the plain mean over draws is the expectation."""
    grid = shortft.ddim_timesteps(50)
    draws = measure_toy.method_draws(method, grid, switches)
    assert len(draws) == size and len({tuple(ch.trunk) for ch, _ in draws}) == size
    if method == "alignprop":  # K = 1 … N, in order: the k-th chain has k gradient steps
        assert [shortft.chain_cost(ch)["grad"] for ch, _ in draws] == list(range(1, 51))
    lv = measure_toy.method_draws("draft_lv", grid, dict(n=2), noise_draws=5)
    assert [s for _, s in lv] == list(range(5))


def test_unbiased_estimator_expectation_is_exact_and_alignprop_is_biased(cache):
    """Truncated gradients are nested sums of per-step contributions: g_K = c_N + … + c_{N−K+1}. So N (g_K − g_{K−1})
    with K ~ U[1, N] is an unbiased estimator of the exact gradient (its expectation telescopes to g_N = g*), while
    AlignProp's own g_K has expectation Σ_j (j/N) c_j, which down-weights the early steps: biased. On a 10-step grid."""
    w = world(cache)
    w.grid = shortft.ddim_timesteps(10)
    x_T, c = batch()
    draws = measure_toy.method_draws("alignprop", w.grid, {})
    n = len(draws)
    g = [measure_toy.draw_gradient(w, ch, s, w.names, x_T, c, REWARD) for ch, s in draws]
    exact = measure_toy.branch_gradients(w, measure_toy.exact_chain(w.grid, None), x_T, c, REWARD)["tuned_1"]
    unbiased = [n * (b - a) for a, b in zip([torch.zeros_like(g[0])] + g[:-1], g)]
    assert measure_toy.cosine(torch.stack(unbiased).mean(0), exact) == pytest.approx(1.0, abs=1e-6)
    assert torch.stack(unbiased).mean(0).norm() / exact.norm() == pytest.approx(1.0, abs=1e-4)
    assert min(measure_toy.cosine(u, exact) for u in unbiased) < 0.99  # one draw alone is noisy
    own = measure_toy.gradient_bias(w, draws, w.names, x_T, c, REWARD)
    assert own["mean_cos"] < 1 - 1e-4 and own["mean_rel_norm"] < 0.9


def test_bench_runs_on_a_tiny_budget(cache, tmp_path):
    """The script end to end: full is exact at every point, ShortFT's last stage too, the trained stage is marked."""
    argv = ["--cache-dir", str(cache), *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in TINY.items()), []),
            "--out-dir", str(tmp_path), "--configs", "full", "shortft", "drtune", "--points", "1", "2",
            "--batches", "2", "--batch-size", "8"]
    metrics = bench_bias.main(argv)
    out = tmp_path / "bias"
    assert {"table.md", "metrics.json", "grad_bias.png"} <= {p.name for p in out.iterdir()}
    s = json.loads((out / "metrics.json").read_text())["summary"]
    for u in ("0", "1", "2"):
        assert s["full chain"]["points"][u]["mean_cos"][0] == pytest.approx(1.0, abs=1e-6)
        assert s["ShortFT, stage 4"]["points"][u]["mean_cos"][0] == pytest.approx(1.0, abs=1e-6)
    assert s["DRTune (K = 5)"]["draws"] == 10
    assert s["ShortFT, stage 1"]["active"]["0"] and s["ShortFT, stage 4"]["active"]["2"]
    assert metrics["summary"].keys() == s.keys()


def test_bench_bad_points_is_one_line():
    r = subprocess.run([sys.executable, "bench_bias.py", "--points", "50", "10"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--points" in r.stderr and len(r.stderr.strip().splitlines()) == 1
