"""Put the spool writer's thread under the CPU scheduling policy that cpu_scheduling names."""

from __future__ import annotations

import os
import threading

# cpu_scheduling's words (fastrelay.config.schema).
BATCH = "batch"
INHERIT = "inherit"

_RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0)


def policy_name(policy: int) -> str:
    """SCHED_OTHER, SCHED_BATCH, ... for a policy number (the flag SCHED_RESET_ON_FORK ignored)."""
    policy &= ~_RESET_ON_FORK
    for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR"):
        if getattr(os, name, None) == policy:
            return name
    return f"policy {policy}"


def apply(setting: str) -> tuple[bool, str]:
    """Apply cpu_scheduling = `setting` to the calling thread; the threads it starts inherit it.
    Returns (ok, what was done, for the log).

    Why the spool writer runs under SCHED_BATCH: each commit ends with the writer waking up (its
    fsync returned) and handing the results to the event loop. Under SCHED_OTHER that wake-up
    preempts whatever runs on the core, often the relay's own event loop (with Workers = 2 each
    loop was preempted 5.5 times a message, with one 0.6), which then also waits for the GIL
    the writer holds. A SCHED_BATCH thread gets the same CPU share (the nice value is kept) but
    does not preempt on wake-up: it runs when the loop waits. Measured (bench/RESULTS.md,
    2026-12-06, 20 sessions, 3 interleaved runs): Workers = 2, relay CPU 0.32-0.34 ms a message
    against 0.39-0.41 and 3,203-3,428 delivered/s against 2,815-2,944; Workers = 1, 0.23-0.24
    against 0.25-0.26 ms. Every thread of the relay under SCHED_BATCH gained no more; the event
    loop alone under it gained nothing. The cost: while other programs keep every core busy, a
    commit waits for the running one's time slice, so a lone sender's messages take longer
    (2.3-7.8 ms each against 1.7-3.1, with two CPU hogs); on an idle core nothing changes
    (0.7 ms either way).
    A policy the relay was started under other than SCHED_OTHER (chrt, systemd's
    CPUSchedulingPolicy=) is the operator's choice and is kept."""
    if setting != BATCH:
        return True, "inherited (cpu_scheduling = inherit)"
    if not hasattr(os, "SCHED_BATCH"):
        return True, "inherited (this system has no SCHED_BATCH)"
    try:
        current = os.sched_getscheduler(0) & ~_RESET_ON_FORK
    except OSError as e:
        return False, f"cannot read the policy ({e}); left as it is"
    if current == os.SCHED_BATCH:
        return True, "SCHED_BATCH (as started)"
    if current != os.SCHED_OTHER:
        return True, f"{policy_name(current)} kept (the relay was started under it)"
    try:  # 0: the calling thread only (Linux applies a policy per thread)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:  # a sandbox that forbids it (seccomp): run on, as before
        return False, f"cannot set SCHED_BATCH ({e}); running under SCHED_OTHER"
    return True, "SCHED_BATCH (cpu_scheduling = batch)"


def name_thread(name: str) -> None:
    """Give the calling thread a name that top -H, ps -L and py-spy show (at most 15 bytes);
    best effort: a system without /proc keeps the process's name."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass
