//! A private `dbus-daemon` for one test (behavior.md §3.1: the daemon under
//! test finds it through `DBUS_SYSTEM_BUS_ADDRESS`).

use crate::TempDir;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

/// The config file committed next to the tests: a bus of type `system` whose
/// policy lets everyone own, send and receive.
pub const CONFIG_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dbus/system.conf");

/// A running `dbus-daemon` listening on a unix socket inside its own temp dir.
///
/// Drop kills and reaps the process, then removes the directory.
#[derive(Debug)]
pub struct DbusDaemon {
    child: Child,
    address: String,
    // Held so the daemon never writes into a closed pipe.
    _stdout: BufReader<ChildStdout>,
    dir: TempDir,
}

impl DbusDaemon {
    /// Starts the bus and returns once it has printed its address, i.e. once
    /// it accepts connections. Panics (with the daemon's stderr) if it fails.
    pub fn start() -> DbusDaemon {
        let dir = TempDir::new("dbus");
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("dbus stderr log");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={CONFIG_FILE}"))
            .arg(format!("--address=unix:path={}", dir.join("bus").display()))
            .arg("--print-address=1")
            .arg("--nofork")
            .arg("--nopidfile")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawning dbus-daemon (is the `dbus` package installed?)");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let n = stdout.read_line(&mut line).unwrap_or(0);
        let address = line.trim().to_string();
        if n == 0 || address.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            panic!("dbus-daemon did not print its address; stderr:\n{log}");
        }
        DbusDaemon {
            child,
            address,
            _stdout: stdout,
            dir,
        }
    }

    /// The bus address, e.g. `unix:path=/tmp/…/bus,guid=…`; suitable for
    /// `DBUS_SYSTEM_BUS_ADDRESS` and `dbus::channel::Channel::open_private`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Process id of the `dbus-daemon`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir holding the socket (removed on drop).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Env pair pointing a process at this bus as its system bus.
    pub fn env(&self) -> (&'static str, &str) {
        ("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
