"""Every module of the package imports first, on its own: no import cycle hides behind the
order in which the other tests happen to import things."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tailaug

SCRIPT = """
import importlib, pkgutil, sys
import tailaug
names = sorted(m.name for m in pkgutil.walk_packages(tailaug.__path__, "tailaug."))
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k == "tailaug" or k.startswith("tailaug.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print(len(names))
print("\\n".join(failed))
"""


def test_every_module_imports_first_in_a_fresh_package():
    src = str(Path(tailaug.__file__).parents[1])
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    count, *failed = done.stdout.strip().splitlines()
    assert int(count) > 80 and not failed, "\n".join(failed)
