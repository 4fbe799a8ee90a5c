"""Test helper: `train_sd.py` under a launcher, with each process's writes and final LoRA weights recorded.

Run by tests/test_multiproc.py as the script of `accelerate launch --multi_gpu --num_processes 2` (or torchrun): the
arguments are train_sd.py's. With MP_DUMP=<folder>, process r writes there: pid<r> (its process id) when it starts;
writes<r>.txt, one line per file or folder it creates, opens for writing, renames or deletes under MP_AUDIT=<folder>
(a Python audit hook, flushed at once, so the list survives a SIGKILL); and when it ends, rank<r>.json (update,
skipped, spent) and rank<r>.safetensors (its LoRA weights). The audit hook sees everything Python writes (open,
os.mkdir, os.rename/replace, os.remove, shutil.rmtree); safetensors writes its files from Rust, into folders that
os.mkdir made.

Run: MP_DUMP=/tmp/mp/dump MP_AUDIT=/tmp/mp accelerate launch --multi_gpu --num_processes 2 tests/mp_train.py --tiny \
     --out-dir /tmp/mp
"""

import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink",
          "os.link", "os.chmod", "os.utime"}


def audit_writes(root: str, log) -> None:
    """Install an audit hook that writes 'event path' to the open text file `log` for every write under `root`."""
    root = os.path.realpath(root) + os.sep

    def hook(event, args):
        if event not in EVENTS:
            return
        if event == "open":
            path, mode, flags = args
            if not (any(c in (mode or "") for c in "wax+") or (mode is None and flags & WRITE_FLAGS)):
                return
            if isinstance(path, (str, bytes, os.PathLike)) and os.path.isdir(path):
                return  # an unnamed O_TMPFILE (runio.check_writable_dir's probe): nothing appears in the folder
            paths = [path]
        else:
            paths = args[:2]
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                p = os.path.realpath(os.fsdecode(p))
                if (p + os.sep).startswith(root):
                    log.write(f"{event} {p[len(root):]}\n")
                    log.flush()

    sys.addaudithook(hook)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    dump, rank = Path(os.environ.get("MP_DUMP") or "."), int(os.environ.get("RANK", "0"))
    if os.environ.get("MP_DUMP"):
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"pid{rank}").write_text(str(os.getpid()))
        if os.environ.get("MP_AUDIT"):
            audit_writes(os.environ["MP_AUDIT"], open(dump / f"writes{rank}.txt", "w"))
    import runio
    import train_sd
    from safetensors.torch import save_file

    out = runio.cli(train_sd.main, train_sd.Args, train_sd.check_args)
    if os.environ.get("MP_DUMP"):
        save_file({k: v.contiguous() for k, v in out["weights"].items()}, str(dump / f"rank{rank}.safetensors"))
        (dump / f"rank{rank}.json").write_text(json.dumps({k: out[k] for k in ("update", "skipped", "spent")}))
