#!/usr/bin/env bash
# Install what is missing into .venv, then search a BlockSwap student of the
# paper's WRN-40-2 teacher at a 400K-parameter budget on real CIFAR-10.
#
# Environment:
#   CIFAR10_TRAIN  training images (default: ../shared/data/cifar10/train.tar)
#   SAMPLES        number of candidates to score (default: 200, a few minutes on 2 cores)
#   OUT            result file (default: output/search_wrn_40_2_400k.json)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${CIFAR10_TRAIN:-$root/../shared/data/cifar10/train.tar}"
samples="${SAMPLES:-200}"
out="${OUT:-$root/output/search_wrn_40_2_400k.json}"

if [ ! -e "$data" ]; then
    echo "main_job: CIFAR-10 training data not found at $data" >&2
    echo "main_job: set CIFAR10_TRAIN to a CIFAR-10 copy: a folder of class folders or a tar file of them" >&2
    exit 2
fi
bash "$root/tools/install.sh"
"$root/.venv/bin/blockswap" search wrn_40_2 --data "$data" --budget-params 400000 \
    --samples "$samples" --seed 0 --out "$out"
echo "main_job: the winning genotype and all scores are in $out"
echo "main_job: count the student with: .venv/bin/blockswap count wrn_40_2 --genotype $out"
