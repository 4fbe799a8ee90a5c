"""One writer per run folder, fail-fast, interruptions: the run guard of the training and benchmark scripts.

Not part of the paper's method: the contract of docs/robustness.md ("One writer per run", "Fail fast",
"Interruptions"). A second writer of a live run folder (a new run or a --resume) is refused in one line naming the
process that holds it; a finished model is replaced only with --overwrite; a run that cannot learn stops before its
first update (a probe of every denoiser, the chain, the decoder and the reward) or after --max-skipped skipped updates
in a row; budgets that leave a progressive stage without an update are said before training; SIGINT / SIGTERM finish
the update, write a checkpoint, print one line with the --resume command and exit 130 / 143, and the resumed run ends
bit-identical to an uninterrupted one; a full disk is one line and the run stays resumable; '~' in paths and names over
255 bytes; the digit reward's prompts are checked before anything is built.

Notation: `toy_argv` the tiny toy run's arguments (test_bad_inputs.WORLD, a world cached once); ENTRY the scripts'
entry points as their __main__ runs them.

Run: python -m pytest -q tests/test_run_guard.py
"""

import errno
import json
import math
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import tqdm
from safetensors.torch import load_file, save_file

import chain_args
import runio
import shortft
import toy
import train_toy
from test_bad_inputs import ENTRY, WORLD, flags, same_tensors

tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread, so that forking a training process is safe


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    toy.build_toy(toy.WorldArgs(cache_dir=str(root / "cache"), **WORLD), shortft.PAPER_LORA_POINTS)
    return root / "cache"


def toy_argv(cache, out, **kw) -> list[str]:
    return flags(dict(WORLD, cache_dir=cache, out_dir=out, budget=4, budget_unit="updates", evals=1, eval_batch=8,
                      batch_size=8) | kw)


def one_line(capfd, code, fn, *a) -> str:
    """Run `fn(*a)`: it must exit with `code` and print exactly one line on stderr, no traceback; returns the line."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(*a)
    err = capfd.readouterr().err
    assert e.value.code == code and len(err.splitlines()) == 1 and "Traceback" not in err, (e.value.code, err)
    return err


# ----------------------------------------------------------------------------- one writer per run


def test_a_live_run_folder_refuses_a_second_writer_and_a_resume(cache, tmp_path, capfd):
    """While another process holds the run folder (a run paused in the middle of writing args.json), a new run and a
    --resume of the same folder exit 2 with one line naming that process (pid, host); after it died (SIGKILL), the
    folder is free again."""
    argv = toy_argv(cache, tmp_path, name="live")
    flag = tmp_path / "paused"

    def child():
        os.environ["RUNIO_PAUSE"] = f"file-written@args.json:{flag}"
        train_toy.main(argv)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.exitcode is None and time.monotonic() < deadline
            time.sleep(0.01)
        for extra in ([], ["--resume"], ["--overwrite"]):
            err = one_line(capfd, 2, train_toy.main, argv + extra)
            assert f"in use by process {proc.pid} on host {socket.gethostname()}" in err, err
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    train_toy.main(argv + ["--overwrite"])  # the lock died with its holder
    assert (tmp_path / "live" / "lora.safetensors").is_file()


def test_run_lock_in_process_and_released(tmp_path):
    """Two holders in one process conflict too; the owner file names this process and goes with the lock."""
    lock = tmp_path / "run" / ".lock"
    with runio.run_lock(lock):
        owner = json.loads((tmp_path / "run" / ".lock.owner.json").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(runio.RunError, match=f"is in use by process {os.getpid()} on host"):
            with runio.run_lock(lock):
                pass
    assert not (tmp_path / "run" / ".lock.owner.json").exists()
    with runio.run_lock(lock):  # free again
        pass


def test_an_unwritable_run_folder_is_one_line(tmp_path):
    """A run folder that cannot be created (a file in its path) or locked (a read-only folder) is a RunError."""
    (tmp_path / "file").write_text("")
    with pytest.raises(runio.RunError, match=r"cannot create .*file.*: choose a writable folder"):
        with runio.run_lock(tmp_path / "file" / "run" / ".lock"):
            pass
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user that writes anywhere (root)")
        with pytest.raises(runio.RunError, match=r"cannot (lock|create) .*: choose a writable folder"):
            with runio.run_lock(tmp_path / "ro" / "run" / ".lock"):
                pass
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_a_refused_check_leaves_nothing_behind(tmp_path):
    with pytest.raises(runio.RunError, match="nothing"):
        with runio.run_lock(tmp_path / "new" / ".lock", check=lambda: runio.check_resume(tmp_path / "new", {}, [])):
            pass
    assert not (tmp_path / "new").exists()


def test_a_finished_run_is_replaced_only_with_overwrite(cache, tmp_path, capfd):
    """A finished toy run whose checkpoints/ were deleted (to save space) is refused by a new run of the same name;
    --overwrite replaces it. The same for a train_sd.py run folder holding lora/ (refused before anything is built)."""
    argv = toy_argv(cache, tmp_path, name="done", budget=2)
    train_toy.main(argv)
    before = (tmp_path / "done" / "lora.safetensors").read_bytes()
    import shutil
    shutil.rmtree(tmp_path / "done" / "checkpoints")
    err = one_line(capfd, 2, train_toy.main, argv)
    assert "holds a finished model (lora.safetensors): pass --overwrite" in err
    assert (tmp_path / "done" / "lora.safetensors").read_bytes() == before
    train_toy.main(argv + ["--overwrite", "--seed", "1"])
    assert (tmp_path / "done" / "lora.safetensors").read_bytes() != before

    (tmp_path / "sd" / "done" / "lora").mkdir(parents=True)
    (tmp_path / "sd" / "done" / "lora" / "tuned_1.safetensors").write_bytes(b"x")
    err = one_line(capfd, 2, ENTRY["train_sd"], ["--tiny", "--out-dir", str(tmp_path / "sd"), "--name", "done"])
    assert "holds a finished model (lora): pass --overwrite to replace it" in err


# ----------------------------------------------------------------------------- fail fast


def test_probe_names_the_part_that_gives_nan():
    """Every denoiser, the chain's end, the decoder and the reward are probed; the first non-finite one is named."""
    grid = shortft.ddim_timesteps(10)
    points = (701, 401, 201, 1)
    chain = shortft.make_chain("shortft", grid, None, points=points, stage=1)
    x = torch.randn(3, 2)
    ok = lambda x, t, s=None: torch.zeros_like(x)  # noqa: E731
    nan = lambda x, t, s=None: torch.full_like(x, math.nan)  # noqa: E731
    reward = lambda x: x.sum(1)  # noqa: E731
    den = {shortft.BASE: ok, shortft.TUNED: ok, shortft.SHORTCUT: ok}
    sched = shortft.make_schedule()
    chain_args.probe_chain(chain, x, den, sched, reward)
    with pytest.raises(runio.RunError, match=r"^the run cannot learn: the shortcut gives NaN/inf at t = 901: check "
                                             r"the shortcut's weights"):
        chain_args.probe_chain(chain, x, {**den, shortft.SHORTCUT: nan}, sched, reward)
    with pytest.raises(runio.RunError, match="the decoder gives NaN/inf"):
        chain_args.probe_chain(chain, x, den, sched, reward, decode=lambda z: z / 0)
    with pytest.raises(runio.RunError, match="the reward gives NaN/inf: check --reward"):
        chain_args.probe_chain(chain, x, den, sched, lambda x: x.sum(1) * math.inf)
    with pytest.raises(runio.RunError, match=r"not one value per sample \(3,\)"):
        chain_args.probe_chain(chain, x, den, sched, lambda x: x)
    state = torch.get_rng_state()
    chain_args.probe_chain(shortft.make_chain("draft_lv", grid, None, n=2), x, den, sched, reward)  # draws noise
    assert torch.equal(state, torch.get_rng_state())


def test_a_run_that_cannot_learn_stops_before_its_first_update(cache, tmp_path, capfd):
    """Reward weights of 1e308 make every reward inf: one line, exit 2, no LoRA saved."""
    err = one_line(capfd, 2, train_toy.main, toy_argv(cache, tmp_path, name="inf", reward="region:1e308"))
    assert "the run cannot learn: the reward gives NaN/inf" in err
    assert not (tmp_path / "inf" / "lora.safetensors").exists()


def test_max_skipped_stops_the_run(cache, tmp_path, capfd, monkeypatch):
    """Every update skipped (the guard finds NaN): the run stops at --max-skipped, exit 2, without a LoRA."""
    monkeypatch.setattr(runio, "guarded_step", lambda opt, params, clip: (False, math.nan))
    err = one_line(capfd, 2, train_toy.main, toy_argv(cache, tmp_path, name="skip", budget=10, max_skipped=3))
    assert "--max-skipped 3: 3 updates in a row were skipped" in err and "at update 3" in err
    assert not (tmp_path / "skip" / "lora.safetensors").exists()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """The files `train_sd.py --tiny --tiny-dir DIR` uses: a tiny SD1.5, a tiny CLIP, a stand-in shortcut LoRA."""
    import tiny

    root = tmp_path_factory.mktemp("tiny")
    tiny.tiny_sd(root / "sd")
    tiny.tiny_clip(root / "clip")
    tiny.tiny_shortcut_lora(root / "shortcut_lora.safetensors", root / "sd" / "unet")
    return root


def test_sd_probe_finds_a_huge_shortcut_and_compile_says_so(tiny_sd, tmp_path, capfd, monkeypatch):
    """train_sd.py --tiny with a shortcut LoRA scaled by 1e30 (finite, but its outputs overflow): one line naming the
    shortcut before the first update; --compile on a CPU first says that compilation runs (torch.compile stubbed)."""
    w = load_file(str(tiny_sd / "shortcut_lora.safetensors"))
    save_file({k: v * 1e30 for k, v in w.items()}, str(tmp_path / "huge.safetensors"))
    monkeypatch.setattr(torch, "compile", lambda net: net)
    # the file check refuses such weights first (test_file_corruptions); lifted here, the probe is the one that speaks
    monkeypatch.setattr(runio.check_weights_finite, "__defaults__", (math.inf,))
    argv = ["--tiny", "--tiny-dir", str(tiny_sd), "--out-dir", str(tmp_path / "runs"), "--num-steps", "10",
            "--lora-points", "701", "401", "201", "1", "--shortcut", str(tmp_path / "huge.safetensors"), "--compile"]
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        ENTRY["train_sd"](argv)
    out, err = capfd.readouterr()
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("train_sd.py: error: the run cannot learn: the shortcut gives NaN/inf"), err
    assert "--compile: torch.compile compiles the unet" in out and "on a CPU each compilation takes minutes" in out
    assert not (tmp_path / "runs" / "sd-tiny" / "checkpoints").exists()


def test_stage_gaps_are_said_before_training(cache, tmp_path, capfd):
    """2 updates for 4 stages: stages 2 and 4 never run (finding 10): one warning line before the first update."""
    assert chain_args.stage_gaps(train_toy.Args(), 4, 2).startswith("warning: 2 updates for 4 progressive stages: "
                                                                    "stage(s) 2 4 get no update")
    assert chain_args.stage_gaps(train_toy.Args(), 4, 4) is None
    assert chain_args.stage_gaps(train_toy.Args(stage_fractions=[0.7, 0.1, 0.1, 0.1]), 4, 9) is not None
    assert chain_args.stage_jump(1, 3, 1) == ("warning: update 2 is in stage 3: stage(s) 2 got no update; give a "
                                              "larger budget (or --no-progressive)")
    assert chain_args.stage_jump(None, 3, 0) is None and chain_args.stage_jump(2, 3, 5) is None
    capfd.readouterr()
    train_toy.main(toy_argv(cache, tmp_path, name="gaps", budget=2))
    err = capfd.readouterr().err
    assert err.splitlines() == ["warning: 2 updates for 4 progressive stages: stage(s) 2 4 get no update; give at "
                                "least 4 updates (or --no-progressive)"]


# ----------------------------------------------------------------------------- names, paths, prompts


def test_tilde_is_the_home_folder(cache, tmp_path, monkeypatch):
    """--out-dir '~/runs' (quoted: the shell left it) writes under $HOME, not into a folder named '~' (finding 7)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train_toy.main(toy_argv(cache, "~/runs", name="t", budget=1))
    assert (tmp_path / "home" / "runs" / "t" / "lora.safetensors").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("script, argv, words", [
    ("train_toy", ["--name", "n" * 300], "--name nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn…: a name of 300 bytes is too "
                                         "long for a file name (at most 250)"),
    ("train_sd", ["--tiny", "--name", "n" * 300], "a name of 300 bytes is too long"),
    ("bench_sd", ["--tiny", "--device", "cpu", "--out", "{tmp}/" + "b" * 250], "a name of 250 bytes is too long for a "
                                                                               "file name (at most 245)"),
    ("train_sd", ["--tiny", "--train-prompts", "{tmp}/" + "p" * 300], "File name too long"),
    ("train_sd", ["--tiny", "--reward", "digit", "--train-prompts", "{tmp}/digits.txt", "--eval-prompts",
                  "{tmp}/nodigit.txt"], "--eval-prompts {tmp}/nodigit.txt: digit reward: prompt 'a cat' names no digit"),
    ("train_sd", ["--tiny", "--reward", "digit:1,aesthetic:0.1", "--train-prompts", "{tmp}/nodigit.txt"],
     "--train-prompts {tmp}/nodigit.txt: digit reward: prompt 'a cat' names no digit"),
])
def test_names_and_prompts_refused_up_front(script, argv, words, tmp_path, capfd):
    """Findings 8 and 9: a run name or --out over 255 bytes, and a prompt the digit reward cannot read, are one line
    before anything is built or written (not a traceback after the whole run)."""
    (tmp_path / "nodigit.txt").write_text("a handwritten 3\na cat\n")
    (tmp_path / "digits.txt").write_text("a handwritten 3\nseven\n")
    out = tmp_path / "out"
    err = one_line(capfd, 2, ENTRY[script], [a.format(tmp=tmp_path) for a in argv] + (
        ["--out-dir", str(out)] if script != "bench_sd" else []))
    assert words.format(tmp=tmp_path) in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- interruptions


def run_until(argv, flag: Path, update: int, main=train_toy.main):
    """A forked `main(argv)` that touches `flag` once update `update` is logged (then goes on)."""

    def child():
        import tqdm.auto

        class Quiet(tqdm.auto.tqdm):  # stderr: only what the script says, not its progress bar
            def __init__(self, *a, **kw):
                super().__init__(*a, **{**kw, "disable": True})

        tqdm.auto.tqdm = Quiet
        log = runio.append_jsonl

        def logging(row, path):
            log(row, path)
            if row.get("update") == update and "loss" in row:
                flag.touch()
                time.sleep(1.0)  # the signal arrives during this update's bookkeeping

        runio.append_jsonl = logging
        main(argv)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.exitcode is None and time.monotonic() < deadline, "the update was not reached"
        time.sleep(0.005)
    return proc


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train_toy.main(toy_argv(cache, out, name="ref", budget=6, save_every=4))
    return out / "ref"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_says_resume_and_resumes_exactly(cache, reference, tmp_path, capfd, sig):
    """SIGINT (Ctrl-C) or SIGTERM after update 3 (the last checkpoint at 0): the update finishes, checkpoint 3 is
    written, one line gives the --resume command, exit 130 / 143, no traceback; running that command ends with the
    uninterrupted run's LoRA and final checkpoint, bit for bit."""
    argv = toy_argv(cache, tmp_path, name="sig", budget=6, save_every=4)
    capfd.readouterr()
    proc = run_until(argv, tmp_path / "flag", 3)
    os.kill(proc.pid, sig)
    proc.join(120)
    err = capfd.readouterr().err
    assert proc.exitcode == 128 + sig, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    name = signal.Signals(sig).name
    assert err.startswith(f"train_toy.py: interrupted by {name}: stopped after update 3 (checkpoint "), err
    assert "; continue with: python train_toy.py --hidden 16 " in err, err
    assert err.rstrip().endswith(" --name sig --save-every 4 --resume"), err
    assert runio.latest_checkpoint(tmp_path / "sig").name == "step_0000003"
    train_toy.main(argv + ["--resume"])
    for f in ("lora.safetensors", "checkpoints/step_0000006/weights.safetensors",
              "checkpoints/step_0000006/optimizer.safetensors"):
        same_tensors(reference / f, tmp_path / "sig" / f)


def test_sd_signal_checkpoints_says_resume_and_resumes_exactly(tiny_sd, tmp_path, capfd):
    """train_sd.py --tiny: SIGTERM after update 2 of 4 (4 progressive stages, the only checkpoint at the end): update
    2 finishes, checkpoint 2 is written, one line, exit 143; the printed --resume ends with the uninterrupted run's
    final LoRA and checkpoint, bit for bit."""
    base = ["--tiny", "--tiny-dir", str(tiny_sd), "--out-dir", str(tmp_path), "--num-steps", "10", "--lora-points",
            "701", "401", "201", "1", "--steps", "4", "--save-every", "4", "--lr", "1e-2", "--eval-samples", "2",
            "--eval-batch", "2"]
    ENTRY["train_sd"](base + ["--name", "ref"])
    capfd.readouterr()
    proc = run_until(base + ["--name", "sig"], tmp_path / "flag", 2, ENTRY["train_sd"])
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(300)
    err = capfd.readouterr().err
    assert proc.exitcode == 143 and len(err.splitlines()) == 1 and "Traceback" not in err, (proc.exitcode, err)
    assert err.startswith("train_sd.py: interrupted by SIGTERM: stopped after update 2 (checkpoint ") and \
        err.rstrip().endswith("--name sig --resume"), err
    assert runio.latest_checkpoint(tmp_path / "sig").name == "step_0000002"
    ENTRY["train_sd"](base + ["--name", "sig", "--resume"])
    for f in ["checkpoints/step_0000004/weights.safetensors"] + [f"lora/tuned_{i}.safetensors" for i in (1, 2, 3, 4)]:
        same_tensors(tmp_path / "ref" / f, tmp_path / "sig" / f)


def test_second_signal_stops_at_once():
    """Inside graceful_stop the first SIGINT is only a request (a repeat within REPEAT_S too: torchrun passes a Ctrl-C
    on to workers that got it already); a later one raises Interrupted (exit 130) at once. On exit the handler it
    found is back (here a marker, as whatever ran before in this test process may have left any handler)."""

    def found(signum, frame):
        raise AssertionError("graceful_stop's handler should be in place")

    outer = signal.signal(signal.SIGINT, found)
    try:
        with runio.graceful_stop():
            assert signal.getsignal(signal.SIGINT) is not found
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert runio.stop_requested() == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C passed on by a launcher: still only a request
            time.sleep(runio.REPEAT_S + 0.1)
            with pytest.raises(runio.Interrupted, match="SIGINT again: stopped at once; continue from the last "
                                                        "checkpoint with: python ") as e:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            assert e.value.code == 130
        assert runio.stop_requested() is None and signal.getsignal(signal.SIGINT) is found
    finally:
        signal.signal(signal.SIGINT, outer)


def test_out_of_disk_is_one_line_and_resumable(cache, reference, tmp_path, capfd, monkeypatch):
    """ENOSPC while checkpoint 6 is written: one line, exit 2; the checkpoint of update 4 is intact, and --resume
    (with space again) ends bit-identical to the uninterrupted run."""
    argv = toy_argv(cache, tmp_path, name="full", budget=6, save_every=4)
    real = runio.save_file

    def full(tensors, path, *a, **kw):
        if "step_0000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(runio, "save_file", full)
    err = one_line(capfd, 2, train_toy.main, argv)
    assert err.startswith("train_toy.py: error: no space left on the device")
    assert err.rstrip().endswith("--resume") and "the last complete checkpoint is intact" in err
    assert runio.latest_checkpoint(tmp_path / "full").name == "step_0000004"
    monkeypatch.setattr(runio, "save_file", real)
    train_toy.main(argv + ["--resume"])
    same_tensors(reference / "lora.safetensors", tmp_path / "full" / "lora.safetensors")


def test_ctrl_c_outside_a_training_loop_is_one_line(capfd):
    """A script interrupted where no update runs (a benchmark, a build, the argument checks): one line, exit 130; a
    full disk there says to run the command again (a benchmark has no --resume)."""
    import bench_sd

    def interrupt(*args):
        raise KeyboardInterrupt

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    err = one_line(capfd, 130, runio.cli, interrupt, train_toy.Args, None, [])
    assert err.endswith("interrupted by SIGINT\n")
    assert one_line(capfd, 130, runio.cli, lambda a: None, train_toy.Args, interrupt, []).endswith("by SIGINT\n")
    err = one_line(capfd, 2, runio.cli, full, bench_sd.Args, None, [])
    assert err.endswith("no space left on the device ([Errno 28] No space left on device): free some space; then run "
                        "the command again\n"), err


# ----------------------------------------------------------------------------- library functions copied elsewhere


def test_library_functions_refuse_malformed_inputs():
    """What a reader copies into other code says what to pass instead of computing something wrong: LoRA points that
    are empty or not strictly decreasing (active_loras would pick the wrong branches), sampler prompts, seeds and
    batch sizes (a batch of 0 would loop forever, a negative one return nothing)."""
    import sd

    assert shortft.active_loras(501, (761, 501, 261, 1)) == (0, 1)
    for points in ((), (261, 501, 761, 1), (761, 761, 1)):
        with pytest.raises(ValueError, match="must be non-empty and strictly decreasing"):
            shortft.active_loras(501, points)
    sd.check_sampler_inputs(["a", "b"], [0, 1], 1)
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        sd.check_sampler_inputs("a cat", [0], 1)
    with pytest.raises(ValueError, match="one seed per prompt, got 2 prompts and 1 seeds"):
        sd.check_sampler_inputs(["a", "b"], [0], 1)
    for batch in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch must be a positive integer"):
            sd.check_sampler_inputs(["a"], [0], batch)
