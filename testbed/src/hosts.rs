//! A private `/etc/hosts` for one process: it runs in a mount namespace of
//! its own (`unshare -m`) with a file bind-mounted over `/etc/hosts`. This is
//! how the test bed makes names resolve (or resolve differently) for the
//! daemon or tinyproxy without touching the host. Needs root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::TempDir;

/// `sh -c` script: `$0` is the hosts file, `"$@"` the command to `exec`
/// (so the pid the caller sees ends up being the command's).
const SCRIPT: &str = "mount --bind \"$0\" /etc/hosts && exec \"$@\"";

/// Whether this process may create a mount namespace (root and `unshare`).
pub fn can_unshare_mounts() -> bool {
    Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// A command that runs `bin` with `hosts_file` as its `/etc/hosts`; the
/// caller adds `bin`'s arguments.
pub fn command(hosts_file: &Path, bin: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args(["-m", "sh", "-c", SCRIPT]).arg(hosts_file).arg(bin);
    c
}

/// Writes `hosts` to `dir/hosts` and an executable wrapper script
/// `dir/private-hosts.sh` that runs `bin` (with the wrapper's arguments)
/// under that `/etc/hosts`; returns the wrapper, e.g. for
/// `Daemon::spawn_with_binary`.
pub fn wrapper(dir: &TempDir, bin: &Path, hosts: &str) -> PathBuf {
    let file = dir.join("hosts");
    std::fs::write(&file, hosts).expect("hosts");
    let wrapper = dir.join("private-hosts.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec unshare -m sh -c '{SCRIPT}' {} {} \"$@\"\n",
            file.display(),
            bin.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    wrapper
}

/// [`wrapper`] around the daemon under test.
pub fn daemon_wrapper(dir: &TempDir, hosts: &str) -> PathBuf {
    let bin = crate::daemon::binary().expect("integration test");
    wrapper(dir, Path::new(bin), hosts)
}
