"""Tests of runio.py: dataclass arguments, JSON/safetensors files and exact checkpoint resume.

Not part of the paper's method; these check the run-folder contract the training scripts rely on:
an interrupted-and-resumed run is bit-identical to an uninterrupted one (weights, Adam moments,
torch / Python / numpy RNG), and a half-written checkpoint is never picked up.

Notation: `Args` a dataclass of arguments; step_N the checkpoint folder of update N.

Run: python -m pytest -q tests/test_runio.py
"""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

import runio


@dataclasses.dataclass
class Args:
    """Toy training arguments."""

    lr: float = 1e-3
    """learning rate of Adam"""
    steps: int = 10
    """number of updates"""
    method: str = "shortft"
    """which chain to train with"""
    checkpoint: bool = True
    """recompute activations in backward"""
    verbose: bool = False
    """print every step"""
    seed: int | None = None
    """random seed (None: draw one)"""
    scale: float | None = None
    """reward scale"""
    boundaries: list = dataclasses.field(default_factory=lambda: [500])
    """timestep-aware LoRA boundaries"""
    rewards: list = dataclasses.field(default_factory=lambda: ["aesthetic", "clip"])
    """reward names"""
    warmup: float = 0.1
    """fraction of updates spent warming up, e.g. 10% of the run"""


def test_parse_args_defaults_and_types():
    args = runio.parse_args(Args, [])
    assert args == Args()
    args = runio.parse_args(Args, ["--lr", "0.5", "--steps", "3", "--no-checkpoint", "--verbose", "--seed", "7",
                                   "--scale", "2.5", "--boundaries", "700", "300", "--rewards", "hps",
                                   "--method", "draft_k"])
    assert args.lr == 0.5 and args.steps == 3 and args.method == "draft_k"
    assert args.checkpoint is False and args.verbose is True
    assert args.seed == 7 and isinstance(args.seed, int)
    assert args.scale == 2.5 and isinstance(args.scale, float)
    assert args.boundaries == [700, 300] and args.rewards == ["hps"]
    assert runio.parse_args(Args, ["--boundaries"]).boundaries == []
    with pytest.raises(SystemExit):
        runio.parse_args(Args, ["--steps", "three"])
    with pytest.raises(SystemExit):
        runio.parse_args(Args, ["--unknown", "1"])


def test_parse_args_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        runio.parse_args(Args, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Toy training arguments." in out
    assert "learning rate of Adam (default: 0.001)" in out
    assert "random seed (None: draw one)" in out
    assert "fraction of updates spent warming up, e.g. 10% of the run" in out
    assert "--no-checkpoint" in out


def test_json_and_jsonl(tmp_path):
    runio.write_json({"args": Args(), "device": torch.device("cpu"), "x": torch.tensor([1.0, 2.0]),
                      "n": np.int64(3), "path": tmp_path}, tmp_path / "a" / "args.json")
    got = json.loads((tmp_path / "a" / "args.json").read_text())
    assert got["args"]["lr"] == 1e-3 and got["device"] == "cpu" and got["x"] == [1.0, 2.0] and got["n"] == 3
    assert not list((tmp_path / "a").glob("*.tmp"))
    for i in range(3):
        runio.append_jsonl({"step": i, "loss": np.float32(0.5)}, tmp_path / "metrics.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": i, "loss": 0.5} for i in range(3)]


def test_save_load_tensors(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)[::2]}  # non-contiguous is fine
    runio.save_tensors(t, tmp_path / "w.safetensors", metadata={"format": "pt"})
    back = runio.load_tensors(tmp_path / "w.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    with pytest.raises(FileNotFoundError, match="no weights file"):
        runio.load_tensors(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- checkpoints


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train(model, opt, steps):
    """Updates that draw from all three RNGs, so a wrong RNG restore changes the weights."""
    for _ in range(steps):
        x = torch.randn(16, 3) + random.random() + float(np.random.rand())
        loss = ((model(x) - 1) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoint_resume_is_bit_identical(tmp_path):
    # uninterrupted: 6 updates
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _train(model, opt, 6)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    # interrupted after 3 updates, resumed in a fresh model/optimizer with scrambled RNGs
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _train(model, opt, 3)
    path = runio.save_checkpoint(tmp_path, 3, model.state_dict(), opt, {"note": "half way"})
    assert path.name == "step_0000003"

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    ckpt = runio.latest_checkpoint(tmp_path)
    assert ckpt == path
    weights, state = runio.load_checkpoint(ckpt, opt)
    model.load_state_dict(weights)
    assert state["step"] == 3 and state["note"] == "half way"
    assert len(opt.state) == len(list(model.parameters()))
    _train(model, opt, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_checkpoint_restores_every_rng(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    runio.save_checkpoint(tmp_path, 1, model.state_dict(), opt, {})
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3))
    torch.manual_seed(6), random.seed(6), np.random.seed(6)
    runio.load_checkpoint(runio.latest_checkpoint(tmp_path))
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1:3] == expected[1:3] and np.array_equal(got[3], expected[3])
    # restore_rng=False leaves the current streams alone
    torch.manual_seed(6)
    a = torch.rand(1)
    torch.manual_seed(6)
    runio.load_checkpoint(runio.latest_checkpoint(tmp_path), restore_rng=False)
    assert torch.equal(torch.rand(1), a)


def test_latest_checkpoint_ignores_half_written(tmp_path):
    assert runio.latest_checkpoint(tmp_path) is None
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    for step in (2, 10):
        runio.save_checkpoint(tmp_path, step, model.state_dict(), opt, {})
    assert runio.latest_checkpoint(tmp_path).name == "step_0000010"
    half = tmp_path / "checkpoints" / "step_0000020"
    half.mkdir()
    (half / "weights.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / ".step_0000030.tmp").mkdir()
    assert runio.latest_checkpoint(tmp_path).name == "step_0000010"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        runio.load_checkpoint(half)
    # overwriting the same step replaces the folder and leaves no temporary folders behind
    runio.save_checkpoint(tmp_path, 10, model.state_dict(), opt, {"again": True})
    _, state = runio.load_checkpoint(runio.latest_checkpoint(tmp_path), restore_rng=False)
    assert state["again"] is True
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".step_0000010")) == []


def test_checkpoint_extra_files_and_no_pickle(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    extra = tmp_path / "lora.safetensors"
    runio.save_tensors({"w": torch.ones(2)}, extra)
    ckpt = runio.save_checkpoint(tmp_path / "run", 4, model.state_dict(), opt, {}, extra_files={"lora.safetensors": extra})
    assert (ckpt / "lora.safetensors").is_file() and not extra.exists()
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["lora.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
                     "weights.safetensors"]
