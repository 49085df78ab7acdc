//! What a test can observe of the stand-in server: upgrade requests, data
//! messages, and the ordered event feed of [`Server::subscribe`](super::Server::subscribe).

use crossbeam_channel::Sender;
use mender_connect::wire::codec::{self, DecodeError, ProtoMsg};
use std::sync::{Arc, Mutex};

/// One upgrade request as the server saw it (rejected ones included).
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// Request path (without query).
    pub path: String,
    /// Full request target as sent (path and query).
    pub uri: String,
    /// Headers in wire order; names lower-case.
    pub headers: Vec<(String, String)>,
    /// Status the stand-in answered: 101, 404 (wrong path) or the reject status.
    pub status: u16,
}

impl UpgradeRequest {
    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One data message received from the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// True for a text message (opcode 1), false for binary (opcode 2).
    pub text: bool,
    /// The payload.
    pub data: Vec<u8>,
}

impl Frame {
    /// The payload decoded as a ProtoMsg.
    pub fn decoded(&self) -> Result<ProtoMsg, DecodeError> {
        codec::decode(&self.data)
    }
}

/// What happened on the server, in order, for [`Server::subscribe`](super::Server::subscribe).
#[derive(Debug, Clone)]
pub enum Event {
    /// An upgrade request was answered (`status` 101 = connection `conn`).
    Upgrade {
        /// Index of the connection (only meaningful for 101).
        conn: Option<usize>,
        /// The request.
        request: UpgradeRequest,
    },
    /// A data message from the device.
    Frame {
        /// Connection index.
        conn: usize,
        /// The message.
        frame: Frame,
    },
    /// A ping from the device.
    Ping {
        /// Connection index.
        conn: usize,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A pong from the device.
    Pong {
        /// Connection index.
        conn: usize,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A close frame from the device.
    Close {
        /// Connection index.
        conn: usize,
        /// Code (1005 when the frame had none) and reason.
        code: u16,
        /// Reason text.
        reason: String,
    },
    /// The connection is gone (TCP closed).
    Closed {
        /// Connection index.
        conn: usize,
        /// Why, when it ended with an error.
        error: Option<String>,
    },
}

pub(super) type Subscribers = Arc<Mutex<Vec<Sender<Event>>>>;

pub(super) fn publish(subs: &Subscribers, ev: Event) {
    subs.lock().unwrap().retain(|s| s.send(ev.clone()).is_ok());
}
