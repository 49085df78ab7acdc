//! A two-namespace network lab for chaos tests: the daemon runs in netns
//! "dev", a TCP forwarder to the stand-in server listens in netns "srv", and
//! the two are joined by an impaired link.
//!
//! The link is a pair of TUN devices (one per namespace) with a relay in this
//! process that delays, jitters and drops IP packets, because `tc netem` is
//! often missing from kernels (CONFIG_NET_SCH_NETEM): it emulates
//! `netem delay D J loss L` on the chosen directions, and a "blackhole" that
//! silently drops everything both ways (like a pulled cable or a DROP rule).
//! Real kernel TCP runs on both ends, so retransmission, reordering and
//! keepalive behave as on a real network.
//!
//! Needs root and `ip` (iproute2); [`NetLab::new`] returns Err with a reason
//! otherwise, so the tests can skip. Everything is removed on drop.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::TempDir;

/// Device-side address on the lab link.
pub const DEV_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Server-side address on the lab link.
pub const SRV_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// Impairment of one direction of the link (netem's `delay D J loss L`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Impair {
    /// Mean one-way delay.
    pub delay: Duration,
    /// Uniform jitter: each packet gets `delay ± jitter` (so packets reorder,
    /// as with netem).
    pub jitter: Duration,
    /// Drop probability, 0.0..=1.0.
    pub loss: f64,
}

#[derive(Default)]
struct LinkState {
    /// [dev→srv, srv→dev]
    impair: [Impair; 2],
    blackhole: bool,
}

struct Shared {
    state: Mutex<LinkState>,
    stop: AtomicBool,
    dropped: AtomicUsize,
    passed: AtomicUsize,
}

/// The lab: two namespaces, the relay threads, and forwarders.
pub struct NetLab {
    dev_ns: String,
    srv_ns: String,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    forwarders: Mutex<Vec<Forwarder>>,
    dir: TempDir,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on a fresh thread that has joined network namespace `ns`
/// (setns only affects the calling thread), e.g. to bind a socket there.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on a valid namespace fd; affects this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| "netns thread panicked".to_string())?
}

fn open_tun(name: &str) -> Result<File, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads/writes an ifreq-sized struct we own.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r != 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(file)
}

/// xorshift for loss and jitter; deterministic per direction.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Pending {
    due: Instant,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // BinaryHeap is a max-heap: the earliest due packet must compare greatest
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

type Queue = Arc<(Mutex<BinaryHeap<Pending>>, Condvar)>;

/// Reads packets from `from`, applies direction `dir`'s impairment, queues them.
fn reader(shared: Arc<Shared>, from: File, dir: usize, q: Queue) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (dir as u64 + 1));
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u64;
    let mut from = from;
    while !shared.stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the timeout only lets us notice `stop`.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let Ok(n) = from.read(&mut buf) else { break };
        let (imp, black) = {
            let s = shared.state.lock().unwrap();
            (s.impair[dir], s.blackhole)
        };
        if black || (imp.loss > 0.0 && rng.next_f64() < imp.loss) {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let jitter = imp.jitter.as_secs_f64() * (2.0 * rng.next_f64() - 1.0);
        let delay = (imp.delay.as_secs_f64() + jitter).max(0.0);
        seq += 1;
        let (lock, cond) = &*q;
        lock.lock().unwrap().push(Pending {
            due: Instant::now() + Duration::from_secs_f64(delay),
            seq,
            packet: buf[..n].to_vec(),
        });
        cond.notify_one();
    }
}

/// Writes queued packets to `to` when they are due.
fn writer(shared: Arc<Shared>, mut to: File, q: Queue) {
    let (lock, cond) = &*q;
    let mut g = lock.lock().unwrap();
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        match g.peek() {
            Some(p) if p.due <= now => {
                let p = g.pop().expect("peeked");
                drop(g);
                // a full device queue or a down link drops, as on a wire
                let _ = to.write(&p.packet);
                shared.passed.fetch_add(1, Ordering::Relaxed);
                g = lock.lock().unwrap();
            }
            // waiting for the next due time or a new packet (not a sync sleep:
            // the due time is the emulated wire's delay)
            Some(p) => {
                let wait = p.due - now;
                g = cond.wait_timeout(g, wait).unwrap().0;
            }
            None => g = cond.wait_timeout(g, Duration::from_millis(100)).unwrap().0,
        }
    }
}

impl NetLab {
    /// Creates the namespaces and the link (no impairment yet), or says why
    /// it cannot (not root, no `ip`, no netns or TUN support).
    pub fn new() -> Result<NetLab, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (network namespaces)".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("needs `ip` (iproute2)".into());
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{n}", std::process::id());
        let dev_ns = format!("mcchaos-{tag}-dev");
        let srv_ns = format!("mcchaos-{tag}-srv");
        ip(&["netns", "add", &dev_ns])?;
        if let Err(e) = ip(&["netns", "add", &srv_ns]) {
            let _ = ip(&["netns", "del", &dev_ns]);
            return Err(e);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(LinkState::default()),
            stop: AtomicBool::new(false),
            dropped: AtomicUsize::new(0),
            passed: AtomicUsize::new(0),
        });
        let mut lab = NetLab {
            dev_ns,
            srv_ns,
            shared,
            threads: Vec::new(),
            forwarders: Mutex::new(Vec::new()),
            dir: TempDir::new("netlab"),
        };
        lab.setup_link()?;
        Ok(lab)
    }

    fn setup_link(&mut self) -> Result<(), String> {
        let mut tuns = Vec::new();
        for (ns, addr) in [(&self.dev_ns, DEV_ADDR), (&self.srv_ns, SRV_ADDR)] {
            let tun = in_netns(ns, || open_tun("mclab0"))??;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "mclab0",
            ])?;
            ip(&["-n", ns, "link", "set", "mclab0", "up"])?;
            tuns.push(tun);
        }
        let srv = tuns.pop().expect("srv tun");
        let dev = tuns.pop().expect("dev tun");
        for (dir, from, to) in [
            (0, &dev, &srv), // device → server
            (1, &srv, &dev), // server → device
        ] {
            let q: Queue = Arc::default();
            let from = from.try_clone().map_err(|e| e.to_string())?;
            let to = to.try_clone().map_err(|e| e.to_string())?;
            let (s1, s2, q2) = (self.shared.clone(), self.shared.clone(), q.clone());
            self.threads
                .push(std::thread::spawn(move || reader(s1, from, dir, q)));
            self.threads
                .push(std::thread::spawn(move || writer(s2, to, q2)));
        }
        Ok(())
    }

    /// The daemon's namespace.
    pub fn dev_ns(&self) -> &str {
        &self.dev_ns
    }

    /// The server's namespace.
    pub fn srv_ns(&self) -> &str {
        &self.srv_ns
    }

    /// Sets the impairment of device→server and server→device traffic.
    pub fn impair(&self, dev_to_srv: Impair, srv_to_dev: Impair) {
        self.shared.state.lock().unwrap().impair = [dev_to_srv, srv_to_dev];
    }

    /// Takes the device's end of the link down or up (`ip link set`), as a
    /// modem or Wi-Fi losing and regaining its link: unlike a blackhole, the
    /// kernel drops the link's routes and tells rtnetlink listeners.
    pub fn set_dev_link(&self, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.dev_ns, "link", "set", "mclab0", state])
    }

    /// Drops every packet both ways while `on`.
    pub fn blackhole(&self, on: bool) {
        self.shared.state.lock().unwrap().blackhole = on;
    }

    /// (packets dropped, packets passed) so far.
    pub fn counters(&self) -> (usize, usize) {
        (
            self.shared.dropped.load(Ordering::Relaxed),
            self.shared.passed.load(Ordering::Relaxed),
        )
    }

    /// A script that runs its arguments' binary `bin` inside the device
    /// namespace (`ip netns exec` execs in place, so the pid is the daemon's);
    /// give it to `Daemon::spawn_with_binary`.
    pub fn dev_wrapper(&self, bin: &std::path::Path) -> PathBuf {
        let p = self.dir.join("in-dev-ns.sh");
        let script = format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            self.dev_ns,
            bin.display()
        );
        std::fs::write(&p, script).expect("write wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    /// A TCP listener on 127.0.0.1 inside the device namespace (a
    /// port-forward target the daemon can reach).
    pub fn dev_listener(&self) -> TcpListener {
        in_netns(&self.dev_ns, || TcpListener::bind("127.0.0.1:0"))
            .expect("netns")
            .expect("bind in device netns")
    }

    /// Forwards connections made to `SRV_ADDR:<returned port>` (in the server
    /// namespace) to `127.0.0.1:target_port` in this process's namespace, so
    /// the stand-in server can stay on loopback. Returns the URL to give the
    /// auth service.
    pub fn forward_to(&self, target_port: u16) -> String {
        let l = in_netns(&self.srv_ns, || TcpListener::bind((SRV_ADDR, 0)))
            .expect("netns")
            .expect("bind in server netns");
        let port = l.local_addr().expect("addr").port();
        let f = Forwarder::start(l, SocketAddr::from(([127, 0, 0, 1], target_port)));
        self.forwarders.lock().unwrap().push(f);
        format!("http://{SRV_ADDR}:{port}")
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        self.forwarders.lock().unwrap().clear();
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = ip(&["netns", "del", &self.dev_ns]);
        let _ = ip(&["netns", "del", &self.srv_ns]);
    }
}

/// A TCP relay: accepts on a listener and pipes each connection to `target`.
/// When either side ends, both are shut down.
struct Forwarder {
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    accept: Option<JoinHandle<()>>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
}

impl Forwarder {
    fn start(listener: TcpListener, target: SocketAddr) -> Forwarder {
        let stop = Arc::new(AtomicBool::new(false));
        let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let l = listener.try_clone().expect("clone listener");
        let (st, so) = (stop.clone(), socks.clone());
        let accept = std::thread::spawn(move || {
            for c in l.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(a) = c else { continue };
                let Ok(b) = TcpStream::connect(target) else {
                    // the server is down: the device sees its connection cut
                    let _ = a.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                {
                    let mut g = so.lock().unwrap();
                    g.push(a.try_clone().expect("clone"));
                    g.push(b.try_clone().expect("clone"));
                }
                for (mut x, mut y) in [
                    (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
                    (b, a),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut x, &mut y);
                        let _ = x.shutdown(Shutdown::Both);
                        let _ = y.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Forwarder {
            stop,
            listener,
            accept: Some(accept),
            socks,
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: wakes accept() on a descriptor we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self.socks.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
