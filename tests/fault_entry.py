"""The CLI with a fault injected from the environment, for tests only: FAULT_SLOW_BUILD_S delays
every producer build (a generator slow to build or compile its model); FAULT_BUILD_ERROR makes it
raise that message (a model that fails to load)."""

import os
import sys
import time

from online_stablerep.cli import main
from online_stablerep.jobs import train as job

_build = job.build_producer


def _faulty_build(*args, **kwargs):
    time.sleep(float(os.environ.get("FAULT_SLOW_BUILD_S", "0")))
    if os.environ.get("FAULT_BUILD_ERROR"):
        raise RuntimeError(os.environ["FAULT_BUILD_ERROR"])
    return _build(*args, **kwargs)


job.build_producer = _faulty_build

if __name__ == "__main__":
    sys.exit(main())
