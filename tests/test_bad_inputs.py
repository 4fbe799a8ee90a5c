"""Every bad input and every interruption of the four scripts, through their real entry points.

Not part of the paper's method: the robustness contract of `train_toy.py`, `bench_toy.py`, `train_sd.py --tiny` (and
the same on the SD3 path, `train_sd.py --tiny-sd3`: every bad input the SD1.5 path refuses has an SD3 twin) and
`bench_sd.py --tiny`. A bad input (a numeric switch at 0, negative, nan, inf or absurd; an unknown name; a missing,
empty, binary or foreign file; a folder where a file goes; an unwritable or escaping run name; a resume that does not
fit its run) ends with exit status 2 and exactly one line on stderr, without a traceback; an argument error is found
before anything is built or written. A run killed with SIGKILL between updates, in the middle of a checkpoint write or
in the middle of the final LoRA write (stopped exactly there by runio's RUNIO_PAUSE hook) and then resumed with
--resume ends bit-identical to an uninterrupted run: the final checkpoint's weights and every tensor of the final LoRA.

Notation: CASES the bad inputs (script, arguments added to the script's tiny base arguments, words the one line must
hold, a preparation; script "train_sd3" is train_sd.py on the tiny SD3); a kill point "POINT@NAME" pauses where runio writes NAME (see runio._pause).

Run: python -m pytest -q tests/test_bad_inputs.py
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import tqdm
from safetensors.torch import load_file, save_file

import bench_sd
import bench_toy
import runio
from sigkill import kill_when_paused
import sd
import shortft
import tiny
import toy
import train_sd
import train_toy

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WORLD = dict(hidden=16, depth=1, pretrain_steps=30, pretrain_batch=64, shortcut_rank=4, distill_steps=10,
             distill_pairs=128, distill_batch=64)
POINTS = ["701", "401", "201", "1"]  # the 10-step grid's LoRA points: 4 progressive stages at a fifth of the cost
SD3_POINTS = ["913.3", "707.3", "464.9", "8.9"]  # the same on SD3's 10-step flow grid (shift 3), typed to one decimal
tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread, so that forking a training process is safe


def flags(d: dict) -> list[str]:
    """{'hidden': 16, 'lora_points': [1]} → ['--hidden', '16', '--lora-points', '1']."""
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, (list, tuple)) else [v])]
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network: a hub id that is not cached must fail at once, in one line."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, a toy world cache, tiny SD files, and a finished run of each training script."""
    root = tmp_path_factory.mktemp("bad")
    (root / "folder").mkdir()
    (root / "empty").mkdir()
    (root / "file").write_text("not a folder\n")
    (root / "empty.txt").write_text("")
    (root / "comments.txt").write_text("# only a comment\n\n")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "junk.safetensors").write_bytes(os.urandom(512))
    (root / "empty.safetensors").write_bytes(b"")
    save_file({"weight": torch.ones(3)}, str(root / "plain.safetensors"))
    torch.set_flush_denormal(True)  # as train_sd.main does
    sd_dir = root / "tiny"
    tiny.tiny_sd(sd_dir / "sd")
    tiny.tiny_clip(sd_dir / "clip")
    tiny.tiny_shortcut_lora(sd_dir / "shortcut_lora.safetensors", sd_dir / "sd" / "unet")
    partial = load_file(str(sd_dir / "shortcut_lora.safetensors"))  # the shortcut plus a module the UNet lacks
    partial.update({"unet.down_blocks.7.attentions.0.to_q.lora_A.weight": torch.ones(2, 8),
                    "unet.down_blocks.7.attentions.0.to_q.lora_B.weight": torch.ones(8, 2)})
    save_file(partial, str(root / "partial_shortcut.safetensors"))
    tiny.tiny_sd3(sd_dir / "sd3")  # what --tiny-sd3 builds, next to the SD1.5 files
    tiny.tiny_shortcut_lora(sd_dir / "shortcut_sd3_lora.safetensors", sd_dir / "sd3" / "transformer")
    partial = load_file(str(sd_dir / "shortcut_sd3_lora.safetensors"))  # the shortcut plus a block the model lacks
    partial.update({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.ones(2, 8),
                    "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.ones(8, 2)})
    save_file(partial, str(root / "partial_shortcut_sd3.safetensors"))
    for name, index, scheduler in (("flux", "FluxPipeline", {"shift": 3.0}),
                                   ("dynamic", "StableDiffusion3Pipeline", {"shift": 3.0, "use_dynamic_shifting": True})):
        (root / name / "scheduler").mkdir(parents=True)  # a pipeline folder this repo does not train
        (root / name / "model_index.json").write_text(json.dumps({"_class_name": index}))
        (root / name / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **scheduler}))
    shutil.copytree(sd_dir / "sd3", root / "not5", ignore=shutil.ignore_patterns("*_3"))  # SD3 without T5
    cache = root / "cache"
    toy.build_toy(toy.WorldArgs(cache_dir=str(cache), **WORLD), shortft.PAPER_LORA_POINTS)
    paths = {"root": root, "cache": cache, "tiny": sd_dir, "toy_runs": root / "toy-runs", "sd_runs": root / "sd-runs",
             "sd3_runs": root / "sd3-runs"}
    train_toy.train(train_toy.Args(**toy_settings(paths), name="done", save_every=1), log=lambda *a: None)
    train_sd.main(sd_args(paths, name="done", steps=2, save_every=1))
    train_sd.main(sd3_args(paths, name="done", steps=2, save_every=1))
    return paths


def toy_settings(paths, **kw) -> dict:
    """train_toy.Args fields of a tiny run: the cached tiny world, 2 updates."""
    return dict(WORLD, cache_dir=str(paths["cache"]), out_dir=str(paths["toy_runs"]), budget=2, budget_unit="updates",
                evals=1, eval_batch=8, batch_size=8) | kw


def sd_args(paths, **kw) -> train_sd.Args:
    """train_sd.Args of a tiny run: the tiny SD files, the 10-step grid, 2 updates."""
    base = dict(tiny=True, tiny_dir=str(paths["tiny"]), out_dir=str(paths["sd_runs"]), num_steps=10,
                lora_points=[int(p) for p in POINTS], steps=2, save_every=1, eval_samples=2, eval_batch=2)
    return train_sd.Args(**{**base, **kw})


def sd3_args(paths, **kw) -> train_sd.Args:
    """train_sd.Args of a tiny SD3 run: the tiny SD3 files, SD3's 10-step flow grid, 2 updates."""
    base = dict(tiny_sd3=True, tiny_dir=str(paths["tiny"]), out_dir=str(paths["sd3_runs"]), num_steps=10,
                lora_points=[float(p) for p in SD3_POINTS], steps=2, save_every=1, eval_samples=2, eval_batch=2)
    return train_sd.Args(**{**base, **kw})


def base_argv(script: str, paths: dict, out: Path) -> list[str]:
    """Tiny, valid arguments of each script, writing under `out`."""
    if script == "train_toy":
        return flags(toy_settings(paths, out_dir=out))
    if script == "bench_toy":
        return flags(dict(WORLD, cache_dir=paths["cache"], out_dir=out, seeds=[0], variants=["shortft"], budget=2,
                          budget_unit="updates", evals=1, eval_batch=8, grad_samples=8, chain_lengths=[10]))
    if script in ("train_sd", "train_sd3"):
        sd3_path = script == "train_sd3"
        return ["--tiny-sd3" if sd3_path else "--tiny",
                *flags(dict(tiny_dir=paths["tiny"], out_dir=out, num_steps=10, lora_points=SD3_POINTS if sd3_path
                            else POINTS, steps=2, save_every=1, eval_samples=2, eval_batch=2))]
    return ["--tiny", *flags(dict(device="cpu", num_steps=10, lora_points=POINTS, batch_sizes=[1], warmup=0,
                                  repeats=1, lora_rank=4, out=out / "bench"))]


ENTRY = {  # what each script's __main__ block runs
    "train_toy": train_toy.main,
    "bench_toy": bench_toy.main,
    "train_sd": lambda argv: runio.cli(train_sd.main, train_sd.Args, train_sd.check_args, argv),
    "train_sd3": lambda argv: runio.cli(train_sd.main, train_sd.Args, train_sd.check_args, argv),
    "bench_sd": lambda argv: runio.cli(bench_sd.main, bench_sd.Args, bench_sd.check_args, argv),
}


# ----------------------------------------------------------------------------- preparations of the resume cases


def copy_run(paths, world, name):
    """A copy of the finished run `done` of `world` (toy or sd) under a new name, in an out folder of its own."""
    out = paths["root"] / f"copy-{world}-{len(list(paths['root'].glob('copy-*')))}"
    shutil.copytree(paths[f"{world}_runs"] / "done", out / name)
    return out


def resign(ckpt: Path, change) -> None:
    """Apply `change(weights) -> weights` to a checkpoint's weights and re-sign its manifest (a file that is complete
    but holds the wrong tensors, as bytes damaged before the manifest was written)."""
    import hashlib

    path = ckpt / "weights.safetensors"
    save_file(change(load_file(str(path))), str(path))
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["weights.safetensors"] = {"bytes": path.stat().st_size,
                                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (ckpt / "state.json").write_text(json.dumps(state))


def rewrite_checkpoints(run: Path, change) -> None:
    for ckpt in (run / "checkpoints").iterdir():
        resign(ckpt, change)


def finished_toy(paths, name):  # a preparation: the folder of the finished runs
    return paths["toy_runs"]


def finished_sd(paths, name):
    return paths["sd_runs"]


def foreign(weights):
    return {"unet.other.lora_A.weight": torch.zeros(2, 3)}


def nonfinite(weights):
    return {k: torch.full_like(v, math.nan) for k, v in weights.items()}


def truncate(run: Path) -> None:
    for ckpt in (run / "checkpoints").iterdir():
        data = (ckpt / "weights.safetensors").read_bytes()
        (ckpt / "weights.safetensors").write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- the matrix


@dataclasses.dataclass
class Case:
    script: str
    argv: list
    words: str  # the one line holds these
    prepare: object = None  # prepare(paths, name) -> out folder holding run `name`; None: a fresh out folder
    built: bool = False  # fails once something is built (a model, a world), not in the argument check

    def id(self, i: int) -> str:
        return f"{i}:{self.script} {' '.join(self.argv)}"[:80]


TOY_NUMBERS = [("budget", "0", "--budget 0.0: must be a finite number > 0"), ("budget", "-1", "--budget -1.0"),
               ("budget", "nan", "'nan' is not a finite number"), ("budget", "inf", "'inf' is not a finite number"),
               ("batch_size", "0", "--batch-size 0"), ("batch_size", "-5", "--batch-size -5"),
               ("batch_size", "1000000000000", "--batch-size 1000000000000"), ("evals", "0", "--evals 0"),
               ("classes", "0", "--classes 0"), ("classes", "3", "--modes 8: must be a multiple of --classes (3)"),
               ("threads", "0", "--threads 0"), ("threads", "100000", "--threads 100000"),
               ("lora_rank", "0", "--lora-rank 0"), ("lora_rank", "-1", "--lora-rank -1"),
               ("lr", "nan", "'nan' is not a finite number"), ("lr", "inf", "'inf' is not a finite number"),
               ("lr", "0", "--lr 0.0: must be a finite number in (0, 1]"), ("lr", "-0.001", "--lr -0.001"),
               ("lr", "1e300", "--lr 1e+300: must be a finite number in (0, 1]; Adam moves each weight"),
               ("max_grad_norm", "nan", "'nan' is not a finite number"), ("max_grad_norm", "-1", "0: no clipping"),
               ("lora_alpha", "0", "--lora-alpha 0.0"), ("eval_batch", "1", "--eval-batch 1"),
               ("save_every", "-1", "--save-every -1"), ("seed", "-1", "--seed -1"),
               ("world_seed", str(2**40), "--world-seed 1099511627776"), ("hidden", "1000000000", "--hidden"),
               ("modes", "0", "--modes 0"), ("radius", "0", "--radius 0.0"), ("radius", "1e30", "--radius 1e+30"),
               ("mode_std", "3", "--mode-std 3.0: must be a finite number in (0, 2]"), ("p_uncond", "1.5", "--p-uncond"),
               ("pretrain_steps", "0", "--pretrain-steps 0"), ("distill_weight_power", "1e9", "--distill-weight-power"),
               ("num_steps", "20", "--num-steps 20: the toy world runs SD1.5's 50-step grid"),
               ("segment1_grad_steps", "0", "--segment1-grad-steps 0"),
               ("segment1_grad_steps", "99", "--segment1-grad-steps 99: must be in [1, 12]"),
               ("draft_k", "0", "--draft-k 0: DRaFT-K's K (steps with gradient, at most the chain length) must be in [1, 50], got 0"),
               ("draft_lv_n", "1000000000", "--draft-lv-n 1000000000"),
               ("alignprop_k_min", "60", "--alignprop-k-min 60"), ("refl_last", "0", "--refl-last 0"),
               ("drtune_k", "51", "--drtune-k 51")]
CASES = [Case("train_toy", [f"--{k.replace('_', '-')}", v], w) for k, v, w in TOY_NUMBERS] + [
    Case("train_toy", ["--method", "sgd"], "--method sgd: unknown method"),
    Case("train_toy", ["--reward", "beauty"], "--reward beauty: unknown reward 'beauty'"),
    Case("train_toy", ["--reward", "region:"], "has ':' but no weight"),
    Case("train_toy", ["--reward", "region:nan"], "is not finite"),
    Case("train_toy", ["--reward", "region,,quality"], "empty reward name"),
    Case("train_toy", ["--reward", "aesthetic"], "unknown reward 'aesthetic'"),  # an image reward on 2D points
    Case("train_toy", ["--reward", "region,region"], "appears twice"),
    Case("train_toy", ["--lora-points", "760", "501", "261", "1"], "--lora-points 760 501 261 1: LoRA point(s) [760]"),
    Case("train_toy", ["--lora-points", "761", "501", "261"], "--lora-points 761 501 261: the last LoRA point must be"),
    Case("train_toy", ["--lora-points", "261", "501", "761", "1"], "strictly decreasing"),
    Case("train_toy", ["--lora-points", "761", "501"], "must be the grid's last step 1"),
    Case("train_toy", ["--stage-fractions", "1", "2"], "--stage-fractions 1 2: stage fractions"),
    Case("train_toy", ["--stage-fractions", "1", "1", "1", "-1"], "must be 4 positive numbers"),
    Case("train_toy", ["--prefix", "sideways"], "--prefix sideways"),
    Case("train_toy", ["--budget-unit", "hours"], "--budget-unit hours"),
    Case("train_toy", ["--name", "../../x"], "--name ../../x: must be one plain folder name"),
    Case("train_toy", ["--name", "/tmp/abs"], "must be one plain folder name"),
    Case("train_toy", ["--out-dir", "{root}/file"], "is a file, not a folder"),
    Case("train_toy", ["--out-dir", "{root}/file/runs"], "is a file, not a folder"),
    Case("train_toy", ["--cache-dir", "{root}/file/cache"], "--cache-dir"),
    Case("train_toy", ["--batch-size", "abc"], "invalid int value: 'abc'"),
    Case("train_toy", ["--no-such-flag", "1"], "unrecognized arguments"),
    Case("train_toy", ["--resume"], "--resume: nothing to resume"),
    Case("train_toy", ["--name", "done"], "--name done: {out}/done already holds a run", finished_toy),
    Case("train_toy", ["--name", "done", "--resume", "--method", "draft_k"], "--method draft_k: {out}/done was made "
         "with shortft: resume with that value", finished_toy),
    Case("train_toy", ["--name", "done", "--resume", "--lora-rank", "8"], "--lora-rank 8: ", finished_toy),
    Case("train_toy", ["--name", "done", "--resume", "--reward", "quality"], "--reward quality: ",
         finished_toy),
    Case("train_toy", ["--name", "done", "--resume", "--hidden", "32"], "--hidden 32: ", finished_toy),
    Case("train_toy", ["--name", "x", "--resume"], "nothing to resume, {out}/x/checkpoints holds no complete "
         "checkpoint", lambda p, n: (out := copy_run(p, "toy", n), truncate(out / n))[0]),
    Case("train_toy", ["--name", "x", "--resume"], "1 unexpected keys (unet.other.lora_A.weight)",
         lambda p, n: (out := copy_run(p, "toy", n), rewrite_checkpoints(out / n, foreign))[0], built=True),
    Case("train_toy", ["--name", "x", "--resume"], "no checkpoint that loads (2 skipped; the newest: ",
         lambda p, n: (out := copy_run(p, "toy", n), rewrite_checkpoints(out / n, nonfinite))[0], built=True),

    Case("bench_toy", ["--seeds"], "--seeds (empty): give one or more distinct seeds"),
    Case("bench_toy", ["--seeds", "0", "0"], "--seeds 0 0"),
    Case("bench_toy", ["--seeds", "-1"], "--seeds -1"),
    Case("bench_toy", ["--variants", "shortft", "sgd"], "unknown variant 'sgd'"),
    Case("bench_toy", ["--variants"], "--variants (empty)"),
    Case("bench_toy", ["--chain-lengths", "3"], "--chain-lengths 3"),
    Case("bench_toy", ["--chain-lengths", "2000"], "--chain-lengths 2000"),
    Case("bench_toy", ["--chain-lengths"], "--chain-lengths (empty)"),
    Case("bench_toy", ["--grad-samples", "0"], "--grad-samples 0"),
    Case("bench_toy", ["--smooth-reward", "beauty"], "--smooth-reward beauty: unknown reward"),
    Case("bench_toy", ["--budget", "-2"], "--budget -2.0"),
    Case("bench_toy", ["--evals", "0"], "--evals 0"),
    Case("bench_toy", ["--threads", "0"], "--threads 0"),
    Case("bench_toy", ["--name", "../x"], "--name ../x"),
    Case("bench_toy", ["--out-dir", "{root}/file"], "is a file, not a folder"),
    Case("bench_toy", ["--guidance", "inf"], "'inf' is not a finite number"),
    Case("bench_toy", ["--mode-std", "-0.1"], "--mode-std -0.1"),

    Case("train_sd", ["--steps", "-3"], "--steps -3"),
    Case("train_sd", ["--steps", "0"], "--steps 0"),
    Case("train_sd", ["--resolution", "30"], "--resolution 30: must be a multiple of 8"),
    Case("train_sd", ["--resolution", "0"], "--resolution 0"),
    Case("train_sd", ["--resolution", "1000000"], "--resolution 1000000"),
    Case("train_sd", ["--grad-accum", "0"], "--grad-accum 0"),
    Case("train_sd", ["--save-every", "-1"], "--save-every -1: must be a finite number ≥ 0; 0: only at the end"),
    Case("train_sd", ["--batch-size", "0"], "--batch-size 0"),
    Case("train_sd", ["--batch-size", "100000"], "for more, use --grad-accum"),
    Case("train_sd", ["--lora-rank", "0"], "--lora-rank 0"),
    Case("train_sd", ["--lr", "nan"], "'nan' is not a finite number"),
    Case("train_sd", ["--lr", "0"], "--lr 0.0"),
    Case("train_sd", ["--lr", "2"], "--lr 2.0: must be a finite number in (0, 1]"),
    Case("train_sd", ["--lora-alpha", "1e30"], "--lora-alpha 1e+30"),
    Case("train_sd", ["--max-grad-norm", "nan"], "'nan' is not a finite number"),
    Case("train_sd", ["--max-grad-norm", "-1"], "--max-grad-norm -1.0"),
    Case("train_sd", ["--weight-decay", "-1"], "--weight-decay -1.0"),
    Case("train_sd", ["--guidance", "-1"], "--guidance -1.0"),
    Case("train_sd", ["--shortcut-scale", "0"], "--shortcut-scale 0.0"),
    Case("train_sd", ["--shortcut-guidance=-inf"], "'-inf' is not a finite number"),
    Case("train_sd", ["--eval-every", "-1"], "--eval-every -1"),
    Case("train_sd", ["--eval-samples", "0"], "--eval-samples 0"),
    Case("train_sd", ["--eval-batch", "0"], "--eval-batch 0"),
    Case("train_sd", ["--seed", str(2**33)], "--seed 8589934592"),
    Case("train_sd", ["--mixed-precision", "fp8"], "--mixed-precision fp8"),
    Case("train_sd", ["--log-with", "nope"], "--log-with nope"),
    Case("train_sd", ["--lora-targets", ""], "--lora-targets '': an empty module name"),
    Case("train_sd", ["--t5"], "--t5 True: SD1.5 has no T5 text encoder: drop --t5"),
    Case("train_sd", ["--shortcut", "hyper-sd3-8-cfg"], "a shortcut of sd3 models, not of this sd1.5 model: choose from "
                                                        "hyper-sd-8"),
    Case("train_sd", ["--method", "nope"], "--method nope: unknown method"),
    Case("train_sd", ["--lora-points", "701", "450", "1"], "LoRA point(s) [450] are not on the 10-step grid"),
    Case("train_sd", ["--stage-fractions", "0.5", "0.5"], "must be 4 positive numbers"),
    Case("train_sd", ["--name", "../../x"], "--name ../../x: must be one plain folder name"),
    Case("train_sd", ["--out-dir", "{root}/file/runs"], "is a file, not a folder"),
    Case("train_sd", ["--tiny-dir", "{root}/file/tiny"], "--tiny-dir"),
    Case("train_sd", ["--model", "{root}/nope"], "the folder does not exist"),
    Case("train_sd", ["--model", "./nope"], "--model ./nope: the folder does not exist"),
    Case("train_sd", ["--model", "{root}/file"], "is a file: pass an SD1.5 pipeline folder"),
    Case("train_sd", ["--model", "{root}/empty"], "the folder has no unet/config.json"),
    Case("train_sd", ["--model", "models/sd15"], "not in the local hub cache and the hub is offline: fetch it with "
                                                 "`hf download models/sd15`"),
    Case("train_sd", ["--model", "bad id!"], "nor a hub id"),
    Case("train_sd", ["--reward", "nope"], "--reward nope: unknown reward 'nope'"),
    Case("train_sd", ["--reward", "symmetry:1:2"], "is not a number"),
    Case("train_sd", ["--reward", "region"], "unknown reward 'region'"),  # a toy reward on images
    Case("train_sd", ["--clip-model", "{root}/missing"], "--clip-model"),
    Case("train_sd", ["--clip-model", "{root}/empty"], "the folder has no config.json"),
    Case("train_sd", ["--shortcut", "nope"], "unknown shortcut 'nope'"),
    Case("train_sd", ["--shortcut", "{root}/missing.safetensors"], "the file does not exist"),
    Case("train_sd", ["--shortcut", "{root}/folder"], "is a folder: pass a .safetensors LoRA file"),
    Case("train_sd", ["--shortcut", "{root}/junk.safetensors"], "not a readable .safetensors file"),
    Case("train_sd", ["--shortcut", "{root}/empty.safetensors"], "not a readable .safetensors file"),
    Case("train_sd", ["--shortcut", "{root}/plain.safetensors"], "holds no LoRA weights"),
    Case("train_sd", ["--no-tiny", "--model", "{tiny}/sd"], "hf download ByteDance/Hyper-SD"),  # shortcut: a hub file
    Case("train_sd", ["--train-prompts", "{root}/missing.txt"], "does not exist"),
    Case("train_sd", ["--train-prompts", "{root}/empty.txt"], "has no prompts"),
    Case("train_sd", ["--train-prompts", "{root}/comments.txt"], "has no prompts"),
    Case("train_sd", ["--train-prompts", "{root}/binary.txt"], "is not UTF-8 text"),
    Case("train_sd", ["--eval-prompts", "{root}/folder"], "--eval-prompts"),
    Case("train_sd", ["--resume"], "--resume: nothing to resume"),
    Case("train_sd", ["--name", "done"], "{out}/done already holds a run", finished_sd),
    Case("train_sd", ["--name", "done", "--resume", "--method", "draft_k"], "--method draft_k: ",
         finished_sd),
    Case("train_sd", ["--name", "done", "--resume", "--lora-rank", "8"], "--lora-rank 8: ", finished_sd),
    Case("train_sd", ["--name", "done", "--resume", "--resolution", "64"], "--resolution 64: ",
         finished_sd),
    Case("train_sd", ["--name", "x", "--resume"], "holds no complete checkpoint",
         lambda p, n: (out := copy_run(p, "sd", n), truncate(out / n))[0]),
    Case("train_sd", ["--name", "x", "--resume"], "1 unexpected keys (unet.other.lora_A.weight)",
         lambda p, n: (out := copy_run(p, "sd", n), rewrite_checkpoints(out / n, foreign))[0], built=True),
    Case("train_sd", ["--shortcut", "{root}/partial_shortcut.safetensors"], "does not fit this UNet: 32 of its",
         built=True),
    Case("train_sd", ["--lora-targets", "to_q", "no_such_module"], "no UNet module is named 'no_such_module'",
         built=True),

    Case("bench_sd", ["--batch-sizes", "0"], "--batch-sizes 0"),
    Case("bench_sd", ["--batch-sizes"], "--batch-sizes (empty)"),
    Case("bench_sd", ["--methods", "nope"], "unknown method 'nope'"),
    Case("bench_sd", ["--method", "full"], "--method full: is not used by the benchmark"),
    Case("bench_sd", ["--device", "tpu"], "--device tpu: use cuda or cpu"),
    Case("bench_sd", ["--resolution", "30"], "--resolution 30"),
    Case("bench_sd", ["--warmup", "-1"], "--warmup -1"),
    Case("bench_sd", ["--repeats", "0"], "--repeats 0"),
    Case("bench_sd", ["--lora-rank", "0"], "--lora-rank 0"),
    Case("bench_sd", ["--shortcut-rank", "-4"], "--shortcut-rank -4"),
    Case("bench_sd", ["--mixed-precision", "fp8"], "--mixed-precision fp8"),
    Case("bench_sd", ["--guidance", "nan"], "'nan' is not a finite number"),
    Case("bench_sd", ["--seed", "-1"], "--seed -1"),
    Case("bench_sd", ["--out", "{root}/file/bench"], "is a file, not a folder"),
    Case("bench_sd", ["--out", "{root}/folder"], "is a folder"),
    Case("bench_sd", ["--num-steps", "-1"], "--num-steps -1"),
    Case("bench_sd", ["--draft-k", "11"], "--draft-k 11: DRaFT-K's K (steps with gradient, at most the chain length) must be in [1, 10], got 11"),
]
if not torch.cuda.is_available():
    CASES.append(Case("bench_sd", ["--device", "cuda"], "no CUDA device"))


# The SD3 path (train_sd.py --tiny-sd3): every bad input of the SD1.5 path, with the SD3 words where they differ, and
# what only a flow model can get wrong.
SD3_ARGV = {("--lora-points", "701", "450", "1"): ["--lora-points", "913.3", "450", "8.9"],
            ("--no-tiny", "--model", "{tiny}/sd"): ["--no-tiny-sd3", "--model", "{tiny}/sd3"],
            ("--shortcut", "{root}/partial_shortcut.safetensors"): ["--shortcut", "{root}/partial_shortcut_sd3.safetensors"],
            ("--shortcut", "hyper-sd3-8-cfg"): ["--shortcut", "hyper-sd-4"]}
SD3_WORDS = {"is a file: pass an SD1.5 pipeline folder": "is a file: pass an SD3 pipeline folder",
             "the folder has no unet/config.json": "the folder has no transformer/config.json",
             "does not fit this UNet: 32 of its": "does not fit this SD3 transformer: 32 of its",
             "no UNet module is named 'no_such_module'": "no transformer module is named 'no_such_module'",
             "--t5 True: SD1.5 has no T5 text encoder: drop --t5": "--t5 True: the model has no text_encoder_3/ (T5)",
             "a shortcut of sd3 models, not of this sd1.5 model: choose from hyper-sd-8":
                 "a shortcut of sd1.5 models, not of this sd3 model: choose from hyper-sd3-4-cfg"}
SD3_ARGV[("--t5",)] = ["--t5", "--model", "{root}/not5"]


def sd3_prepare(prepare):
    """A preparation of the SD1.5 path, on the SD3 runs (the finished run `done` of the SD3 path)."""
    return None if prepare is None else (lambda paths, name: prepare({**paths, "sd_runs": paths["sd3_runs"]}, name))


SD3_TWINS = [dataclasses.replace(c, script="train_sd3", argv=SD3_ARGV.get(tuple(c.argv), c.argv),
                                 words=SD3_WORDS.get(c.words, c.words), prepare=sd3_prepare(c.prepare))
             for c in CASES if c.script == "train_sd"]
CASES += SD3_TWINS + [
    Case("train_sd3", ["--lora-points", "814", "8.9"], "--lora-points 814 8.9: LoRA point(s) [814] are not on the "
         "10-step grid"),
    Case("train_sd3", ["--lora-points", "814", "8.9"], "; the grid: 1000.0 960.1 913.3 857.7 790.4 707.3 602.2 464.9 "
         "278.0 8.9"),
    Case("train_sd3", ["--num-steps", "3", "--lora-points"], "--lora-points (empty): the 3-step grid is too short for the "
         "paper's 4 distinct LoRA points"),
    Case("train_sd3", ["--model", "{root}/flux"], "a FluxPipeline folder: train_sd.py fine-tunes StableDiffusionPipeline "
         "(SD1.5) and StableDiffusion3Pipeline (SD3, SD3.5) models"),
    Case("train_sd3", ["--model", "{root}/dynamic"], "--model {root}/dynamic: this flow-matching scheduler shifts its grid "
         "by image size (use_dynamic_shifting"),
    Case("train_sd3", ["--resolution", "256"], "--resolution 256: at most 128 for this model", built=True),
    Case("train_sd3", ["--t5-tokens", "513"], "--t5-tokens 513: must be a finite number in [0, 512]"),
    Case("train_sd3", ["--t5-tokens", "-1"], "--t5-tokens -1: must be a finite number in [0, 512]"),
    Case("train_sd3", ["--t5", "--t5-tokens", "0"], "--t5-tokens 0: must be a finite number in [1, 512]"),
]
SD1_5_ONLY = [Case("train_sd", ["--t5-tokens", "77"], "--t5-tokens 77: SD1.5 has no T5 prompt tokens")]
CASES += SD1_5_ONLY


def test_every_sd1_5_bad_input_is_refused_on_the_sd3_path_too():
    sd15 = [c for c in CASES if c.script == "train_sd" and c not in SD1_5_ONLY]
    assert len(SD3_TWINS) == len(sd15) > 60
    assert all(SD3_ARGV.get(tuple(a.argv), a.argv) == b.argv for a, b in zip(sd15, SD3_TWINS))


@pytest.mark.parametrize("case", CASES, ids=[c.id(i) for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_exit_2(case, files, tmp_path, capfd):
    """In process, through what the script's __main__ runs: exit status 2, one line on stderr (fd level, so library
    loggers count too), no traceback; an argument error leaves the output folder untouched."""
    out = case.prepare(files, "x") if case.prepare else tmp_path / "out"
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else []
    argv = base_argv(case.script, files, out) + [a.format(**files) for a in case.argv]
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        ENTRY[case.script](argv)
    err = capfd.readouterr().err
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert case.words.format(out=out, **files) in err, err
    if not case.built:  # found by the argument check or the resume check: nothing was written
        assert (sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else []) == before


@pytest.mark.parametrize("script, argv, words", [
    ("train_toy.py", ["--lr", "inf"], "train_toy.py: error: argument --lr: 'inf' is not a finite number"),
    ("bench_toy.py", ["--seeds"], "bench_toy.py: error: --seeds (empty): give one or more distinct seeds"),
    ("train_sd.py", ["--tiny", "--steps", "-3"], "train_sd.py: error: --steps -3: must be a finite number ≥ 1"),
    ("train_sd.py", ["--model", "models/sd15"], "`hf download models/sd15`"),
    ("train_sd.py", ["--tiny-sd3", "--lora-points", "814", "8.9"], "LoRA point(s) [814] are not on the 28-step grid"),
    ("bench_sd.py", ["--tiny", "--device", "cpu", "--repeats", "0"], "bench_sd.py: error: --repeats 0"),
])
def test_bad_input_in_a_real_process(script, argv, words, tmp_path):
    """`python script.py …` as a user types it (HF_HUB_OFFLINE=1): exit status 2 and one line, with no network round
    trip for an uncached hub id."""
    r = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_resolution_checked_against_the_loaded_model():
    """--resolution must be a multiple of the VAE's × UNet's downsampling: SD1.5's 8 · 8 = 64, known only once its
    configs are loaded (sd.check_model, before anything is written)."""
    from types import SimpleNamespace as NS

    vae = NS(config=NS(block_out_channels=(128, 256, 512, 512)))  # SD1.5's configs
    modules = [(f"mid_block.attentions.0.{t}", None) for t in sd.LORA_TARGETS]
    unet = NS(config=NS(block_out_channels=(320, 640, 1280, 1280)), named_modules=lambda: modules)
    sd.check_model(unet, vae, 576, sd.LORA_TARGETS)
    with pytest.raises(runio.ArgError, match=r"^--resolution 520: must be a multiple of 64 for this model"):
        sd.check_model(unet, vae, 520, sd.LORA_TARGETS)


def test_model_path_or_hub_id(files, tmp_path, monkeypatch, capfd):
    """models/sd15 is a path when ./models exists (no such folder: one line, no hub), else a hub id (not cached,
    offline: one line with its `hf download`); an unreachable hub turns the process offline instead of retrying."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    argv = base_argv("train_sd", files, tmp_path / "out") + ["--model", "models/sd15"]
    for words in ("hf download models/sd15", "--model models/sd15: the folder does not exist"):
        with pytest.raises(SystemExit):
            ENTRY["train_sd"](argv)
        assert words in capfd.readouterr().err
        (tmp_path / "models").mkdir(exist_ok=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sd, "hub_reachable", lambda timeout=3.0: False)
    assert sd.hub_offline() and constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_resume_falls_back_over_a_corrupt_checkpoint(files, capfd):
    """The newest checkpoint holds NaN behind a valid manifest (bytes damaged before it was signed): --resume says it
    skips it, continues from the one before, and ends where the uninterrupted run ended, bit for bit."""
    out = copy_run(files, "toy", "x")
    resign(out / "x" / "checkpoints" / "step_0000002", nonfinite)
    capfd.readouterr()
    train_toy.main(base_argv("train_toy", files, out) + ["--name", "x", "--resume"])
    err = capfd.readouterr().err
    assert err.startswith("skipping checkpoint: ") and "step_0000002/weights.safetensors: tensor" in err, err
    for f in ("lora.safetensors", "checkpoints/step_0000002/weights.safetensors"):
        same_tensors(files["toy_runs"] / "done" / f, out / "x" / f)


# ----------------------------------------------------------------------------- SIGKILL, then --resume


def kill_at(point: str, flag: Path, target, update: int | None = None) -> None:
    """Run `target` in a forked process and SIGKILL it where it pauses: at runio write point `point`
    ('POINT@NAME'), or (point 'update') right after metrics.jsonl has logged update `update`."""

    def child():
        if point == "update":
            log = runio.append_jsonl

            def pausing(row, path):
                log(row, path)
                if row.get("update") == update and "loss" in row:
                    flag.touch()
                    time.sleep(600)

            runio.append_jsonl = pausing
        else:
            os.environ["RUNIO_PAUSE"] = f"{point}:{flag}"
        target()

    kill_when_paused(child, flag, point)


def same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (a, b)


TOY_KILLS = [("update", 3), ("swapped@step_0000002", None), ("folder-filled@step_0000004", None),
             ("manifest-written@step_0000004", None), ("old-moved@step_0000006", None),
             ("file-written@lora.safetensors", None)]


@pytest.fixture(scope="module")
def toy_reference(files):
    """An uninterrupted toy run: 6 updates in 4 progressive stages, a checkpoint every 2."""
    kw = toy_settings(files, budget=6, save_every=2, evals=2, out_dir=str(files["root"] / "toy-kills"))
    train_toy.train(train_toy.Args(name="reference", **kw), log=lambda *a: None)
    return kw


@pytest.mark.parametrize("point, update", TOY_KILLS, ids=[p for p, _ in TOY_KILLS])
def test_toy_killed_and_resumed_is_bit_identical(toy_reference, tmp_path, point, update):
    """train_toy.py SIGKILLed between updates (no checkpoint since update 2), right after a checkpoint, while a
    checkpoint's files are written, before its manifest's folder is renamed in, while the final checkpoint replaces
    itself, and while the final LoRA file is written: --resume (through the command line) ends with the uninterrupted
    run's final checkpoint and LoRA, bit for bit."""
    out, name = Path(toy_reference["out_dir"]), f"kill-{point.replace('@', '-')}"
    kill_at(point, tmp_path / "paused", lambda: train_toy.train(train_toy.Args(name=name, **toy_reference),
                                                                log=lambda *a: None), update)
    train_toy.main(flags(toy_reference) + ["--name", name, "--resume"])
    for f in ("lora.safetensors", "checkpoints/step_0000006/weights.safetensors",
              "checkpoints/step_0000006/optimizer.safetensors"):
        same_tensors(out / "reference" / f, out / name / f)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # rows after the checkpoint replaced
    assert not [p.name for p in (out / name / "checkpoints").iterdir() if p.name.startswith(".")]


SD_KILLS = [("update", 3), ("folder-filled@step_0000004", None), ("folder-filled@lora", None)]


@pytest.fixture(scope="module")
def sd_reference(files):
    """An uninterrupted train_sd.py --tiny run: 4 updates in 4 progressive stages, a checkpoint every 2."""
    kw = dict(steps=4, save_every=2, lr=1e-2, out_dir=str(files["root"] / "sd-kills"))
    train_sd.main(sd_args(files, name="reference", **kw))
    return kw


@pytest.mark.parametrize("point, update", SD_KILLS, ids=[p for p, _ in SD_KILLS])
def test_sd_killed_and_resumed_is_bit_identical(files, sd_reference, tmp_path, point, update):
    """train_sd.py --tiny SIGKILLed between updates 3 and 4 (last checkpoint: update 2), while checkpoint 4 is written,
    and while the final LoRA folder is written: --resume ends with the uninterrupted run's weights and final LoRA
    files, bit for bit."""
    out, name = Path(sd_reference["out_dir"]), f"kill-{point.replace('@', '-')}"
    args = sd_args(files, name=name, **sd_reference)
    kill_at(point, tmp_path / "paused", lambda: train_sd.main(args), update)
    train_sd.main(dataclasses.replace(args, resume=True))
    files_ = ["checkpoints/step_0000004/weights.safetensors"] + [f"lora/tuned_{i}.safetensors" for i in (1, 2, 3, 4)]
    for f in files_:
        same_tensors(out / "reference" / f, out / name / f)
    assert runio.folder_problem(out / name / "lora") is None
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows if "loss" in r] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def sd3_reference(files):
    """An uninterrupted train_sd.py --tiny-sd3 run: 4 updates in 4 progressive stages, a checkpoint every 2."""
    kw = dict(steps=4, save_every=2, lr=1e-2, out_dir=str(files["root"] / "sd3-kills"))
    train_sd.main(sd3_args(files, name="reference", **kw))
    return kw


def test_sd3_killed_and_resumed_is_bit_identical(files, sd3_reference, tmp_path):
    """train_sd.py --tiny-sd3 SIGKILLed between updates 3 and 4 (last checkpoint: update 2): --resume ends with the
    uninterrupted run's weights and final LoRA files, bit for bit, as on the SD1.5 path."""
    out, name = Path(sd3_reference["out_dir"]), "kill-update"
    args = sd3_args(files, name=name, **sd3_reference)
    kill_at("update", tmp_path / "paused", lambda: train_sd.main(args), 3)
    train_sd.main(dataclasses.replace(args, resume=True))
    for f in ["checkpoints/step_0000004/weights.safetensors"] + [f"lora/tuned_{i}.safetensors" for i in (1, 2, 3, 4)]:
        same_tensors(out / "reference" / f, out / name / f)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows if "loss" in r] == [1, 2, 3, 4]
