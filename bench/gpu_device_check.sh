#!/usr/bin/env bash
# Issue 33's device check in one call: the cuda-marked tests and bench/gpu_check.py on the
# validation ten, on a machine with a GPU and a bare Python with torch (nothing installed).
#
# Prepare here (the repository plus this data must stay under 64 MiB to travel):
#   printf '/gpu_check_data/\n/.whl/\n' >> .git/info/exclude
#   mkdir -p gpu_check_data/val gpu_check_data/extra .whl
#   for p in $(cat ../shared/data/lgg/splits/reference_validation.txt); do cp -r ../shared/data/lgg/$p gpu_check_data/val/; done
#   cp -r ../shared/data/lgg/TCGA_CS_4941_19960909 ../shared/data/lgg/data.csv gpu_check_data/extra/
#   cp ../shared/data/unpack_lgg.py gpu_check_data/
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl nibabel==5.3.2
# then run `bash bench/gpu_device_check.sh` there, carrying gpu_check_data and .whl; $OUT receives
# gpu_check.json, the logs and resunet16.gpu-verdicts.json (copy it into models/).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/shim && ln -sfn "$PWD" /tmp/shim/segengine  # the repository as the segengine package
export PYTHONPATH=/tmp/shim:/tmp/site PYTHONUNBUFFERED=1
# the tests' fixtures read ../shared beside the repository
mkdir -p ../shared/data/lgg && cp -r gpu_check_data/val/* gpu_check_data/extra/* ../shared/data/lgg/ \
    && cp gpu_check_data/unpack_lgg.py ../shared/data/
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
timeout 120 python3 -m pytest -q -m cuda tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/cuda_tests.log"
timeout 300 python3 bench/gpu_check.py gpu_check_data/val --json "$OUT/gpu_check.json" --record-into /tmp/v \
    --workers "${WORKERS:-1,4,8,16}" --budget-s "${BUDGET_S:-230}" 2>&1 | tee "$OUT/gpu_check.log"
cp /tmp/v/*.gpu-verdicts.json "$OUT/" 2>/dev/null
ls -la "$OUT"
