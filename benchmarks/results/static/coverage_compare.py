"""The coverage grid (`persistrnn capacity --coverage`) before and after, per target:
the static tables of 0d0c9c6 (the first tensor-core step, tables_0d0c9c6/) and today's, with one
launch per layer only, and today's with several launches (configs.launch_waves). Run from the
repository root:

    python benchmarks/results/static/coverage_compare.py
"""
import json
import os

import persistrnn.autotune.capacity as capacity
import persistrnn.configs as configs

HERE = os.path.dirname(os.path.abspath(__file__))


def tables_at(directory):
    return {t: configs.tables_from_json(json.load(open(os.path.join(directory, f"{t}.json"))))
            for t in configs.TARGETS}


old, today = tables_at(os.path.join(HERE, "tables_0d0c9c6")), tables_at(configs.STATIC_DIR)
several = configs.launch_waves


def one_launch(*args):
    waves = several(*args)
    return waves if waves is not None and len(waves) == 1 else None


def counted(target, tables, waves):
    configs.launch_waves = capacity.launch_waves = waves  # the planner's and the report's
    try:
        return capacity.coverage(target, tables)
    finally:
        configs.launch_waves = capacity.launch_waves = several


for target in ("sm_90", "sm_80"):
    before, one, now = (counted(target, old, one_launch), counted(target, today, one_launch),
                        counted(target, today, several))
    print(f"{target}: tables of 0d0c9c6, one launch: {before['kernel']}; today's tables, one launch: {one['kernel']}; "
          f"several launches: {now['kernel']} of {now['layers']} ({now['several_launches']} in more than one)")
