"""CPU priority of background work (monitoring runs, the local judge server) beside the endpoint.

On one machine the endpoint shares the cores with everything else genops runs. Linux with
autogroup scheduling (the default of most distributions) shares the CPU first between
sessions, equally, and only then between the processes of one session by their nice values.
The endpoint runs in a session of its own, so a lower nice value for a monitoring run inside
Dagster's session leaves the endpoint with half the cores at best; and two PyTorch processes
whose OpenMP threads share two cores slow each other far more than half (a parallel region
waits for a thread the scheduler has put aside). Background work therefore moves into a
session of its own and lowers that session's autogroup nice as well as its own nice value
(kernels without autogroup use the latter). It still gets every cycle the endpoint leaves idle.
"""

from __future__ import annotations

import os

AUTOGROUP = "/proc/self/autogroup"


def lower_priority(nice: int, new_session: bool = False) -> list[str]:
    """Lower the calling process's CPU priority to ``nice`` and return what was changed.

    ``new_session``: first move into a session of its own (its own autogroup); without it the
    autogroup is lowered only when the process already leads its session, never a caller's
    session. Never raises for a priority the system does not let it change: background work
    runs either way."""
    done: list[str] = []
    if nice <= 0:
        return done
    if new_session and os.getsid(0) != os.getpid():
        try:
            os.setsid()
            done.append("own session")
        except OSError:  # a process group leader cannot start a session
            pass
    if os.getsid(0) == os.getpid() and os.path.exists(AUTOGROUP):
        try:
            with open(AUTOGROUP, "w", encoding="ascii") as f:
                f.write(str(nice))
            done.append(f"autogroup nice {nice}")
        except OSError:
            pass
    if os.getpriority(os.PRIO_PROCESS, 0) < nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
            done.append(f"nice {nice}")
        except OSError:
            pass
    return done


def autogroup_nice(pid: int | str = "self") -> int | None:
    """The autogroup nice value of a process (None where the kernel has no autogroup)."""
    try:
        with open(f"/proc/{pid}/autogroup", encoding="ascii") as f:
            return int(f.read().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None
