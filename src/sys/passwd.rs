//! The user and group databases (`getpwnam_r`, `getgrnam_r`,
//! `getgrouplist`), each looked up in one place for the configuration's
//! `User` and the file-transfer limits' owner and group names.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// Largest buffer a lookup grows to on ERANGE.
const MAX_BUF: usize = 1 << 20;

/// A passwd entry, as far as the daemon needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Passwd {
    /// Numeric user id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
    /// Home directory (empty when passwd has none).
    pub home: PathBuf,
}

/// Runs a reentrant passwd/group lookup with a buffer that doubles while
/// the call says ERANGE (up to `MAX_BUF`). `call` returns the lookup's
/// result, or its nonzero return code.
fn with_buffer<T>(
    mut call: impl FnMut(&mut [libc::c_char]) -> Result<Option<T>, libc::c_int>,
) -> io::Result<Option<T>> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        match call(&mut buf) {
            Err(libc::ERANGE) if buf.len() < MAX_BUF => {
                let grown = buf.len() * 2;
                buf.resize(grown, 0);
            }
            Err(rc) => return Err(io::Error::from_raw_os_error(rc)),
            Ok(found) => return Ok(found),
        }
    }
}

/// Looks `name` up in passwd: `Ok(None)` when there is no such user (a
/// name with a NUL byte cannot be in passwd), `Err` when the lookup failed.
pub fn user_by_name(name: &str) -> io::Result<Option<Passwd>> {
    let Ok(c) = CString::new(name) else {
        return Ok(None);
    };
    with_buffer(|buf| {
        // SAFETY: passwd is plain old data; zeroed is a valid initial state.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut res: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; buf.len() is its size.
        let rc = unsafe {
            libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut res)
        };
        if rc != 0 {
            return Err(rc);
        }
        if res.is_null() {
            return Ok(None);
        }
        let home = if pwd.pw_dir.is_null() {
            PathBuf::new()
        } else {
            // SAFETY: pw_dir points into buf, NUL-terminated by getpwnam_r,
            // and is copied out before buf goes.
            let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
            PathBuf::from(std::ffi::OsString::from_vec(dir.to_bytes().to_vec()))
        };
        Ok(Some(Passwd {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home,
        }))
    })
}

/// The gid of group `name`: `Ok(None)` when there is no such group.
pub fn group_by_name(name: &str) -> io::Result<Option<libc::gid_t>> {
    let Ok(c) = CString::new(name) else {
        return Ok(None);
    };
    with_buffer(|buf| {
        // SAFETY: group is plain old data; zeroed is a valid initial state.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut res: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; buf.len() is its size.
        let rc = unsafe {
            libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut res)
        };
        if rc != 0 {
            return Err(rc);
        }
        Ok((!res.is_null()).then_some(grp.gr_gid))
    })
}

/// Every group of user `name` whose primary group is `gid` (`getgrouplist`,
/// growing the list until it fits); just `gid` when that fails.
pub fn group_list(name: &str, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let Ok(c) = CString::new(name) else {
        return vec![gid];
    };
    let mut cap: libc::c_int = 32;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; cap as usize];
        let mut n = cap;
        // SAFETY: groups holds `n` entries; c is NUL-terminated.
        let rc = unsafe { libc::getgrouplist(c.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if cap >= 65536 {
            return vec![gid];
        }
        cap = if n > cap { n } else { cap * 2 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_and_unknown_names_are_none_not_errors() {
        let root = user_by_name("root").expect("lookup").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(group_by_name("root").expect("lookup"), Some(0));
        assert_eq!(user_by_name("no-such-user-xyz").expect("lookup"), None);
        assert_eq!(group_by_name("no-such-group-xyz").expect("lookup"), None);
        assert_eq!(user_by_name("ro\0ot").expect("nul"), None);
    }

    #[test]
    fn the_group_list_holds_the_primary_group() {
        assert!(group_list("root", 0).contains(&0));
        assert_eq!(group_list("no-such-user-xyz", 4242), vec![4242]);
    }
}
