//! Debian's real `tinyproxy`, started with its own configuration on a free
//! loopback port, optionally with host names that only it can resolve.
//!
//! The names go into a private `/etc/hosts` bind-mounted over the real one in
//! a mount namespace of tinyproxy's own (`unshare -m`), so the daemon under
//! test (outside that namespace) cannot resolve them: a connection to such a
//! name proves the `CONNECT` tunnel was used. That part needs root; without
//! root [`TinyProxy::start`] returns Err so tests can skip.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::TempDir;

/// Where Debian installs it (`/usr/bin` on newer releases).
const CANDIDATES: [&str; 2] = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"];

/// A running tinyproxy. Drop kills and reaps it and removes its files.
pub struct TinyProxy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

/// The tinyproxy binary, if installed.
pub fn binary() -> Option<&'static str> {
    CANDIDATES.into_iter().find(|p| Path::new(p).exists())
}

impl TinyProxy {
    /// Starts tinyproxy on `127.0.0.1:<free port>`; `hosts` are `(name, ip)`
    /// pairs only it resolves; `basic_auth` makes it demand credentials.
    pub fn start(hosts: &[(&str, &str)], basic_auth: Option<(&str, &str)>) -> Result<Self, String> {
        let bin = binary().ok_or("tinyproxy is not installed (scripts/deps.sh)")?;
        // SAFETY: geteuid has no preconditions.
        if !hosts.is_empty() && unsafe { libc::geteuid() } != 0 {
            return Err("needs root (a mount namespace for tinyproxy's /etc/hosts)".into());
        }
        let dir = TempDir::new("tinyproxy");
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.local_addr().map_err(|e| e.to_string())?.port()
        };
        let mut conf =
            format!("Port {port}\nListen 127.0.0.1\nTimeout 600\nLogLevel Info\nMaxClients 50\n");
        if let Some((u, p)) = basic_auth {
            conf.push_str(&format!("BasicAuth {u} {p}\n"));
        }
        let conf_file = dir.join("tinyproxy.conf");
        std::fs::write(&conf_file, conf).map_err(|e| e.to_string())?;
        let log = dir.join("tinyproxy.log");
        let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut cmd = if hosts.is_empty() {
            let mut c = Command::new(bin);
            c.arg("-d").arg("-c").arg(&conf_file);
            c
        } else {
            let mut text = String::from("127.0.0.1 localhost\n");
            for (name, ip) in hosts {
                text.push_str(&format!("{ip} {name}\n"));
            }
            let hosts_file = dir.join("hosts");
            std::fs::write(&hosts_file, text).map_err(|e| e.to_string())?;
            let mut c = crate::hosts::command(&hosts_file, Path::new(bin));
            c.arg("-d").arg("-c").arg(&conf_file);
            c
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(|e| e.to_string())?)
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("starting tinyproxy: {e}"))?;
        let mut tp = TinyProxy {
            child,
            port,
            log,
            _dir: dir,
        };
        let up = crate::wait_until(crate::TIMEOUT, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                || tp.child.try_wait().ok().flatten().is_some()
        });
        if !up || tp.child.try_wait().ok().flatten().is_some() {
            return Err(format!("tinyproxy did not start:\n{}", tp.log()));
        }
        Ok(tp)
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://[user:password@]127.0.0.1:PORT`.
    pub fn url(&self, creds: Option<(&str, &str)>) -> String {
        match creds {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// tinyproxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        crate::wait_until(timeout, || self.log().contains(needle))
    }
}

impl Drop for TinyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- tinyproxy log -----\n{}----- end -----", self.log());
        }
    }
}
