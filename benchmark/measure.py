"""Wall time and peak memory of a block of code.

CPU: peak resident set size above its value at the start, sampled every 2 ms by a thread
(reads /proc/self/statm). CUDA: torch's peak allocated device memory above the start.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        return 0


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


@contextmanager
def measure(device: str = "cpu"):
    m = Measurement()
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    stop = threading.Event()
    base = _rss_bytes()
    peak = [base]

    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield m
    finally:
        if cuda:
            torch.cuda.synchronize()
        m.seconds = time.perf_counter() - start
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        used = (torch.cuda.max_memory_allocated() - cuda_base) if cuda else (peak[0] - base)
        m.peak_memory_mb = max(used, 0) / 2**20


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


#: a row ran contended when the 1-minute load average, at its start or end, exceeded the CPUs
#: by more than this (more runnable threads than cores: its seconds are not the machine's)
CONTENDED_EXCESS = 0.5


@contextmanager
def machine_load():
    """The machine's load over a block: yields a dict filled at exit with the 1-minute load
    average at start and end, the CPUs available, torch's threads, the process CPU seconds per
    wall second, and `contended` (a load above CPUs + CONTENDED_EXCESS at either end)."""
    info: dict = {}
    start_load, start_cpu, start = _loadavg(), time.process_time(), time.perf_counter()
    try:
        yield info
    finally:
        wall = time.perf_counter() - start
        end_load, cpus = _loadavg(), available_cpus()
        loads = [v for v in (start_load, end_load) if v is not None]
        info.update({
            "loadavg_start": start_load, "loadavg_end": end_load, "cpus": cpus, "threads": torch.get_num_threads(),
            "cpu_seconds_per_second": (time.process_time() - start_cpu) / wall if wall > 0 else None,
            "contended": bool(loads) and max(loads) > cpus + CONTENDED_EXCESS,
        })
