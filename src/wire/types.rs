//! Message type names and status values, by protocol (protocol.md §2–6),
//! so matches and replies name them instead of repeating string literals.

/// The `status` property (shell and mender-client replies): 1, 2 or 3.
pub mod status {
    /// Success, or terminal output.
    pub const NORMAL: i64 = 1;
    /// Failure; the body is the error text.
    pub const ERROR: i64 = 2;
    /// A control message inside the protocol (the shell's ping).
    pub const CONTROL: i64 = 3;
}

/// Control protocol (0xFFFF) message types.
pub mod control {
    /// Handshake request (server → device).
    pub const OPEN: &str = "open";
    /// Handshake reply.
    pub const ACCEPT: &str = "accept";
    /// End the session.
    pub const CLOSE: &str = "close";
    /// Error report, optionally ending the session.
    pub const ERROR: &str = "error";
    /// Idle keep-alive request.
    pub const PING: &str = "ping";
    /// Idle keep-alive reply.
    pub const PONG: &str = "pong";
}

/// Remote terminal (proto 1) message types.
pub mod shell {
    /// Start a shell.
    pub const NEW: &str = "new";
    /// Keystrokes in, terminal output out.
    pub const SHELL: &str = "shell";
    /// New terminal size.
    pub const RESIZE: &str = "resize";
    /// End the shell.
    pub const STOP: &str = "stop";
    /// Health check (device → server).
    pub const PING: &str = "ping";
    /// Health-check reply.
    pub const PONG: &str = "pong";
}

/// File transfer (proto 2) message types.
pub mod filetransfer {
    /// Download request.
    pub const GET_FILE: &str = "get_file";
    /// Upload request.
    pub const PUT_FILE: &str = "put_file";
    /// Metadata request.
    pub const STAT: &str = "stat";
    /// Metadata reply.
    pub const FILE_INFO: &str = "file_info";
    /// A piece of file content (an empty one ends the file).
    pub const FILE_CHUNK: &str = "file_chunk";
    /// Flow control: the receiver has this much.
    pub const ACK: &str = "ack";
    /// Failure; the body is the error.
    pub const ERROR: &str = "error";
}

/// Port forward (proto 3) message types.
pub mod portforward {
    /// Open a connection to a target.
    pub const NEW: &str = "new";
    /// Bytes for the other side.
    pub const FORWARD: &str = "forward";
    /// Flow control: one forward received.
    pub const ACK: &str = "ack";
    /// Close the connection.
    pub const STOP: &str = "stop";
    /// Failure; the body is the error.
    pub const ERROR: &str = "error";

    /// Transport of a forwarded connection (a `new`'s `protocol`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Net {
        /// A TCP stream.
        Tcp,
        /// A connected UDP socket: one `forward` body is one datagram.
        Udp,
    }

    impl Net {
        /// `tcp` / `udp` (the wire name and Go's network name).
        pub fn name(self) -> &'static str {
            match self {
                Net::Tcp => "tcp",
                Net::Udp => "udp",
            }
        }
    }
}

/// Mender-client triggers (proto 4) message types.
pub mod menderclient {
    /// Check for an update now.
    pub const CHECK_UPDATE: &str = "check-update";
    /// Send the inventory now.
    pub const SEND_INVENTORY: &str = "send-inventory";
}
