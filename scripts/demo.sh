#!/bin/sh
# One command: install what is needed, build, and run the daemon against a
# private D-Bus, a stand-in Mender auth service and a stand-in Mender server.
# On a terminal with mender-cli installed (scripts/deps.sh installs it) this
# opens a real remote shell on the local daemon through `mender-cli terminal`
# (the exact command line is printed; `exit` or Ctrl-] ends the demo).
# Otherwise it logs what the device sends and prints the mender-cli commands
# to try from another terminal. Extra arguments go to the stand-in
# (e.g. --no-terminal, --config FILE).
set -eu
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build -q --bin mender-connect --example standin
echo "Running mender-connect against the stand-in server; Ctrl-C stops." >&2
exec target/debug/examples/standin --daemon target/debug/mender-connect "$@"
