#!/usr/bin/env bash
# Checks the cross-built ARM binaries (run packaging/cross/build.sh for both targets first):
#   ARMv5 armel  (armv5te-unknown-linux-gnueabi): runs under qemu-arm -cpu arm926 (ARMv5TEJ)
#                and -cpu arm1176 (ARMv6, Pi Zero/1): --version must print the crate version;
#                the daemon connects to the stand-in server (ws:// and wss://) and serves a
#                shell session (examples/shell_check.rs); guest RSS while connected and idle.
#   ARMv6 hf     (arm-unknown-linux-gnueabihf): not runnable here (Debian armhf libs are
#                ARMv7 and SIGILL on arm1176), so its ELF attributes are checked instead:
#                Tag_CPU_arch v6, Tag_FP_arch VFPv2, hard-float calling convention.
# Both: stripped size <= 1.5 MiB, no 64-bit atomic helper calls on ARMv5.
#
#   packaging/cross/test-qemu.sh
# Needs: qemu-user, the armel sysroot (cross-arm.sh setup), dbus-daemon, python3,
# and the host Rust toolchain (for the driver).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
home=${CROSS_ARM_HOME:-/opt/cross-arm}
log() { printf '[cross/test] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
max=$((3 * 1024 * 1024 / 2))
v5="$repo/target/armv5te-unknown-linux-gnueabi/release/mender-connect"
v6="$repo/target/arm-unknown-linux-gnueabihf/release/mender-connect"
[[ -x $v5 ]] || fail "$v5 missing: packaging/cross/build.sh armv5te-unknown-linux-gnueabi"
[[ -x $v6 ]] || fail "$v6 missing: packaging/cross/build.sh arm-unknown-linux-gnueabihf"
version=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
readelf=readelf; command -v arm-linux-gnueabi-readelf >/dev/null && readelf=arm-linux-gnueabi-readelf

stripped() {  # file must carry no symbol table and no DWARF
    ! $readelf -S "$1" | grep -qE '\.(symtab|debug_info)' || fail "$1 is not stripped"
}
attr() { $readelf -A "$1" | awk -F': ' -v k="$2" '$1 ~ k {print $2; exit}'; }

# --- ARMv5 armel under qemu ------------------------------------------------------
stripped "$v5"
# 64-bit atomics: ARMv5 has no ldrexd/strexd; the Rust side must not need them
# (std's AtomicU64 does not even exist for armv5te, so the build would have failed)
# and no C dependency may pull in the __sync/__atomic 8-byte helpers.
if $readelf --dyn-syms -W "$v5" | grep -E '__(sync|atomic)_[a-z_]+_8\b'; then
    fail "armel binary calls 64-bit atomic helpers (libatomic): see above"
fi
log "armel attributes: Tag_CPU_arch=$(attr "$v5" Tag_CPU_arch) ELF flags: $($readelf -h "$v5" | sed -n "s/^ *Flags: *//p")"

# The host-side driver: stand-in D-Bus + auth service + deviceconnect server,
# one shell session (examples/shell_check.rs). The daemon under qemu-user talks
# to the host's private dbus-daemon over its unix socket; the shell it starts
# is the host's /bin/sh (qemu-user runs a host binary natively on execve).
log "building the host-side driver (cargo build --example shell_check)"
( cd "$repo" && nice -n "${NICE:-10}" cargo build -q --example shell_check )
check="$repo/target/debug/examples/shell_check"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for cpu in arm926 arm1176; do
    out=$(qemu-arm -cpu "$cpu" -L "$home/sysroot-armel" "$v5" --version) || fail "armel --version on $cpu exited $?"
    log "armel on -cpu $cpu: $out"
    [[ $out == *"$version"* ]] || fail "armel --version on $cpu does not contain $version"
    printf '#!/bin/sh\nexec qemu-arm -cpu %s -L %s %s "$@"\n' "$cpu" "$home/sysroot-armel" "$v5" > "$tmp/daemon-$cpu"
    chmod +x "$tmp/daemon-$cpu"
    for tls in "" --tls; do
        r=$("$check" --daemon "$tmp/daemon-$cpu" $tls) || fail "shell session with the armel daemon on -cpu $cpu ${tls:-(ws)}"
        log "armel on -cpu $cpu: $r"
    done
done

# Idle RSS of the guest (../shared/tools/cross-arm.md section 3): the daemon
# connected to the stand-in server and idle for 6 s (figure at 5 s), then one
# shell session (the peak). The shell is a child process, not counted.
rss_run() {  # rss_run ws|wss
    local tls="" rep="$tmp/rss-$1"
    [[ $1 == wss ]] && tls=--tls
    printf '#!/bin/sh\nexec python3 %s --report %s --mark 5 -- qemu-arm -cpu arm926 -L %s %s "$@"\n' \
        "$here/guest-rss.py" "$rep" "$home/sysroot-armel" "$v5" > "$tmp/rss-daemon"
    chmod +x "$tmp/rss-daemon"
    "$check" --daemon "$tmp/rss-daemon" --idle-secs 6 $tls >/dev/null || fail "RSS run ($1)"
    local idle peak
    idle=$(sed -n 's/^GUEST_RSS_MARK .* now_kB=\([0-9]*\).*/\1/p' "$rep")
    peak=$(sed -n 's/^GUEST_RSS peak_kB=\([0-9]*\).*/\1/p' "$rep")
    [[ -n $idle && -n $peak ]] || fail "no RSS figures ($1): $(cat "$rep" 2>/dev/null)"
    log "armel guest RSS on arm926, $1: idle (connected) ${idle} kB, peak with a shell session ${peak} kB"
}
rss_run ws
rss_run wss

# --- ARMv6 hard-float: ELF attributes ----------------------------------------------
stripped "$v6"
arch=$(attr "$v6" Tag_CPU_arch); fp=$(attr "$v6" Tag_FP_arch)
# lld (zig) does not emit Tag_ABI_VFP_args; the ELF header's EF_ARM_ABI_FLOAT_HARD says the same
flags=$($readelf -h "$v6" | sed -n 's/^ *Flags: *//p')
log "armhf attributes: Tag_CPU_arch=$arch Tag_FP_arch=$fp; ELF flags: $flags"
[[ $arch == v6 || $arch == v6K || $arch == v6KZ ]] || fail "armhf Tag_CPU_arch is '$arch', want v6"
[[ $fp == VFPv2 ]] || fail "armhf Tag_FP_arch is '$fp', want VFPv2"
[[ $flags == *"hard-float ABI"* ]] || fail "armhf is not hard-float (ELF flags '$flags')"
interp=$($readelf -l "$v6" | sed -n 's/.*interpreter: \(.*\)]/\1/p')
[[ $interp == /lib/ld-linux-armhf.so.3 ]] || fail "armhf interpreter is '$interp'"

# --- sizes -------------------------------------------------------------------------
s5=$(stat -c %s "$v5"); s6=$(stat -c %s "$v6")
mib() { awk -v s="$1" 'BEGIN{printf "%.2f", s/1048576}'; }
log "stripped size armv5te-unknown-linux-gnueabi: $s5 bytes ($(mib "$s5") MiB)"
log "stripped size arm-unknown-linux-gnueabihf:   $s6 bytes ($(mib "$s6") MiB)"
(( s5 <= max && s6 <= max )) || fail "stripped size above 1.5 MiB"
log OK
