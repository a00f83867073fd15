"""Layer 6 (measure): how long the device waited for data in an epoch.

On CPU the host clock between a step's end and the next batch's arrival; on CUDA events on
the device's own timeline, so loader time hidden behind running kernels does not count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# A run whose epoch waited on data for more than this share of its time is "data bound".
DATA_BOUND_FRACTION = 0.2


class DeviceWaitClock:
    """How long the device sat idle waiting for the next batch during an epoch.

    CPU: the host's wait in the loader (the CPU computes synchronously, so it idles exactly
    then). CUDA: the gaps on the GPU's own timeline between the end of one step's work and
    the start of the next (CUDA events), so loader time that overlaps kernels still running
    from the previous step is not counted as waiting; the copy to the device counts as data.

        clock = DeviceWaitClock(device); clock.start()
        for batch in loader:
            inputs, target = to_device(batch, device); clock.batch_ready()
            step(...); clock.step_done()
        wait_s = clock.seconds()     # after the epoch's final synchronize
    """

    def __init__(
        self, device: torch.device, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock = clock  # the host clock (injectable: tests plant its readings)
        self._host = 0.0
        self._mark = 0.0
        self._last: Any = None
        self._gaps: list[tuple[Any, Any]] = []

    def _event(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # this device, not the current
        return event

    def start(self) -> None:
        if self.cuda:
            self._last = self._event()
        self._mark = self.clock()

    def batch_ready(self) -> None:
        if self.cuda:
            self._gaps.append((self._last, self._event()))
        else:
            self._host += self.clock() - self._mark

    def step_done(self) -> None:
        if self.cuda:
            self._last = self._event()
        else:
            self._mark = self.clock()

    def seconds(self) -> float:
        if not self.cuda:
            return self._host
        torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in self._gaps) / 1e3


def data_bound(record: dict[str, Any]) -> bool | None:
    """True when the epoch waited on data for more than DATA_BOUND_FRACTION of its time."""
    wait, total = record.get("epoch_data_wait_s"), record.get("epoch_s")
    if wait is None or not total:
        return None
    return wait / total > DATA_BOUND_FRACTION
