#!/usr/bin/env bash
# What CI runs for the Debian package (needs root: dpkg -i / apt-get):
# build it, install it, check what it installed, verify the systemd unit, run
# the binary, remove it, run lintian.  Exits non-zero on the first failure.
#
#   packaging/debian/check-deb.sh            # builds first (build-deb.sh)
#   packaging/debian/check-deb.sh FILE.deb   # checks an already built package
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
log() { printf '[check-deb] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
[[ $(id -u) == 0 ]] || fail "run as root (dpkg -i)"
t0=$(date +%s)

deb=${1:-}
[[ -n $deb ]] || deb=$("$here/build-deb.sh" | tail -n1)
[[ -f $deb ]] || fail "no package at '$deb'"
dbg="${deb/mender-connect_/mender-connect-dbgsym_}"
[[ -f $dbg ]] || fail "no debug symbol package at $dbg"
log "checking $deb (+ $(basename "$dbg"))"

# tools: lintian, systemd-analyze (package systemd), gdb for the symbol check
missing=""
command -v lintian >/dev/null || missing="$missing lintian"
command -v systemd-analyze >/dev/null || missing="$missing systemd"
command -v gdb >/dev/null || missing="$missing gdb"
if [[ -n $missing ]]; then
    log "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || log "warning: apt-get update reported errors; going on"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >&2
fi

# --- lintian (errors fail; warnings are shown) ----------------------------------
log "lintian"
lintian --fail-on error --tag-display-limit 0 "$deb" "$dbg" >&2 || fail "lintian reported errors"

# --- install -------------------------------------------------------------------
log "dpkg -i"
if ! dpkg -i "$deb" "$dbg" >&2; then
    log "dpkg -i left dependencies unresolved; apt-get -f install"
    apt-get install -y -q -f --no-install-recommends >&2
fi
dpkg-query -W -f='${Status}\n' mender-connect-rs | grep -q "install ok installed" || fail "not installed"
[[ $(dpkg-query -W -f='${Provides}' mender-connect-rs) == *mender-connect* ]] || fail "Provides: mender-connect missing"

# --- files ---------------------------------------------------------------------
bin=/usr/bin/mender-connect conf=/etc/mender/mender-connect.conf unit=/lib/systemd/system/mender-connect.service
[[ -x $bin ]] || fail "$bin missing"
[[ $(stat -c '%a %U %G' "$conf") == "600 root root" ]] || fail "$conf: mode/owner $(stat -c '%a %U %G' "$conf"), want 600 root root"
[[ $(cat "$conf") == '{"ShellCommand": "/bin/bash", "User": "nobody"}' ]] || fail "$conf is not the upstream example"
grep -qx "$conf" /var/lib/dpkg/info/mender-connect-rs.conffiles || fail "$conf is not a conffile"
[[ -f /usr/share/man/man1/mender-connect.1.gz && -f /usr/share/man/man5/mender-connect.conf.5.gz ]] || fail "man pages missing"
readelf -S "$bin" | grep -q '\.debug_info' && fail "$bin is not stripped"
bid=$(readelf -n "$bin" | awk '/Build ID/ {print $3}')
[[ -n $bid ]] || fail "$bin has no build-id"
dfile="/usr/lib/debug/.build-id/${bid:0:2}/${bid:2}.debug"
[[ -f $dfile ]] || fail "debug file $dfile missing"
readelf -S "$dfile" 2>/dev/null | grep -q '\.debug_info' || fail "$dfile has no DWARF"
log "binary $(stat -c %s "$bin") bytes stripped; debug file $dfile ($(stat -c %s "$dfile") bytes)"
# gdb finds the separate debug file by build-id and resolves the daemon's own functions
gdb -batch -nx -ex 'info functions ^mender_connect::daemon::run$' "$bin" 2>&1 | grep -q 'mender_connect::daemon::run' \
    || fail "gdb does not see mender_connect::daemon::run via $dfile"

# --- systemd unit --------------------------------------------------------------
# Stand-ins for the Mender client units the unit Wants=, which are not installed
# here: without them `verify` reports them as missing, with them any remaining
# message is about our unit.
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
for u in mender-client mender-authd; do
    printf '[Unit]\nDescription=stand-in %s\n[Service]\nExecStart=/bin/true\n' "$u" > "$stub/$u.service"
done
log "systemd-analyze verify $unit"
out=$(SYSTEMD_UNIT_PATH="$stub:" systemd-analyze verify --man=no "$unit" 2>&1) && rc=0 || rc=$?
printf '%s\n' "$out" | sed 's/^/  verify: /' >&2
# Only messages about mender-connect.service count; verify also lints every
# unit the dependency closure pulls in (distribution units), which is not ours.
bad=$(printf '%s\n' "$out" | grep -i 'mender-connect' || true)
[[ $rc == 0 || -z $bad ]] || fail "systemd-analyze verify: exit $rc"
[[ -z $bad ]] || fail "systemd-analyze verify complains about our unit"

# --- run -----------------------------------------------------------------------
log "$bin --version"
ver_out=$("$bin" --version) || fail "--version exited $?"
log "  -> $ver_out"
upstream=$(dpkg-query -W -f='${Version}' mender-connect-rs); upstream=${upstream%-*}; upstream=${upstream%%-0~snapshot*}
[[ $ver_out == *"$upstream"* ]] || fail "--version output does not contain the package version $upstream"
[[ $ver_out == *$'\t'runtime:* ]] || fail "--version output lacks '<TAB>runtime:' (behavior.md 1.3)"

# --- remove --------------------------------------------------------------------
log "dpkg -r"
dpkg -r mender-connect-rs-dbgsym mender-connect-rs >&2
[[ ! -e $bin ]] || fail "$bin still there after dpkg -r"
[[ -f $conf ]] || fail "dpkg -r removed the conffile (only purge should)"
dpkg -P mender-connect-rs >&2
[[ ! -e $conf ]] || fail "$conf still there after purge"

# --- drop-in over Debian's Go mender-connect -------------------------------------
# dpkg moves the conffile over from the Go package (Replaces): an unchanged Go
# config is replaced by ours without a question; an edited one gets dpkg's
# usual conffile question (default: keep yours), which --force-confold answers
# for unattended installs.
if [[ ${SKIP_TAKEOVER:-} != 1 ]] && apt-cache show mender-connect >/dev/null 2>&1; then
    log "drop-in over Debian's mender-connect $(apt-cache show mender-connect | sed -n 's/^Version: //p' | head -n1)"
    go_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mender-connect >&2; }
    go_install
    dpkg -i "$deb" </dev/null >&2 || fail "dpkg -i over the unchanged Go package asked or failed"
    dpkg-query -W -f='${Status}\n' mender-connect 2>/dev/null | grep -q "install ok installed" && fail "Go mender-connect still installed"
    [[ $(cat "$conf") == '{"ShellCommand": "/bin/bash", "User": "nobody"}' ]] || fail "unchanged Go config not replaced by ours"
    [[ $(stat -c %a "$conf") == 600 ]] || fail "$conf mode $(stat -c %a "$conf") after take-over, want 600"
    dpkg -P mender-connect-rs mender-connect >&2
    go_install
    printf '{"ShellCommand": "/bin/sh", "User": "root"}\n' > "$conf"
    dpkg -i --force-confold "$deb" </dev/null >&2 || fail "dpkg -i --force-confold over the edited Go package failed"
    [[ $(cat "$conf") == '{"ShellCommand": "/bin/sh", "User": "root"}' ]] || fail "the edited Go config was not kept"
    "$bin" --version >/dev/null || fail "--version after take-over"
    dpkg -P mender-connect-rs mender-connect >&2
    rm -f "$conf.dpkg-dist" "$conf.dpkg-new"
    [[ ! -e $conf ]] || fail "$conf still there after purge"
fi

log "OK ($(( $(date +%s) - t0 )) s)"
