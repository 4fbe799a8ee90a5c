"""Damaged files, generated: every kind of file the scripts read back, corrupted in ways nobody listed.

Not part of the paper's method: the contract of docs/robustness.md, "What is validated when read". Hypothesis draws
corruptions — truncation, byte flips, garbage lines, deleted keys, values of the wrong type, NaN or ×1e30 tensors, wrong
shapes and dtypes, shuffled or off-grid LoRA points, manifests re-signed so that only the deeper checks can see the
damage — of each kind of file:

    checkpoints and metrics.jsonl   train_toy.py --resume (the loop, the optimizer, every RNG, the run's counters)
    a LoRA folder                   sd.load_lora (shortft.json, the branch files, MANIFEST.json)
    the toy world's cache           toy.build_toy (runs/cache/base_*.safetensors, shortcut_*.safetensors)
    shortcut LoRA, classifier       shortcut.load_shortcut_lora, rewards.load_digit_classifier
    records kept between calls      runio.read_json_cache (minisd's report.json)

and asserts the one invariant: a correct result (the same weights as from the undamaged files, bit for bit) or one
clear error (exit status 2, or a ValueError / FileNotFoundError of one line), never a traceback and never silently
wrong data. Then the regression tests of two findings: a saved LoRA folder trusted blindly (NaN weights, unsorted or
off-grid points, "timestep_aware": "false", too few adapters, a damaged shortft.json), and --resume over damaged run
files (one bad metrics line, an RNG tensor of the wrong size or dtype, state.json missing a key, `update` edited),
and the other files kept between calls: bench_minisd's bench.json, --tiny's model folders, minisd's stage folders.

Notation: a damage is (file, operation, where, value); "resign" rewrites the checkpoint's manifest entry of a damaged
file, as if the bytes had been damaged before the manifest was written.

Run: python -m pytest -q tests/test_file_corruptions.py
"""

import contextlib
import copy
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rewards
import runio
import sd
import sd3
import shortcut
import shortft
import tiny
import toy
import train_toy

WORLD = dict(hidden=16, depth=1, pretrain_steps=30, pretrain_batch=64, shortcut_rank=4, distill_steps=10,
             distill_pairs=128, distill_batch=64)
RUN = dict(method="shortft", budget=4, budget_unit="updates", evals=1, eval_batch=16, batch_size=8, save_every=1)
GRID = shortft.ddim_timesteps(10)  # 901, 801, …, 1
POINTS = (701, 401, 201, 1)
SAMPLING_KEYS = ("adapters", "files", "lora_points", "timestep_aware", "grid", "guidance_scale")
QUICK = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
             suppress_health_check=list(HealthCheck))  # the same examples on every run, no shrinking (slow here)
FEW = settings(max_examples=8, **QUICK)


# ----------------------------------------------------------------------------- corruptions


def damage_bytes(data: bytes, op: str, where: float, value: int) -> bytes:
    """truncate at, flip a byte at (xor `value`, never 0), append garbage after, or empty the file."""
    i = min(int(where * len(data)), max(len(data) - 1, 0))
    if op == "truncate":
        return data[:i]
    if op == "flip":
        return data[:i] + bytes([data[i] ^ value]) + data[i + 1:] if data else b"\x00"
    if op == "append":
        return data + bytes([value]) * 7
    return b""


FRACTION = st.integers(0, 1000).map(lambda i: i / 1000)  # where in a file; st.floats breaks once a module imported
# by the suite (minisd.py) has set torch.set_flush_denormal(True): hypothesis then sees its smallest float as 0
BYTE_OPS = st.tuples(st.sampled_from(["truncate", "flip", "append", "empty"]), FRACTION, st.integers(1, 255))
RETYPES = [None, "x", True, [], {}, -1, "NaN", [1, "a"]]


def json_paths(obj, prefix=()) -> list[tuple]:
    """Every key path of nested dicts (list elements are not entered)."""
    out = []
    for k, v in obj.items() if isinstance(obj, dict) else []:
        out.append(prefix + (k,))
        out += json_paths(v, prefix + (k,))
    return out


def damage_json(obj, op: str, where: float, value: int):
    """delete a key, give it a value of another type, or shuffle / cut / move off the grid a list at a key path."""
    obj = copy.deepcopy(obj)
    paths = json_paths(obj)
    path = paths[min(int(where * len(paths)), len(paths) - 1)]
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == "delete":
        del parent[key]
    elif op == "retype":
        parent[key] = RETYPES[value % len(RETYPES)]
    elif isinstance(parent[key], list) and parent[key]:
        items = parent[key]
        if op == "shuffle":
            parent[key] = items[::-1] if value % 2 else items[1:] + items[:1]
        elif op == "cut":
            parent[key] = items[:-1] if value % 2 else items[1:]
        elif op == "offgrid":
            parent[key] = [x + 1 if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in items]
    else:
        parent[key] = RETYPES[value % len(RETYPES)]
    return obj


JSON_OPS = st.tuples(st.sampled_from(["delete", "retype", "shuffle", "cut", "offgrid"]), FRACTION,
                     st.integers(0, 255))
TENSOR_OPS = st.tuples(st.sampled_from(["nan", "huge", "dtype", "int", "shape", "delete", "extra"]), FRACTION,
                       st.integers(0, 255))


def damage_tensors(path: Path, op: str, where: float, value: int) -> None:
    """Rewrite a safetensors file (its metadata kept) with one tensor damaged: a NaN, ×1e30, float64 or int64, one
    row fewer, deleted, or a foreign tensor added."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    names = sorted(tensors)
    name = names[min(int(where * len(names)), len(names) - 1)]
    t = tensors[name]
    if op == "nan" and t.is_floating_point() and t.numel():
        t = t.clone().reshape(-1)
        t[value % t.numel()] = math.nan
        t = t.reshape(tensors[name].shape)
    elif op == "huge" and t.is_floating_point():
        t = t * 1e30 + 1e30
    elif op == "dtype":
        t = t.double() if t.dtype != torch.float64 else t.float()
    elif op == "int":
        t = t.long() if t.dtype != torch.int64 else t.float()
    elif op == "shape":
        t = t.reshape(-1)[:-1] if t.numel() > 1 else torch.zeros(3)
    elif op == "delete":
        del tensors[name]
        t = None
    elif op == "extra":
        tensors["foreign.weight"] = torch.ones(2, 2)
    if t is not None:
        tensors[name] = t.contiguous()
    save_file(tensors, str(path), metadata=meta)


def damage_file(path: Path, op: str, where: float, value: int, json_op: str | None = None) -> None:
    """One drawn damage, in place: a byte-level op on any file, else a tensor op on a .safetensors file, else a JSON
    op (`json_op`, default `op`) on a JSON file."""
    if op in ("truncate", "flip", "append", "empty"):
        path.write_bytes(damage_bytes(path.read_bytes(), op, where, value))
    elif path.suffix == ".safetensors":
        damage_tensors(path, op, where, value)
    else:
        path.write_text(json.dumps(damage_json(json.loads(path.read_text()), json_op or op, where, value)))


def resign(folder: Path, manifest: str, name: str) -> None:
    """Make the manifest's entry of `name` match the (damaged) file again."""
    state = json.loads((folder / manifest).read_text())
    path = folder / name
    if path.is_file():
        state["files"][name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / manifest).write_text(json.dumps(state))


def one_line_error(text: str) -> bool:
    """A message of one non-empty line."""
    return bool(text.strip()) and "\n" not in text.strip()


def run_cli(main, argv) -> tuple[int, str]:
    """(exit status, stderr) of a script's `main(argv)` run in this process; any other exception is a traceback and
    fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 4-update toy run with a checkpoint after every update, and its world cache."""
    root = tmp_path_factory.mktemp("toy")
    args = dict(WORLD, cache_dir=str(root / "cache"), out_dir=str(root / "runs"), **RUN)
    train_toy.train(train_toy.Args(name="whole", **args), log=lambda *a: None)
    argv = []
    for k, v in args.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return {"root": root, "whole": root / "runs" / "whole", "argv": argv,
            "lora": runio.load_tensors(root / "runs" / "whole" / "lora.safetensors")}


def partial_run(toy_run, name: str) -> Path:
    """A copy of the finished run as it was after update 3 (checkpoints 1, 2, 3; its metrics to update 4 are cut)."""
    run = toy_run["root"] / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(toy_run["whole"], run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "lora.safetensors").unlink()
    return run


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny UNet (no adapters, to copy), a saved LoRA folder of 4 random branches on it, and the branches' weights."""
    root = tmp_path_factory.mktemp("lora")
    unet = tiny.sd_components()["unet"]
    pristine = copy.deepcopy(unet)
    names = sd.add_tuned_loras(unet, 4, rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sd.lora_parameters(unet, names):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    sd.save_lora(unet, root / "lora", GRID, POINTS, True, 7.5, method="shortft")
    pristine.save_pretrained(root / "unet")
    tiny.tiny_shortcut_lora(root / "shortcut.safetensors", root / "unet")
    return {"root": root, "folder": root / "lora", "unet": pristine, "names": names,
            "weights": {k: v.detach().clone() for k, v in sd.lora_weights(unet, names).items()},
            "layout": json.loads((root / "lora" / sd.LORA_JSON).read_text())}


def fresh_folder(lora, name: str) -> Path:
    folder = lora["root"] / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(lora["folder"], folder)
    return folder


# ----------------------------------------------------------------------------- checkpoints and metrics: --resume


RUN_FILES = ["state.json", "weights.safetensors", "optimizer.safetensors", "rng.safetensors", "metrics.jsonl",
             "args.json"]
METRICS_LINES = [b"{not json", b"[1, 2]", b'{"update": "3"}', b"\xff\xfe\x00", b"", b'{"update": -1}', b"null"]


@st.composite
def run_damage(draw):
    """One to three damages of the run folder's files: which checkpoint (3, the newest, or 2), which file, how."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        file = draw(st.sampled_from(RUN_FILES))
        step = draw(st.sampled_from([3, 3, 2]))
        if file == "metrics.jsonl":
            how = draw(st.one_of(st.tuples(st.just("line"), FRACTION, st.sampled_from(METRICS_LINES)), BYTE_OPS))
        elif file.endswith(".safetensors"):
            how = draw(st.one_of(BYTE_OPS, TENSOR_OPS))
        else:
            how = draw(st.one_of(BYTE_OPS, JSON_OPS))
        out.append((file, step, how, draw(st.booleans())))  # the last: re-sign the manifest
    return out


def apply_run_damage(run: Path, damage) -> None:
    for file, step, (op, where, value), sign in damage:
        ckpt = run / "checkpoints" / f"step_{step:07d}"
        path = run / file if file in ("metrics.jsonl", "args.json") else ckpt / file
        if op == "line":
            lines = path.read_bytes().split(b"\n")
            i = int(where * (len(lines) - 1))
            path.write_bytes(b"\n".join(lines[:i] + [value] + lines[i:]))
        elif op in ("truncate", "flip", "append", "empty"):
            path.write_bytes(damage_bytes(path.read_bytes(), op, where, value))
        elif file.endswith(".safetensors"):
            damage_tensors(path, op, where, value)
        else:
            try:
                obj = json.loads(path.read_text())
            except (ValueError, OSError):  # already damaged by an earlier byte operation: damage its bytes again
                path.write_bytes(damage_bytes(path.read_bytes(), "flip", where, value | 1))
                continue
            if file == "state.json" and sign:  # without its checksum, only the structural checks can see it
                obj.pop(runio.STATE_DIGEST, None)
                op = op if op in ("delete", "retype") else "retype"
            path.write_text(json.dumps(damage_json(obj, op, where, value)))
        if sign and path.parent == ckpt and file != "state.json":
            resign(ckpt, "state.json", file)


@FEW
@given(damage=run_damage())
def test_resume_over_damaged_run_files_is_exact_or_one_line(toy_run, damage):
    """--resume over damaged checkpoints, metrics.jsonl or args.json ends bit-identical to the undamaged run (from the
    newest checkpoint that passes every check) or with exit 2 and one line; damage confined to the newest checkpoint
    (its manifest untouched) or to metrics.jsonl always falls back and finishes."""
    run = partial_run(toy_run, "part")
    apply_run_damage(run, damage)
    code, err = run_cli(train_toy.main, ["--name", "part", "--resume", *toy_run["argv"]])
    assert "Traceback" not in err
    if code == 0:
        assert same_tensors(runio.load_tensors(run / "lora.safetensors"), toy_run["lora"])
        lines = (run / "metrics.jsonl").read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(runio.metrics_record(line) is not None for line in lines[:-1])
        losses = [r["loss"] for r in runio.read_jsonl(run / "metrics.jsonl") if "loss" in r]
        assert losses[-1] == [r["loss"] for r in runio.read_jsonl(toy_run["whole"] / "metrics.jsonl") if "loss" in r][-1]
    else:
        assert code == 2 and one_line_error(err.strip().splitlines()[-1]), err
        assert ": error: " in err.strip().splitlines()[-1]  # `<script>: error: …` (the script is pytest here)
    falls_back = all(file == "metrics.jsonl" or (step == 3 and file != "args.json" and not sign)
                     for file, step, _, sign in damage)
    assert code == 0 or not falls_back, err


def test_resume_falls_back_over_the_findings_damages(toy_run):
    """Finding 6, each case alone: one bad line in metrics.jsonl, an RNG tensor of the wrong size or dtype (manifest
    re-signed), state.json missing a key, `update` edited by hand. Each resumes from the previous good checkpoint with
    one line saying so (or, for the metrics line, drops it with one line) and ends bit-identical."""
    cases = {
        "metrics line": [("metrics.jsonl", 3, ("line", 0.5, b"{broken"), False)],
        "rng size": [("rng.safetensors", 3, ("shape", 0.0, 0), True)],
        "rng dtype": [("rng.safetensors", 3, ("dtype", 0.0, 0), True)],
        "state key": [("state.json", 3, ("delete", 0.0, 0), False)],
        "state key, no checksum": [("state.json", 3, ("delete", 0.0, 0), True)],
    }
    for what, damage in cases.items():
        run = partial_run(toy_run, "part")
        apply_run_damage(run, damage)
        code, err = run_cli(train_toy.main, ["--name", "part", "--resume", *toy_run["argv"]])
        assert code == 0 and "Traceback" not in err, (what, err)
        said = "dropped 1 damaged line" if what == "metrics line" else "skipping checkpoint: "
        assert sum(said in line for line in err.splitlines()) == 1, (what, err)
        assert same_tensors(runio.load_tensors(run / "lora.safetensors"), toy_run["lora"]), what
    run = partial_run(toy_run, "part")  # `update` edited by hand, in state.json and its spent budget alike
    state = json.loads((run / "checkpoints" / "step_0000003" / "state.json").read_text())
    state["spent"]["updates"] = 2
    (run / "checkpoints" / "step_0000003" / "state.json").write_text(json.dumps(state))
    code, err = run_cli(train_toy.main, ["--name", "part", "--resume", *toy_run["argv"]])
    assert code == 0 and "state.json was changed after it was written" in err
    assert same_tensors(runio.load_tensors(run / "lora.safetensors"), toy_run["lora"])


def test_resume_with_no_good_checkpoint_is_one_line(toy_run):
    """Every checkpoint's state.json without its checksum and with `step` edited: exit 2, one line, nothing trained."""
    run = partial_run(toy_run, "part")
    for ckpt in (run / "checkpoints").iterdir():
        state = json.loads((ckpt / "state.json").read_text())
        state.pop(runio.STATE_DIGEST)
        state["skipped"] = "none"
        (ckpt / "state.json").write_text(json.dumps(state))
    code, err = run_cli(train_toy.main, ["--name", "part", "--resume", *toy_run["argv"]])
    assert code == 2 and ": error: --resume: nothing to resume" in err.strip().splitlines()[-1]
    assert not (run / "lora.safetensors").exists()


# ----------------------------------------------------------------------------- the toy world's cache


@settings(max_examples=6, **QUICK)
@given(kind=st.sampled_from(["base", "shortcut"]), how=st.one_of(BYTE_OPS, TENSOR_OPS))
def test_damaged_cache_file_is_rebuilt(toy_run, kind, how):
    """A damaged cache file is rebuilt with one line saying so, and the world is the undamaged cache's, bit for bit."""
    cache = toy_run["root"] / "cache2"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.copytree(toy_run["root"] / "cache", cache)
    path = next(cache.glob(f"{kind}_*.safetensors"))
    op, where, value = how
    damage_file(path, op, where, value)
    w = toy.WorldArgs(cache_dir=str(cache), **WORLD)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        world = toy.build_toy(w, POINTS)
    assert sum("rebuilding it" in line for line in err.getvalue().splitlines()) <= 1
    clean = toy.build_toy(toy.WorldArgs(cache_dir=str(toy_run["root"] / "cache"), **WORLD), POINTS)
    assert same_tensors(world.model.state_dict(), clean.model.state_dict())
    assert runio.load_cached_tensors(path, lambda t: None)  # the rebuilt file is whole again


# ----------------------------------------------------------------------------- a LoRA folder


def check_loaded(lora, folder: Path) -> str | None:
    """sd.load_lora into a fresh UNet: None when it loaded the original branches with the original layout, else the
    one-line message of its ValueError / FileNotFoundError (any other exception fails the test)."""
    unet = copy.deepcopy(lora["unet"])
    try:
        layout = sd.load_lora(unet, folder)
    except (ValueError, FileNotFoundError) as e:
        assert one_line_error(str(e)), str(e)
        return str(e)
    assert {k: layout[k] for k in SAMPLING_KEYS} == {k: lora["layout"][k] for k in SAMPLING_KEYS}
    assert same_tensors({k: v.detach() for k, v in sd.lora_weights(unet, lora["names"]).items()}, lora["weights"])
    return None


@st.composite
def lora_damage(draw):
    """A damage of shortft.json, a branch file or MANIFEST.json, with or without the manifest (a user's hand edit):
    without it, only damage a reader can see (a flipped float, or a branch cast to float16, is then a valid file)."""
    keep = draw(st.booleans())
    file = draw(st.sampled_from([sd.LORA_JSON, "tuned_1.safetensors", "tuned_3.safetensors"]
                                + (["MANIFEST.json"] if keep else [])))
    if file.endswith(".safetensors"):
        ops = st.one_of(BYTE_OPS, TENSOR_OPS) if keep else st.one_of(
            st.tuples(st.sampled_from(["truncate", "empty"]), FRACTION, st.integers(1, 255)),
            TENSOR_OPS.filter(lambda h: h[0] != "dtype"))
    else:
        ops = st.one_of(BYTE_OPS, JSON_OPS) if keep else JSON_OPS
    return keep, file, draw(ops)


@FEW
@given(damage=lora_damage())
def test_damaged_lora_folder_loads_exactly_or_is_one_line(lora, damage):
    """sd.load_lora over a damaged LoRA folder: the original branches and layout, or one clear line."""
    keep, file, (op, where, value) = damage
    folder = fresh_folder(lora, "damaged")
    if not keep:
        (folder / "MANIFEST.json").unlink()
    path = folder / file
    if op in ("truncate", "flip", "append", "empty"):
        path.write_bytes(damage_bytes(path.read_bytes(), op, where, value))
    elif file.endswith(".safetensors"):
        damage_tensors(path, op, where, value)
    else:
        obj = json.loads(path.read_text())
        if not keep and op == "retype" and json_paths(obj)[min(int(where * len(json_paths(obj))),
                                                               len(json_paths(obj)) - 1)][0] not in SAMPLING_KEYS:
            op = "delete"  # an informational key (method, timestep_spacing) may hold anything
        path.write_text(json.dumps(damage_json(obj, op, where, value)))
    check_loaded(lora, folder)


FINDING_5 = {  # the damages of finding 5, each on a folder without its manifest (a hand edit)
    "nan weights": lambda f: damage_tensors(f / "tuned_2.safetensors", "nan", 0.5, 3),
    "unsorted points": lambda f: edit_layout(f, lora_points=[401, 701, 201, 1]),
    "off-grid points": lambda f: edit_layout(f, lora_points=[700, 401, 201, 1]),
    "timestep_aware string": lambda f: edit_layout(f, timestep_aware="false"),
    "too few adapters": lambda f: edit_layout(f, adapters=["tuned_1", "tuned_2"],
                                              files=["tuned_1.safetensors", "tuned_2.safetensors"]),
    "truncated json": lambda f: (f / sd.LORA_JSON).write_text((f / sd.LORA_JSON).read_text()[:40]),
    "json missing a key": lambda f: edit_layout(f, grid=None),
}


def edit_layout(folder: Path, **change) -> None:
    layout = json.loads((folder / sd.LORA_JSON).read_text())
    layout.update(change)
    layout = {k: v for k, v in layout.items() if v is not None}
    (folder / sd.LORA_JSON).write_text(json.dumps(layout))


@pytest.mark.parametrize("what", list(FINDING_5))
def test_load_lora_and_prepare_pipeline_refuse_a_damaged_folder(lora, what):
    """Finding 5: sd.load_lora, sd.prepare_pipeline and sd3.load_lora refuse each damage with one ValueError line
    naming the folder (no KeyError, no JSONDecodeError), before any adapter is loaded."""
    from diffusers import StableDiffusionPipeline

    folder = fresh_folder(lora, "finding5")
    (folder / "MANIFEST.json").unlink()
    FINDING_5[what](folder)
    message = check_loaded(lora, folder)
    assert message is not None and str(folder) in message, message
    pipe = StableDiffusionPipeline(**tiny.sd_components(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with pytest.raises(ValueError) as e:
        sd.prepare_pipeline(pipe, folder)
    assert one_line_error(str(e.value)) and not getattr(pipe.unet, "peft_config", None)
    with pytest.raises(ValueError) as e:
        sd3.load_lora(None, folder)  # the same validator, before the transformer is touched
    assert one_line_error(str(e.value))


def test_lora_folder_edited_under_its_manifest_is_refused(lora):
    """A folder whose shortft.json was changed after it was written (valid JSON, another CFG scale) is refused while
    its MANIFEST.json stands, and loads once the manifest is removed (the user's explicit choice)."""
    folder = fresh_folder(lora, "edited")
    edit_layout(folder, guidance_scale=3.0)
    with pytest.raises(ValueError, match="changed after it was written"):
        sd.read_lora_layout(folder)
    (folder / "MANIFEST.json").unlink()
    assert sd.read_lora_layout(folder)["guidance_scale"] == 3.0


# ----------------------------------------------------------------------------- shortcut and classifier weights


@FEW
@given(how=st.one_of(BYTE_OPS, TENSOR_OPS))
def test_damaged_shortcut_lora_is_finite_or_one_line(lora, how):
    """shortcut.load_shortcut_lora over a damaged file: a loaded adapter whose weights are finite and of trained size,
    or one ValueError line naming the file."""
    path = lora["root"] / "shortcut_damaged.safetensors"
    shutil.copy(lora["root"] / "shortcut.safetensors", path)
    op, where, value = how
    damage_file(path, op, where, value)
    unet = copy.deepcopy(lora["unet"])
    try:
        params = shortcut.load_shortcut_lora(unet, path, sd.SHORTCUT_ADAPTER, 1.0)
    except ValueError as e:
        assert one_line_error(str(e)) and str(path) in str(e), str(e)
        return
    assert params and all(bool(torch.isfinite(p).all()) and float(p.abs().max()) <= runio.WEIGHT_LIMIT for p in params)


def test_nonfinite_or_huge_shortcut_is_refused(lora):
    """Finding 4's files: a NaN or ×1e30 shortcut LoRA is one line before anything trains."""
    for op in ("nan", "huge"):
        path = lora["root"] / f"shortcut_{op}.safetensors"
        shutil.copy(lora["root"] / "shortcut.safetensors", path)
        damage_tensors(path, op, 0.3, 1)
        with pytest.raises(ValueError, match="NaN/inf" if op == "nan" else "no trained weight is that large") as e:
            shortcut.load_shortcut_lora(copy.deepcopy(lora["unet"]), path)
        assert one_line_error(str(e.value))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    model = rewards.DigitClassifier(image_size=8, channels=(4,), classes=10)
    rewards.save_digit_classifier(model, root / "classifier.safetensors")
    return root, {k: v.detach().clone() for k, v in model.state_dict().items()}


@FEW
@given(file=st.sampled_from(["classifier.safetensors", "classifier.json"]), how=st.one_of(BYTE_OPS, TENSOR_OPS))
def test_damaged_classifier_loads_exactly_or_is_one_line(classifier, file, how):
    """rewards.load_digit_classifier over a damaged weights or config file: the original classifier, or one line."""
    root, weights = classifier
    folder = root / "damaged"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name in ("classifier.safetensors", "classifier.json"):
        shutil.copy(root / name, folder / name)
    op, where, value = how
    path = folder / file
    damage_file(path, op, where, value, json_op="retype")
    try:
        model = rewards.load_digit_classifier(str(folder / "classifier.safetensors"), str(folder / "classifier.json"))
    except ValueError as e:
        assert one_line_error(str(e)), str(e)
        return
    assert model.config == rewards.DigitClassifier(image_size=8, channels=(4,), classes=10).config
    assert same_tensors(model.state_dict(), weights)


def test_nan_classifier_is_refused(classifier):
    """Finding 4's classifier: NaN weights (even with a re-made checksum) are one line before any reward is computed."""
    root, weights = classifier
    bad = {k: v.clone() for k, v in weights.items()}
    next(iter(bad.values())).reshape(-1)[0] = math.nan
    folder = root / "nan"
    folder.mkdir(exist_ok=True)
    save_file(bad, str(folder / "classifier.safetensors"))
    shutil.copy(root / "classifier.json", folder / "classifier.json")
    with pytest.raises(ValueError, match="NaN/inf") as e:
        rewards.digit(digit_classifier=str(folder / "classifier.safetensors"))
    assert one_line_error(str(e.value))


# ----------------------------------------------------------------------------- records kept between calls


def test_benchmark_reuses_a_finished_run_only_while_its_records_are_whole(tmp_path, capsys):
    """bench_minisd.train reuses a finished run while bench.json and the metrics it recorded the checksum of are
    intact; a damaged bench.json or an edited metrics.jsonl makes the run again, with one line saying so."""
    import sys

    import bench_minisd

    run = tmp_path / "run"
    log = tmp_path / "calls.txt"
    cmd = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(run)!r}).mkdir(exist_ok=True); "
           f"(pathlib.Path({str(run)!r}) / 'metrics.jsonl').write_text('{{\"update\": 1, \"loss\": 0.5}}\\n'); "
           f"open({str(log)!r}, 'a').write('x')"]
    rows = bench_minisd.train(cmd, run)[0]
    assert rows == [{"update": 1, "loss": 0.5}] and bench_minisd.train(cmd, run)[0] == rows and log.read_text() == "x"
    for damage in (lambda: (run / "bench.json").write_text('{"command": [1, '),
                   lambda: (run / "metrics.jsonl").write_text('{"update": 1, "loss": 9.5}\n')):
        damage()
        capsys.readouterr()
        assert bench_minisd.train(cmd, run)[0] == rows
        assert sum("made again" in line for line in capsys.readouterr().err.splitlines()) == 1
    assert log.read_text() == "xxx"


def test_train_sd_state_check():
    """train_sd.check_state: the counters of runio.check_run_state and a stage in 1 … k; anything else is refused."""
    import train_sd

    good = {"step": 4, "skipped": 1, "stage": 4, "spent": {"updates": 4, "gflop": 1.0, "cpu_seconds": 2.0, "seconds": 3}}
    train_sd.check_state(good, k=4)
    for change in ({"stage": 5}, {"stage": "4"}, {"skipped": 5}, {"skipped": True}, {"spent": {"updates": 4}},
                   {"spent": dict(good["spent"], updates=3)}, {"spent": dict(good["spent"], gflop=math.inf)}):
        with pytest.raises((ValueError, KeyError)):
            train_sd.check_state({**good, **change}, k=4)
    with pytest.raises(KeyError):
        train_sd.check_state({k: v for k, v in good.items() if k != "stage"}, k=4)


def test_damaged_tiny_model_folder_is_rebuilt(tmp_path, capsys):
    """--tiny's files kept between runs: a flipped byte in the tiny CLIP folder is seen by its manifest and the folder
    is rebuilt with one line, into the very same files (the build is seeded)."""
    import train_sd

    folder = tmp_path / "clip"
    train_sd.tiny_part(folder, "config.json", tiny.tiny_clip)
    manifest = (folder / "MANIFEST.json").read_text()
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(damage_bytes(weights.read_bytes(), "flip", 0.9, 1))
    capsys.readouterr()
    train_sd.tiny_part(folder, "config.json", tiny.tiny_clip)
    assert sum("is damaged" in line and "rebuilding it" in line for line in capsys.readouterr().err.splitlines()) == 1
    assert json.loads((folder / "MANIFEST.json").read_text())["files"] == json.loads(manifest)["files"]


def test_minisd_stage_folders_are_checked_against_their_manifest(tmp_path):
    """minisd's stage folders (written whole, with a MANIFEST.json) report a damaged file, which makes minisd.py build
    that stage again; a folder without a manifest (an older build) is not checked."""
    import minisd

    out = tmp_path / "out"
    minisd.save_folder(lambda d: (d / "sub").mkdir() or (d / "sub" / "w.bin").write_bytes(b"\x01" * 64), out / "pipe")
    files = [out / "pipe" / "sub", out / "classifier.safetensors"]
    assert minisd.damaged_stage(out, files) is None
    (out / "pipe" / "sub" / "w.bin").write_bytes(b"\x01" * 63 + b"\x02")
    assert "w.bin does not match its checksum" in minisd.damaged_stage(out, files)
    (out / "pipe" / "MANIFEST.json").unlink()
    assert minisd.damaged_stage(out, files) is None


@FEW
@given(how=st.one_of(BYTE_OPS, JSON_OPS))
def test_signed_json_record_is_exact_or_rebuilt(tmp_path_factory, how):
    """runio.write_json_cache / read_json_cache (minisd's report.json): a damaged or hand-edited record reads as None
    (the stages are built again) with one line, and removed; an intact one reads back exactly, without its checksum."""
    path = tmp_path_factory.mktemp("record") / "report.json"
    record = {"classifier": {"heldout_accuracy": 0.93, "seconds": 1.5}, "guidance": {"chosen": 3.0, "rates": [0.1, 0.9]}}
    runio.write_json_cache(record, path)
    op, where, value = how
    damage_file(path, op, where, value)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        back = runio.read_json_cache(path, "every stage is built again")
    if back is None:
        assert one_line_error(err.getvalue()) and "is damaged" in err.getvalue() and not path.exists()
    else:
        assert back == record and err.getvalue() == ""
