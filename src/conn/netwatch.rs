//! Network change notifications from rtnetlink: a link coming up, an address
//! or a default route appearing means "the network may be back", so a
//! disconnected daemon retries at once instead of sleeping out its back-off
//! (a modem or Wi-Fi reconnect is otherwise noticed up to 60 s late).
//!
//! One small thread blocks on a `NETLINK_ROUTE` socket subscribed to the
//! link, address and route groups; the decoding is a pure function.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::sys::poll::{PollFd, poll};
use crate::sys::wake::Wake;
use crate::sys::{netlink, socket};

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

/// The watching thread; stop it with [`NetWatch::stop`].
#[derive(Debug)]
pub struct NetWatch {
    stop: Arc<Wake>,
    join: JoinHandle<()>,
}

impl NetWatch {
    /// Ends the thread and waits for it (it only waits in `poll`).
    pub fn stop(self) {
        self.stop.wake();
        crate::threads::join_within(self.join, Duration::from_secs(1));
    }
}

/// Opens the subscription (so a failure is reported to the caller) and
/// starts the thread that sends `()` on `events` for every datagram that
/// [`gained`] accepts. The thread ends when `events` is disconnected or on
/// [`NetWatch::stop`].
pub fn start(events: Sender<()>) -> io::Result<NetWatch> {
    let sock = netlink::route_socket(GROUPS)?;
    let stop = Arc::new(Wake::new()?);
    let thread_stop = Arc::clone(&stop);
    let join = crate::threads::spawn("netlink".to_string(), 64 * 1024, move || {
        watch(&sock, &thread_stop, &events)
    })?;
    Ok(NetWatch { stop, join })
}

fn watch(sock: &OwnedFd, stop: &Wake, events: &Sender<()>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut fds = [
            PollFd::new(sock.as_raw_fd(), libc::POLLIN),
            PollFd::new(stop.as_raw_fd(), libc::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, -1) {
            log::warn!("rtnetlink: poll: {e}; network changes are no longer watched");
            return;
        }
        if fds[1].revents() != 0 {
            return;
        }
        match socket::recv(sock, &mut buf, libc::MSG_DONTWAIT) {
            Ok(n) => {
                if gained(&buf[..n]) && !notify(events) {
                    return;
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN) => {}
                // the kernel dropped notifications: something changed
                Some(libc::ENOBUFS) => {
                    if !notify(events) {
                        return;
                    }
                }
                _ => {
                    log::warn!("rtnetlink: {e}; network changes are no longer watched");
                    return;
                }
            },
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
