"""Peak resident memory of this process (Linux), resettable so one run can measure
several phases one after the other."""

from __future__ import annotations


def peak_rss_mib() -> float:
    """VmHWM: the process's peak resident memory since start or the last reset."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
