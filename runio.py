"""Run folders for the training scripts: arguments, metrics and checkpoints that survive bad input and kills.

Not part of the method (nothing here is in the paper); shared by `train_toy.py`, `train_sd.py` and
`bench_sd.py` so that they all write `runs/<name>/` the same way:

    runs/<name>/args.json            the arguments of the run
    runs/<name>/metrics.jsonl        one JSON object per logged step
    runs/<name>/checkpoints/step_N/  weights / optimizer / rng .safetensors + state.json (its manifest)
    runs/<name>/lora/                a folder written with `atomic_folder` (+ MANIFEST.json)

Atomic writes. A file is written to `.<name>.tmp`, fsynced, renamed onto `<name>` (os.replace), and its
folder fsynced. A whole folder `<name>` (a checkpoint, the final LoRA) is swapped in like this:

    1. write every file into `.<name>.tmp/`;
    2. write the manifest last (size + sha256 of every other file, each fsynced), fsync the folder;
    3. rename `<name>` → `.<name>.old` (if it exists), then `.<name>.tmp` → `<name>`, fsync the parent;
    4. delete `.<name>.old` (a deletion renames to `.<name>.del` first, so half-deleted is never read).

A folder is *complete* when its manifest parses and every file it lists has the listed size and hash.
Wherever a kill lands, the previous complete copy or the new one survives among `.<name>.tmp`, `<name>`,
`.<name>.old` (newest first); readers take the first complete one in that order, and the next write of
the folder (or `recover_folder`) renames that one to `<name>` and deletes the rest. Old checkpoints are
deleted only after the new one is in place. `metrics.jsonl` is only appended to: a line torn by a kill
is cut off at the next append.

Errors. Whatever the user can fix raises a `RunError` (a ValueError) with a one-line message, arguments
as `--flag VALUE: what is wrong and what to do`; `cli` prints it as `<script>: error: <message>` and exits
with status 2, no traceback. Nothing is unpickled: tensors go through safetensors, the rest is JSON.
NaN/inf tensors are never written, and never loaded from a checkpoint.

The guarded update. `guarded_step` clips the gradient (`grad_norm` measures it) and applies the optimizer step
unless it would put NaN/inf into the weights: a non-finite gradient is dropped, weights a step made non-finite are
restored; `check_skipped` stops a run whose updates are skipped too many times in a row.

Notation: step_N the checkpoint after N updates (N zero-padded to 7 digits); `expect` the weights
(name → tensor or shape) a checkpoint must match; `keys` the arguments a resumed run must keep.

Run: python -c "import runio; print(runio.latest_checkpoint('runs/toy'))"
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import numbers
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


# ----------------------------------------------------------------------------- errors


class RunError(ValueError):
    """A problem the user can fix, said in one line; `cli` prints it and exits with status 2."""


class ArgError(RunError):
    """A bad command-line value: `--flag VALUE: what is wrong and what to do`."""

    def __init__(self, flag: str, value: Any, what: str):
        super().__init__(f"{_flag(flag)} {_shown(value)}: {what}")


class CheckpointError(RunError):
    """A checkpoint or tensors file that is incomplete, corrupt or holds NaN/inf (resuming skips it)."""


class MismatchError(RunError):
    """Saved with other settings than the current run (arguments, keys, shapes): resuming stops."""


def require(ok: bool, flag: str, value: Any, what: str) -> None:
    """Raise `ArgError` (`--flag VALUE: what`) unless `ok`; for a script's `check_args(args)`."""
    if not ok:
        raise ArgError(flag, value, what)


def require_range(flag: str, value: Any, low: float | None = None, high: float | None = None, *,
                  low_open: bool = False, what: str = "") -> None:
    """`require` a finite number in [low, high] ((low, high] with `low_open`); nan and ±inf always fail."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = number and (low is None or value > low or (value == low and not low_open)) and (high is None or value <= high)
    if low is not None and high is not None:
        span = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        span = f" {'>' if low_open else '≥'} {low:g}"
    else:
        span = "" if high is None else f" ≤ {high:g}"
    require(ok, flag, value, f"must be a finite number{span}" + (f"; {what}" if what else ""))


def check_arg(flag: str, value: Any, check: Callable[..., Any], *args) -> Any:
    """`check(*args)` (e.g. a parser or loader of the value); its one-line ValueError or OSError (a missing file)
    becomes ArgError `--flag VALUE: message` (an ArgError passes unchanged). Returns what `check` returns."""
    try:
        return check(*args)
    except ArgError:
        raise
    except (ValueError, OSError) as e:
        raise ArgError(flag, value, _one_line(e)) from None


def _flag(name: str) -> str:
    return name if name.startswith("-") else "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value) if value else "(empty)"
    text = str(value)
    return text if text and not any(c.isspace() for c in text) else repr(text)


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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error; --help has the rest
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _finite_float(text: str) -> float:
    """argparse type of every float field: nan and ±inf are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(cls, argv: list[str] | None = None, check: Callable[[Any], None] | None = None):
    """Build an argparse parser from a dataclass of arguments and return a filled instance.
    Booleans become --flag/--no-flag; `None` defaults accept a value of the annotated type; floats must
    be finite. Bad values, and a ValueError from `check(args)`, exit with one line and status 2."""
    docs = _field_docs(cls)
    parser = _Parser(description=(cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = type(default) if default is not None else _annotated_type(f.type)
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse formats help with %
        name = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif kind in (list, tuple):
            parser.add_argument(name, type=_parse_type(_element_type(default, f.type)), nargs="*", default=default,
                                help=help_)
        else:
            parser.add_argument(name, type=_parse_type(kind), default=default, help=help_)
    args = cls(**{k: _home(v) for k, v in vars(parser.parse_args(argv)).items()})
    if check is not None:
        try:
            check(args)
        except ValueError as e:
            parser.error(str(e))
        except OSError as e:  # a path the system refuses to look at (e.g. a name over 255 bytes)
            parser.error(f"{_one_line(e)}: check the paths given")
    return args


def cli(main: Callable[[Any], Any], cls, check: Callable[[Any], None] | None = None,
        argv: list[str] | None = None):
    """A script's entry point: `parse_args(cls, argv, check)`, then `main(args)`; a `RunError` raised
    anywhere in `main` ends the script with one line on stderr and exit status 2."""
    import errno
    import signal

    script = Path(sys.argv[0]).name if main.__module__ == "__main__" else main.__module__ + ".py"
    _STOP["command"] = (script, list(sys.argv[1:] if argv is None else argv))
    prog, resumable = script, any(f.name == "resume" for f in dataclasses.fields(cls))
    try:
        return main(parse_args(cls, argv, check))
    except Interrupted as e:  # SIGINT / SIGTERM: one line (the resume command), exit 130 / 143
        if str(e):
            print(f"{prog}: interrupted by {e}", file=sys.stderr)
        raise SystemExit(e.code) from None
    except RunError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops after its update, `graceful_stop`)
        print(f"{prog}: interrupted by SIGINT", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except OSError as e:
        if getattr(e, "errno", None) == errno.ENAMETOOLONG:
            print(f"{prog}: error: {_one_line(e)}: choose shorter names", file=sys.stderr)
            raise SystemExit(2) from None
        if not disk_full(e):
            raise
        then = f"the last complete checkpoint is intact, continue with: {resume_command()}" if resumable else \
            "then run the command again"
        print(f"{prog}: error: no space left on the device ({_one_line(e)}): free some space; {then}", file=sys.stderr)
        raise SystemExit(2) from None


def _home(value: Any) -> Any:
    """`~/x` as the shell expands it (a quoted '~/runs' or --out-dir=~/runs reaches the script unexpanded)."""
    return os.path.expanduser(value) if isinstance(value, str) and (value == "~" or value.startswith("~/")) else value


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


def _parse_type(kind: type) -> Callable[[str], Any]:
    return _finite_float if kind is float else kind


def check_run_name(name: str, *, out_flag: str = "--out", name_flag: str = "--name") -> None:
    """ArgError unless `name` is one plain folder name (not empty, absolute, `.`, `..`, nor with separators):
    a run folder OUT/NAME never lands outside OUT."""
    plain = bool(name) and name not in (".", "..") and not any(s in name for s in ("/", "\\", "\0", os.sep)) \
        and not os.path.isabs(name)
    require(plain, name_flag, name, "must be one plain folder name (no '/', '\\' or '..'): the run folder is "
                                    f"{out_flag.lstrip('-').upper()}/NAME")
    check_name_length(name_flag, name)


def check_name_length(flag: str, name: str, suffix: int = 0) -> None:
    """ArgError unless the file name `name` (plus `suffix` characters the script appends, and the `.NAME.tmp` of an
    atomic write) fits the 255 bytes a file name may have."""
    size = len(name.encode(errors="replace")) + suffix + len("..tmp")
    require(size <= 255, flag, name[:40] + "…" if len(name) > 40 else name,
            f"a name of {len(name.encode(errors='replace'))} bytes is too long for a file name (at most "
            f"{255 - suffix - len('..tmp')}): choose a shorter one")


def check_writable_dir(flag: str, path: str | Path) -> None:
    """ArgError unless `path` is a folder that can be written, or can be created (its nearest existing
    ancestor is a writable folder); creates nothing but a temporary file it deletes at once."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ArgError(flag, path, f"{existing} is a file, not a folder: choose a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ArgError(flag, path, f"cannot write in {existing} ({e.strerror or e}): choose a writable folder") \
            from None


def run_dir(out: str | Path, name: str, *, out_flag: str = "--out", name_flag: str = "--name") -> Path:
    """`out/name`, created: refuses (ArgError) a name that is not one plain folder name (absolute, `..`,
    separators) and an `out` where the run folder cannot be created or written."""
    check_run_name(name, out_flag=out_flag, name_flag=name_flag)
    path = Path(out) / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ArgError(out_flag, out, f"cannot write the run folder {path} ({e.strerror or e}): "
                                      "choose a writable folder") from None
    return path


# ----------------------------------------------------------------------------- files


def write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temporary file, fsync, os.replace)."""
    text = json.dumps(obj, indent=2, default=_jsonable)
    _write_atomic(Path(path), lambda tmp: tmp.write_text(text))


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (temporary file, fsync, os.replace)."""
    _write_atomic(Path(path), lambda tmp: tmp.write_text(text))


def write_bytes(data: bytes, path: str | Path) -> None:
    """Write a binary file atomically (temporary file, fsync, os.replace)."""
    _write_atomic(Path(path), lambda tmp: tmp.write_bytes(data))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics file (one JSON object a line); a last line torn by a kill is left out, and damaged
    lines (see `metrics_record`) are dropped with one line on stderr saying how many."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")[:-1] if path.is_file() else []  # [:-1]: a torn last line, or ""
    rows = [r for r in map(metrics_record, lines) if r is not None]
    if len(rows) < len(lines):
        print(f"{path}: dropped {len(lines) - len(rows)} damaged line(s) of {len(lines)}", file=sys.stderr)
    return rows


def keep_jsonl_until(path: str | Path, update: int) -> None:
    """On resume: keep only the records logged up to `update` (later ones are logged again), atomically. RunError if
    `path` is something other than a file."""
    if Path(path).exists() and not Path(path).is_file():
        raise RunError(f"{path} is not a file: move it away, the run appends its metrics there")
    rows = [r for r in read_jsonl(path) if r.get("update", 0) <= update]
    write_text("".join(json.dumps(r) + "\n" for r in rows), path)


def append_jsonl(obj: dict, path: str | Path) -> None:
    """Append one metrics record (a line of JSON); a last line torn by a kill is cut off first."""
    line = (json.dumps(obj, default=_jsonable) + "\n").encode()
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write(line)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors, written atomically, with a checksum of its tensors in its metadata (TENSORS_DIGEST); refuses
    NaN/inf (CheckpointError naming the tensor)."""
    cpu = _cpu(tensors)
    _refuse_nonfinite(cpu, str(path))
    metadata = {**(metadata or {}), TENSORS_DIGEST: tensors_digest(cpu)}
    _write_atomic(Path(path), lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file: FileNotFoundError if missing, CheckpointError if unreadable, NaN/inf, or its tensors
    differ from the checksum `save_tensors` wrote into it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            digest = (f.metadata() or {}).get(TENSORS_DIGEST)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_one_line(e)[:160]})") from None
    bad = _nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN/inf (corrupt file)")
    if digest is not None and digest != tensors_digest(tensors):
        raise CheckpointError(f"{path} does not match its checksum (corrupt file)")
    return {k: v.to(device) for k, v in tensors.items()}


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        _fsync(tmp)
        _pause("file-written", path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders: POSIX only)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} is missing: {what}") from None
    except (ValueError, OSError) as e:
        raise RunError(f"{path} is not readable JSON ({_one_line(e)}): {what}") from None


def _one_line(e: BaseException | str) -> str:
    """A message as one line: control characters a user typed into a value (\\r, \\n, ...) are shown escaped."""
    text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(e).strip())
    return text or type(e).__name__


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


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor holding NaN/inf, or None."""
    for k, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return k
    return None


def _refuse_nonfinite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    bad = _nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(f"refusing to write {what}: tensor {bad!r} holds NaN/inf (the run diverged: "
                              "resume from the last checkpoint with a lower --lr)")


def _pause(point: str, path: Path) -> None:
    """Test hook: with RUNIO_PAUSE=point:FILE in the environment, create FILE and sleep at `point`, so a
    test can SIGKILL the process exactly there; RUNIO_PAUSE=point@NAME:FILE pauses only where the file or
    folder being written (or removed) is named NAME, e.g. `folder-filled@lora` or `manifest-written@step_0000004`.
    Points: file-written, folder-filled, manifest-written, old-moved, swapped, removing."""
    name, _, flag = os.environ.get("RUNIO_PAUSE", "").partition(":")
    where, _, only = name.partition("@")
    if where == point and (not only or only == Path(path).name):
        Path(flag).touch()
        time.sleep(600)


# ----------------------------------------------------------------------------- atomic folders


def _sibling(path: Path, kind: str) -> Path:
    """`.<name>.tmp` / `.old` / `.del` next to `path`."""
    return path.parent / f".{path.name}.{kind}"


def folder_problem(folder: str | Path, manifest: str = "MANIFEST.json") -> str | None:
    """Why `folder` is not a complete copy (one line), or None when every file its manifest lists is
    there with the listed size and sha256."""
    folder = Path(folder)
    try:
        files = json.loads((folder / manifest).read_text())["files"]
        listed = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        return f"no {manifest} (its write did not finish)"
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return f"{manifest} is unreadable"
    for name, size, sha in listed:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {size}"
        if _sha256(path) != sha:
            return f"{name} does not match its checksum (corrupt)"
    return None


@contextlib.contextmanager
def atomic_folder(path: str | Path, manifest: str = "MANIFEST.json", meta: dict | None = None) -> Iterator[Path]:
    """Write a whole folder atomically (module docstring): `with atomic_folder(run / "lora") as tmp:
    save(tmp)`. The files written into `tmp` replace `path` only once all are on disk, with a manifest
    (`meta` plus "files": size and sha256 of each) written last; an exception discards them."""
    path, meta = Path(path), dict(meta or {})
    json.dumps(meta, default=_jsonable)  # fail before writing anything
    _recover(path, manifest)
    tmp = _sibling(path, "tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        _pause("folder-filled", path)
        _write_manifest(tmp, manifest, meta)
        _pause("manifest-written", path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, path)


def recover_folder(path: str | Path, manifest: str = "MANIFEST.json") -> bool:
    """Finish or undo an interrupted `atomic_folder` write of `path`; True if `path` now holds a complete
    copy (e.g. `if not recover_folder(run / "lora"): save the LoRA`)."""
    _recover(Path(path), manifest)
    return folder_problem(path, manifest) is None


def _write_manifest(folder: Path, manifest: str, meta: dict) -> None:
    """Step 2: size and sha256 of every file (each fsynced), then the manifest itself, then the folder."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(f)
        files[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    for d in {f.parent for f in folder.rglob("*") if f.is_file() and f.parent != folder}:
        _fsync(d)
    write_json({**meta, "files": files}, folder / manifest)  # fsyncs `folder` too


def _swap_in(tmp: Path, path: Path) -> None:
    """Steps 3-4: `path` → `.old`, complete `tmp` → `path`, delete `.old`."""
    old = _sibling(path, "old")
    if old.exists():
        _remove(old, path)
    if path.exists():
        os.rename(path, old)
        _fsync(path.parent)
        _pause("old-moved", path)
    os.rename(tmp, path)
    _fsync(path.parent)
    _pause("swapped", path)
    if old.exists():
        _remove(old, path)


def _remove(folder: Path, path: Path) -> None:
    """Delete `folder` (`path` or one of its siblings) by renaming it to `.<name>.del` first."""
    trash = _sibling(path, "del")
    if trash.exists():
        _delete(trash)
    os.rename(folder, trash)
    _fsync(path.parent)
    _pause("removing", folder)
    _delete(trash)


def _delete(path: Path) -> None:
    """Delete a folder, or a file where a folder was expected (a damaged run folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _recover(path: Path, manifest: str) -> None:
    """Leave at most `path` of `path`, `.tmp`, `.old`, `.del`: the newest complete copy."""
    tmp, old, trash = (_sibling(path, k) for k in ("tmp", "old", "del"))
    if trash.exists():
        _delete(trash)
    if tmp.exists():
        if folder_problem(tmp, manifest) is None:
            _swap_in(tmp, path)  # killed after step 2: the new copy is complete, finish the swap
        else:
            _delete(tmp)  # killed in step 1 or 2: `path` was never touched
    if old.exists():
        if path.exists():
            _remove(old, path)  # killed in step 4
        else:
            os.rename(old, path)  # no newer complete copy (the protocol never leaves this): restore the old one
            _fsync(path.parent)


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


_STEP = re.compile(r"step_(\d+)")
_STEP_LEFTOVER = re.compile(r"\.(step_\d+)\.(tmp|old|del)")


def save_checkpoint(
    run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
    state: dict, extra_files: dict[str, Path] | None = None, keep: int | None = None,
) -> Path:
    """Write `checkpoints/step_N/` atomically (module docstring): weights, optimizer, RNG, and `state`
    in state.json, the manifest. `extra_files` (name → existing file) are moved in as well, e.g. a
    diffusers-format LoRA. NaN/inf anywhere: CheckpointError, nothing written. Once the new folder is in
    place, checkpoints of later steps (left by a run restarted or resumed from an earlier one) are
    deleted and, with `keep`, all but the newest `keep`."""
    require(keep is None or keep >= 1, "keep", keep, "keep at least the newest checkpoint")
    root = Path(run_dir) / "checkpoints"
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    files = {"weights.safetensors": _cpu(weights), "optimizer.safetensors": _cpu(opt_tensors),
             "rng.safetensors": _cpu(rng_tensors)}
    for name, tensors in files.items():
        _refuse_nonfinite(tensors, f"checkpoint step {step} ({name})")
    _tidy(root)
    final = root / f"step_{step:07d}"
    meta = {**state, "step": step, "optimizer": opt_meta, "rng": rng_meta}
    meta[STATE_DIGEST] = state_digest(meta)  # the manifest covers itself (validated reading, below)
    with atomic_folder(final, "state.json", meta) as tmp:
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
        for name, src in (extra_files or {}).items():
            shutil.move(str(src), tmp / name)
    done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)))
    older = [p for n, p in done if n < step]
    for p in [p for n, p in done if n > step] + (older[:len(older) - keep + 1] if keep else []):
        _remove(p, p)
    return final


def _tidy(root: Path) -> None:
    """Finish or undo every interrupted checkpoint write under `root` (see `recover_folder`)."""
    if root.is_dir():
        for name in sorted({m.group(1) for p in root.iterdir() if (m := _STEP_LEFTOVER.fullmatch(p.name))}):
            _recover(root / name, "state.json")


def _candidates(run_dir: str | Path) -> list[Path]:
    """Every folder that may hold a checkpoint, newest first: per step `.step_N.tmp`, `step_N`, `.step_N.old`."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        if m := _STEP.fullmatch(p.name):
            found.append((-int(m.group(1)), 1, p))
        elif (m := _STEP_LEFTOVER.fullmatch(p.name)) and m.group(2) != "del":
            found.append((-int(m.group(1)[5:]), 0 if m.group(2) == "tmp" else 2, p))
    return [p for *_, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (manifest verified), or None. After a kill it may
    be a `.step_N.tmp` folder; the next `save_checkpoint` renames it."""
    return next((p for p in _candidates(run_dir) if folder_problem(p, "state.json") is None), None)


def load_checkpoint(ckpt: str | Path, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
                    expect: Mapping[str, Any] | None = None, check_state: Callable[[dict], Any] | None = None):
    """Read a checkpoint written by `save_checkpoint`: returns (weights, state) and restores the
    optimizer and the RNGs in place, only once every check passed: complete (CheckpointError), finite
    (CheckpointError), and with `expect` (name → tensor or shape) the same keys and shapes (MismatchError); every
    other check of `check_checkpoint` (state.json's checksum, RNG and optimizer states, `check_state`) a
    CheckpointError."""
    ckpt = Path(ckpt)
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no state.json)")
    problem = folder_problem(ckpt, "state.json")
    if problem is not None:
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: {problem}")
    try:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{ckpt}: state.json is not readable JSON ({_one_line(e)})") from None
    weights, opt, rng = (load_tensors(ckpt / f"{n}.safetensors") for n in ("weights", "optimizer", "rng"))
    check_checkpoint(ckpt, state, {"weights": weights, "optimizer": opt, "rng": rng}, optimizer, expect, check_state)
    state.pop("files", None)
    if optimizer is not None:
        _check_optimizer(optimizer, opt, state["optimizer"], ckpt)
        before = optimizer.state_dict()
        try:
            load_optimizer_tensors(optimizer, opt, state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            optimizer.load_state_dict(before)
            raise CheckpointError(f"{ckpt}: its optimizer state does not load ({_one_line(e)[:160]})") from None
    if restore_rng:
        set_rng_state(rng, state["rng"])
    return weights, state


def check_weights(weights: Mapping[str, torch.Tensor], expect: Mapping[str, Any], where: str = "checkpoint") -> None:
    """MismatchError unless `weights` has exactly the keys of `expect` (name → tensor or shape) with the
    same shapes; the message names a few of the keys that differ."""
    shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)  # noqa: E731
    foreign, missing = sorted(set(weights) - set(expect)), sorted(set(expect) - set(weights))
    other = [k for k in sorted(set(weights) & set(expect)) if tuple(weights[k].shape) != shape(expect[k])]
    few = lambda ks: ", ".join(ks[:3]) + (", …" if len(ks) > 3 else "")  # noqa: E731
    parts = ([f"{len(foreign)} unexpected keys ({few(foreign)})"] if foreign else []) \
        + ([f"{len(missing)} missing keys ({few(missing)})"] if missing else []) \
        + ([f"{len(other)} other shapes ({other[0]}: {tuple(weights[other[0]].shape)}, "
            f"expected {shape(expect[other[0]])})"] if other else [])
    if parts:
        raise MismatchError(f"{where}: {'; '.join(parts)}: saved from another model or LoRA setup "
                            "(rank, targets, timestep ranges): start a new run (another --name)")


def _check_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                     ckpt: Path) -> None:
    """The saved optimizer state fits `optimizer`: as many parameters per group, per-parameter tensors
    (Adam moments, momentum) of the parameter's shape."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = [len(g["params"]) for g in meta["param_groups"]]
    if saved != [len(g["params"]) for g in optimizer.param_groups]:
        raise MismatchError(f"{ckpt}: its optimizer holds {saved} parameters per group, this run "
                            f"{[len(g['params']) for g in optimizer.param_groups]}: start a new run (another --name)")
    for name, t in tensors.items():
        p = params[int(name.split(".", 1)[0])]
        if t.dim() > 0 and t.dtype != p.dtype:
            raise CheckpointError(f"{ckpt}: optimizer state {name} is {t.dtype}, its parameter {p.dtype} (a damaged "
                                  "file)")
        if t.dim() > 0 and t.shape != p.shape:
            raise MismatchError(f"{ckpt}: optimizer state {name} has shape {tuple(t.shape)}, its parameter "
                                f"{tuple(p.shape)}: start a new run (another --name)")


# ----------------------------------------------------------------------------- resuming


def check_settings(saved: Mapping[str, Any], current: Any, keys: Iterable[str], where: str = "the saved run") -> None:
    """MismatchError naming the first of `keys` whose value differs between `saved` (e.g. args.json) and
    `current` (the arguments dataclass, or a dict)."""
    now = json.loads(json.dumps(current if isinstance(current, Mapping) else dataclasses.asdict(current),
                                default=_jsonable))
    for k in keys:
        if k not in saved or saved[k] != now[k]:
            was = _shown(saved[k]) if k in saved else "no value for it"
            raise MismatchError(f"{_flag(k)} {_shown(now[k])}: {where} was made with {was}: resume with that "
                                "value, or start a new run (another --name)")


def check_resume(run_dir: str | Path, args: Any, keys: Iterable[str]) -> Path:
    """Before a resumed run writes anything (args.json included): RunError if `run_dir` holds no complete
    checkpoint, MismatchError if its args.json differs from `args` on `keys` (e.g. method, reward,
    lora_rank, seed). Returns the newest complete checkpoint."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise RunError(f"--resume: nothing to resume, {run_dir / 'checkpoints'} holds no complete checkpoint: "
                       "drop --resume to start a new run")
    saved = _read_json(run_dir / "args.json", "the settings of its checkpoints are unknown; start a new run")
    if not isinstance(saved, dict):
        raise RunError(f"{run_dir / 'args.json'} holds no JSON object: the settings of its checkpoints are unknown; "
                       "start a new run")
    check_settings(saved, args, keys, str(run_dir))
    return ckpt


def check_fresh(run_dir: str | Path, name_flag: str = "--name") -> None:
    """Before a new (not resumed) run writes anything: ArgError if `run_dir` already holds a complete
    checkpoint, so that two runs never mix in one folder (resume it, or choose another name)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        raise ArgError(name_flag, Path(run_dir).name, f"{run_dir} already holds a run (checkpoint {ckpt.name}): "
                                                      f"pass --resume to continue it, --overwrite to replace it, or "
                                                      f"choose another {name_flag}")


def resume_checkpoint(run_dir: str | Path, optimizer: torch.optim.Optimizer | None = None,
                      expect: Mapping[str, Any] | None = None, restore_rng: bool = True,
                      check_state: Callable[[dict], Any] | None = None):
    """`load_checkpoint` the newest checkpoint of `run_dir` that loads, saying which one; each newer one
    that is incomplete, corrupt, non-finite or fails `check_state` (see `check_checkpoint`) is skipped, with a
    one-line message each. Returns (path,
    weights, state). RunError (one line, with the newest reason) if none loads; a MismatchError (keys,
    shapes, optimizer) stops at once."""
    skipped = []
    for ckpt in _candidates(run_dir):
        try:
            weights, state = load_checkpoint(ckpt, optimizer, restore_rng, expect, check_state)
        except (CheckpointError, FileNotFoundError) as e:
            skipped.append(_one_line(e))
            continue
        for reason in skipped:
            print(f"skipping checkpoint: {reason}", file=sys.stderr)
        print(f"resuming from {ckpt} (step {state['step']})")
        return ckpt, weights, state
    where = Path(run_dir) / "checkpoints"
    if skipped:
        raise RunError(f"--resume: nothing to resume, {where} holds no checkpoint that loads ({len(skipped)} "
                       f"skipped; the newest: {skipped[0]}): start a new run with another --name")
    raise RunError(f"--resume: nothing to resume, {where} holds no checkpoint: drop --resume to start a new run")


# ----------------------------------------------------------------------------- one writer per run, interruptions
# A run folder is written by one process at a time: `run_lock` holds an OS-level lock (the `filelock` package:
# flock on POSIX, released by the OS when the process dies, SIGKILL included) on `<folder>/.lock` for the whole run,
# with its holder (pid, host, command) in `<folder>/.lock.owner.json`. `graceful_stop` turns the first SIGINT /
# SIGTERM into a request the training loop answers between updates (checkpoint, one line, exit 130 / 143); `cli`
# turns any other interruption and a full disk into one line.


class Interrupted(RunError):
    """SIGINT / SIGTERM stopped the run: `cli` prints the line (if any) and exits with 128 + the signal's number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.code = 128 + signum


_STOP: dict[str, Any] = {"signal": None, "command": None}


def resume_command() -> str:
    """The command line that continues this run: the script's, with --resume (shell-quoted)."""
    import shlex

    script, argv = _STOP["command"] or (Path(sys.argv[0]).name, sys.argv[1:])
    argv = [a for a in argv if a not in ("--resume", "--overwrite", "--no-resume")]
    return shlex.join(["python", script, *argv, "--resume"])


REPEAT_S = 2.0
"""A second SIGINT / SIGTERM stops at once only this many seconds after the first: torchrun passes the Ctrl-C that
the terminal sent to every process on to its workers, which then see it twice within milliseconds."""


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Inside: the first SIGINT (Ctrl-C) or SIGTERM only asks the loop to stop (`stop_requested`), so that the update
    in progress finishes and a checkpoint is written; a second one stops at once (`Interrupted`, the previous
    checkpoint stays the newest complete one), if it comes more than REPEAT_S after the first. Handlers are restored on
    exit; outside the main thread a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _STOP["signal"] is None:
            _STOP["signal"], _STOP["at"] = signum, time.monotonic()
        elif time.monotonic() - _STOP["at"] > REPEAT_S:  # not the same Ctrl-C passed on by a launcher (torchrun)
            raise Interrupted(signum, f"{signal.Signals(signum).name} again: stopped at once; continue from the last "
                                      f"checkpoint with: {resume_command()}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _STOP["signal"] = None


def stop_requested() -> int | None:
    """The signal (SIGINT / SIGTERM number) that asked the run to stop, or None."""
    return _STOP["signal"]


def interrupted(where: str, main_process: bool = True) -> Interrupted:
    """The exception that ends a run stopped by `stop_requested()` once its checkpoint `where` is written."""
    import signal

    signum = stop_requested() or signal.SIGINT
    return Interrupted(signum, f"{signal.Signals(signum).name}: stopped after {where}; continue with: "
                               f"{resume_command()}" if main_process else "")


def _lock_owner(path: Path) -> str:
    owner = path.with_name(path.name + ".owner.json")
    try:
        o = json.loads(owner.read_text())
        return f"process {o['pid']} on host {o['host']} (since {o['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(lock: str | Path, what: str = "run folder", check: Callable[[], Any] = lambda: None,
             enabled: bool = True) -> Iterator[None]:
    """Hold the OS-level lock file `lock` (e.g. `<run>/.lock`) while the block runs: one writer per folder. Busy:
    RunError naming the holder (pid, host). `check()` (read-only checks such as `check_fresh`) runs before the lock
    file is created, so a run refused by it leaves nothing behind, and again once the lock is held. `enabled=False`
    (a process other than the main one): only `check()`."""
    import filelock
    import socket

    lock = Path(lock)
    if not enabled:
        check()
        yield
        return
    held = filelock.FileLock(str(lock), timeout=0)

    def take():
        try:
            held.acquire()
        except filelock.Timeout:
            raise RunError(f"{lock.parent} is in use by {_lock_owner(lock)}: this {what} has one writer at a time; "
                           "wait for it to end (or stop it), or choose another name") from None
        except OSError as e:  # a read-only folder, a file where the folder should be
            raise RunError(f"cannot lock {lock} ({e.strerror or _one_line(e)}): choose a writable folder") from None

    if lock.exists():
        take()  # the holder of a live run is named before anything else is said about the folder
    try:
        check()
        if not held.is_locked:
            try:
                lock.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunError(f"cannot create {lock.parent} ({e.strerror or _one_line(e)}): choose a writable "
                               "folder") from None
            take()
            check()
        write_json({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": _STOP["command"] or sys.argv}, lock.with_name(lock.name + ".owner.json"))
        yield
    finally:
        if held.is_locked:
            lock.with_name(lock.name + ".owner.json").unlink(missing_ok=True)
            held.release(force=True)


def check_not_finished(run_dir: str | Path, finished: Iterable[str], overwrite: bool, name_flag: str = "--name") -> None:
    """ArgError if `run_dir` holds a finished model (any of `finished`, e.g. `lora` or `lora.safetensors`) and the
    user did not pass --overwrite: a finished run is never replaced by accident (its checkpoints may be gone)."""
    done = [f for f in finished if (Path(run_dir) / f).exists()]
    require(overwrite or not done, name_flag, Path(run_dir).name,
            f"{run_dir} holds a finished model ({done[0] if done else ''}): pass --overwrite to replace it, "
            f"or choose another {name_flag}")


def disk_full(e: BaseException) -> bool:
    """Whether `e` is an out-of-space error (ENOSPC, EDQUOT) while writing."""
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# ----------------------------------------------------------------------------- the guarded update


def _parameters(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters as a list, read once: `model.parameters()` is a generator, and reading it twice would give
    the second reader nothing. TypeError unless every item is a tensor."""
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    bad = next((p for p in params if not isinstance(p, torch.Tensor)), None)
    if bad is not None:
        raise TypeError(f"parameters must be tensors (e.g. model.parameters()), got a {type(bad).__name__}")
    return params


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """‖∇‖₂ over all parameters that have a gradient (inf/nan propagate)."""
    grads = [p.grad.detach().float().norm() for p in _parameters(params) if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def guarded_step(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], max_grad_norm: float | None = 1.0
) -> tuple[bool, float]:
    """Clip and apply the update unless it would put NaN/inf into the weights: a non-finite gradient is dropped
    before the step, and weights that come out of the step non-finite (e.g. an absurd learning rate) are restored
    from a copy taken just before it. `params` (any iterable, e.g. `model.parameters()`) are the parameters whose
    gradient is measured and clipped; every parameter the optimizer holds is guarded. Returns (applied, gradient
    norm before clipping)."""
    params = _parameters(params)
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real)
                                      or not math.isfinite(max_grad_norm) or max_grad_norm < 0):
        raise ValueError(f"max_grad_norm must be a finite number ≥ 0 (0 or None: no clipping), got {max_grad_norm!r}")
    norm = grad_norm(params)
    if not torch.isfinite(norm):
        for p in [*params, *(q for g in optimizer.param_groups for q in g["params"])]:  # the optimizer's and `params`
            p.grad = None
        return False, float(norm)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    guarded = list({id(p): p for g in optimizer.param_groups for p in g["params"] if p.grad is not None}.values())
    before = [p.detach().clone() for p in guarded]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if all(bool(torch.isfinite(p).all()) for p in guarded):
        return True, float(norm)
    with torch.no_grad():
        for p, b in zip(guarded, before):
            p.copy_(b)
    return False, float(norm)


def check_skipped(in_a_row: int, limit: int, update: int) -> None:
    """RunError once `limit` (> 0; --max-skipped) updates in a row were skipped for NaN/inf: a run that cannot learn
    stops instead of saving its untrained weights as the result."""
    if limit and in_a_row >= limit:
        raise RunError(f"--max-skipped {limit}: {in_a_row} updates in a row were skipped (NaN/inf gradient or weights), "
                       f"the last at update {update}: the run cannot learn; lower --lr, or check --reward's weights, "
                       "the shortcut and the model")


# ----------------------------------------------------------------------------- validated reading
# One validator per kind of file the scripts read back, shared by every reader of that kind (docs/robustness.md,
# "What is validated when read"): what fails a check is never used. A damaged run file is dropped or skipped (metrics
# lines, checkpoints: the previous good one), a damaged cache file is rebuilt, a damaged input the user passed (a LoRA
# folder, shortcut or classifier weights) is one line naming the file and what is wrong with it.

STATE_DIGEST = "state_sha256"
"""Key of state.json (a checkpoint's manifest) holding the sha256 of the rest of it: the manifest hashes every other
file, this covers the manifest itself, so that a value edited by hand (`update`, `step`, a seed) is seen."""
TENSORS_DIGEST = "tensors_sha256"
"""Key of the metadata `save_tensors` writes into a .safetensors file: the sha256 of its names, dtypes, shapes and
bytes, so that `load_tensors` sees a flipped byte of the data (a file outside any manifest: caches, lora.safetensors)."""
WEIGHT_LIMIT = 1e4
"""Largest |w| accepted in trained weights read from a file (LoRA branches, shortcut, classifier): trained weights are
of order 1, and a weight near 1e30 overflows float32 in its first matrix product (every update then non-finite)."""


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 of a checkpoint's state (state.json without its "files" list and without the digest itself), over its
    JSON with sorted keys, as written and as read back (tuples are lists, numpy numbers plain numbers)."""
    body = json.loads(json.dumps({k: v for k, v in state.items() if k not in ("files", STATE_DIGEST)},
                                 default=_jsonable))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_weights_finite(tensors: Mapping[str, torch.Tensor], where: str, limit: float = WEIGHT_LIMIT) -> None:
    """CheckpointError (one line) unless every floating tensor of `tensors` is finite with |w| ≤ `limit`: trained
    weights read from a file (a LoRA, a shortcut, a classifier), refused before any training uses them."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: {name!r} is not a tensor")
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {name!r} holds NaN/inf (a diverged or damaged file): pass the "
                                  "weights of a finished training")
        biggest = float(t.detach().abs().max())
        if biggest > limit:
            raise CheckpointError(f"{where}: tensor {name!r} holds |w| = {biggest:.3g} > {limit:g}, no trained weight "
                                  "is that large (a damaged or rescaled file): pass the weights of a finished training")


CONTENT_DIGEST = "content_sha256"
"""Key of a JSON object written by `write_json_cache`: the sha256 of the rest of it (`state_digest`)."""


def write_json_cache(obj: Mapping[str, Any], path: str | Path) -> None:
    """`write_json` of a JSON object a script keeps between calls (e.g. minisd's report.json), with the sha256 of its
    content (CONTENT_DIGEST), so that `read_json_cache` sees a value changed after it was written."""
    body = {k: v for k, v in obj.items() if k != CONTENT_DIGEST}
    write_json({**body, CONTENT_DIGEST: state_digest(body)}, path)


def read_json_cache(path: str | Path, what: str = "it is rebuilt") -> Any:
    """The JSON a script keeps between calls (a cache, a benchmark's finished-run record), or None when it is missing;
    a damaged one — not JSON, or a `write_json_cache` object whose checksum does not match — is removed, with one line
    saying so (`what`: what happens instead), and is None too. The checksum key is not returned."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(obj, dict) and CONTENT_DIGEST in obj:
            if obj.pop(CONTENT_DIGEST) != state_digest(obj):
                raise ValueError("changed after it was written: its checksum does not match")
        return obj
    except (ValueError, OSError) as e:
        print(f"{path} is damaged ({_one_line(e)[:120]}): {what}", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None


def load_cached_tensors(path: str | Path, use: Callable[[dict[str, torch.Tensor]], Any],
                        dtype: torch.dtype | None = torch.float32) -> bool:
    """Load a cache file of tensors and hand them to `use` (e.g. a model's load_state_dict): True when it did. False
    when the file is missing, or damaged — unreadable, NaN/inf, another checksum, a tensor not of `dtype`, keys or
    shapes `use` refuses —, in which case it is removed with one line saying so, and the caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        tensors = load_tensors(path)
        wrong = [k for k, t in tensors.items() if dtype is not None and t.dtype != dtype]
        if wrong:
            raise CheckpointError(f"tensor {wrong[0]!r} is {tensors[wrong[0]].dtype}, not {dtype}")
        use(tensors)
        return True
    except (CheckpointError, RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
        print(f"cache file {path} is damaged ({_one_line(e)[:160]}): rebuilding it", file=sys.stderr)
        path.unlink(missing_ok=True)
        return False


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_python_random_state(value: Any, what: str) -> tuple:
    """`value` (a `random.getstate()` as JSON lists) as a state `random.setstate` takes; ValueError (one line) if it is
    not one (tried on a throwaway generator)."""
    try:
        state = _tuplify(value)
        random.Random().setstate(state)
        return state
    except (TypeError, ValueError, OverflowError, IndexError):
        raise ValueError(f"{what} is not a Python random state") from None


def _check_rng(tensors: Mapping[str, torch.Tensor], meta: Any) -> None:
    """rng.safetensors and state.json's "rng": each state restorable, tried on throwaway generators (the run's own are
    set only once everything passed)."""
    if not isinstance(meta, dict) or "python" not in meta or "numpy" not in meta:
        raise ValueError("its RNG state lacks the Python or numpy generator")
    check_python_random_state(meta["python"], "its Python RNG state")
    try:
        kind, keys, *rest = meta["numpy"]
        keys = np.array(keys, dtype=np.int64)
        if keys.shape != (624,) or keys.min() < 0 or keys.max() >= 2**32:
            raise ValueError
        np.random.RandomState().set_state((kind, keys.astype(np.uint32), *rest))
    except (TypeError, ValueError, OverflowError, IndexError):
        raise ValueError("its numpy RNG state is not one") from None
    for name, t in tensors.items():
        if name != "torch" and not re.fullmatch(r"cuda\.\d+", name):
            raise ValueError(f"rng.safetensors holds an unknown tensor {name!r}")
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise ValueError(f"RNG tensor {name!r} is {t.dtype} of shape {tuple(t.shape)}, not a uint8 vector")
    if "torch" not in tensors:
        raise ValueError("rng.safetensors lacks the torch CPU generator")
    try:
        torch.Generator().set_state(tensors["torch"])
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"RNG tensor 'torch' has {tensors['torch'].numel()} bytes, not a torch CPU generator "
                         f"state ({torch.get_rng_state().numel()})") from None


def _check_optimizer_meta(optimizer: torch.optim.Optimizer | None, tensors: Mapping[str, torch.Tensor],
                          meta: Any) -> None:
    """state.json's "optimizer" and optimizer.safetensors are what `optimizer_tensors` writes: param groups of integer
    parameter indices, per-parameter entries named `<index>.<key>` with an index in range."""
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not isinstance(meta.get("scalars"), dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(_is_int(i) for i in g["params"])
            for g in groups):
        raise ValueError("its optimizer state is not one (param_groups, scalars)")
    indices = [i for g in groups for i in g["params"]]
    if indices != list(range(len(indices))):
        raise ValueError("its optimizer param groups do not number the parameters 0, 1, …")
    keys: dict[str, set] = {}
    for name in list(tensors) + list(meta["scalars"]):
        idx, dot, key = name.partition(".")
        if not (dot and key and idx.isdigit() and int(idx) < len(indices)):
            raise ValueError(f"optimizer entry {name!r} names no parameter of its param groups")
        keys.setdefault(idx, set()).add(key)
    if len({frozenset(k) for k in keys.values()}) > 1:
        raise ValueError("its optimizer state holds other entries for some parameters than for others")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"optimizer tensor {name!r} is {t.dtype}, not floating point")
    if optimizer is not None:
        now = optimizer.param_groups
        for g in groups:
            missing = [k for k in now[0] if k != "params" and k not in g] if now else []
            if missing:
                raise ValueError(f"its optimizer param group lacks {missing[0]!r}")


def check_checkpoint(ckpt: Path, state: Any, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                     optimizer: torch.optim.Optimizer | None = None,
                     expect: Mapping[str, Any] | None = None,
                     check_state: Callable[[dict], Any] | None = None) -> None:
    """Everything `load_checkpoint` will use, checked before any of it is used: state.json a JSON object whose
    checksum (STATE_DIGEST) matches and whose `step` is the folder's; the RNG and optimizer states restorable; the
    weights of `expect`'s dtypes (keys and shapes: `check_weights`, a MismatchError); `check_state(state)` (the
    script's own keys, e.g. spent, skipped) raising no ValueError, KeyError or TypeError. CheckpointError (one line)
    naming the first problem."""
    try:
        if not isinstance(state, dict):
            raise ValueError("state.json is not a JSON object")
        unlisted = [f"{n}.safetensors" for n in tensors if f"{n}.safetensors" not in state.get("files", {})]
        if unlisted:
            raise ValueError(f"its manifest does not list {unlisted[0]}")
        if STATE_DIGEST in state and state[STATE_DIGEST] != state_digest(state):
            raise ValueError("state.json was changed after it was written (its checksum does not match)")
        m = _STEP.search(ckpt.name)  # step_N, .step_N.tmp, .step_N.old
        step = int(m.group(1)) if m else None
        if not _is_int(state.get("step")) or (step is not None and state["step"] != step):
            raise ValueError(f"state.json's step {state.get('step')!r} is not the folder's ({step})")
        _check_rng(tensors["rng"], state.get("rng"))
        _check_optimizer_meta(optimizer, tensors["optimizer"], state.get("optimizer"))
        if check_state is not None:
            check_state(state)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else _one_line(e)
        raise CheckpointError(f"{ckpt}: {what}") from None
    check_weights_finite(tensors["weights"], str(ckpt))  # trained weights of an absurd size: a damaged file
    if expect is not None:
        check_weights(tensors["weights"], expect, str(ckpt))
        wrong = [k for k, v in expect.items() if isinstance(v, torch.Tensor) and tensors["weights"][k].dtype != v.dtype]
        if wrong:
            raise CheckpointError(f"{ckpt}: weight {wrong[0]} is {tensors['weights'][wrong[0]].dtype}, the model's "
                                  f"{expect[wrong[0]].dtype} (a damaged file)")


def check_run_state(state: Mapping[str, Any], keys: Iterable[str] = ()) -> None:
    """The loop state both training scripts checkpoint: `skipped` a count, `spent` (budget.Spent) with `updates` equal
    to the checkpoint's step and finite non-negative amounts, and each of `keys` present. KeyError or ValueError."""
    for k in ("skipped", "spent", *keys):
        if k not in state:
            raise KeyError(k)
    if not _is_int(state["skipped"]) or state["skipped"] > state["step"]:
        raise ValueError(f"its skipped count {state['skipped']!r} is not a count of at most {state['step']} updates")
    spent = state["spent"]
    if not isinstance(spent, dict) or set(spent) != {"updates", "gflop", "cpu_seconds", "seconds"}:
        raise ValueError("its spent budget is not updates, gflop, cpu_seconds, seconds")
    if spent["updates"] != state["step"] or not _is_int(spent["updates"]):
        raise ValueError(f"its spent updates {spent['updates']!r} are not its step {state['step']}")
    if not all(_is_number(spent[k]) and spent[k] >= 0 for k in ("gflop", "cpu_seconds", "seconds")):
        raise ValueError("its spent budget holds a negative or non-finite amount")


def metrics_record(line: bytes | str) -> dict | None:
    """One line of metrics.jsonl as its record, or None when it is damaged: not UTF-8, not a JSON object, or with an
    `update` that is not a non-negative integer (every reader selects and truncates rows by it)."""
    try:
        row = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(row, dict) or ("update" in row and not _is_int(row["update"])):
        return None
    return row


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (e.g. to see later whether a finished run's metrics.jsonl changed)."""
    return _sha256(Path(path))
