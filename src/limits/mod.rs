//! Byte-rate limiting and path containment shared by the file-transfer sessions.
