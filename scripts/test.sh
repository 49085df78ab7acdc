#!/bin/sh
# The project's test command: installs what the tests need, then runs them all.
set -eu
cd "$(dirname "$0")/.."
./scripts/deps.sh
exec cargo test "$@"
