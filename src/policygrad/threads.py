"""How many CPU threads torch gets, for every command, and noticing when the CPU is shared.

torch's own choice is one thread per core. On a machine where another process keeps a core busy (a second seed, a
browser, the test suite) that oversubscribes the cores: each of torch's many small parallel regions ends at a barrier
that waits for the thread the scheduler put off, and a step runs many times slower (benchmarks/NOTES.md, issue 16:
sampling 3 s -> 96 s on 2 cores with one busy process). So the default here is one thread per *idle* core, counted when
the command starts, and OpenMP's threads sleep rather than spin while they wait (:func:`quiet_waits`), so that a run
that started alone and is joined later degrades instead of collapsing. ``--threads N`` overrides the count.

Standard library only until :func:`set_threads` is called: the command line imports this before torch.
"""

from __future__ import annotations

import os
import statistics
import time

__all__ = ["SlowSteps", "default_threads", "idle_cores", "quiet_waits", "set_threads"]


def quiet_waits() -> None:
    """Ask the OpenMP runtime to sleep at its barriers instead of spinning (unless the user set the policy): must run
    before torch is imported, which loads the runtime and reads its environment once."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> dict[str, tuple[int, int]]:
    """``{cpu: (idle, total)}`` jiffies of each CPU from /proc/stat."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields]
                times[name] = (values[3] + (values[4] if len(values) > 4 else 0), sum(values))
    return times


def idle_cores(interval: float = 0.2) -> float:
    """How many CPUs sat idle over ``interval`` seconds (Linux: /proc/stat; elsewhere every CPU counts as idle)."""
    try:
        before = _cpu_times()
        time.sleep(interval)
        after = _cpu_times()
    except OSError:
        return float(_usable_cpus())
    idle = 0.0
    for name, (idle_after, total_after) in after.items():
        idle_before, total_before = before.get(name, (idle_after, total_after))
        elapsed = total_after - total_before
        idle += (idle_after - idle_before) / elapsed if elapsed > 0 else 1.0
    return idle


def default_threads() -> int:
    """One thread per idle core, at least 1 and at most the CPUs this process may run on."""
    return max(1, min(_usable_cpus(), round(idle_cores())))


def set_threads(threads: int | None) -> int:
    """Run torch on ``threads`` CPU threads (None: :func:`default_threads`); return the count."""
    import torch

    count = default_threads() if threads is None else threads
    torch.set_num_threads(count)
    return count


class SlowSteps:
    """Notices steps that run far slower than this run's own fastest: a step over ``factor`` times the fastest of the
    last ``window`` steps, while more processes want a CPU than there are, is worth a word in the progress line."""

    def __init__(self, factor: float = 2.5, window: int = 20) -> None:
        self.factor, self.window = factor, window
        self.times: list[float] = []

    def note(self, seconds: float) -> str:
        """Record a step's seconds; return a short warning for the progress line, or ``""``."""
        earlier = self.times[-self.window :]
        self.times.append(seconds)
        if len(earlier) < 2 or seconds < self.factor * min(earlier):
            return ""
        load = _load()
        if load is None or load <= _usable_cpus() - 0.5:
            return ""
        slower = seconds / statistics.median(sorted(earlier)[:2])
        return f"{slower:.0f}x slower: CPU shared (load {load:.1f} on {_usable_cpus()} cores; try --threads 1)"


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
