#!/usr/bin/env bash
# Install what is missing into .venv, then run the whole test suite.
#
# Extra arguments go to pytest, for example `bash tools/run_tests.sh -m "not slow"`.
# pytest exits with 5 when it collected no test; that counts as a failure here.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The tests and the mmdet configs read the real data from ../shared/data. Without
# it most tests would skip and the run would still pass, so stop before installing.
shared="$(cd "$root/.." && pwd)/shared"
for needed in data/cifar10/train.tar data/cifar10/test.tar data/coco128 reference/paper_genotypes.json; do
    if [ ! -e "$shared/$needed" ]; then
        echo "run_tests: $shared/$needed not found; the tests read the real data from ../shared beside the" \
             "repository, so clone it next to that folder or link it there (ln -s /path/to/shared $shared)" >&2
        exit 1
    fi
done
bash "$root/tools/install.sh" || { echo "run_tests: installation failed" >&2; exit 1; }
cd "$root"
.venv/bin/python -m pytest tests -ra "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "run_tests: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$status"
