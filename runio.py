"""Run folders for the training scripts: arguments from a dataclass, metrics, atomic checkpoints.

Not part of the method (nothing here is in the paper); shared by `train_toy.py` and `train_sd.py`
so that both write `runs/<name>/` the same way:

    runs/<name>/args.json            the arguments of the run
    runs/<name>/metrics.jsonl        one JSON object per logged step
    runs/<name>/checkpoints/step_N/  weights.safetensors + optimizer.safetensors + state.json

Every file is written to a temporary name and moved into place (`os.replace`), and a checkpoint
folder appears under its final name only once complete, so an interrupted run never leaves a
half-written checkpoint. Nothing is ever unpickled: tensors go through safetensors, the rest is JSON.

Run: python -c "import runio; print(runio.latest_checkpoint('runs/toy'))"
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import random
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


# ----------------------------------------------------------------------------- arguments


def _field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field (cleanrl style), for --help; fields inherited from a base
    class (e.g. shortft.ChainArgs) are documented where they are defined."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def parse_args(cls, argv: list[str] | None = None):
    """Build an argparse parser from a dataclass of arguments and return a filled instance.
    Booleans become --flag/--no-flag; `None` defaults accept a value of the annotated type."""
    docs = _field_docs(cls)
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = type(default) if default is not None else _annotated_type(f.type)
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse formats help with %
        name = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif kind in (list, tuple):
            parser.add_argument(name, type=_element_type(default, f.type), nargs="*", default=default, help=help_)
        else:
            parser.add_argument(name, type=kind, default=default, help=help_)
    args = cls(**vars(parser.parse_args(argv)))
    return args


def _annotated_type(annotation) -> type:
    text = str(annotation)
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if name in text:
            return kind
    return str


def _element_type(default, annotation) -> type:
    """Element type of a list field: from its annotation (list[float]), else from its default's first element."""
    text = str(annotation)
    for name, kind in (("[int]", int), ("[float]", float), ("[str]", str)):
        if name in text:
            return kind
    return type(default[0]) if default else str


# ----------------------------------------------------------------------------- files


def write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temporary file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    os.replace(tmp, path)


def append_jsonl(obj: dict, path: str | Path) -> None:
    """Append one metrics record (a line of JSON)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=_jsonable) + "\n")


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    return load_file(str(path), device=str(device))


def _jsonable(o):
    if isinstance(o, (Path, torch.device, torch.dtype)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


# ----------------------------------------------------------------------------- checkpoints


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into flat tensors (safetensors) and JSON (param groups, scalars)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG a run draws from: torch (CPU and CUDA) as tensors, Python's and numpy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _listify(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(meta["python"]))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _listify(o):
    return [_listify(x) for x in o] if isinstance(o, (tuple, list)) else o


def _tuplify(o):
    return tuple(_tuplify(x) for x in o) if isinstance(o, list) else o


def save_checkpoint(
    run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
    state: dict, extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write `checkpoints/step_{step}/` atomically: weights, optimizer, RNG and `state` (JSON).
    `extra_files` (name → existing file) are moved in as well, e.g. a diffusers-format LoRA."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:07d}.", dir=root))
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
    for name, src in (extra_files or {}).items():
        shutil.move(str(src), tmp / name)
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, "rng": rng_meta, **state},
                                               default=_jsonable))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(ckpt: str | Path, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True):
    """Read a checkpoint written by `save_checkpoint`: returns (weights, state) and restores the
    optimizer and the RNGs in place."""
    ckpt = Path(ckpt)
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no state.json)")
    state = json.loads((ckpt / "state.json").read_text())
    weights = load_file(str(ckpt / "weights.safetensors"))
    if optimizer is not None:
        load_optimizer_tensors(optimizer, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    if restore_rng:
        set_rng_state(load_file(str(ckpt / "rng.safetensors")), state["rng"])
    return weights, state
