#!/usr/bin/env bash
# One command for a session that is lent a GPU (the device tool): GPU tests against cuDNN, then
# the benchmark (forward and training step), reports under benchmarks/results/<device>/ (and copied to $OUT if set).
#
# The device image has torch, triton, numpy, pytest and pytest-xdist but not pyperf: carry it as a
# wheel (with psutil). Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pyperf psutil
# (psutil: add --platform manylinux_2_17_x86_64 if pip finds none), then run with carry [".whl"]:
#   bash benchmarks/gpu_day.sh
# The GPU tests' log (gpu_tests.log, -rA) holds the fast-math accuracy: "fast math ..." lines.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the repository root is the package: put a link named persistrnn on the path (no install needed)
mkdir -p /tmp/pkgroot && ln -sfn "$PWD" /tmp/pkgroot/persistrnn
export PYTHONPATH=/tmp/pkgroot${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import persistrnn, triton, torch; print('persistrnn', persistrnn.__file__, 'torch', torch.__version__, 'triton', triton.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 -rA 2>&1 | tee /tmp/gpu_tests.log
python3 -m persistrnn bench
# the shape of the "numbers to beat" (DESIGN.md): B=16, T=1024, H=768
python3 -m persistrnn bench --cell lstm gru --batch 16 --hidden 768 --seq 1024 --dtype float16 bfloat16 \
    --out "benchmarks/results/$(python3 -c 'import torch,re;print(re.sub(r"[^a-z0-9]+","-",torch.cuda.get_device_name().lower()).strip("-"))')/flashrnn-shape"
if [ -n "${OUT:-}" ]; then
    cp -r benchmarks/results "$OUT/" && cp /tmp/gpu_tests.log "$OUT/"
fi
