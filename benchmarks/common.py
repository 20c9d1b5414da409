"""What the benchmark scripts share: the machine's name and peak memory over a block."""

from __future__ import annotations

import os
import platform
import threading
import time

import torch


def machine(device: torch.device) -> str:
    """The CPU model, cores and torch threads; the GPU's name first on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu = f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cpu}"
    return cpu


class PeakMemory:
    """Peak memory growth over a block (``.bytes``): CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, self._rss()) - self.base


def profile_summary(fn, device: torch.device, title: str, rows: int = 15) -> str:
    """One call of ``fn`` (after a warm-up) under ``torch.profiler``, as text: wall time, the device's
    busy time (the union of its kernel and copy intervals) and idle share, synchronizations and
    host-device copies, then the top ops by device time (CUDA) and by host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - start
    events = prof.events()
    busy, end = 0.0, float("-inf")  # the union of device intervals, in microseconds
    for lo, hi in sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA):
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    counts = {name: sum(name in e.name for e in events if e.device_type == DeviceType.CPU)
              for name in ("Synchronize", "cudaMemcpy", "aten::_local_scalar_dense")}
    averages = prof.key_averages()
    lines = [f"## {title}", f"wall {wall * 1e3:.1f} ms; host (CPU) self time in ops "
             f"{sum(e.self_cpu_time_total for e in averages) / 1e3:.1f} ms (profiler overhead included)"]
    if device.type == "cuda":
        lines.append(f"device busy {busy / 1e3:.1f} ms, idle {100 * max(0.0, 1 - busy / 1e6 / wall):.0f}% of the wall "
                     f"time; synchronize calls {counts['Synchronize']}, cudaMemcpy* calls {counts['cudaMemcpy']}, "
                     f"scalar reads to the host {counts['aten::_local_scalar_dense']}")
        lines += ["", "### top ops by device time", averages.table(sort_by="self_device_time_total", row_limit=rows)]
    lines += ["", "### top ops by host time", averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "\n".join(lines) + "\n"
