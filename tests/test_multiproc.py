"""Several processes on the CPU (gloo): `accelerate launch --multi_gpu --num_processes 2 train_sd.py --tiny` trains one
model, as one process would at twice the batch; only the main process writes; a SIGKILL plus `--resume` continues
exactly.

What "the same total batch" means here. Every process of a run seeds the same random streams and draws the whole
batch — N × B prompts, N × B noise latents x_T and one chain per micro-batch — then keeps its own B (process r: the
r-th slice). So the 2-process run at --batch-size 1 draws exactly what one process at --batch-size 2 draws, and the
two runs differ only in where the batch mean is taken: inside one backward pass, or as the all-reduced mean of two
per-process gradients. That is equal in exact arithmetic and equal to float rounding in practice, which the test checks
after 4 updates (4 progressive stages, each training other branches). Other choices were possible (independent
per-process streams, compared only in distribution); this one makes the equivalence exact by construction, and it is
also what makes resume exact: every process's streams equal the main process's, which the checkpoint stores.

One 2-process run (module fixture `two`) is SIGKILLed inside a checkpoint write and resumed under 2 processes; the
tests read its two launches. A run whose gradients are not averaged fails: its processes hold different weights
(train_sd.py itself stops at the first checkpoint), and neither equals the batch-2 run; a run that sums instead of
averaging logs twice the gradient norm and ends elsewhere under AdamW's ε.

accelerate 1.15 starts several CPU processes only with --multi_gpu (it runs torchrun; train_sd.py then picks gloo
because the machine has no accelerator) or under MPI: `accelerate launch --cpu --num_processes 2` starts one process,
which train_sd.py refuses with one line. No accelerate config of the user is read (HF_HOME points into the test's
folder), and each launch gets a free port. About 100 s on 2 shared, busy cores.

Run: python -m pytest -q tests/test_multiproc.py
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runio
import sd
import train_sd

ROOT = Path(__file__).resolve().parent.parent
GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
pytestmark = [pytest.mark.skipif(not GLOO, reason="needs torch.distributed with the gloo backend"),
              pytest.mark.skipif(os.name != "posix", reason="kills processes with SIGKILL (POSIX)")]

RUN = dict(num_steps=10, lora_points=[701, 401, 201, 1], steps=4, save_every=2, eval_samples=2, eval_batch=2,
           lr=1e-2, budget=1e6, budget_unit="cpu_seconds")
"""The runs: tiny SD on a 10-step grid, 4 updates = 4 stages, checkpoints at 2 and 4, a CPU-seconds budget that never
binds but is counted (and combined over processes) at every update."""
TIMED = {"time/update_s", "time/cpu_s", "budget/spent"}
"""Metric keys that measure the machine (not the same in two runs)."""


def flags(**kw) -> list[str]:
    """train_sd.py's command line for `kw` (field names)."""
    out = []
    for k, v in kw.items():
        name = "--" + k.replace("_", "-")
        out += [name] if v is True else [name, *map(str, v)] if isinstance(v, list) else [name, str(v)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(tmp: Path, **extra) -> dict:
    """The environment of a launch: one thread per process, no user accelerate config, the repo importable."""
    return {**os.environ, "HF_HOME": str(tmp / "hf"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def accelerate_launch(tmp: Path, args: list[str], script: str = "tests/mp_train.py", processes: int = 2,
                      multi: bool = True) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if multi else ["--cpu"]),
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), script, *args]


def launch(tmp: Path, args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 tests/mp_train.py ARGS`; a port taken in between is retried."""
    for _ in range(3):
        r = subprocess.run(accelerate_launch(tmp, args), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode == 0 or "address already in use" not in (r.stdout + r.stderr).lower():
            return r
    return r


def ranks(dump: Path) -> list[dict]:
    """Each process's result (update, skipped, spent), writes and final LoRA weights, as tests/mp_train.py left them."""
    out = []
    for r in (0, 1):
        done = dump / f"rank{r}.json"
        out.append({"writes": (dump / f"writes{r}.txt").read_text().splitlines(),
                    **({**json.loads(done.read_text()), "weights": load_file(str(dump / f"rank{r}.safetensors"))}
                       if done.exists() else {})})
    return out


def rows(run: Path) -> list[dict]:
    """metrics.jsonl without the keys that measure the machine."""
    return [{k: v for k, v in row.items() if k not in TIMED} for row in runio.read_jsonl(run / "metrics.jsonl")]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """`python train_sd.py --tiny` under 2 processes at --batch-size 1, from scratch (the main process builds the tiny
    model in the run folder while the other waits), SIGKILLed — the launcher and both processes — while the main
    process writes checkpoint 4 (its files in place, no manifest yet); then the same command with `--resume` under 2
    processes, which falls back to checkpoint 2 and redoes updates 3 and 4. What the killed run had logged and written
    for updates 3 and 4 is kept aside; every process's writes under the run folder are recorded in both launches."""
    tmp = tmp_path_factory.mktemp("two")
    run, flag = tmp / "runs" / "two", tmp / "paused"
    args = ["--tiny", "--out-dir", str(tmp / "runs"), "--name", "two", *flags(**RUN)]
    env = launch_env(tmp, RUNIO_PAUSE=f"folder-filled@step_0000004:{flag}", MP_AUDIT=str(tmp / "runs"),
                     MP_DUMP=str(tmp / "killed"))
    killed = subprocess.Popen(accelerate_launch(tmp, args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = [killed.pid]
    try:
        deadline = time.monotonic() + 400
        while not flag.exists():
            assert killed.poll() is None, killed.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "checkpoint 4 not reached in 400 s"
            time.sleep(0.05)
        pids += [int((tmp / "killed" / f"pid{r}").read_text()) for r in (0, 1)]
    finally:
        kill_all(pids)
        killed.wait()
        killed.stderr.close()
    at_kill = {"checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()), "rows": rows(run),
               "step4": {n: load_file(str(run / "checkpoints" / ".step_0000004.tmp" / f"{n}.safetensors"))
                         for n in ("weights", "optimizer")}}

    r = launch(tmp, [*args, "--resume"], launch_env(tmp, MP_AUDIT=str(tmp / "runs"), MP_DUMP=str(tmp / "resumed")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"run": run, "tiny": run / "tiny", "at_kill": at_kill, "killed": ranks(tmp / "killed"),
            "resumed": ranks(tmp / "resumed"), "stdout": r.stdout}


def one_process(two, tmp_path, batch_size: int) -> dict:
    """The same run as one process (in this one) at `batch_size`, uninterrupted."""
    torch.set_flush_denormal(True)
    args = train_sd.Args(tiny=True, tiny_dir=str(two["tiny"]), out_dir=str(tmp_path), name=f"b{batch_size}",
                         batch_size=batch_size, **RUN)
    return train_sd.main(args)


def test_two_processes_train_like_one_process_at_twice_the_batch(two, tmp_path):
    """Both processes end with the same weights bit for bit. They equal one process at --batch-size 2 on the same
    draws to within 0.1 % of one update (AdamW moves a weight by about lr per update, whatever the gradient's size, so
    rounding in the batch mean shows most where a gradient element is at rounding level), while one process at
    --batch-size 1 ends about 4 updates away: a run with per-process or one process's gradients fails. The logged
    grad/norm is the norm of the mean gradient (a sum would double it), loss and reward are the whole batch's, and
    updates, stages and skips are one process's."""
    p0, p1 = two["resumed"]
    assert p0["weights"].keys() == p1["weights"].keys() and len(p0["weights"]) > 0
    assert all(torch.equal(p0["weights"][k], p1["weights"][k]) for k in p0["weights"])
    assert "× 2" in two["stdout"] and "effective batch 2" in two["stdout"]

    b2, b1 = one_process(two, tmp_path, 2), one_process(two, tmp_path, 1)
    lr = RUN["lr"]
    diff = max((p0["weights"][k] - b2["weights"][k]).abs().max().item() for k in b2["weights"])
    apart = max((b1["weights"][k] - b2["weights"][k]).abs().max().item() for k in b2["weights"])
    assert diff < 1e-3 * lr and apart > lr, (diff, apart)

    mine, one = rows(two["run"]), rows(b2["run_dir"])
    assert [r.keys() for r in mine] == [r.keys() for r in one]
    for a, b in zip(mine, one):
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (k, a, b)
            else:
                assert a[k] == b[k], (k, a, b)
    assert [r["stage"] for r in mine if "stage" in r] == [1, 2, 3, 4]
    assert (p0["update"], p0["skipped"]) == (p1["update"], p1["skipped"]) == (b2["update"], b2["skipped"]) == (4, 0)


def test_only_the_main_process_writes(two):
    """Process 1 creates, opens for writing, renames or deletes nothing under the run folder, neither in the killed
    run (which built the tiny model) nor in the resumed one; process 0 wrote everything once: args.json, one metrics
    row per update and one evaluation row, complete checkpoints 2 and 4, lora/, the evaluation grid, and no leftover
    temporary file. Both processes count the same budget spent (CPU-seconds summed over the processes, wall-seconds
    of the slowest), so they agree on stages and on when to stop."""
    (k0, k1), (r0, r1) = two["killed"], two["resumed"]
    assert k1["writes"] == [] and r1["writes"] == [], (k1["writes"][:5], r1["writes"][:5])
    written = " ".join(k0["writes"] + r0["writes"])
    for what in ("args.json", "metrics.jsonl", "step_0000002", "step_0000004", "lora", "eval_000004.png", "tiny/sd"):
        assert what in written, what
    run = two["run"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "args.json", "checkpoints", "eval_000004.png", "lora",
                                                    "metrics.jsonl", "tiny"]  # .lock: the main process's run lock
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert all(runio.folder_problem(p, "state.json") is None for p in (run / "checkpoints").iterdir())
    assert runio.folder_problem(run / "lora") is None
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old", ".del"))]
    logged = runio.read_jsonl(run / "metrics.jsonl")
    assert [r["update"] for r in logged] == [1, 2, 3, 4, 4] and "eval/reward_mean" in logged[-1]
    assert r0["spent"] == r1["spent"] and r0["spent"]["updates"] == 4
    assert r0["spent"]["cpu_seconds"] == logged[3]["time/cpu_s"]


def test_sigkill_and_resume_under_two_processes_is_exact(two):
    """At the kill, checkpoint 4 was incomplete and updates 1-4 were logged. The resumed run started from checkpoint 2
    and redid updates 3 and 4 (stages 3 and 4) exactly as the killed run had done them: the same metrics rows, and
    checkpoint 4's weights and AdamW state bit for bit what the killed run had written before its manifest."""
    at_kill = two["at_kill"]
    assert at_kill["checkpoints"] == [".step_0000004.tmp", "step_0000002"]
    assert [r["update"] for r in at_kill["rows"]] == [1, 2, 3, 4]
    assert "resuming from" in two["stdout"] and "step_0000002" in two["stdout"]
    assert rows(two["run"])[:4] == at_kill["rows"]
    step4 = two["run"] / "checkpoints" / "step_0000004"
    for name, before in at_kill["step4"].items():
        after = load_file(str(step4 / f"{name}.safetensors"))
        assert after.keys() == before.keys() and len(after) > 0
        assert all(torch.equal(after[k], before[k]) for k in after), name
    state = json.loads((step4 / "state.json").read_text())
    assert state["stage"] == 4 and state["spent"]["updates"] == 4


def test_ctrl_c_under_two_processes_stops_both_after_one_update_and_resumes_exactly(two, tmp_path):
    """Ctrl-C in the terminal: SIGINT to the launcher and both processes at once (their process group), which torchrun
    then passes on to the processes once more. Both stop after the same update u, the main process writes checkpoint
    u, one line names the --resume command (the other process prints nothing), no traceback through this repo's code; the same
    command with --resume under 2 processes ends with the weights and AdamW state of the uninterrupted run."""
    run = tmp_path / "runs" / "two"
    args = ["--tiny", "--tiny-dir", str(two["tiny"]), "--out-dir", str(tmp_path / "runs"), "--name", "two",
            *flags(**RUN)]
    proc = subprocess.Popen(accelerate_launch(tmp_path, args), cwd=ROOT, env=launch_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 400
    while not any(row.get("update") == 1 for row in runio.read_jsonl(run / "metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    ours = [line for line in (out + err).splitlines() if line.startswith("train_sd.py:")]
    assert len(ours) == 1 and ours[0].startswith("train_sd.py: interrupted by SIGINT: stopped after update "), ours
    assert ours[0].endswith("--resume") and f'File "{ROOT}' not in err, err[-3000:]  # (torchrun's own traceback of
    # the SignalException it raised to stop is the launcher's, not the processes')
    u = int(ours[0].split("stopped after update ")[1].split()[0])
    assert 1 <= u < 4 and runio.latest_checkpoint(run).name == f"step_{u:07d}"
    r = launch(tmp_path, [*args, "--resume"], launch_env(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for n in ("weights", "optimizer"):
        a = load_file(str(two["run"] / "checkpoints" / "step_0000004" / f"{n}.safetensors"))
        b = load_file(str(run / "checkpoints" / "step_0000004" / f"{n}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n


def test_accelerate_cpu_launch_of_two_processes_is_refused_in_one_line(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts a single process (accelerate 1.15 runs several CPU processes
    only under MPI): train_sd.py says so in one line and names the commands that work, instead of training one process
    at half the batch asked for."""
    r = subprocess.run(accelerate_launch(tmp_path, ["--tiny", "--out-dir", str(tmp_path)], script="train_sd.py",
                                         multi=False), cwd=ROOT, env=launch_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    line = [x for x in r.stderr.splitlines() if x.startswith("train_sd.py: error:")]
    assert len(line) == 1 and "started a single process" in line[0] and "--multi_gpu" in line[0], r.stderr[-2000:]
    assert not (tmp_path / "sd-tiny").exists()


class FakeAccelerator:
    """Stands in for 2 processes: `reduce(mean)` averages this process's flat tensor with the other's."""

    num_processes, scaler = 2, None

    def __init__(self, other: torch.Tensor):
        self.other = other

    def reduce(self, t, reduction):
        assert reduction == "mean"
        return (t + self.other) / 2

    def unscale_gradients(self):
        pass

    def gather(self, t):
        return torch.cat([t, t + 1])


def test_guarded_update_averages_gradients_and_keeps_missing_ones_missing():
    """The all-reduce in sd.guarded_update, against its closed form: each gradient becomes the mean of both processes';
    a parameter that neither process has a gradient for keeps none (AdamW leaves it and its moments alone, as in one
    process); one that only the other process has counts this process's as zero."""
    a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([2.0, 4.0]), None
    other = torch.tensor([4.0, 8.0, 6.0, 6.0, 0.0, 0.0, 1.0, 1.0, 0.0])  # a, b, c, then has-gradient flags
    opt = torch.optim.SGD([a, b, c], lr=1.0)
    applied, norm = sd.guarded_update(FakeAccelerator(other), opt, [a, b, c], max_grad_norm=0)
    assert applied and norm == pytest.approx(torch.tensor([3.0, 6.0, 3.0, 3.0]).norm().item())
    assert torch.equal(a.data, torch.tensor([-2.0, -5.0])) and torch.equal(b.data, torch.tensor([-2.0, -2.0]))
    assert torch.equal(c.data, torch.ones(2))  # no process had a gradient: untouched


def test_update_cost_sums_compute_and_takes_the_slowest_wall_time():
    """What an update cost a 2-process run: GFLOP and CPU-seconds of both processes, wall-seconds of the slower; the
    same numbers on every process (one gather), so a budget ends every process at the same update."""
    fake = FakeAccelerator(None)
    fake.device = torch.device("cpu")
    assert sd.update_cost(fake, 1.5, 2.0, 3.0) == (4.0, 5.0, 4.0)  # the other: 2.5, 3.0, 4.0


def test_accelerate_one_process_launcher_is_detected(monkeypatch):
    """The environment of accelerate's one-process launcher asked for more processes (MASTER_ADDR set, no world size)
    is refused; torchrun's world size is read; a plain `python train_sd.py` is one process."""
    for v in ("ACCELERATE_DYNAMO_BACKEND", "MASTER_ADDR", *sd.WORLD_SIZE_VARS):
        monkeypatch.delenv(v, raising=False)
    assert sd.launched_processes() == 1
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert sd.launched_processes() == 1
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(runio.RunError, match="started a single process"):
        sd.launched_processes()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert sd.launched_processes() == 4
