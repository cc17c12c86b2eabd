"""The coverage grid (`persistrnn capacity --coverage`) before and after, per target:
the shipped tables of 0d0c9c6 (the first tensor-core step) and today's, with one launch per layer only, and
today's with several launches (dispatch.launch_waves). Run from the repository root:

    python benchmarks/results/static/coverage_compare.py
"""
import importlib.util
import subprocess
import tempfile

import persistrnn.layers.dispatch as dispatch
from persistrnn.autotune.capacity import coverage
from persistrnn.autotune.tables import TABLES

with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
    f.write(subprocess.check_output(["git", "show", "0d0c9c6:autotune/tables.py"], text=True))
    f.flush()
    spec = importlib.util.spec_from_file_location("tables_0d0c9c6", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

several = dispatch.launch_waves


def one_launch(*args):
    waves = several(*args)
    return waves if waves is not None and len(waves) == 1 else None


for target in ("sm_90", "sm_80"):
    dispatch.launch_waves = one_launch
    before, one = coverage(target, old.TABLES), coverage(target, TABLES)
    dispatch.launch_waves = several
    now = coverage(target, TABLES)
    print(f"{target}: tables of 0d0c9c6, one launch: {before['kernel']}; today's tables, one launch: {one['kernel']}; "
          f"several launches: {now['kernel']} of {now['layers']} ({now['several_launches']} in more than one)")
