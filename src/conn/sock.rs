//! The TCP socket under the websocket (and under TLS). Once the link runs
//! non-blocking:
//! - Small reads are served from one larger read ahead. Over TLS, OpenSSL
//!   asks for a record's 5-byte header, then its body, and both asks are
//!   met in full, so a 4 KiB `forward` took three `read(2)`s (the third to
//!   learn that nothing was left); now it takes one. tungstenite's own asks
//!   vary with the spare room in its buffer and are often small too.
//! - It skips the `read(2)` that could only say EAGAIN: a read that returned
//!   less than asked emptied the kernel's buffer, and the connection
//!   thread's next read (it reads until WouldBlock) would find nothing.
//!   Anything that arrives meanwhile makes the level-triggered `poll(2)`
//!   return at once, so nothing waits.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// Reads smaller than this go through the read-ahead buffer (allocated at
/// the first one, kept for the link): a `forward` and its frame headers fit.
const AHEAD: usize = 8 * 1024;

/// A TCP stream that reads ahead and remembers when a read drained it.
#[derive(Debug)]
pub struct Sock {
    tcp: TcpStream,
    nonblocking: bool,
    drained: bool,
    /// Bytes read and not yet asked for: `ahead[lo..hi]`.
    ahead: Vec<u8>,
    lo: usize,
    hi: usize,
}

impl Sock {
    /// Wraps a connected (still blocking) stream.
    pub fn new(tcp: TcpStream) -> Sock {
        Sock {
            tcp,
            nonblocking: false,
            drained: false,
            ahead: Vec::new(),
            lo: 0,
            hi: 0,
        }
    }

    /// The stream itself.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Switches to non-blocking mode, where reads go ahead and a drained
    /// read is remembered.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(on)?;
        self.nonblocking = on;
        self.drained = false;
        Ok(())
    }

    /// One `read(2)` into `buf`; notes whether it emptied the kernel's buffer.
    fn read_kernel(tcp: &mut TcpStream, buf: &mut [u8], drained: &mut bool) -> io::Result<usize> {
        let n = tcp.read(buf)?;
        *drained = n > 0 && n < buf.len();
        Ok(n)
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.lo < self.hi {
            let n = (self.hi - self.lo).min(buf.len());
            buf[..n].copy_from_slice(&self.ahead[self.lo..self.lo + n]);
            self.lo += n;
            return Ok(n);
        }
        if !self.nonblocking {
            return self.tcp.read(buf);
        }
        if std::mem::take(&mut self.drained) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if buf.len() >= AHEAD {
            return Self::read_kernel(&mut self.tcp, buf, &mut self.drained);
        }
        if self.ahead.is_empty() {
            self.ahead = vec![0; AHEAD];
        }
        let got = Self::read_kernel(&mut self.tcp, &mut self.ahead, &mut self.drained)?;
        let n = got.min(buf.len());
        buf[..n].copy_from_slice(&self.ahead[..n]);
        (self.lo, self.hi) = (n, got);
        Ok(n)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Waits (bounded) until bytes the peer wrote can be read.
    fn wait_readable(sock: &Sock) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(sock.tcp());
        let r = crate::sys::poll::poll_one(fd, libc::POLLIN, 5000).expect("poll");
        assert_ne!(r & libc::POLLIN, 0, "nothing to read within 5 s");
    }

    fn pair() -> (Sock, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (Sock::new(c), s)
    }

    #[test]
    fn after_a_short_read_the_next_says_wouldblock_once_then_reads_again() {
        let (mut sock, mut peer) = pair();
        sock.set_nonblocking(true).expect("nonblocking");
        peer.write_all(b"abc").expect("write");
        let mut buf = [0u8; 16];
        wait_readable(&sock);
        assert_eq!(sock.read(&mut buf).expect("read"), 3);
        peer.write_all(b"de").expect("write");
        // drained by the short read: no syscall, WouldBlock
        let e = sock.read(&mut buf).expect_err("skipped");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // what came meanwhile is read on the next call (poll reports it)
        wait_readable(&sock);
        assert_eq!(sock.read(&mut buf).expect("read"), 2);
        assert_eq!(&buf[..2], b"de");
    }

    #[test]
    fn a_blocking_socket_never_fakes_wouldblock() {
        let (mut sock, mut peer) = pair();
        peer.write_all(b"abc").expect("write");
        let mut buf = [0u8; 16];
        assert_eq!(sock.read(&mut buf).expect("read"), 3);
        peer.write_all(b"d").expect("write");
        assert_eq!(sock.read(&mut buf).expect("read"), 1);
    }

    #[test]
    fn small_reads_are_served_in_order_from_one_kernel_read() {
        let (mut sock, mut peer) = pair();
        sock.set_nonblocking(true).expect("nonblocking");
        let sent: Vec<u8> = (0..100u8).collect();
        peer.write_all(&sent).expect("write");
        wait_readable(&sock);
        let mut buf = [0u8; 7];
        let mut got = Vec::new();
        let n = sock.read(&mut buf).expect("first read");
        got.extend_from_slice(&buf[..n]);
        // more arrives now; the first read(2) took all 100 bytes and found
        // the kernel's buffer empty, so they come out without the "z"
        peer.write_all(b"z").expect("write");
        wait_readable(&sock);
        loop {
            match sock.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        assert_eq!(got, sent);
        assert_eq!(sock.read(&mut buf).expect("read"), 1);
        assert_eq!(buf[0], b'z');
    }

    #[test]
    fn bytes_read_ahead_are_still_served_after_switching_to_blocking() {
        let (mut sock, mut peer) = pair();
        sock.set_nonblocking(true).expect("nonblocking");
        peer.write_all(b"abcdef").expect("write");
        wait_readable(&sock);
        let mut buf = [0u8; 2];
        assert_eq!(sock.read(&mut buf).expect("read"), 2);
        sock.set_nonblocking(false).expect("blocking");
        let mut rest = [0u8; 8];
        assert_eq!(sock.read(&mut rest).expect("read"), 4);
        assert_eq!(&rest[..4], b"cdef");
    }

    #[test]
    fn a_read_ahead_that_fills_its_buffer_does_not_count_as_drained() {
        let (mut sock, mut peer) = pair();
        sock.set_nonblocking(true).expect("nonblocking");
        let sent = vec![7u8; 3 * AHEAD];
        peer.write_all(&sent).expect("write");
        // on loopback the write lands in our receive queue before it returns
        wait_readable(&sock);
        // small reads drain the buffer: its read(2) was full, so the next
        // read asks the kernel again instead of saying WouldBlock
        let mut buf = [0u8; 100];
        let mut got = 0;
        while got < AHEAD {
            got += sock
                .read(&mut buf[..(AHEAD - got).min(100)])
                .expect("ahead");
        }
        assert!(sock.read(&mut buf).expect("next read(2)") > 0);
    }
}
