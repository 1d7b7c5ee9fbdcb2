#!/usr/bin/env bash
# Install what is missing into .venv, then run the whole test suite.
#
# Extra arguments go to pytest, for example `bash tools/run_tests.sh -m "not slow"`.
# pytest exits with 5 when it collected no test; that counts as a failure here.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/install.sh" || { echo "run_tests: installation failed" >&2; exit 1; }
cd "$root"
.venv/bin/python -m pytest tests -ra "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "run_tests: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$status"
