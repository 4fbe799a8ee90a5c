"""Toy shortcut (shortcut.py, toy section): the teacher map against shortft's own DDIM chain, the
central-difference JVP against forward-mode AD, adapter save/load, and a distillation budget test."""


import pytest
import torch

import shortcut
import shortft
import train_toy as T




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
        segs = [shortft.Segment("m", u, v, grad=False) for u, v in zip(pts[a:b], pts[a + 1 : b + 1])]
        ref = shortft.run_chain(x[i : i + 1], segs, {"m": den}, sch)
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
    m = T.EpsMLP(16, 1, 4, emb=8)
    T.add_lora(m, "shortcut", 4, 0, T.linear_names(m))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".shortcut." in n:
                p.normal_()
    shortcut.save_adapter(m, "shortcut", tmp_path / "a.safetensors")
    m2 = T.EpsMLP(16, 1, 4, emb=8)
    T.add_lora(m2, "shortcut", 4, 1, T.linear_names(m2))
    shortcut.load_adapter(m2, "shortcut", tmp_path / "a.safetensors")
    a, b = shortcut.adapter_state_dict(m, "shortcut"), shortcut.adapter_state_dict(m2, "shortcut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    m3 = T.EpsMLP(16, 1, 4, emb=8)
    T.add_lora(m3, "shortcut", 8, 0, T.linear_names(m3))
    with pytest.raises(ValueError, match="shape"):
        shortcut.load_adapter(m3, "shortcut", tmp_path / "a.safetensors")
    with pytest.raises(KeyError, match="no LoRA adapter"):
        shortcut.adapter_state_dict(m3, "tuned")


def test_distilled_shortcut_meets_trajectory_error_bound(tmp_path):
    """A small budget (≈10 s): the 4-jump shortcut lands much closer to the 50-step DDIM endpoint than
    the base's own 4-step DDIM (which is where the zero-initialised shortcut LoRA starts), and within
    6% of the data radius."""
    args = T.Args(out=str(tmp_path), hidden=32, depth=1, pretrain_steps=600, pretrain_batch=256,
                  shortcut_rank=16, distill_steps=1200, distill_pairs=2048, distill_batch=256)
    toy, _ = T.build_toy(args, progress=False)
    g = torch.Generator().manual_seed(0)
    x_T, c = torch.randn(256, 2, generator=g), torch.randint(0, 4, (256,), generator=g)
    err = T.trajectory_error(toy, x_T, c, args.radius, jumps=(4,))["4"]
    assert err["mean"] < 0.7 * err["ddim_mean"], err
    assert err["mean"] < 0.06, err
