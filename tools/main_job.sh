#!/usr/bin/env bash
# The main job: BlockSwap on real CIFAR-10 from start to end.
#
# 1. Install what the timm path needs into .venv (no mmcv build).
# 2. Train a WRN-16-2 teacher on all 50,000 training images for 6 epochs, or
#    load it from the cache of an earlier run ($BLOCKSWAP_CACHE/teachers).
# 3. Search a student at 25 % of the teacher's parameters (100 candidates).
# 4. Train the winner for 4 epochs with attention transfer from the teacher.
# 5. Evaluate teacher and student on the 10,000 test images and write
#    output/cifar_pipeline/results.json.
#
# Environment:
#   CIFAR10   folder with train.tar and test.tar (default: ../shared/data/cifar10)
#   OUTPUT    result folder (default: output/cifar_pipeline)
# Extra arguments go to tools/cifar_pipeline.py, for example --compare --report docs.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${CIFAR10:-$root/../shared/data/cifar10}"
output="${OUTPUT:-$root/output/cifar_pipeline}"

for split in train.tar test.tar; do
    if [ ! -e "$data/$split" ]; then
        echo "main_job: $data/$split not found" >&2
        echo "main_job: set CIFAR10 to a folder with train.tar and test.tar (class-folder tar files)" >&2
        exit 2
    fi
done
bash "$root/tools/install.sh" --no-mmcv
started=$(date +%s)
"$root/.venv/bin/python" "$root/tools/cifar_pipeline.py" --data "$data" --output "$output" "$@"
echo "main_job: finished in $(( ($(date +%s) - started) / 60 )) min $(( ($(date +%s) - started) % 60 )) s;" \
    "results in $output/results.json"
