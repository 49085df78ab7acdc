#!/bin/sh
# Side-by-side benchmark: this daemon against Debian's Go mender-connect 2.1.0.
# Usage: benches/compare.sh [ROUNDS]   (default 3; prints a table of medians)
# Installs the build deps and the Go daemon if missing (needs root or sudo).
# The Go package's service is never started: the benchmark runs both daemons
# itself, against a private D-Bus and stand-in servers on loopback.
set -eu
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

scripts/deps.sh
if ! [ -x /usr/bin/mender-connect ] || ! /usr/bin/mender-connect --version >/dev/null 2>&1; then
    echo "installing Debian's mender-connect (Go 2.1.0)" >&2
    # forbid service starts during the install (restored afterwards)
    prc=/usr/sbin/policy-rc.d
    restore=""
    if [ -e "$prc" ]; then
        $SUDO cp -p "$prc" "$prc.compare-bak"
        restore=1
    fi
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$prc" >/dev/null
    $SUDO chmod 755 "$prc"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends mender-connect >&2 || status=$?
    if [ -n "$restore" ]; then $SUDO mv "$prc.compare-bak" "$prc"; else $SUDO rm -f "$prc"; fi
    [ -z "${status:-}" ] || exit "$status"
fi
# if a system service manager started it anyway, stop it: it would compete for CPU
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now mender-connect.service >/dev/null 2>&1 || true
fi

# A private copy: the machine may be shared, and someone removing the package
# mid-run must not break (or silently change) the comparison.
mkdir -p target/bench-go
cp /usr/bin/mender-connect target/bench-go/mender-connect
GO_BIN="$PWD/target/bench-go/mender-connect"

cargo build --release --bin mender-connect

# In a VM, how fast a sleeping thread wakes depends on the guest's idle
# loop: with halt polling off, every wake-up of an idle vCPU is a VM exit
# (tens of µs), which a round trip of small messages pays several times.
# Printed so the figures can be read; COMPARE_HALT_POLL_NS=N sets it for the
# run (root or sudo) and restores it afterwards, however the run ends.
HP=/sys/module/haltpoll/parameters/guest_halt_poll_ns
old_hp=""
restore_hp() {
    if [ -n "$old_hp" ]; then
        echo "$old_hp" | $SUDO tee "$HP" >/dev/null || true
        old_hp=""
    fi
}
bench=""
# a signal stops the bench too (it runs in the background so the trap
# fires at once, not when the bench ends), then restores the setting
on_signal() {
    [ -z "$bench" ] || kill -TERM "-$bench" 2>/dev/null || true
    restore_hp
    exit "$1"
}
trap restore_hp EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
if [ -r "$HP" ]; then
    if [ -n "${COMPARE_HALT_POLL_NS:-}" ]; then
        old_hp=$(cat "$HP")
        echo "$COMPARE_HALT_POLL_NS" | $SUDO tee "$HP" >/dev/null
    fi
    echo "cpuidle: $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null), guest_halt_poll_ns=$(cat "$HP")"
elif [ -n "${COMPARE_HALT_POLL_NS:-}" ]; then
    echo "COMPARE_HALT_POLL_NS ignored: no $HP (not a guest with the haltpoll cpuidle driver)" >&2
fi
# The bench binary is built with the release profile too (cargo bench).
# Its own process group, so a signal can stop cargo and the bench together.
setsid cargo bench --bench compare -- \
    --ours "$PWD/target/release/mender-connect" \
    --theirs "$GO_BIN" \
    --rounds "$ROUNDS" &
bench=$!
status=0
wait "$bench" || status=$?
bench=""
exit "$status"
