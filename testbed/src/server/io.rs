//! The byte stream under tungstenite: plain or TLS, with unbounded write
//! buffering and a filter that can drop the pongs tungstenite sends by itself.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub(super) enum Inner {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TcpStream>>),
}

pub(super) enum FilterState {
    Header(Vec<u8>),
    Payload { remaining: u64, drop: bool },
}

/// Stream under the websocket. Writes go through an unbounded buffer so the
/// connection thread never blocks on write (except while an
/// [`Exchange`](super::Exchange) runs, when the socket is blocking with a
/// timeout per write); once `filtering` is on, outgoing
/// pong frames are dropped while `answer_pings` is false (tungstenite answers
/// pings by itself and has no switch for it).
pub(super) struct Io {
    pub(super) inner: Inner,
    /// Bytes already read off the socket (a request head peeked for an
    /// [`HttpHook`]) that reads must return first.
    pub(super) pending: Vec<u8>,
    pub(super) out: Vec<u8>,
    pub(super) filtering: bool,
    pub(super) filter: FilterState,
    pub(super) answer_pings: Arc<AtomicBool>,
}

impl Io {
    fn drain(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let r = match &mut self.inner {
                Inner::Plain(s) => s.write(&self.out),
                Inner::Tls(s) => s.write(&self.out),
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn feed(&mut self, mut buf: &[u8]) {
        let answer = self.answer_pings.load(Ordering::SeqCst);
        while !buf.is_empty() {
            match &mut self.filter {
                FilterState::Header(h) => {
                    h.push(buf[0]);
                    buf = &buf[1..];
                    if let Some((hlen, plen)) = frame_header_len(h)
                        && h.len() == hlen
                    {
                        let is_pong = h[0] & 0x0f == 0x0a;
                        let drop = is_pong && !answer;
                        if !drop {
                            self.out.extend_from_slice(h);
                        }
                        self.filter = if plen == 0 {
                            FilterState::Header(Vec::new())
                        } else {
                            FilterState::Payload {
                                remaining: plen,
                                drop,
                            }
                        };
                    }
                }
                FilterState::Payload { remaining, drop } => {
                    let n = (*remaining).min(buf.len() as u64) as usize;
                    if !*drop {
                        self.out.extend_from_slice(&buf[..n]);
                    }
                    *remaining -= n as u64;
                    buf = &buf[n..];
                    if *remaining == 0 {
                        self.filter = FilterState::Header(Vec::new());
                    }
                }
            }
        }
    }
}

/// (header length, payload length) once enough of the header is known.
fn frame_header_len(h: &[u8]) -> Option<(usize, u64)> {
    if h.len() < 2 {
        return None;
    }
    let masked = h[1] & 0x80 != 0;
    let l7 = h[1] & 0x7f;
    let ext = match l7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    if h.len() < 2 + ext {
        return None;
    }
    let plen = match l7 {
        126 => u16::from_be_bytes([h[2], h[3]]) as u64,
        127 => u64::from_be_bytes(h[2..10].try_into().unwrap()),
        n => n as u64,
    };
    Some((2 + ext + if masked { 4 } else { 0 }, plen))
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = buf.len().min(self.pending.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        match &mut self.inner {
            Inner::Plain(s) => s.read(buf),
            Inner::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.filtering {
            self.feed(buf);
        } else {
            self.out.extend_from_slice(buf);
        }
        match self.drain() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        match &mut self.inner {
            Inner::Plain(s) => s.flush(),
            Inner::Tls(s) => s.flush(),
        }
    }
}
