"""The CLI with a fault injected from the environment, for tests/test_faults.py only:
FAULT_SLOW_BUILD_S delays every producer build (a generator slow to build or compile its model)."""

import os
import sys
import time

from online_stablerep.cli import main
from online_stablerep.jobs import train as job

_build = job.build_producer


def _slow_build(*args, **kwargs):
    time.sleep(float(os.environ.get("FAULT_SLOW_BUILD_S", "0")))
    return _build(*args, **kwargs)


job.build_producer = _slow_build

if __name__ == "__main__":
    sys.exit(main())
