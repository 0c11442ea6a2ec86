"""What a timed run needs to be trusted on a shared machine: the CPU other processes
used during it, CPU steal, waiting for quiet, and peak resident memory.

Standard library only: the llama.cpp worker (engine/llamacpp_peer.py) imports it in
a venv that has llama-cpp-python and not lutengine's dependencies.
"""
import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat() -> tuple[int, int, int]:
    """(busy jiffies of the whole machine, steal jiffies, total jiffies) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
    return busy, v[7], sum(v)


class Interference:
    """CPU used by other processes (in cores) and steal (%) over the `with` block:
    the machine's busy time minus this process's own CPU time, over the wall time."""

    def __enter__(self):
        self.s0 = read_stat()
        self.c0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        s1 = read_stat()
        wall = time.perf_counter() - self.t0
        own = time.process_time() - self.c0
        busy = (s1[0] - self.s0[0]) / CLK_TCK
        self.other_cores = max(0.0, (busy - own) / max(wall, 1e-9))
        self.steal_pct = 100.0 * (s1[1] - self.s0[1]) / max(1, s1[2] - self.s0[2])
        return False


def wait_quiet(limit_cores: float, max_wait_s: float) -> float:
    """Wait (up to max_wait_s) until other processes use < limit_cores over 0.5 s; the seconds waited."""
    t0 = time.time()
    while True:
        with Interference() as it:
            time.sleep(0.5)
        if it.other_cores < limit_cores or time.time() - t0 > max_wait_s:
            return round(time.time() - t0, 1)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS interval (Linux: writing 5 to clear_refs resets VmHWM); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since the start or the last reset_peak_rss (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
