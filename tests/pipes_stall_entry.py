"""genops' training program (genops_assets.lib.train_entry) with a stall: after logging the first
training step past STALL_AFTER it writes its pid to STALL_FILE and stops making progress, so a
test can kill it with SIGKILL at a known point (the checkpoint of STALL_AFTER is complete then).

Launched through Pipes as ``python -m pipes_stall_entry`` with tests/ on PYTHONPATH; every other
part of the program is genops' own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from genops_assets.lib.train_entry import main

STALL_AFTER = "STALL_AFTER"
STALL_FILE = "STALL_FILE"


def stall(record: dict[str, float]) -> None:
    if "loss" in record and record["step"] > int(os.environ[STALL_AFTER]):
        target = Path(os.environ[STALL_FILE])  # every rank stalls; the file names one of them
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, target)
        time.sleep(3600)


if __name__ == "__main__":
    main(after_record=stall)
