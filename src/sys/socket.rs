//! `recv(2)` with the flags std does not offer: a UDP datagram's real
//! length (port forward), a non-blocking read of a netlink socket.

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

/// Receives one datagram from `sock` into `buf` with `flags`; returns what
/// recv returned (with `MSG_TRUNC`, the datagram's full length).
pub fn recv(sock: &impl AsFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    let fd = sock.as_fd().as_raw_fd();
    // SAFETY: recv writes at most buf.len() bytes into buf, which we borrow
    // mutably; the fd is borrowed from a live socket for the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives one datagram from the connected socket `sock` into `buf`.
/// Returns the datagram's full length (`MSG_TRUNC`), which exceeds
/// `buf.len()` when the kernel had to cut it. UDP only: on a stream socket
/// `MSG_TRUNC` would discard the bytes.
pub fn recv_datagram(sock: &std::net::UdpSocket, buf: &mut [u8]) -> io::Result<usize> {
    recv(sock, buf, libc::MSG_TRUNC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn a_datagram_larger_than_the_buffer_reports_its_real_length() {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.connect(a.local_addr().expect("addr")).expect("connect");
        a.connect(b.local_addr().expect("addr")).expect("connect");
        b.send(&[7u8; 100]).expect("send");
        b.send(b"hi").expect("send");
        let mut buf = [0u8; 10];
        assert_eq!(recv_datagram(&a, &mut buf).expect("recv"), 100);
        assert_eq!(buf, [7u8; 10]);
        assert_eq!(recv_datagram(&a, &mut buf).expect("recv"), 2);
        assert_eq!(&buf[..2], b"hi");
    }
}
