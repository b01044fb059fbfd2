"""`python tests/with_faults.py SCRIPT ARGS...`: SCRIPT's `__main__` with the faults of tests/faults.py that the
environment variable REAR_TEST_FAULTS holds (a JSON list) installed first. For runs that a launcher (torchrun,
accelerate launch) starts in processes of its own, where tests/script_runner.py cannot reach; a fault with
"rank": R acts only in the process of that RANK."""

import json
import os
import runpy
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import faults

    faults.install(json.loads(os.environ.get("REAR_TEST_FAULTS", "[]")))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
