SUMMARY = "Mender remote terminal, file transfer and port forwarding daemon (Rust)"
DESCRIPTION = "A re-implementation in Rust of Mender's mender-connect, a drop-in \
replacement: same binary path, configuration file, command line and systemd unit."
HOMEPAGE = "https://github.com/mendersoftware/mender-connect"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# Where the sources come from: set these in your layer's bbappend or local.conf
# (or use externalsrc during development, see README.md).
MENDER_CONNECT_RS_SRC_URI ?= "git://github.com/OWNER/mender-connect-rs.git;protocol=https;branch=main"
SRCREV ?= "${AUTOREV}"
SRC_URI = "${MENDER_CONNECT_RS_SRC_URI}"
# The Rust crate is edition 2024 (rustc >= 1.85): a release with UNPACKDIR.
S = "${UNPACKDIR}/git"

# crate:// entries and checksums, generated from Cargo.lock by
# packaging/yocto/gen-crates.py (tests/yocto_drift.rs keeps them in sync)
require mender-connect-rs-crates.inc

inherit cargo pkgconfig systemd

DEPENDS += "openssl dbus"

# Stand in for meta-mender's Go mender-connect. Select this one with
#   PREFERRED_PROVIDER_mender-connect = "mender-connect-rs"
#   PREFERRED_RPROVIDER_mender-connect = "mender-connect-rs"
PROVIDES = "mender-connect"
RPROVIDES:${PN} = "mender-connect"
RREPLACES:${PN} = "mender-connect"
RRECOMMENDS:${PN} = "dbus"

# Only the daemon (cargo would otherwise also copy the library's .rlib).
CARGO_BUILD_FLAGS:append = " --bin mender-connect"
# openssl-sys / libdbus-sys find the target's libraries with pkg-config.
export PKG_CONFIG_ALLOW_CROSS = "1"
export OPENSSL_NO_VENDOR = "1"
# `mender-connect version` must contain the package version.
export MENDER_CONNECT_VERSION = "${PV}"

do_install:append() {
    install -d -m 0755 ${D}${sysconfdir}/mender
    install -m 0600 ${S}/packaging/conf/mender-connect.conf ${D}${sysconfdir}/mender/mender-connect.conf
    install -d ${D}${systemd_system_unitdir}
    sed -e 's,/usr/bin/mender-connect,${bindir}/mender-connect,' \
        ${S}/packaging/systemd/mender-connect.service > ${D}${systemd_system_unitdir}/mender-connect.service
    chmod 0644 ${D}${systemd_system_unitdir}/mender-connect.service
    install -d ${D}${mandir}/man1 ${D}${mandir}/man5
    install -m 0644 ${S}/packaging/man/mender-connect.1 ${D}${mandir}/man1/
    install -m 0644 ${S}/packaging/man/mender-connect.conf.5 ${D}${mandir}/man5/
}

CONFFILES:${PN} = "${sysconfdir}/mender/mender-connect.conf"
SYSTEMD_SERVICE:${PN} = "mender-connect.service"
SYSTEMD_AUTO_ENABLE ?= "enable"
# The man pages go to ${PN}-doc (installed when "doc-pkgs" is in IMAGE_FEATURES);
# the debug info (the release profile keeps full DWARF) to ${PN}-dbg.
