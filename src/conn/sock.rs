//! The TCP socket under the websocket (and under TLS). Once the link runs
//! non-blocking, it skips the `read(2)` that could only say EAGAIN: a read
//! that returned less than asked emptied the kernel's buffer, and the
//! connection thread's next read (it reads until WouldBlock) would find
//! nothing. Anything that arrives meanwhile makes the level-triggered
//! `poll(2)` return at once, so nothing waits. One syscall less per
//! inbound message.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// A TCP stream that remembers when a read drained it.
#[derive(Debug)]
pub struct Sock {
    tcp: TcpStream,
    nonblocking: bool,
    drained: bool,
}

impl Sock {
    /// Wraps a connected (still blocking) stream.
    pub fn new(tcp: TcpStream) -> Sock {
        Sock {
            tcp,
            nonblocking: false,
            drained: false,
        }
    }

    /// The stream itself.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Switches to non-blocking mode, where a drained read is remembered.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(on)?;
        self.nonblocking = on;
        self.drained = false;
        Ok(())
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if std::mem::take(&mut self.drained) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.tcp.read(buf)?;
        self.drained = self.nonblocking && n > 0 && n < buf.len();
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
    fn a_full_read_does_not_count_as_drained() {
        let (mut sock, mut peer) = pair();
        sock.set_nonblocking(true).expect("nonblocking");
        peer.write_all(b"abcd").expect("write");
        let mut buf = [0u8; 2];
        wait_readable(&sock);
        assert_eq!(sock.read(&mut buf).expect("read"), 2);
        assert_eq!(sock.read(&mut buf).expect("read"), 2);
    }
}
