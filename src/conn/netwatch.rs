//! Network change notifications from rtnetlink: a link coming up, an address
//! or a default route appearing means "the network may be back", so a
//! disconnected daemon retries at once instead of sleeping out its back-off
//! (a modem or Wi-Fi reconnect is otherwise noticed up to 60 s late).
//!
//! One small thread blocks on a `NETLINK_ROUTE` socket subscribed to the
//! link, address and route groups; the decoding is a pure function.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crossbeam_channel::Sender;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_HDRLEN: usize = 16;
/// `RT_SCOPE_HOST`: addresses such as 127.0.0.1 on `lo`.
const SCOPE_HOST: u8 = 254;
/// `RT_TABLE_MAIN`.
const TABLE_MAIN: u8 = 254;
const IFF_UP: u32 = 0x1;
const IFF_LOOPBACK: u32 = 0x8;
const IFF_RUNNING: u32 = 0x40;
const GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_ROUTE) as u32;

/// Whether the datagram `buf` from rtnetlink reports connectivity gained: a
/// non-loopback link up and running, a non-host-scope address added, or a
/// default route added to the main table. Malformed input is ignored.
pub fn gained(buf: &[u8]) -> bool {
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return false;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let body = &rest[NLMSG_HDRLEN..len];
        let hit = match kind {
            // ifinfomsg: family, pad, type(2), index(4), flags(4) @8
            RTM_NEWLINK if body.len() >= 12 => {
                let flags = u32::from_ne_bytes([body[8], body[9], body[10], body[11]]);
                flags & (IFF_UP | IFF_RUNNING) == (IFF_UP | IFF_RUNNING)
                    && flags & IFF_LOOPBACK == 0
            }
            // ifaddrmsg: family, prefixlen, flags, scope @3
            RTM_NEWADDR if body.len() >= 4 => body[3] != SCOPE_HOST,
            // rtmsg: family, dst_len @1, src_len, tos, table @4
            RTM_NEWROUTE if body.len() >= 5 => body[1] == 0 && body[4] == TABLE_MAIN,
            _ => false,
        };
        if hit {
            return true;
        }
        let aligned = (len + 3) & !3;
        rest = rest.get(aligned..).unwrap_or(&[]);
    }
    false
}

/// Opens the subscription (so a failure is reported to the caller) and
/// starts the thread that sends `()` on `events` for every datagram that
/// [`gained`] accepts. The thread ends when `events` is disconnected.
pub fn start(events: Sender<()>) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = GROUPS;
    // SAFETY: addr is a valid sockaddr_nl of the size given.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    std::thread::Builder::new()
        .name("netlink".to_string())
        .stack_size(64 * 1024)
        .spawn(move || watch(&sock, &events))?;
    Ok(())
}

fn watch(sock: &OwnedFd, events: &Sender<()>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: recv into our buffer of the given length.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // the kernel dropped notifications: something changed
                Some(libc::ENOBUFS) => {
                    if !notify(events) {
                        return;
                    }
                    continue;
                }
                _ => {
                    log::warn!("rtnetlink: {e}; network changes are no longer watched");
                    return;
                }
            }
        }
        if gained(&buf[..n as usize]) && !notify(events) {
            return;
        }
    }
}

/// Tells the supervisor without waiting (one pending event is as good as
/// many); false once it is gone.
fn notify(events: &Sender<()>) -> bool {
    !matches!(
        events.try_send(()),
        Err(crossbeam_channel::TrySendError::Disconnected(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn link(flags: u32) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[8..12].copy_from_slice(&flags.to_ne_bytes());
        msg(RTM_NEWLINK, &b)
    }

    #[test]
    fn link_up_and_running_counts_but_down_or_loopback_does_not() {
        assert!(gained(&link(IFF_UP | IFF_RUNNING)));
        assert!(!gained(&link(IFF_UP)));
        assert!(!gained(&link(0)));
        assert!(!gained(&link(IFF_UP | IFF_RUNNING | IFF_LOOPBACK)));
    }

    #[test]
    fn new_addresses_count_unless_host_scoped() {
        assert!(gained(&msg(RTM_NEWADDR, &[2, 24, 0, 0, 1, 0, 0, 0])));
        assert!(!gained(&msg(
            RTM_NEWADDR,
            &[2, 8, 0, SCOPE_HOST, 1, 0, 0, 0]
        )));
        assert!(!gained(&msg(
            21, /* DELADDR */
            &[2, 24, 0, 0, 1, 0, 0, 0]
        )));
    }

    #[test]
    fn only_a_default_route_in_the_main_table_counts() {
        let route = |dst_len: u8, table: u8| {
            msg(
                RTM_NEWROUTE,
                &[2, dst_len, 0, 0, table, 0, 0, 1, 0, 0, 0, 0],
            )
        };
        assert!(gained(&route(0, TABLE_MAIN)));
        assert!(!gained(&route(24, TABLE_MAIN)));
        assert!(!gained(&route(0, 255 /* local */)));
    }

    #[test]
    fn any_matching_message_in_a_batch_counts_and_garbage_is_ignored() {
        let mut batch = link(0);
        batch.extend(msg(RTM_NEWADDR, &[10, 64, 0, 0, 2, 0, 0, 0]));
        assert!(gained(&batch));
        assert!(!gained(&[]));
        assert!(!gained(&[0xff; 7]));
        let mut bad = link(IFF_UP | IFF_RUNNING);
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes()); // longer than the datagram
        assert!(!gained(&bad));
        let mut tiny = link(IFF_UP | IFF_RUNNING);
        tiny[0..4].copy_from_slice(&3u32.to_ne_bytes()); // shorter than a header
        assert!(!gained(&tiny));
    }
}
