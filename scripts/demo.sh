#!/bin/sh
# One command: install what is needed, build, and run the daemon against a
# private D-Bus, a stand-in Mender auth service and a stand-in Mender server.
set -eu
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build -q --bin mender-connect --example standin
echo "Running mender-connect against the stand-in server; Ctrl-C stops." >&2
exec target/debug/examples/standin --daemon target/debug/mender-connect "$@"
