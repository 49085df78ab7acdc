//! Why a link ended. `Display` is the text the supervisor logs
//! (`connection lost: …`, `eventLoop: error reconnecting: …`).

use std::fmt;
use std::io;
use std::time::Duration;

use tungstenite::protocol::CloseFrame;

use crate::conn::dial::DialError;

/// How a connection thread ended.
#[derive(Debug)]
pub enum LinkEnd {
    /// The supervisor asked it to stop (token or URL change, shutdown).
    Stopped,
    /// The dial failed; nothing was connected.
    Dial(DialError),
    /// The socket could not be made non-blocking.
    Setup(io::Error),
    /// The server sent a close frame.
    ClosedByServer(Option<CloseFrame>),
    /// Reading failed (transport gone, or a protocol violation).
    Read(tungstenite::Error),
    /// Writing a data frame or flushing failed.
    Write(tungstenite::Error),
    /// Writing the keepalive ping failed.
    Ping(tungstenite::Error),
    /// `poll` itself failed.
    Poll(io::Error),
    /// `poll` reported an error condition on the socket.
    SocketError,
    /// No ping or pong from the server for this long.
    Silent(Duration),
}

impl LinkEnd {
    /// The server refused the dial with HTTP 401: the token needs renewing.
    pub fn unauthorized(&self) -> bool {
        matches!(self, LinkEnd::Dial(DialError::Status(401)))
    }

    /// The text to log, `None` when the link was asked to stop.
    pub fn error_text(&self) -> Option<String> {
        match self {
            LinkEnd::Stopped => None,
            other => Some(other.to_string()),
        }
    }
}

impl fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkEnd::Stopped => f.write_str("stopped"),
            LinkEnd::Dial(e) => write!(f, "{e}"),
            LinkEnd::Setup(e) => write!(f, "socket setup: {e}"),
            LinkEnd::ClosedByServer(Some(c)) => {
                write!(f, "closed by the server: {} {}", c.code, c.reason)
            }
            LinkEnd::ClosedByServer(None) => f.write_str("closed by the server"),
            LinkEnd::Read(e) => write!(f, "read: {e}"),
            LinkEnd::Write(e) => write!(f, "write: {e}"),
            LinkEnd::Ping(e) => write!(f, "ping: {e}"),
            LinkEnd::Poll(e) => write!(f, "poll: {e}"),
            LinkEnd::SocketError => f.write_str("socket error"),
            LinkEnd::Silent(d) => write!(f, "no ping or pong from the server for {d:?}"),
        }
    }
}

impl std::error::Error for LinkEnd {}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::coding::CloseCode;

    #[test]
    fn texts_are_the_logged_ones() {
        let close = CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        };
        assert_eq!(
            LinkEnd::ClosedByServer(Some(close)).to_string(),
            "closed by the server: 1001 bye"
        );
        assert_eq!(
            LinkEnd::Silent(Duration::from_secs(60)).to_string(),
            "no ping or pong from the server for 60s"
        );
        assert_eq!(LinkEnd::Stopped.error_text(), None);
        assert!(LinkEnd::Dial(DialError::Status(401)).unauthorized());
        assert!(!LinkEnd::Dial(DialError::Status(403)).unauthorized());
    }
}
