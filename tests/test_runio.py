"""Tests of runio.py: dataclass arguments, JSON/safetensors files and exact checkpoint resume.

Not part of the paper's method; these check the run-folder contract the training scripts rely on:
an interrupted-and-resumed run is bit-identical to an uninterrupted one (weights, Adam moments,
torch / Python / numpy RNG); a process SIGKILLed at every point of a checkpoint or folder write
leaves the newest complete copy found and loading bit for bit; corrupt, NaN or foreign checkpoints
are skipped or refused in one line; bad arguments end in one line with exit status 2.

Notation: `Args` a dataclass of arguments; step_N the checkpoint folder of update N.

Run: python -m pytest -q tests/test_runio.py
"""

import copy
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time

import numpy as np
import pytest
import torch

import runio
from sigkill import kill_when_paused


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


# ----------------------------------------------------------------------------- arguments: one line, exit 2


def _one_line_exit(capsys, fn, *a):
    with pytest.raises(SystemExit) as e:
        fn(*a)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_require_messages_name_flag_value_and_fix():
    runio.require(True, "lr", -1, "never raised")
    with pytest.raises(runio.ArgError, match=r"^--lora-rank 0: must be ≥ 1$"):
        runio.require(False, "lora_rank", 0, "must be ≥ 1")
    with pytest.raises(ValueError, match=r"^--lora-targets to_q to_k: unknown$"):
        runio.require(False, "--lora-targets", ["to_q", "to_k"], "unknown")
    runio.require_range("lr", 1e-4, 0, low_open=True)
    runio.require_range("p_uncond", 1.0, 0, 1)
    runio.require_range("steps", 1, 1)
    for value, low, high, low_open, text in [
        (0.0, 0, None, True, "--lr 0.0: must be a finite number > 0; e.g. --lr 1e-4"),
        (math.nan, 0, None, True, "--lr nan: must be a finite number > 0; e.g. --lr 1e-4"),
        (math.inf, 0, None, False, "--lr inf: must be a finite number ≥ 0; e.g. --lr 1e-4"),
        (-math.inf, None, None, False, "--lr -inf: must be a finite number; e.g. --lr 1e-4"),
        (1.5, 0, 1, False, "--lr 1.5: must be a finite number in [0, 1]; e.g. --lr 1e-4"),
        (0, 0, 1, True, "--lr 0: must be a finite number in (0, 1]; e.g. --lr 1e-4"),
        (True, None, None, False, "--lr True: must be a finite number; e.g. --lr 1e-4"),
    ]:
        with pytest.raises(runio.ArgError) as e:
            runio.require_range("lr", value, low, high, low_open=low_open, what="e.g. --lr 1e-4")
        assert str(e.value) == text


def test_parse_args_errors_are_one_line(capsys):
    for argv in (["--lr", "nan"], ["--lr", "inf"], ["--scale", "-inf"], ["--steps", "three"], ["--nope"]):
        err = _one_line_exit(capsys, runio.parse_args, Args, argv)
        assert err.startswith(f"{os.path.basename(sys.argv[0])}: error: "), err
    assert "'nan' is not a finite number" in _one_line_exit(capsys, runio.parse_args, Args, ["--lr", "nan"])
    assert runio.parse_args(Args, ["--lr", "1e-2", "--scale", "-3"]).scale == -3.0

    def check(args):
        runio.require_range("steps", args.steps, 1, what="train for at least one update")

    err = _one_line_exit(capsys, runio.parse_args, Args, ["--steps", "0"], check)
    assert err.endswith("error: --steps 0: must be a finite number ≥ 1; train for at least one update\n")
    assert runio.parse_args(Args, ["--steps", "2"], check).steps == 2


def test_cli_turns_run_errors_into_one_line(capsys):
    def main(args):
        if args.steps == 5:
            raise runio.MismatchError("--method x: the saved run was made with y")
        if args.steps == 6:
            raise KeyError("a bug keeps its traceback")
        return args.steps

    assert runio.cli(main, Args, argv=["--steps", "4"]) == 4
    err = _one_line_exit(capsys, runio.cli, main, Args, None, ["--steps", "5"])
    assert err.endswith("error: --method x: the saved run was made with y\n")
    _one_line_exit(capsys, runio.cli, main, Args, None, ["--steps", "-1.5"])
    with pytest.raises(KeyError):
        runio.cli(main, Args, argv=["--steps", "6"])


def test_run_dir_refuses_escaping_names_and_unwritable_out(tmp_path):
    out = tmp_path / "runs"
    assert runio.run_dir(out, "a.b-c d") == out / "a.b-c d" and (out / "a.b-c d").is_dir()
    for name in ("../../x", "..", ".", "", "a/b", "a\\b", str(tmp_path / "abs"), "/etc"):
        with pytest.raises(runio.ArgError, match=r"^--name .*: must be one plain folder name"):
            runio.run_dir(out, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    (tmp_path / "file").write_text("")
    with pytest.raises(runio.ArgError, match=r"^--out-dir .*file: cannot write the run folder"):
        runio.run_dir(tmp_path / "file", "x", out_flag="--out-dir")


# ----------------------------------------------------------------------------- files: atomic, never NaN


def test_failed_writes_leave_the_old_file_and_no_temporary(tmp_path):
    runio.write_json({"a": 1}, tmp_path / "args.json")
    with pytest.raises(TypeError):
        runio.write_json({"a": object()}, tmp_path / "args.json")
    runio.save_tensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    with pytest.raises(runio.CheckpointError, match=r"^refusing to write .*w.safetensors: tensor 'w' holds NaN/inf"):
        runio.save_tensors({"w": torch.tensor([1.0, math.inf])}, tmp_path / "w.safetensors")
    assert json.loads((tmp_path / "args.json").read_text()) == {"a": 1}
    assert torch.equal(runio.load_tensors(tmp_path / "w.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json", "w.safetensors"]


def test_append_jsonl_cuts_a_line_torn_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    runio.append_jsonl({"step": 1}, path)
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # the process died here
    runio.append_jsonl({"step": 3}, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 3}]


def test_load_tensors_refuses_corrupt_and_nonfinite_files(tmp_path):
    path = tmp_path / "w.safetensors"
    runio.save_tensors({"w": torch.ones(4)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(runio.CheckpointError, match="not a readable safetensors file"):
        runio.load_tensors(path)
    path.write_bytes(data[:-16] + b"\xff" * 16)  # the tensor's bytes: float32 NaN
    with pytest.raises(runio.CheckpointError, match="tensor 'w' holds NaN/inf"):
        runio.load_tensors(path)


# ----------------------------------------------------------------------------- checkpoints: manifest, NaN, keys


def _history(n):
    """n snapshots (weights, Adam state) of a parameter after each of n updates, and the optimizer."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adam([p], lr=0.1)
    snaps = []
    for _ in range(n):
        opt.zero_grad()
        (p ** 3).sum().backward()
        opt.step()
        snaps.append(({"p": p.detach().clone()}, copy.deepcopy(opt.state_dict())))
    return opt, snaps


def _save(run, step, snap, opt, **kw):
    opt.load_state_dict(copy.deepcopy(snap[1]))
    return runio.save_checkpoint(run, step, snap[0], opt, {"version": step}, **kw)


def _assert_loads(ckpt, snap):
    """The checkpoint loads bit-identically: weights, Adam moments and step."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(4, 3))], lr=0.1)
    weights, _ = runio.load_checkpoint(ckpt, opt, restore_rng=False, expect=snap[0])
    assert torch.equal(weights["p"], snap[0]["p"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state_dict()["state"][0][key], snap[1]["state"][0][key]), key


def _corrupt(path, how):
    data = path.read_bytes()
    data_start = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, header, tensor bytes
    if how == "truncated":
        path.write_bytes(data[:-7])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "overwritten":
        path.write_bytes(data[:data_start] + b"\xff" * 8 + data[data_start + 8:])
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("file,how", [("weights.safetensors", "truncated"), ("weights.safetensors", "overwritten"),
                                      ("optimizer.safetensors", "empty"), ("rng.safetensors", "missing"),
                                      ("state.json", "truncated-json")])
def test_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys, file, how):
    opt, snaps = _history(2)
    _save(tmp_path, 1, snaps[0], opt)
    newest = _save(tmp_path, 2, snaps[1], opt)
    if how == "truncated-json":
        (newest / file).write_text((newest / file).read_text()[:-20])
    else:
        _corrupt(newest / file, how)
    assert runio.latest_checkpoint(tmp_path).name == "step_0000001"
    with pytest.raises((runio.CheckpointError, FileNotFoundError), match="not a complete checkpoint"):
        runio.load_checkpoint(newest)
    ckpt, weights, state = runio.resume_checkpoint(tmp_path, restore_rng=False)
    out = capsys.readouterr()
    assert ckpt.name == "step_0000001" and state["version"] == 1 and torch.equal(weights["p"], snaps[0][0]["p"])
    assert out.err.count("\n") == 1 and out.err.startswith("skipping checkpoint: ") and "step_0000002" in out.err
    assert out.out == f"resuming from {ckpt} (step 1)\n"


def test_nonfinite_checkpoint_behind_a_valid_manifest_is_skipped(tmp_path, capsys):
    """Bytes overwritten before the manifest was made (a bad disk write): the hash agrees, the NaN check refuses."""
    opt, snaps = _history(2)
    _save(tmp_path, 1, snaps[0], opt)
    newest = _save(tmp_path, 2, snaps[1], opt)
    _corrupt(newest / "weights.safetensors", "overwritten")
    state = json.loads((newest / "state.json").read_text())
    data = (newest / "weights.safetensors").read_bytes()
    state["files"]["weights.safetensors"]["sha256"] = hashlib.sha256(data).hexdigest()
    (newest / "state.json").write_text(json.dumps(state))
    assert runio.latest_checkpoint(tmp_path) == newest
    with pytest.raises(runio.CheckpointError, match=r"weights.safetensors: tensor 'p' holds NaN/inf"):
        runio.load_checkpoint(newest)
    ckpt, _, _ = runio.resume_checkpoint(tmp_path, restore_rng=False)
    assert ckpt.name == "step_0000001" and "holds NaN/inf" in capsys.readouterr().err


def test_save_checkpoint_refuses_nonfinite_and_writes_nothing(tmp_path):
    opt, snaps = _history(1)
    with pytest.raises(runio.CheckpointError, match=r"^refusing to write checkpoint step 3 \(weights.safetensors\): "
                                                      r"tensor 'p' holds NaN/inf"):
        runio.save_checkpoint(tmp_path, 3, {"p": torch.tensor([0.0, math.nan])}, opt, {})
    opt.load_state_dict(copy.deepcopy(snaps[0][1]))
    opt.state_dict()["state"][0]["exp_avg_sq"][0, 0] = math.inf
    with pytest.raises(runio.CheckpointError, match=r"\(optimizer.safetensors\): tensor '0.exp_avg_sq'"):
        runio.save_checkpoint(tmp_path, 3, snaps[0][0], opt, {})
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_foreign_missing_and_reshaped_keys_stop_the_resume(tmp_path):
    opt, snaps = _history(1)
    _save(tmp_path, 1, snaps[0], opt)
    ckpt = runio.latest_checkpoint(tmp_path)
    expect = {"down.lora_A.weight": torch.zeros(4, 3), "up.lora_B.weight": torch.zeros(3, 4)}
    with pytest.raises(runio.MismatchError, match=r"1 unexpected keys \(p\); 2 missing keys \(down.lora_A.weight, "
                                                    r"up.lora_B.weight\): saved from another model or LoRA setup"):
        runio.load_checkpoint(ckpt, expect=expect)
    with pytest.raises(runio.MismatchError, match=r"1 other shapes \(p: \(4, 3\), expected \(8, 3\)\)"):
        runio.resume_checkpoint(tmp_path, expect={"p": (8, 3)})  # not skipped: every checkpoint would fail
    # a mismatching optimizer is refused before anything is restored
    bigger = torch.optim.Adam([torch.nn.Parameter(torch.zeros(8, 3))])
    with pytest.raises(runio.MismatchError, match=r"optimizer state 0.exp_avg has shape \(4, 3\), its parameter \(8, "):
        runio.load_checkpoint(ckpt, bigger)
    two = torch.optim.Adam([torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(1))])
    torch.manual_seed(7)
    with pytest.raises(runio.MismatchError, match=r"its optimizer holds \[1\] parameters per group, this run \[2\]"):
        runio.load_checkpoint(ckpt, two)
    after_failed_load = torch.rand(1)
    torch.manual_seed(7)
    assert not two.state and torch.equal(after_failed_load, torch.rand(1))  # RNG not restored either


def test_check_resume_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(runio.RunError, match=r"^--resume: nothing to resume, .*checkpoints holds no complete"):
        runio.check_resume(run, Args(), ["method"])
    with pytest.raises(runio.RunError, match=r"^--resume: nothing to resume"):
        runio.resume_checkpoint(run)
    opt, snaps = _history(1)
    _save(run, 1, snaps[0], opt)
    with pytest.raises(runio.RunError, match=r"args.json is missing: the settings of its checkpoints are unknown"):
        runio.check_resume(run, Args(), ["method"])
    runio.write_json(Args(), run / "args.json")
    keys = ["method", "lr", "boundaries", "seed"]
    assert runio.check_resume(run, Args(), keys).name == "step_0000001"
    assert runio.check_resume(run, dataclasses.asdict(Args(steps=99)), keys).name == "step_0000001"
    for changed, text in [(dict(method="draft_k"), "--method draft_k: .*run was made with shortft"),
                          (dict(boundaries=[700, 300]), "--boundaries 700 300: .*run was made with 500"),
                          (dict(lr=2e-3, seed=1), "--lr 0.002: .*run was made with 0.001"),
                          (dict(seed=1), "--seed 1: .*run was made with None")]:
        with pytest.raises(runio.MismatchError, match=f"^{text}: resume with that value, or start a new run"):
            runio.check_resume(run, Args(**changed), keys)
    with pytest.raises(runio.MismatchError, match="^--rank 4: the saved run was made with no value for it"):
        runio.check_settings({}, {"rank": 4}, ["rank"])
    (run / "args.json").write_text("{")
    with pytest.raises(runio.RunError, match="args.json is not readable JSON"):
        runio.check_resume(run, Args(), keys)


def test_keep_prunes_only_older_and_later_steps_are_dropped(tmp_path):
    opt, snaps = _history(5)
    for step in range(1, 6):
        _save(tmp_path, step, snaps[step - 1], opt, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004", "step_0000005"]
    _save(tmp_path, 3, snaps[2], opt)  # resumed from an earlier step: 4 and 5 belong to the abandoned run
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003"]
    with pytest.raises(runio.ArgError, match="^--keep 0: keep at least the newest checkpoint"):
        _save(tmp_path, 6, snaps[0], opt, keep=0)


def test_atomic_folder_replaces_whole_and_discards_on_error(tmp_path):
    lora = tmp_path / "run" / "lora"
    for version in (1, 2):
        with runio.atomic_folder(lora) as tmp:
            (tmp / "pytorch_lora_weights.safetensors").write_bytes(bytes([version]) * 10)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "b.txt").write_text(str(version))
    assert (lora / "pytorch_lora_weights.safetensors").read_bytes() == b"\x02" * 10
    assert runio.folder_problem(lora) is None and runio.recover_folder(lora)
    with pytest.raises(RuntimeError):
        with runio.atomic_folder(lora) as tmp:
            (tmp / "pytorch_lora_weights.safetensors").write_bytes(b"half")
            raise RuntimeError("killed by a bug")
    assert (lora / "sub" / "b.txt").read_text() == "2" and sorted(p.name for p in lora.parent.iterdir()) == ["lora"]
    (lora / "sub" / "b.txt").write_text("x")
    assert runio.folder_problem(lora) == "sub/b.txt does not match its checksum (corrupt)"
    assert not runio.recover_folder(tmp_path / "nothing") and runio.folder_problem(tmp_path) == "no MANIFEST.json " \
        "(its write did not finish)"


# ----------------------------------------------------------------------------- SIGKILL at every point of a write


def _kill_at(tmp_path, point, target):
    """Run `target` in a forked process, SIGKILL it when it pauses at `point` (runio._pause)."""
    flag = tmp_path / f"paused-{point}"
    flag.unlink(missing_ok=True)

    def child():
        os.environ["RUNIO_PAUSE"] = f"{point}:{flag}"
        target()

    kill_when_paused(child, flag, point, timeout=30)


@pytest.mark.parametrize("point,resave,keep,expect_name,expect_snap", [
    ("file-written", False, None, "step_0000002", 1),        # state.json not in place yet: a new, incomplete step 3
    ("folder-filled", False, None, "step_0000002", 1),       # every file but the manifest
    ("manifest-written", False, None, ".step_0000003.tmp", 2),  # complete, not yet renamed
    ("swapped", False, None, "step_0000003", 2),
    ("removing", False, 1, "step_0000003", 2),               # pruning step 1 (keep=1) half done
    ("manifest-written", True, None, ".step_0000002.tmp", 2),  # re-saving step 2: the newer complete copy wins
    ("old-moved", True, None, ".step_0000002.tmp", 2),       # between the two renames: no step_0000002 at all
    ("swapped", True, None, "step_0000002", 2),              # .step_0000002.old not yet deleted
])
def test_sigkill_during_save_checkpoint(tmp_path, capsys, point, resave, keep, expect_name, expect_snap):
    opt, snaps = _history(4)
    _save(tmp_path, 1, snaps[0], opt)
    _save(tmp_path, 2, snaps[1], opt)
    _kill_at(tmp_path, point, lambda: _save(tmp_path, 2 if resave else 3, snaps[2], opt, keep=keep))
    ckpt = runio.latest_checkpoint(tmp_path)
    assert ckpt.name == expect_name
    _assert_loads(ckpt, snaps[expect_snap])
    path, _, _ = runio.resume_checkpoint(tmp_path, restore_rng=False)
    assert capsys.readouterr().out.startswith(f"resuming from {ckpt}") and path == ckpt
    # the next save tidies every leftover: only complete step_N folders remain
    _save(tmp_path, 4, snaps[3], opt)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith(".")] and names[-1] == "step_0000004", names
    for name in names:
        assert runio.folder_problem(tmp_path / "checkpoints" / name, "state.json") is None
    _assert_loads(runio.latest_checkpoint(tmp_path), snaps[3])


@pytest.mark.parametrize("point,version", [("folder-filled", 1), ("file-written", 1), ("manifest-written", 2),
                                           ("old-moved", 2), ("swapped", 2), ("removing", 2)])
def test_sigkill_during_atomic_folder(tmp_path, point, version):
    lora = tmp_path / "lora"

    def write(v):
        with runio.atomic_folder(lora) as tmp:
            (tmp / "pytorch_lora_weights.safetensors").write_bytes(bytes([v]) * 1000)

    write(1)
    _kill_at(tmp_path, point, lambda: write(2))
    assert runio.recover_folder(lora)
    assert (lora / "pytorch_lora_weights.safetensors").read_bytes() == bytes([version]) * 1000
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("paused")) == ["lora"]
    write(3)
    assert (lora / "pytorch_lora_weights.safetensors").read_bytes() == bytes([3]) * 1000


def test_sigkill_at_random_moments_of_a_save_loop(tmp_path):
    """A process saving checkpoints back to back (keep=2) killed at arbitrary moments, three times over: each
    time the newest complete checkpoint loads bit-identically and the next process continues from it."""
    opt, snaps = _history(4)
    started = tmp_path / "started"

    def loop():
        ckpt = runio.latest_checkpoint(tmp_path)
        step = 0 if ckpt is None else json.loads((ckpt / "state.json").read_text())["step"]
        while True:
            step += 1
            _save(tmp_path, step, snaps[step % 4], opt, keep=2)
            started.touch()

    rng = random.Random(0)
    last = 0
    for _ in range(3):
        started.unlink(missing_ok=True)
        proc = multiprocessing.get_context("fork").Process(target=loop)
        proc.start()
        while not started.exists():
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        ckpt = runio.latest_checkpoint(tmp_path)
        step = json.loads((ckpt / "state.json").read_text())["step"]
        assert step > last
        _assert_loads(ckpt, snaps[step % 4])
        last = step
