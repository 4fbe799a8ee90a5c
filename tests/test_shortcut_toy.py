"""Toy shortcut (shortcut.py, toy section; toy.py): the teacher map against shortft's own DDIM chain, the
central-difference JVP against forward-mode AD, adapter save/load, the chain's jump pairs, and a distillation
budget test (trajectory error from x_T and on the paper's jumps 741→501, 481→261, 241→1)."""

import pytest
import torch

import measure_toy
import runio
import shortcut
import shortft
import toy


def linear_eps(x, t, s, c):
    """An exact ε for N(0, σ² I) data with σ = 2: ε(x_t) = √(1−ᾱ_t) x_t / (ᾱ_t σ² + 1 − ᾱ_t)."""
    a = shortcut.alpha_bar_at(shortft.make_schedule(), t)[:, None]
    return (1 - a).sqrt() * x / (4 * a + 1 - a)


def test_alpha_bar_at_matches_schedule():
    sch = shortft.make_schedule()
    t = torch.tensor([999, 500, 0, shortft.CLEAN])
    assert torch.allclose(shortcut.alpha_bar_at(sch, t).double(),
                          torch.tensor([sch.alpha_bar(int(v)) for v in t], dtype=torch.float64), atol=1e-7)


def test_teacher_map_equals_shortft_chain_on_the_grid():
    sch, grid = shortft.make_schedule(), shortft.ddim_timesteps(50)
    x = torch.randn(6, 2)
    pairs = [(grid[0], shortft.CLEAN), (grid[3], grid[20]), (grid[10], grid[11]), (grid[40], shortft.CLEAN)]
    t = torch.tensor([p[0] for p in pairs] + [grid[0]] * 2)
    s = torch.tensor([p[1] for p in pairs] + [grid[5]] * 2)
    out = shortcut.teacher_map(x, t, s, None, linear_eps, sch, grid)

    def den(x_, t_, s_=None):
        return linear_eps(x_, torch.full((x_.shape[0],), t_), None, None)

    pts = grid + [shortft.CLEAN]
    for i in range(6):
        a, b = pts.index(int(t[i])), pts.index(int(s[i]))
        segs = [shortft.Segment(shortft.BASE, u, v, grad=False) for u, v in zip(pts[a:b], pts[a + 1 : b + 1])]
        ref = shortft.run_chain(x[i : i + 1], segs, {shortft.BASE: den}, sch)
        assert torch.allclose(out[i : i + 1], ref, atol=1e-5), i


def test_teacher_path_off_grid():
    assert shortcut.teacher_path(970, 930, [981, 961, 941, 921]) == [970, 961, 941, 930]
    assert shortcut.teacher_path(5, -1, [21, 1]) == [5, 1, -1]


def test_central_difference_jvp_matches_forward_mode():
    w = torch.randn(2, 2)

    def f(x, k):
        return torch.tanh(x @ w) * k[:, None]

    x, v, k = torch.randn(5, 2), torch.randn(5, 2), torch.rand(5) + 0.5
    y, jv = shortcut.central_difference_jvp(f, x, v, k, h=1e-3)
    y_ref, jv_ref = torch.func.jvp(lambda z: f(z, k), (x,), (v,))
    assert torch.allclose(y, y_ref) and torch.allclose(jv, jv_ref, atol=1e-3)


def test_distillation_loss_is_zero_for_the_exact_one_step_teacher():
    # with a single-step teacher path the teacher map *is* one jump of the teacher ε
    sch, grid = shortft.make_schedule(), shortft.ddim_timesteps(50)
    t, s = torch.tensor([981, 501]), torch.tensor([961, 481])
    data = shortcut.make_distillation_set(torch.randn(2, 2), t, s, None, linear_eps, sch, grid)
    loss, value, jvp = shortcut.distillation_loss(data, linear_eps, sch, jvp_weight=1.0)
    assert loss.item() < 1e-6


def test_adapter_save_load_roundtrip(tmp_path):
    """runio.save_tensors(shortcut.adapter_state_dict(…)) → shortcut.load_adapter_state_dict restores the adapter."""
    def model(rank, seed):
        m = toy.EpsMLP(16, 1, 4, emb=8)
        toy.add_lora(m, "shortcut", rank, rank, seed, toy.linear_names(m))
        return m

    m = model(4, 0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".shortcut." in n:
                p.normal_()
    runio.save_tensors(shortcut.adapter_state_dict(m, "shortcut"), tmp_path / "a.safetensors")
    m2 = model(4, 1)
    shortcut.load_adapter_state_dict(m2, "shortcut", runio.load_tensors(tmp_path / "a.safetensors"))
    a, b = shortcut.adapter_state_dict(m, "shortcut"), shortcut.adapter_state_dict(m2, "shortcut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="shape"):
        shortcut.load_adapter_state_dict(model(8, 0), "shortcut", runio.load_tensors(tmp_path / "a.safetensors"))
    with pytest.raises(KeyError, match="no LoRA adapter"):
        shortcut.adapter_state_dict(m2, "tuned_1")


def test_chain_jump_pairs_are_the_papers_jumps():
    grid = shortft.ddim_timesteps(50)
    t, s = toy.chain_jump_pairs(300, grid, shortft.PAPER_LORA_POINTS, torch.Generator().manual_seed(0))
    assert set(zip(t.tolist(), s.tolist())) == {(741, 501), (481, 261), (241, 1)}


def test_snap_points_to_other_grids():
    assert measure_toy.snap_points(shortft.ddim_timesteps(10)) == (801, 501, 301, 1)
    assert measure_toy.snap_points(shortft.ddim_timesteps(200)) == shortft.PAPER_LORA_POINTS
    assert measure_toy.snap_points(shortft.ddim_timesteps(20))[-1] == 1


def test_distilled_shortcut_meets_trajectory_error_bound(tmp_path):
    """A small budget (≈10 s): the 4-jump shortcut lands much closer to the 50-step DDIM endpoint than the base's own
    4-step DDIM (which is where the zero-initialised shortcut LoRA starts), within 6% of the data radius; and each of
    the chain's jumps from the base trajectory lands closer than the base's own one DDIM step over the interval."""
    w = toy.WorldArgs(cache_dir=str(tmp_path), hidden=32, depth=1, pretrain_steps=600, pretrain_batch=256,
                      shortcut_rank=16, distill_steps=1200, distill_pairs=2048, distill_batch=256)
    world = toy.build_toy(w, shortft.PAPER_LORA_POINTS)
    x_T, c = toy.eval_batch(w, 256)
    err = measure_toy.trajectory_errors(world, x_T, c, w.radius, jumps=(4,))["4"]
    assert err["mean"] < 0.7 * err["ddim_mean"], err
    assert err["mean"] < 0.06, err
    for jump, e in measure_toy.chain_jump_errors(world, x_T, c, w.radius).items():
        assert e["mean"] < 0.5 * e["ddim_mean"], (jump, e)
