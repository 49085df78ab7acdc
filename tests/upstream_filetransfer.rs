//! `mendersoftware/integration` `tests/tests/test_filetransfer.py`, one test
//! per upstream test and named after it, through the management stand-in's
//! REST API (deviceconnect's download/upload endpoints, with its error
//! mapping) to the real daemon. Upstream's device paths (`/etc/profile`,
//! `/tmp`, `/var/lib/mender/filetransfer`) become files in a temp dir with
//! the same shape; its `set_limits` (rewrite the config, restart the daemon)
//! is a daemon started with those limits.
//!
//! `test_upload_limits_err_max_bytes_per_minute_exceeded` waits two minutes
//! like upstream; it runs only with `UPSTREAM_RATE_LIMIT_TEST=1` (it passes:
//! a transfer cut by the limit spends a minute's budget, so the third upload
//! is refused at its start and the last one, two minutes on, is allowed).

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use testbed::http::{self, Response};
use testbed::management::DEVICES_PATH;
use testbed::{Managed, TempDir, default_config};

/// Per HTTP request (deviceconnect's own per-message deadline is 60 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// What upstream's /etc/profile has that its tests look for.
const PROFILE: &[u8] = b"# /etc/profile\nexport PATH\nPS1='\\u@\\h:\\w\\$ '\n";

/// The daemon behind the management stand-in (a type of this test's own, to
/// carry upstream's request helpers).
struct Bed(Managed);

impl std::ops::Deref for Bed {
    type Target = Managed;

    fn deref(&self) -> &Managed {
        &self.0
    }
}

/// The daemon with `Limits` = `limits` (none when `None`), connected.
fn bed(limits: Option<serde_json::Value>) -> Bed {
    let mut cfg: serde_json::Value = serde_json::from_str(&default_config()).expect("config");
    if let Some(l) = limits {
        cfg["Limits"] = l;
    }
    Bed(Managed::start(&cfg.to_string(), "device-token"))
}

/// [`bed`] with `Limits` enabled and `Limits.FileTransfer` = `file_transfer`.
fn limited(file_transfer: serde_json::Value) -> Bed {
    bed(Some(json!({
        "Enabled": true,
        "FileTransfer": file_transfer,
    })))
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Bed {
    fn device_path(&self, action: &str) -> String {
        format!("{DEVICES_PATH}{}/{action}", self.mgmt.device_id())
    }

    fn auth() -> Vec<(&'static str, String)> {
        vec![("Authorization", "Bearer user-token".to_string())]
    }

    /// Upstream's `download_file`.
    fn download(&self, path: &str) -> Response {
        let target = format!(
            "{}?path={}",
            self.device_path("download"),
            encode_query(path)
        );
        http::client_request(
            self.mgmt.url(),
            "GET",
            &target,
            &Self::auth(),
            b"",
            REQUEST_TIMEOUT,
        )
        .unwrap_or_else(|e| {
            self.daemon.dump_log();
            panic!("download {path}: {e}")
        })
    }

    /// Upstream's `upload_file` (parts path, mode, uid, gid, file).
    fn upload(&self, path: &str, data: &[u8], mode: &str, uid: &str, gid: &str) -> Response {
        self.try_upload(path, data, mode, uid, gid)
            .unwrap_or_else(|e| {
                self.daemon.dump_log();
                panic!("upload {path}: {e}")
            })
    }

    /// [`upload`](Self::upload), the transport error returned.
    fn try_upload(
        &self,
        path: &str,
        data: &[u8],
        mode: &str,
        uid: &str,
        gid: &str,
    ) -> std::io::Result<Response> {
        let name = path.rsplit('/').next().unwrap_or(path);
        let (ctype, body) = http::multipart(&[
            ("path", None, path.as_bytes()),
            ("mode", None, mode.as_bytes()),
            ("uid", None, uid.as_bytes()),
            ("gid", None, gid.as_bytes()),
            ("file", Some(name), data),
        ]);
        let mut headers = Self::auth();
        headers.push(("Content-Type", ctype));
        http::client_request(
            self.mgmt.url(),
            "PUT",
            &self.device_path("upload"),
            &headers,
            &body,
            REQUEST_TIMEOUT,
        )
    }

    /// Upstream's `upload_file` with its defaults (mode 600, uid 0, gid 0).
    fn upload_default(&self, path: &str, data: &[u8]) -> Response {
        self.upload(path, data, "600", "0", "0")
    }
}

/// Upstream's `assert_forbidden` without the MEN-4659 escape hatch: 403 and
/// the device's exact text.
fn assert_forbidden(r: &Response, message: &str) {
    assert_eq!(
        (r.status, r.error().as_str()),
        (403, message),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
}

/// A 400 whose error text contains `text`.
fn assert_bad_request(r: &Response, text: &str) {
    assert_eq!(r.status, 400, "{}", r.error());
    assert!(r.error().contains(text), "{}", r.error());
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Upstream's image: `/var/lib/mender` is a symlink (to /data/mender).
/// Returns `<base>/var/lib/mender/filetransfer` spelled through the link;
/// created only when `create`.
fn var_lib_mender_filetransfer(base: &TempDir, create: bool) -> String {
    std::fs::create_dir_all(base.join("data/mender")).expect("mkdir data");
    std::fs::create_dir_all(base.join("var/lib")).expect("mkdir var/lib");
    symlink("../../data/mender", base.join("var/lib/mender")).expect("ln");
    let chroot = base.join("var/lib/mender/filetransfer");
    if create {
        std::fs::create_dir_all(&chroot).expect("mkdir chroot");
    }
    s(&chroot)
}

/// A root-owned 0644 file with upstream's /etc/profile content.
fn profile(dir: &TempDir) -> String {
    std::fs::create_dir_all(dir.join("etc")).expect("mkdir etc");
    let p = dir.join("etc/profile");
    std::fs::write(&p, PROFILE).expect("write profile");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    s(&p)
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    testbed::random_bytes(n, seed)
}

// ---------------------------------------------------------------------------
// BaseTestFileTransferDownload

#[test]
fn test_download_ok() {
    let dir = TempDir::new("up-ft-dl");
    std::fs::create_dir_all(dir.join("etc/mender")).expect("mkdir");
    let path = dir.join("etc/mender/mender.conf");
    std::fs::write(&path, br#"{"ServerURL": "https://docker.mender.io"}"#).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let b = bed(None);
    let r = b.download(&s(&path));
    assert_eq!(r.status, 200, "{}", r.error());
    assert!(String::from_utf8_lossy(&r.body).contains("ServerURL"));
    assert_eq!(
        r.header("Content-Disposition"),
        Some("attachment; filename=\"mender.conf\"")
    );
    assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
    assert_eq!(r.header("X-Men-File-Gid"), Some("0"));
    assert_eq!(r.header("X-Men-File-Uid"), Some("0"));
    assert_eq!(r.header("X-Men-File-Mode"), Some("644"));
    assert_eq!(r.header("X-Men-File-Path"), Some(s(&path).as_str()));
    assert!(r.header("X-Men-File-Size").is_some_and(|v| !v.is_empty()));
}

#[test]
fn test_download_error_relative_path() {
    let b = bed(None);
    let r = b.download("relative/path");
    assert_bad_request(&r, "path: must be absolute");
}

#[test]
fn test_upload_error_no_such_file_or_directory() {
    assert!(!Path::new("/does/not/exist").exists());
    let b = bed(None);
    let r = b.download("/does/not/exist");
    assert_bad_request(&r, "/does/not/exist: no such file or directory");
}

#[test]
fn test_upload_and_download_ok() {
    let dir = TempDir::new("up-ft-rt");
    let data = random_bytes(4 << 20, 11);
    let (uid, gid) = (137u32, 163u32);
    let path = s(&dir.join("qzkfmwpa"));
    let b = bed(None);
    let r = b.upload(&path, &data, "600", &uid.to_string(), &gid.to_string());
    assert_eq!(r.status, 201, "{}", r.error());
    let r = b.download(&path);
    assert_eq!(r.status, 200, "{}", r.error());
    assert_eq!(
        r.header("Content-Disposition"),
        Some("attachment; filename=\"qzkfmwpa\"")
    );
    assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
    assert_eq!(r.header("X-Men-File-Mode"), Some("600"));
    assert_eq!(r.header("X-Men-File-Uid"), Some(uid.to_string().as_str()));
    assert_eq!(r.header("X-Men-File-Gid"), Some(gid.to_string().as_str()));
    assert_eq!(r.header("X-Men-File-Path"), Some(path.as_str()));
    assert_eq!(r.header("X-Men-File-Size"), Some("4194304"));
    assert!(r.body == data, "downloaded bytes differ");
}

#[test]
fn test_upload_error_path_is_relative() {
    let b = bed(None);
    let r = b.upload_default("relative/path/dummy.txt", b"dummy");
    assert_bad_request(&r, "path: must be absolute");
}

#[test]
fn test_upload_error_file_does_not_exist() {
    assert!(!Path::new("/does/not/exist").exists());
    let b = bed(None);
    let r = b.upload_default("/does/not/exist/dummy.txt", b"dummy");
    assert_bad_request(&r, "failed to create target file");
    assert!(!Path::new("/does/not/exist").exists());
}

// ---------------------------------------------------------------------------
// BaseTestFileTransferLimits

#[test]
fn test_upload_limits_err_file_outside_chroot() {
    let base = TempDir::new("up-ft-chroot-out");
    // upstream starts the daemon, then creates the chroot
    let chroot = s(&base.join("var/lib/mender/filetransfer"));
    let b = limited(json!({"Chroot": chroot}));
    std::fs::create_dir_all(&chroot).expect("mkdir chroot");
    std::fs::create_dir_all(base.join("usr")).expect("mkdir usr");
    let target = base.join("usr/vbnmqwer");
    let r = b.upload_default(&s(&target), &random_bytes(4 << 20, 3));
    assert_eq!(r.status, 400, "{}", r.error());
    assert_eq!(
        r.error(),
        "access denied: the target file path is outside chroot"
    );
    assert!(!target.exists());
}

#[test]
fn test_upload_limits_ok() {
    let base = TempDir::new("up-ft-chroot-ok");
    let chroot = var_lib_mender_filetransfer(&base, false);
    let b = limited(json!({"Chroot": chroot, "FollowSymLinks": true}));
    // created after the daemon started, as upstream does
    std::fs::create_dir_all(&chroot).expect("mkdir chroot");
    let r = b.upload_default(&format!("{chroot}/plokijuh"), &random_bytes(16, 4));
    assert_eq!(r.status, 201, "{}", r.error());
    assert_eq!(
        std::fs::read(base.join("data/mender/filetransfer/plokijuh"))
            .expect("uploaded")
            .len(),
        16
    );
}

#[test]
fn test_upload_limits_err_file_too_big() {
    let dir = TempDir::new("up-ft-big");
    let b = limited(json!({"MaxFileSize": 15 * 1024, "FollowSymLinks": true}));
    let data = b"ok".repeat(128 * 1024);
    let target = dir.join("asdfghjk");
    let r = b.upload_default(&s(&target), &data);
    assert_eq!(r.status, 400, "{}", r.error());
    assert_eq!(
        r.error(),
        "failed to write file chunk: transmitted bytes limit exhausted"
    );
    assert!(!target.exists());
}

#[test]
fn test_upload_limits_err_max_bytes_per_minute_exceeded() {
    if std::env::var("UPSTREAM_RATE_LIMIT_TEST").as_deref() != Ok("1") {
        eprintln!("SKIPPED: takes over two minutes; UPSTREAM_RATE_LIMIT_TEST=1 runs it");
        return;
    }
    let dir = TempDir::new("up-ft-rate");
    let b = limited(json!({
        "FollowSymLinks": true,
        "Counters": {"MaxBytesRxPerMinute": 16 * 1024},
    }));
    let data = b"ok".repeat(256 * 1024);
    // upstream ignores the outcome of the first two
    for name in ["f-0.bin", "f-1.bin"] {
        let r = b.try_upload(&s(&dir.join(name)), &data, "600", "0", "0");
        eprintln!("{name}: {:?}", r.map(|r| (r.status, r.error())));
    }
    testbed::hold(Duration::from_secs(60));
    let r = b.upload_default(&s(&dir.join("f-2.bin")), &data);
    assert_eq!(r.status, 400, "{}", r.error());
    assert_eq!(r.error(), "transmitted bytes limit exhausted");
    testbed::hold(Duration::from_secs(64));
    let r = b.upload_default(&s(&dir.join("f-a.bin")), &b"ok".repeat(64));
    assert_eq!(r.status, 201, "{}", r.error());
}

#[test]
fn test_upload_limits_err_preserve_modes() {
    let base = TempDir::new("up-ft-suid");
    let chroot = var_lib_mender_filetransfer(&base, true);
    let b = limited(json!({"Chroot": chroot, "FollowSymLinks": true, "PreserveMode": true}));
    let target = format!("{chroot}/zxcvbnml.bin");
    let r = b.upload(&target, &random_bytes(16, 5), "4711", "0", "0");
    let ls = std::process::Command::new("ls")
        .args(["-al", &target])
        .output()
        .expect("ls");
    let modes_ls = String::from_utf8_lossy(&ls.stdout);
    assert!(modes_ls.starts_with("-rws--x--x"), "{modes_ls}");
    assert_eq!(r.status, 201, "{}", r.error());
}

#[test]
fn test_upload_limits_preserve_owner_and_group() {
    let base = TempDir::new("up-ft-owner");
    let chroot = var_lib_mender_filetransfer(&base, true);
    let b = limited(json!({"Chroot": chroot, "FollowSymLinks": true, "PreserveOwner": true}));
    let last_id = |file: &str| -> u32 {
        let text = std::fs::read_to_string(file).expect("read");
        let line = text.lines().rfind(|l| !l.is_empty()).expect("line");
        line.split(':').nth(2).expect("id").parse().expect("number")
    };
    let (uid, gid) = (last_id("/etc/passwd"), last_id("/etc/group"));
    let target = format!("{chroot}/lkjhgfds.bin");
    let r = b.upload(
        &target,
        &random_bytes(16, 6),
        "600",
        &uid.to_string(),
        &gid.to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.error());
    let md = std::fs::metadata(&target).expect("uploaded");
    assert_eq!((md.uid(), md.gid()), (uid, gid));
}

#[test]
fn test_filetransfer_limits_download_err_outside_chroot() {
    let base = TempDir::new("up-ft-dl-chroot");
    let path = profile(&base);
    let b = limited(json!({"Chroot": s(&base.join("var/lib/mender/filetransfer"))}));
    let r = b.download(&path);
    assert_forbidden(&r, "access denied: the target file path is outside chroot");
}

#[test]
fn test_filetransfer_limits_download_err_max_file_size() {
    let base = TempDir::new("up-ft-dl-size");
    let path = profile(&base);
    let b = limited(json!({"MaxFileSize": 2}));
    let r = b.download(&path);
    assert_forbidden(&r, "access denied: the file size is over the limit");
}

#[test]
fn test_filetransfer_limits_download_err_not_allowed_to_follow_link() {
    let base = TempDir::new("up-ft-dl-link");
    let target = profile(&base);
    let link = base.join("tmp-profile-link");
    symlink(&target, &link).expect("ln");
    let b = limited(json!({"FollowSymLinks": false}));
    let r = b.download(&s(&link));
    assert_forbidden(&r, "access denied: forbidden to follow the link");
}

#[test]
fn test_filetransfer_limits_download_err_not_allowed_to_follow_link_on_path_part() {
    let base = TempDir::new("up-ft-dl-linkpart");
    profile(&base);
    std::fs::create_dir_all(base.join("tmp/qwertyui")).expect("mkdir");
    // a link to the etc directory: <tmp>/qwertyui/etc -> <base>/etc
    symlink(base.join("etc"), base.join("tmp/qwertyui/etc")).expect("ln");
    let b = limited(json!({"FollowSymLinks": false}));
    let r = b.download(&s(&base.join("tmp/qwertyui/etc/profile")));
    assert_forbidden(&r, "access denied: forbidden to follow the link");
}

#[test]
fn test_filetransfer_limits_download_ok_allowed_to_follow_symlink() {
    let base = TempDir::new("up-ft-dl-follow");
    let target = profile(&base);
    let link = base.join("asdfqwer.symlink");
    symlink(&target, &link).expect("ln");
    let b = limited(json!({"FollowSymLinks": true}));
    let r = b.download(&s(&link));
    assert_eq!(r.status, 200, "{}", r.error());
    assert!(String::from_utf8_lossy(&r.body).contains("PS1="));
}

#[test]
fn test_filetransfer_limits_download_err_owner_mismatch() {
    let base = TempDir::new("up-ft-dl-owner");
    let path = profile(&base);
    let b = limited(json!({"OwnerGet": ["someotheruser"]}));
    let r = b.download(&path);
    assert_forbidden(&r, "access denied: the file owner does not match");
}

#[test]
fn test_filetransfer_limits_download_err_group_mismatch() {
    let base = TempDir::new("up-ft-dl-group");
    let path = profile(&base);
    let b = limited(json!({"GroupGet": ["someothergroup"]}));
    let r = b.download(&path);
    assert_forbidden(&r, "access denied: the file group does not match");
}

#[test]
fn test_filetransfer_limits_download_err_not_a_regular_file() {
    let base = TempDir::new("up-ft-dl-fifo");
    let fifo = base.join("mnbvcxza.fifo");
    let c = std::ffi::CString::new(s(&fifo)).expect("cstr");
    // SAFETY: plain syscall with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let b = limited(json!({"RegularFilesOnly": true}));
    let r = b.download(&s(&fifo));
    assert_eq!(r.status, 400, "{}", r.error());
    assert!(
        r.error().ends_with("path is not a regular file"),
        "{}",
        r.error()
    );
}

#[test]
fn test_filetransfer_limits_download_ok_file_owner_match() {
    let base = TempDir::new("up-ft-dl-ownerok");
    let path = profile(&base);
    let b = limited(json!({"OwnerGet": ["someotheruser", "root"]}));
    let r = b.download(&path);
    assert_eq!(r.status, 200, "{}", r.error());
    assert!(String::from_utf8_lossy(&r.body).contains("PS1="));
}
