//! OS error texts as Go prints them, because they reach the server and the
//! journal verbatim: lower-case strerror, no Rust " (os error N)" suffix.

use std::ffi::CStr;
use std::io;

/// An OS error as Go prints it (`no such file or directory`); a timeout
/// without an errno is Go's `i/o timeout`. The one copy for every module.
pub fn go_text(e: &io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        if e.kind() == io::ErrorKind::TimedOut {
            return "i/o timeout".to_string();
        }
        return lower_first(&e.to_string());
    };
    // SAFETY: strerror returns a pointer to a NUL-terminated static or
    // thread-local string; it is copied out at once.
    let text = unsafe { CStr::from_ptr(libc::strerror(code)) }
        .to_string_lossy()
        .into_owned();
    if text.is_empty() {
        return format!("errno {code}");
    }
    lower_first(&text)
}

/// A signal's name as Go's `exec.ExitError` prints it (`killed`).
pub fn signal_text(sig: libc::c_int) -> String {
    // SAFETY: strsignal returns a static or thread-local string, copied out
    // at once.
    unsafe {
        let p = libc::strsignal(sig);
        if p.is_null() {
            format!("signal {sig}")
        } else {
            CStr::from_ptr(p).to_string_lossy().to_ascii_lowercase()
        }
    }
}

/// The daemon never calls `setlocale`, so libc's texts are the C locale's
/// ASCII (as Go's are): ASCII case rules suffice, and spare the binary
/// Unicode's case tables.
fn lower_first(s: &str) -> String {
    let mut out = s.to_string();
    if let Some(first) = out.get_mut(..1) {
        first.make_ascii_lowercase();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_texts_are_gos() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(go_text(&e), "no such file or directory");
        let e = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(go_text(&e), "permission denied");
        let e = io::Error::new(io::ErrorKind::TimedOut, "x");
        assert_eq!(go_text(&e), "i/o timeout");
        let e = io::Error::other("Bad thing");
        assert_eq!(go_text(&e), "bad thing");
    }

    #[test]
    fn signal_names_are_lower_case() {
        assert_eq!(signal_text(libc::SIGKILL), "killed");
    }
}
