"""Tuned tables: what `persistrnn tune` measured, one JSON file per device.

Keys. A device is its name, compute capability, SM count, and the triton and persistrnn versions
(a table written under other versions is stale: its configs were timed on other kernels). A layer
is its cell, dtype, pass, hidden size, proj_size, directions and batch bucket (the next power of
two of the batch). Not the sequence length: the tuner times at a fixed T, which ranks configs by
their per-step cost.

Where. The user's tables live in `$PERSISTRNN_CACHE_DIR` (default `~/.cache/persistrnn`), as
`<device>.json`. Tables for devices the project measured ship in the package, in
`autotune/configs/<device>.json`. The planner looks in the user's table first, then the shipped
one, then falls back to the static tables (autotune/configs/static, configs.py).

Safety. Writes take a file lock, re-read the file and merge, write a temporary file and rename it
over the old one: two tuners at once lose nothing, and a reader never sees half a file. A file
that is not valid JSON, not in this format, or written for another device or version is warned
about once and ignored.
"""
import json
import os
import re
import tempfile
import warnings

import filelock
import torch
import triton

from ..configs import dtype_name
from ..version import __version__

FORMAT = 1
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "configs")
# the device key of the Triton interpreter on CPU (`persistrnn tune --backend interpret`)
INTERPRETER = "triton interpreter (cpu)"


def cache_dir():
    return os.environ.get("PERSISTRNN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "persistrnn")


def device_key(device, sms=None):
    """What identifies a device's measurements. `device` is a torch.device; a CPU device stands for
    the interpreter (timed by wall clock, so its tables only ever serve the interpreter)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, capability, sms = props.name, f"{props.major}.{props.minor}", props.multi_processor_count
    else:
        name, capability = INTERPRETER, None
    return {"name": name, "capability": capability, "sms": sms, "triton": triton.__version__,
            "persistrnn": __version__}


def device_slug(key):
    """The file name of a device's table: its name in lower case, words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", key["name"].lower()).strip("-")


def batch_bucket(batch):
    return 1 << max(batch - 1, 0).bit_length()


def layer_key(cell, dtype, pass_, hidden_size, proj_size, num_directions, batch):
    return (f"{cell}|{dtype_name(dtype)}|{pass_}|hidden={hidden_size}|proj={proj_size}|directions={num_directions}"
            f"|batch<={batch_bucket(batch)}")


def table_path(key, directory=None):
    return os.path.join(directory or cache_dir(), f"{device_slug(key)}.json")


def shipped_path(key):
    return os.path.join(SHIPPED_DIR, f"{device_slug(key)}.json")


_warned = set()


def _warn_once(path, why):
    if (path, why) not in _warned:
        _warned.add((path, why))
        warnings.warn(f"persistrnn: ignoring the tuned table {path}: {why}", RuntimeWarning, stacklevel=3)


def read_table(path, key):
    """The entries of the table at `path` if it is valid and was written for the device `key`
    (name, capability, SMs, triton and persistrnn versions); {} otherwise (warned once)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _warn_once(path, f"not readable JSON ({exc})")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        _warn_once(path, f"not a persistrnn tuned table of format {FORMAT}")
        return {}
    written = data.get("device")
    if written != key:
        differ = ", ".join(f"{k} {written.get(k)!r} (this one: {v!r})" for k, v in key.items()
                           if not isinstance(written, dict) or written.get(k) != v) if isinstance(written, dict) \
            else "no device record"
        _warn_once(path, f"written for another device or version: {differ}")
        return {}
    return {k: v for k, v in data["entries"].items() if _valid_entry(v)}


def _valid_entry(entry):
    if not isinstance(entry, dict) or entry.get("choice") not in ("kernel", "torch"):
        return False
    if entry["choice"] == "torch":
        return True
    config = entry.get("config")
    fields = ("block_b", "block_h", "num_warps", "num_stages")
    return isinstance(config, dict) and all(isinstance(config.get(f), int) for f in fields)


def write_entries(key, entries, directory=None):
    """Merge `entries` (layer key -> entry) into the device's table in `directory` (the user's
    cache by default), under a lock, by an atomic rename. Returns the file's path."""
    path = table_path(key, directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with filelock.FileLock(path + ".lock"):
        merged = dict(read_table(path, key))
        merged.update(entries)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "device": key, "entries": dict(sorted(merged.items()))}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    _loaded.clear()
    return path


_loaded = {}  # path -> ((mtime_ns, size), entries): the planner reads a file once until it changes


def entries_at(path, key):
    try:
        st = os.stat(path)
    except OSError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _loaded.get(path)
    if cached is None or cached[0] != stamp:
        cached = _loaded[path] = (stamp, read_table(path, key))
    return cached[1]


def table_entry(key, layer, source):
    """(entry, path) of a layer in the device's "tuned" table (the user's) or "shipped" one (the
    package's); (None, path) where it has none."""
    path = table_path(key) if source == "tuned" else shipped_path(key)
    return entries_at(path, key).get(layer), path
