//! A TCP server on loopback for port-forward targets (echo and friends).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// A TCP server on 127.0.0.1 running `serve` per connection; drop stops it.
pub struct TcpTarget {
    /// Where it listens.
    pub addr: SocketAddr,
    done: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TcpTarget {
    /// Starts serving; every connection gets its own thread running `serve`.
    pub fn start(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> TcpTarget {
        let serve = Arc::new(serve);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let accept = std::thread::spawn(move || {
            for s in l.incoming() {
                if d.load(Ordering::Acquire) {
                    return;
                }
                if let Ok(s) = s {
                    let serve = Arc::clone(&serve);
                    std::thread::spawn(move || serve(s));
                }
            }
        });
        TcpTarget {
            addr,
            done,
            accept: Some(accept),
        }
    }

    /// An echo server.
    pub fn echo() -> TcpTarget {
        TcpTarget::start(|mut s| {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        })
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
