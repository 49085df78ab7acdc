//! Why a file-transfer request or transfer failed. `Display` is the exact
//! `err` text of the `error` reply (most of them upstream's, asserted byte
//! for byte by Mender's suite), so a variant is chosen where the failure is
//! found and turned into text only on the wire and in the logs.

use std::fmt;
use std::io;

use crate::limits::bucket::LimitError;
use crate::limits::policy::{ConfigIssue, Denial, PlanError};
use crate::sys::errno::go_text;

/// A file-transfer failure, worded as the server is told.
#[derive(Debug)]
pub enum FtError {
    /// The request body did not decode (the decoder's detail).
    Malformed(String),
    /// `path` absent, nil or empty.
    PathBlank,
    /// `path` not absolute.
    PathRelative,
    /// A NUL byte in the named field (`path` or `src_path`).
    PathNul(&'static str),
    /// Refused by a Limits rule.
    Denied(Denial),
    /// The shared rate limit refused (at the start of a transfer, or a
    /// download's wait grew too long).
    Limit(LimitError),
    /// `stat` of the requested path failed.
    Stat {
        /// The path as shown.
        path: String,
        /// The OS error.
        err: io::Error,
    },
    /// Opening a download failed.
    OpenRead {
        /// The path as shown.
        path: String,
        /// The OS error.
        err: io::Error,
    },
    /// One transfer per session.
    Busy,
    /// The transfer thread could not start (`download` / `upload`).
    Spawn {
        /// Which transfer.
        what: &'static str,
        /// Why.
        err: io::Error,
    },
    /// Reading a download failed mid-way.
    ReadChunk {
        /// The path as shown.
        path: String,
        /// The OS error.
        err: io::Error,
    },
    /// An ack for bytes never sent, or fewer than acknowledged before.
    AckOffset {
        /// The offset the server sent.
        offset: i64,
        /// Bytes sent so far.
        sent: u64,
        /// Bytes acknowledged so far.
        acked: u64,
    },
    /// An ack's offset is not int64.
    AckOffsetType,
    /// An ack without offset.
    AckOffsetBlank,
    /// Anything but an ack during a download (the type).
    UnexpectedInDownload(String),
    /// Anything but a chunk during an upload (the type).
    UnexpectedInUpload(String),
    /// An upload chunk without int64 offset.
    ChunkOffsetMissing,
    /// An upload chunk not at the end of what was written.
    ChunkOffset,
    /// An upload grew past `MaxFileSize` (upstream's text names the rate limit).
    UploadTooLarge,
    /// The rate limit ended an upload.
    WriteLimit(LimitError),
    /// Writing an upload chunk failed.
    WriteChunk(io::Error),
    /// The upload's target is a directory.
    TargetIsDir,
    /// The upload's target exists and is not a regular file.
    TargetIrregular,
    /// The upload's (temp) file could not be created.
    Create {
        /// The name as shown.
        name: String,
        /// The OS error.
        err: io::Error,
    },
    /// Looking at the upload's location failed.
    CheckLocation {
        /// The path as shown.
        path: String,
        /// The OS error.
        err: io::Error,
    },
    /// `Umask` is broken.
    ModeConfig(ConfigIssue),
    /// `OwnerPut` / `GroupPut` is broken.
    OwnerConfig(ConfigIssue),
    /// fsync of the temp file failed.
    Fsync {
        /// The temp name as shown.
        tmp: String,
        /// The OS error.
        err: io::Error,
    },
    /// fchown of the temp file failed.
    Chown {
        /// The temp name as shown.
        tmp: String,
        /// The OS error.
        err: io::Error,
    },
    /// fchmod of the temp file failed.
    Chmod {
        /// The temp name as shown.
        tmp: String,
        /// The OS error.
        err: io::Error,
    },
    /// Renaming the temp file to the target failed.
    Rename {
        /// The temp name as shown.
        tmp: String,
        /// The target as shown.
        path: String,
        /// The OS error.
        err: io::Error,
    },
    /// An ack, chunk or error while no transfer runs.
    NotInProgress,
    /// A message of a running transfer over `MAX_MESSAGE_BODY`.
    ChunkTooLarge,
    /// The peer ignores the window.
    QueueFull,
    /// A message type protocol 2 does not know.
    Unsupported(String),
}

impl fmt::Display for FtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FtError::*;
        match self {
            Malformed(detail) => write!(f, "malformed request parameters: {detail}"),
            PathBlank => f.write_str("invalid request parameters: path: cannot be blank."),
            PathRelative => f.write_str("invalid request parameters: path: must be absolute"),
            PathNul(field) => write!(
                f,
                "invalid request parameters: {field}: must not contain a NUL byte."
            ),
            Denied(d) => write!(f, "access denied: {d}"),
            Limit(e) => write!(f, "{e}"),
            Stat { path, err } => write!(
                f,
                "failed to get file info from path '{path}': stat {path}: {}",
                go_text(err)
            ),
            OpenRead { path, err } => write!(
                f,
                "failed to open file for reading: open {path}: {}",
                go_text(err)
            ),
            Busy => f.write_str("another file transfer is in progress"),
            Spawn { what, err } => write!(f, "failed to start the {what}: {err}"),
            ReadChunk { path, err } => write!(
                f,
                "failed to copy file chunk to session: read {path}: {}",
                go_text(err)
            ),
            AckOffset {
                offset,
                sent,
                acked,
            } => write!(
                f,
                "invalid ack offset {offset}: {sent} bytes sent, {acked} acknowledged"
            ),
            AckOffsetType => f.write_str("invalid offset data type: require int64"),
            AckOffsetBlank => f.write_str("ack message: offset property cannot be blank"),
            UnexpectedInDownload(t) => {
                write!(f, "received unexpected message type '{t}'; expected 'ack'")
            }
            UnexpectedInUpload(t) => {
                write!(
                    f,
                    "received unexpected message type '{t}' during file upload"
                )
            }
            ChunkOffsetMissing => {
                f.write_str("invalid file chunk message: missing offset property")
            }
            ChunkOffset => f.write_str("received unexpected chunk offset"),
            UploadTooLarge => {
                f.write_str("failed to write file chunk: transmitted bytes limit exhausted")
            }
            WriteLimit(e) => write!(f, "failed to write file chunk: {e}"),
            WriteChunk(e) => write!(f, "failed to write file chunk: {}", go_text(e)),
            TargetIsDir => f.write_str("conflicting file path: cannot overwrite directory"),
            TargetIrregular => {
                f.write_str("conflicting file path: cannot overwrite irregular file")
            }
            Create { name, err } => write!(
                f,
                "failed to create target file: failed to create file: open {name}: {}",
                go_text(err)
            ),
            CheckLocation { path, err } => write!(
                f,
                "error checking file location: lstat {path}: {}",
                go_text(err)
            ),
            ModeConfig(issue) => write!(f, "failed to preserve file mode: {issue}"),
            OwnerConfig(issue) => write!(f, "failed to preserve file owner/group: {issue}"),
            Fsync { tmp, err } => write!(
                f,
                "failed to commit uploaded file: fsync {tmp}: {}",
                go_text(err)
            ),
            Chown { tmp, err } => {
                write!(f, "failed to set file owner: chown {tmp}: {}", go_text(err))
            }
            Chmod { tmp, err } => write!(
                f,
                "failed to set file permissions: chmod {tmp}: {}",
                go_text(err)
            ),
            Rename { tmp, path, err } => write!(
                f,
                "failed to commit uploaded file: rename {tmp} {path}: {}",
                go_text(err)
            ),
            NotInProgress => f.write_str("no file transfer in progress"),
            ChunkTooLarge => f.write_str("file chunk too large"),
            QueueFull => f.write_str("too many file transfer messages queued"),
            Unsupported(t) => write!(f, "session: filetransfer message type '{t}' not supported"),
        }
    }
}

impl std::error::Error for FtError {}

impl FtError {
    /// The `code` of a `get_file` refused before it started: 403 when the
    /// limits refused it (MEN-4659: a denial is not 500 "internal error").
    pub fn download_code(&self) -> Option<u16> {
        match self {
            FtError::Denied(_) | FtError::Limit(_) => Some(super::wire::CODE_FORBIDDEN),
            _ => None,
        }
    }
}

impl From<Denial> for FtError {
    fn from(d: Denial) -> FtError {
        FtError::Denied(d)
    }
}

impl From<PlanError> for FtError {
    fn from(e: PlanError) -> FtError {
        match e {
            PlanError::Denied(d) => FtError::Denied(d),
            PlanError::Mode(issue) => FtError::ModeConfig(issue),
            PlanError::Owner(issue) => FtError::OwnerConfig(issue),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_upstreams_byte_for_byte() {
        let enoent = || io::Error::from_raw_os_error(libc::ENOENT);
        let cases: Vec<(FtError, &str)> = vec![
            (
                FtError::Denied(Denial::Outside),
                "access denied: the target file path is outside chroot",
            ),
            (
                FtError::Limit(LimitError::Exhausted),
                "transmitted bytes limit exhausted",
            ),
            (
                FtError::WriteLimit(LimitError::Exhausted),
                "failed to write file chunk: transmitted bytes limit exhausted",
            ),
            (
                FtError::UploadTooLarge,
                "failed to write file chunk: transmitted bytes limit exhausted",
            ),
            (
                FtError::Stat {
                    path: "/x".into(),
                    err: enoent(),
                },
                "failed to get file info from path '/x': stat /x: no such file or directory",
            ),
            (
                FtError::PathNul("src_path"),
                "invalid request parameters: src_path: must not contain a NUL byte.",
            ),
            (
                FtError::ModeConfig(ConfigIssue::Umask("9x".into())),
                "failed to preserve file mode: invalid Umask \"9x\": not an octal number",
            ),
            (
                FtError::OwnerConfig(ConfigIssue::UnknownName {
                    key: "OwnerPut",
                    name: "nobody-x".into(),
                }),
                "failed to preserve file owner/group: OwnerPut \"nobody-x\" is unknown",
            ),
            (
                FtError::AckOffset {
                    offset: -1,
                    sent: 4096,
                    acked: 0,
                },
                "invalid ack offset -1: 4096 bytes sent, 0 acknowledged",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn only_refusals_by_the_limits_carry_403() {
        assert_eq!(FtError::Denied(Denial::Link).download_code(), Some(403));
        assert_eq!(
            FtError::Limit(LimitError::Exhausted).download_code(),
            Some(403)
        );
        assert_eq!(FtError::Busy.download_code(), None);
    }
}
