"""Equal compute in a unit that does not depend on the machine: the FLOPs of each training update.

Guo, Cui, Bo, Huang, "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025,
https://arxiv.org/abs/2507.22604 — Table 1 compares methods at equal compute (6 h on 2 A800 GPUs). Seconds of one
machine do not transfer to another, nor to the same machine under other load; FLOPs do. Nothing here is the method.

What is counted: every matrix multiplication, convolution and attention of an update, forward and backward (the
backward of a layer costs what it costs: ≈ 2× its forward where weights get gradients, ≈ 1× where only the input
does, and a checkpointed step is recomputed in backward), in the denoiser calls, the decoder and the reward —
exactly what torch's `FlopCounterMode` counts (its formulas, without its per-module bookkeeping), plus the CPU
flash-attention kernels it does not register. Element-wise work and the optimizer step are not counted. The FLOPs of
an update depend only on its *kind* (the chain's segments, the batch size and which parameters are trained), so each
kind is counted once, on its first update, and looked up afterwards: the count costs nothing after that, and it is
the same on any machine and in any run.

    GFLOP         10⁹ floating-point operations (a multiply-add is 2)
    kind          (chain segments, batch size, trained branches) of an update
    spent         what a run's updates have used so far: updates, GFLOP, CPU-seconds, wall-seconds

Run: python -c "import budget, torch; f = torch.nn.Linear(8, 8); \
print(budget.FlopMeter().gflop('x', lambda: f(torch.randn(4, 8)).sum().backward(), f.parameters()))"
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

UNITS = ("gflop", "cpu_seconds", "seconds", "updates")
"""Budget units: GFLOP (machine-independent, the default for tables), CPU-seconds (time.process_time; a run of several
processes counts all of them together), wall-clock seconds, updates."""


def _cpu_attention_formulas() -> dict:
    """FLOP formulas of the CPU flash-attention kernels, forward and backward, as torch's own for the CUDA ones
    (PyTorch registers only those, so on a CPU every attention would count 0)."""
    from torch.utils import flop_counter as fc

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    return {getattr(aten, op): formula for op, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                                                           ("_scaled_dot_product_flash_attention_for_cpu_backward",
                                                            backward)) if hasattr(aten, op)}


def _flop_mode():
    """torch's FlopCounterMode with the CPU attention formulas added: the peer that `FlopCount` is tested against."""
    from torch.utils import flop_counter as fc

    return fc.FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())


class FlopCount(TorchDispatchMode):
    """Total FLOPs of what runs inside `with FlopCount() as count:` (`count.total`): torch's FlopCounterMode's formulas
    and its rule (an operator without a formula is decomposed, and its parts are counted), without the per-module
    breakdown, whose module hooks make a dry run about twice as slow. The same total as FlopCounterMode (tested)."""

    def __init__(self):
        from torch.utils import flop_counter as fc

        super().__init__()
        self.formulas = {**fc.flop_registry,
                         **{op: fc.shape_wrapper(f) for op, f in _cpu_attention_formulas().items()}}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = self.formulas.get(func._overloadpacket)
        if formula is None:
            with self:  # the parts of a decomposable operator come back through this mode
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


class FlopMeter:
    """FLOPs per kind of update, each counted once. `meter.gflop(kind, forward_backward, params)` runs
    `forward_backward()` (the update's forward and backward) under FlopCounterMode the first time `kind` is seen, as
    a dry run: the gradients it leaves on `params` are discarded and the RNGs restored. The real update runs after
    it, untouched: under the mode PyTorch may round differently, and a measured update must be bit-identical to an
    unmeasured one (a resumed run counts its kinds again)."""

    def __init__(self):
        self.flops: dict[Hashable, int] = {}

    def gflop(self, kind: Hashable, forward_backward: Callable[[], object], params: Iterable[torch.Tensor]) -> float:
        """The update's GFLOP, counted by a dry run of `forward_backward` if `kind` is new."""
        if kind not in self.flops:
            params = list(params)
            kept = [p.grad for p in params]
            for p in params:
                p.grad = None
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=devices), FlopCount() as count:
                forward_backward()
            for p, g in zip(params, kept):
                p.grad = g
            self.flops[kind] = count.total
        return self.flops[kind] / 1e9


def update_kind(chain, batch_size: int, trained: tuple) -> tuple:
    """The key of an update's FLOPs: its chain's segments (trunk and branches), the batch size and the trained
    branches (what gets weight gradients)."""
    return tuple(chain.trunk), tuple(tuple(b) for b in chain.branches), int(batch_size), tuple(trained)


def count_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """(fn(*args, **kwargs), its FLOPs): for one-off counts such as one denoiser call, the unit of forward-equivalents."""
    with FlopCount() as count:
        out = fn(*args, **kwargs)
    return out, count.total


@dataclass
class Spent:
    """What a run's updates have used so far (evaluation and saving excluded). Saved in checkpoints, so a resumed run
    continues with the same progress."""

    updates: int = 0
    gflop: float = 0.0
    cpu_seconds: float = 0.0
    seconds: float = 0.0

    def of(self, unit: str) -> float:
        """The amount spent in `unit` (one of UNITS)."""
        if unit not in UNITS:
            raise ValueError(f"unknown budget unit {unit!r}: use one of {', '.join(UNITS)}")
        return float(getattr(self, unit))


class Stopwatch:
    """CPU- and wall-seconds of one update: `watch = Stopwatch()` before it, `watch.add_to(spent, gflop)` after."""

    def __init__(self):
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def add_to(self, spent: Spent, gflop: float,
               combine: Callable[[float, float, float], tuple[float, float, float]] | None = None) -> float:
        """Adds this update (and its GFLOP) to `spent`; returns its wall-seconds. `combine` maps this process's
        (GFLOP, CPU-seconds, wall-seconds) to the whole run's when several processes share each update
        (`sd.update_cost`: GFLOP and CPU-seconds summed, wall-seconds of the slowest)."""
        cost = (gflop, time.process_time() - self.cpu0, time.perf_counter() - self.wall0)
        gflop, cpu, wall = combine(*cost) if combine else cost
        spent.updates += 1
        spent.gflop += gflop
        spent.cpu_seconds += cpu
        spent.seconds += wall
        return wall
