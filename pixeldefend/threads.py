"""How many CPU threads PyTorch should use by default.

PyTorch's own default is one thread per core of the machine. On a shared or busy machine
that oversubscribes: the models here are small, each operation is short, and a parallel
region waits for its slowest thread, so when another process holds a core, every step
waits for the scheduler (measured on 2 cores with one busy: 2 threads 3x slower than 1,
README "Threads"). The default is therefore the number of physical cores this process
may use (CPU affinity, cgroup quota), less the cores other processes keep busy (1-minute
load average), at least 1 and at most `CAP`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CAP = 8  # beyond this the small models here gain nothing


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cores: int  # physical cores available to this process
    load: float | None  # 1-minute load average when chosen

    def describe(self) -> str:
        load = "unknown" if self.load is None else f"{self.load:.1f}"
        return (f"{self.threads} thread(s): {self.cores} physical core(s) available, "
                f"load average {load}")


def _affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None) -> int:
    """Distinct physical cores among `cpus` (hyper-threads share one), per sysfs; the
    number of CPUs where the topology is not readable."""
    cpus = _affinity() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs allowed by a cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`) quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 else None


def choose_threads(cores: int, load: float | None, machine_cpus: int, cap: int = CAP) -> int:
    """`cores` less the CPUs other processes keep busy (load above what the rest of the
    machine can absorb), rounded, within [1, cap]."""
    free = float(cores)
    if load is not None:
        elsewhere = max(0, machine_cpus - cores)  # CPUs outside our share absorb load first
        free = min(free, cores - max(0.0, load - elsewhere))
    return int(max(1, min(cap, cores, round(free))))


def default_threads() -> ThreadChoice:
    cpus = _affinity()
    cores = physical_cores(cpus)
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, limit)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads = choose_threads(cores, load, os.cpu_count() or len(cpus))
    # torchrun's ranks on this machine share its cores (LOCAL_WORLD_SIZE of them)
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return ThreadChoice(max(1, threads // ranks_here), cores, load)



def apply_threads(threads: int) -> None:
    """Make PyTorch use `threads` intra-op threads, now if it is loaded, else the moment it
    is: the CLI chooses the count before it knows whether the command needs PyTorch at all
    (`--help` and usage errors must not pay its seconds of import time). Environment
    variables would not do: OpenMP caps OMP_NUM_THREADS at the cores it sees."""
    for hook in [h for h in sys.meta_path if isinstance(h, _ThreadsOnImport)]:
        sys.meta_path.remove(hook)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:
        sys.meta_path.insert(0, _ThreadsOnImport(threads))


class _ThreadsOnImport(importlib.abc.MetaPathFinder):
    """Finds `torch` the usual way, and calls `torch.set_num_threads` once it has loaded.
    Stays installed until then, so a mere `importlib.util.find_spec("torch")` (an
    availability check) does not use it up."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._finding = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch" or self._finding:
            return None
        self._finding = True  # the find_spec below asks every finder, this one included
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_set_threads(module: Any) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            module.set_num_threads(self.threads)

        spec.loader.exec_module = exec_then_set_threads  # type: ignore[method-assign]
        return spec
