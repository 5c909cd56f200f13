"""``import stochopt`` costs what ``import torch`` does: torch's compiler (dynamo) and DTensor load when first
used, not at import (together they added ~2.7 s to every process: the CLI, each benchmark worker, each rank)."""

import json
import subprocess
import sys

PROBE = """
import json, sys
import stochopt
print(json.dumps({name: name in sys.modules for name in ("torch._dynamo", "torch.distributed.tensor")}))
"""


def test_import_loads_neither_dynamo_nor_dtensor() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "torch._dynamo": False,
        "torch.distributed.tensor": False,
    }
