#!/bin/sh
# Installs the system packages the build and the tests need (Debian/Ubuntu).
# Idempotent: does nothing when everything is already there.
# mender-cli (Debian's real client) drives the end-to-end tests in
# tests/mender_cli.rs and the demo's remote terminal; on a distribution that
# does not package it, it is skipped with a warning (those tests then skip).
# openssh-server/-client: mender-cli's own port-forward test (scp through
# the forward) runs a private sshd on 127.0.0.1 (tests/mender_cli.rs).
set -eu
PKGS="pkg-config libssl-dev libdbus-1-dev dbus openssl iproute2 gdb binutils mender-cli openssh-server openssh-client tinyproxy"
OPTIONAL="mender-cli"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >&2
install=""
for p in $missing; do
    case " $OPTIONAL " in
    *" $p "*)
        if ! apt-cache show "$p" >/dev/null 2>&1; then
            echo "warning: package $p is not available here; skipping it" >&2
            continue
        fi
        ;;
    esac
    install="$install $p"
done
[ -z "$install" ] && exit 0
echo "installing:$install" >&2
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $install >&2
