"""CPU lists and physical cores, from Linux sysfs (standard library only).

What a timing run is pinned to (``benchmarks.cost --cpus``) and how ``scripts/gpu_jobs.py lanes``
splits the host's cores between jobs that run side by side on different GPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SYS_CPU = "/sys/devices/system/cpu"


def parse_cpu_list(text: str) -> list[int]:
    """A Linux CPU list such as ``0-3,8,10-11`` (sysfs, ``taskset -c``) as sorted CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. 0-7,16)")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first or last >= 1 << 16:
            raise ValueError(f"not a CPU range: {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def format_cpu_list(cpus: list[int]) -> str:
    """The inverse of ``parse_cpu_list``: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on. Raises ValueError off Linux."""
    if not hasattr(os, "sched_getaffinity"):
        raise ValueError("CPU pinning needs Linux (os.sched_setaffinity)")
    return set(os.sched_getaffinity(0))


def physical_cores(allowed: set[int], sys_cpu: str = SYS_CPU) -> list[list[int]]:
    """The physical cores among ``allowed``, each as its allowed hardware threads, ordered by their
    first CPU. A CPU without topology files counts as a core of its own."""
    cores: dict[tuple[int, ...], list[int]] = {}
    for cpu in sorted(allowed):
        try:
            siblings = tuple(
                parse_cpu_list((Path(sys_cpu) / f"cpu{cpu}/topology/thread_siblings_list").read_text())
            )
        except (OSError, ValueError):
            siblings = (cpu,)
        cores.setdefault(siblings, []).append(cpu)
    return list(cores.values())


def choose_cpus(spec: str, allowed: set[int] | None = None, sys_cpu: str = SYS_CPU) -> list[int]:
    """The CPUs of ``--cpus SPEC``: a CPU list, or ``one-per-core:N``, the first N physical cores
    among the CPUs this process may use, one hardware thread of each (sysfs topology), so that no
    two threads of the engine share a core. Raises ValueError naming what is wrong."""
    if allowed is None:
        allowed = allowed_cpus()
    kind, colon, count = spec.partition(":")
    if kind == "one-per-core" and colon:
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--cpus {spec!r}: expected one-per-core:N with N >= 1")
        cores = physical_cores(allowed, sys_cpu)
        if int(count) > len(cores):
            raise ValueError(
                f"--cpus {spec!r}: only {len(cores)} physical cores among the {len(allowed)} CPUs this process may use"
            )
        return sorted(core[0] for core in cores[: int(count)])
    try:
        cpus = parse_cpu_list(spec)
    except ValueError:
        raise ValueError(f"--cpus {spec!r}: expected a CPU list such as 0-7,16, or one-per-core:N") from None
    outside = sorted(set(cpus) - allowed)
    if outside:
        raise ValueError(
            f"--cpus {spec!r}: CPU(s) {outside} are not among the CPUs this process may use {sorted(allowed)}"
        )
    return cpus


def split_cores(n: int, allowed: set[int] | None = None, sys_cpu: str = SYS_CPU) -> list[list[int]] | None:
    """``allowed`` in ``n`` disjoint groups of whole physical cores (hardware-thread siblings stay
    together, so two groups never share a core), as even as the core count allows. None when there
    are fewer cores than groups: then no split keeps the groups apart."""
    if n < 1:
        raise ValueError(f"cannot split CPUs into {n} groups")
    cores = physical_cores(allowed_cpus() if allowed is None else allowed, sys_cpu)
    if len(cores) < n:
        return None
    size, extra = divmod(len(cores), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        groups.append(sorted(cpu for core in cores[start:end] for cpu in core))
        start = end
    return groups


@contextlib.contextmanager
def pinned(cpus: list[int] | None) -> Iterator[None]:
    """Run the block with this thread, and so every process it starts (an engine, a job: they
    inherit the thread's mask), on ``cpus``; the previous mask is restored afterwards. Linux sets
    the mask per thread, so other threads (another GPU lane) keep theirs. None: unchanged."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
