"""Layer 8 (predict): convolution, pooling and BatchNorm calls timed alone, the source's
against the target's.

A convolution's time per FLOP moves with its channels, batch and threads in ways no bound
says. The dev box, one thread, a 3D convolution from c to 2c channels (forward and both
gradients): 79 GFLOP/s at c = 8, 206 at 16, 94 at 12, 160 at 24; and f8's 8 -> 16 backward
took 4.7x its forward. Scaled by their bounds, the convolutions put widths 12 and 24 14-25%
low. So where the target runs on this machine, the model does not scale a convolution call
by its bounds: it makes the source's call and the target's call again, alone, alternated
(a shared machine drifts), and scales the call's in-step time by the median ratio. Habitat
(Yu et al., USENIX ATC 2021) likewise measures the kernels it cannot scale.

The pooling and BatchNorm calls are made alone for another reason: they run far below their
memory bound, so their time does not follow the copy bandwidth their bound reads when the
threads change (the Zen 3 dev VM, f8 b2, 1 -> 2 threads: the step's max-pools took 0.54-0.61
of their time and its BatchNorms 0.67-0.70, where the bandwidth curve said 0.88-0.93, and
made alone 0.53 and 0.69; every 1 -> 2 thread prediction of model 5 was 17-39% high there).

    ratios = KernelRatios()
    ratios.ratio(source_call, 1, target_call, 2)   # target's seconds / source's, alone

Ratios are cached per host and torch version (kernel_ratios.json), so the same question
gets the same answer; `fresh` measures them again.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

from lungbench.core.cache import (
    measured_number,
    read_cache,
    register_schema,
    where_key,
    write_cache,
)
from lungbench.measure.timing import SIGNED_OPERATORS, OpCall, set_threads

CACHE_FILE = "kernel_ratios.json"
# a ratio, or None: the call cannot be made alone (its bounds scale it)
register_schema(CACHE_FILE, lambda ratio: ratio is None or measured_number(ratio))

ROUNDS = 5  # alternated source/target pairs; the ratio is their median
# The calls that keep a signature, by name: each is made again through its aten overload.
OPERATORS = {
    name: getattr(torch.ops.aten, name.removeprefix("aten.")).default for name in SIGNED_OPERATORS
}


def decode(value: object, device: torch.device) -> object:
    """An argument of timing.call_signature back as a value: a tensor of random numbers of
    the recorded shape, dtype and layout."""
    if isinstance(value, list) and value[:1] == ["tensor"]:
        _, shape, dtype, channels_last = value
        x = torch.randn(shape, device=device).to(getattr(torch, dtype))
        if channels_last:
            layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=layout)
        return x
    if isinstance(value, list):
        return [decode(v, device) for v in value]
    return value


def call_runner(call: OpCall, device: torch.device) -> Callable[[], None]:
    """A function that makes `call` again with fresh tensors of its shapes."""
    operator = OPERATORS[call.name]
    args = [decode(a, device) for a in json.loads(call.signature)]
    if call.name == "aten.max_pool3d_with_indices_backward":
        args[-1] = pooled_indices(args)

    def run() -> None:
        operator(*args)

    return run


def pooled_indices(args: list) -> torch.Tensor:
    """A max-pool backward's indices, made by the forward pooling of its input (random
    indices could point outside each window, or all at one element, which scatters at
    another speed)."""
    _, x, kernel, stride, padding, dilation, ceil_mode, _ = args
    _, indices = torch.ops.aten.max_pool3d_with_indices(
        x, kernel, stride, padding, dilation, ceil_mode
    )
    return indices


def timed(run: Callable[[], None], threads: int) -> float:
    """Seconds of one call at `threads` threads, after an untimed one (the thread pool and
    oneDNN's kernel cache settle)."""
    set_threads(threads)
    run()
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


class KernelRatios:
    """Per (source call, its threads, target call, its threads): the target's time over the
    source's, both made alone on this machine's CPU; measured once per host (the cache) or,
    with `fresh`, once per KernelRatios."""

    def __init__(self, rounds: int = ROUNDS, fresh: bool = False) -> None:
        self.rounds = rounds
        self.fresh = fresh
        self._measured: set[str] = set()

    def ratio(self, source: OpCall, source_threads: int, target: OpCall, threads: int):
        """The ratio, or None when either call cannot be made alone (not a signed
        convolution, or it fails: the model then scales that call by its bounds)."""
        if not (source.signature and target.signature) or source.name != target.name:
            return None
        if source.signature == target.signature and source_threads == threads:
            return 1.0
        where = where_key(torch.device("cpu")).rsplit("|", 2)  # host | cpu model | torch
        key = json.dumps(
            [where[0], where[-1], source.name, source.signature, source_threads]
            + [target.signature, threads]
        )
        cache = read_cache(CACHE_FILE)
        if key not in cache or (self.fresh and key not in self._measured):
            cache[key] = self._measure(source, source_threads, target, threads)
            self._measured.add(key)
            write_cache(CACHE_FILE, cache)
        return cache[key]

    def _measure(self, source: OpCall, source_threads: int, target: OpCall, threads: int):
        before = torch.get_num_threads()
        cpu = torch.device("cpu")
        try:
            first, second = call_runner(source, cpu), call_runner(target, cpu)
            ratios = [
                timed(second, threads) / max(timed(first, source_threads), 1e-9)
                for _ in range(self.rounds)
            ]
        except (RuntimeError, ValueError, KeyError, TypeError):  # no kernel, out of memory
            return None
        finally:
            set_threads(before)
        return statistics.median(ratios)
