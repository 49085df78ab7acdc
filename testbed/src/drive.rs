//! Client-side drivers shared by the benches and the chaos tests: they talk to
//! a connected daemon through the stand-in server the way deviceconnect (file
//! transfer, terminal) and mender-cli (port forward) do, so the Go daemon and
//! ours can be driven identically. Also /proc readers for CPU and memory.
//!
//! Every wait takes the caller's timeout (benches on loopback use seconds,
//! chaos tests over a lossy link use a minute).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::ConnHandle;
use mender_connect::wire::codec::{
    PROTO_CONTROL, PROTO_FILETRANSFER, PROTO_PORTFORWARD, PROTO_SHELL, ProtoMsg, Value,
};
use mender_connect::wire::control::{Open, decode_map, encode_map};

/// deviceconnect's file chunk and mender-cli's forward size (and the Go
/// daemon's 8 KiB inbound limit leaves no room for more).
pub const CHUNK: usize = 4096;

/// Byte `i` of the deterministic test pattern (period 251, so a shifted or
/// dropped block shows up as a mismatch).
pub fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// `len` bytes of the pattern starting at position `from`.
pub fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(pattern_byte).collect()
}

/// Whether `data` equals the pattern from position `from`. Compares
/// against a copy of the pattern a slice at a time: a per-byte check costs
/// a bench's sink more CPU than the daemon spends on the same bytes, and on
/// two cores that CPU is taken from the daemon and the client.
pub fn is_pattern(from: usize, data: &[u8]) -> bool {
    static PERIODS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    // 64 periods of 251 bytes: each comparison covers up to 63 of them
    // (15 813 bytes), so any start within the first period fits
    let table = PERIODS.get_or_init(|| pattern(0, 251 * 64));
    let span = table.len() - 251;
    let mut at = 0;
    while at < data.len() {
        let start = (from + at) % 251;
        let n = span.min(data.len() - at);
        if data[at..at + n] != table[start..start + n] {
            return false;
        }
        at += n;
    }
    true
}

/// CPU time of the live threads of `pid` (only those named `only`, if
/// given), ns-precise (schedstat's sum_exec_runtime), in ms. A thread that
/// ends inside a measured window is missed: measure across windows that
/// no thread of interest leaves.
pub fn sched_ms(pid: u32, only: Option<&str>) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    dir.flatten()
        .filter(|e| {
            only.is_none_or(|name| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e6
}

/// CPU time of a process (all threads, excluding children) in ms:
/// utime + stime from /proc/PID/stat.
pub fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    // fields after the ")" of comm start at field 3 (state); utime/stime are 14/15
    let f: Vec<&str> = stat
        .get(close + 2..)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (field(11) + field(12)) * 1000.0 / hz
}

/// A `Field:  N kB` value from `/proc/PID/<file>` (`status`, `smaps_rollup`).
pub fn proc_kib(pid: u32, file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Number of threads of a process.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The next message for `sid` (any protocol), skipping other sessions and the
/// device's control pings. None on timeout or a closed connection.
pub fn recv_for(conn: &ConnHandle, sid: &str, timeout: Duration) -> Option<ProtoMsg> {
    conn.recv_msg_matching(timeout, |m| {
        m.hdr.sid == sid && !(m.hdr.proto == PROTO_CONTROL && m.hdr.typ == "ping")
    })
}

/// Control `open` for `sid` (as deviceconnect and mender-cli do first) and
/// waits for `accept`.
pub fn open_session(conn: &ConnHandle, sid: &str, timeout: Duration) -> Result<(), String> {
    let body = Open { versions: vec![1] }.encode();
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "open", sid).with_body(body));
    match recv_for(conn, sid, timeout) {
        Some(m) if m.hdr.typ == "accept" => Ok(()),
        other => Err(format!("open {sid}: expected accept, got {other:?}")),
    }
}

/// Control `close` for `sid`.
pub fn close_session(conn: &ConnHandle, sid: &str) {
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "close", sid));
}

// ---------------------------------------------------------------- terminal

fn shell_msg(typ: &str, sid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_SHELL, typ, sid).with_prop("user_id", Value::Str("bench-user".into()))
}

/// Opens a shell on session `sid` and waits for the `new` reply
/// ("Shell started").
pub fn shell_open(conn: &ConnHandle, sid: &str, timeout: Duration) -> Result<(), String> {
    conn.send_msg(&shell_msg("new", sid));
    loop {
        let m = recv_for(conn, sid, timeout).ok_or("no reply to shell new")?;
        if m.hdr.proto == PROTO_SHELL && m.hdr.typ == "new" {
            return match m.body.as_deref() {
                Some(b"Shell started") => Ok(()),
                b => Err(format!("shell new: {:?}", b.map(String::from_utf8_lossy))),
            };
        }
        if m.hdr.typ == "error" {
            return Err(format!("shell new: {m:?}"));
        }
    }
}

/// Types `line` into shell `sid` and collects its output until `marker`
/// appears; returns (output bytes, messages).
pub fn shell_run_until(
    conn: &ConnHandle,
    sid: &str,
    line: &str,
    marker: &[u8],
    timeout: Duration,
) -> Result<(usize, usize), String> {
    conn.send_msg(&shell_msg("shell", sid).with_body(line.as_bytes().to_vec()));
    let (mut bytes, mut msgs) = (0, 0);
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let m = recv_for(conn, sid, timeout).ok_or("shell output timed out")?;
        if m.hdr.typ != "shell" {
            continue;
        }
        let b = m.body.unwrap_or_default();
        bytes += b.len();
        msgs += 1;
        tail.extend_from_slice(&b);
        if tail.windows(marker.len()).any(|w| w == marker) {
            return Ok((bytes, msgs));
        }
        let keep = tail.len().saturating_sub(marker.len());
        tail.drain(..keep);
    }
}

/// Stops shell `sid` and waits for the device's `stop` reply (so the shell
/// no longer counts against `Sessions.MaxPerUser`).
pub fn shell_stop(conn: &ConnHandle, sid: &str, timeout: Duration) -> Result<(), String> {
    conn.send_msg(&shell_msg("stop", sid));
    loop {
        let m = recv_for(conn, sid, timeout).ok_or("no reply to shell stop")?;
        if m.hdr.proto == PROTO_SHELL && m.hdr.typ == "stop" {
            return Ok(());
        }
    }
}

// ----------------------------------------------------------- port forward

fn pf_msg(typ: &str, sid: &str, cid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_PORTFORWARD, typ, sid)
        .with_prop("connection_id", Value::Str(cid.into()))
        .with_prop("user_id", Value::Str("bench-user".into()))
}

/// The body of a port-forward `new`: `host`:`port` over `proto` ("tcp"/"udp").
pub fn pf_new_body(host: &str, port: u16, proto: &str) -> Vec<u8> {
    encode_map(&[
        ("remote_host", Value::Str(host.into())),
        ("remote_port", Value::U16(port)),
        ("protocol", Value::Str(proto.into())),
    ])
}

/// The decoded map body of an `error` message (panics if it does not decode).
pub fn error_body(msg: &ProtoMsg) -> Vec<(String, Value)> {
    decode_map(msg.body.as_deref().unwrap_or_default()).expect("error body")
}

/// The string value of `key` in a decoded map body ("" when absent or not a
/// string).
pub fn str_field(body: &[(String, Value)], key: &str) -> String {
    body.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_str())
        .unwrap_or_default()
        .to_string()
}

/// Port-forward `new` for connection `cid` to `addr` (tcp); waits for the echo.
pub fn pf_new(
    conn: &ConnHandle,
    sid: &str,
    cid: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    let body = pf_new_body(&addr.ip().to_string(), addr.port(), "tcp");
    conn.send_msg(&pf_msg("new", sid, cid).with_body(body));
    loop {
        match recv_for(conn, sid, timeout) {
            Some(m) if m.hdr.typ == "new" => return Ok(()),
            // The ack of a previous connection's last forward can cross the
            // device's `stop` (remote EOF); the device then answers
            // "unknown connection", which mender-cli ignores too.
            Some(m)
                if m.hdr.typ == "error"
                    && String::from_utf8_lossy(m.body.as_deref().unwrap_or_default())
                        .contains("unknown connection") => {}
            other => return Err(format!("port-forward new: {other:?}")),
        }
    }
}

/// Target side of a download: accepts one connection on `listener` and writes
/// `total` pattern bytes, then closes.
pub fn pf_source(listener: TcpListener, total: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut sent = 0;
        while sent < total {
            let n = (total - sent).min(64 * 1024);
            if s.write_all(&pattern(sent, n)).is_err() {
                return;
            }
            sent += n;
        }
    })
}

/// Target side of an upload: accepts one connection and reads until `total`
/// bytes or EOF; returns the bytes read, whether they matched the pattern,
/// and the socket (kept open so the device does not `stop` first).
pub fn pf_sink(
    listener: TcpListener,
    total: usize,
) -> std::thread::JoinHandle<(usize, bool, Option<TcpStream>)> {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return (0, false, None);
        };
        let mut buf = vec![0; 256 * 1024];
        let (mut n, mut intact) = (0, true);
        while n < total {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    intact &= is_pattern(n, &buf[..k]);
                    n += k;
                }
            }
        }
        (n, intact, Some(s))
    })
}

/// Receives a device→client stream on `cid` until the device's `stop`,
/// acking every `forward` as mender-cli does; returns (bytes, forwards) and
/// fails unless the bytes are the pattern.
pub fn pf_receive(
    conn: &ConnHandle,
    sid: &str,
    cid: &str,
    timeout: Duration,
) -> Result<(usize, usize), String> {
    let (mut got, mut msgs) = (0, 0);
    loop {
        let m = recv_for(conn, sid, timeout)
            .ok_or_else(|| format!("port-forward receive stalled after {got} bytes"))?;
        match m.hdr.typ.as_str() {
            "forward" => {
                let b = m.body.unwrap_or_default();
                if !is_pattern(got, &b) {
                    return Err(format!("port-forward data corrupt near offset {got}"));
                }
                got += b.len();
                msgs += 1;
                conn.send_msg(&pf_msg("ack", sid, cid));
            }
            "stop" => return Ok((got, msgs)),
            _ => return Err(format!("port-forward receive: {m:?}")),
        }
    }
}

/// Sends `total` pattern bytes on `cid` in `chunk`-byte `forward`s, one in
/// flight (mender-cli's stop-and-wait).
pub fn pf_send(
    conn: &ConnHandle,
    sid: &str,
    cid: &str,
    total: usize,
    chunk: usize,
    timeout: Duration,
) -> Result<(), String> {
    let mut sent = 0;
    while sent < total {
        let n = chunk.min(total - sent);
        conn.send_msg(&pf_msg("forward", sid, cid).with_body(pattern(sent, n)));
        sent += n;
        match recv_for(conn, sid, timeout) {
            Some(m) if m.hdr.typ == "ack" => {}
            other => return Err(format!("port-forward send at {sent}: {other:?}")),
        }
    }
    Ok(())
}

/// Client `stop` for `cid`; waits for the device's echo.
pub fn pf_stop(conn: &ConnHandle, sid: &str, cid: &str, timeout: Duration) -> Result<(), String> {
    conn.send_msg(&pf_msg("stop", sid, cid));
    match recv_for(conn, sid, timeout) {
        Some(m) if m.hdr.typ == "stop" => Ok(()),
        other => Err(format!("port-forward stop: {other:?}")),
    }
}

// ---------------------------------------------------------- file transfer

fn ft_msg(typ: &str, sid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_FILETRANSFER, typ, sid)
        .with_prop("user_id", Value::Str("bench-user".into()))
}

fn path_body(p: &Path) -> Vec<u8> {
    encode_map(&[("path", Value::Str(p.display().to_string()))])
}

fn offset_of(m: &ProtoMsg) -> Option<i64> {
    m.prop("offset").and_then(Value::as_i64)
}

/// Downloads `p` on session `sid` like deviceconnect (§2.3: ack after every
/// 10th chunk and after EOF, offsets checked); returns the bytes.
pub fn ft_download(
    conn: &ConnHandle,
    sid: &str,
    p: &Path,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    conn.send_msg(&ft_msg("get_file", sid).with_body(path_body(p)));
    let ack = |o: usize| ft_msg("ack", sid).with_prop("offset", Value::I64(o as i64));
    let (mut data, mut n) = (Vec::new(), 0usize);
    loop {
        let m = recv_for(conn, sid, timeout)
            .ok_or_else(|| format!("download stalled after {} bytes", data.len()))?;
        if m.hdr.typ != "file_chunk" {
            return Err(format!("download: {m:?}"));
        }
        if offset_of(&m) != Some(data.len() as i64) {
            return Err(format!("download: wrong offset at {}: {m:?}", data.len()));
        }
        match m.body {
            Some(b) => {
                data.extend_from_slice(&b);
                n += 1;
                if n.is_multiple_of(10) {
                    conn.send_msg(&ack(data.len()));
                }
            }
            None => {
                conn.send_msg(&ack(data.len()));
                return Ok(data);
            }
        }
    }
}

/// Uploads `data` to `p` on session `sid` like deviceconnect (§2.4: waits for
/// the initial ack, at most 20 chunks beyond the last ack, then waits for the
/// final ack ≥ total).
pub fn ft_upload(
    conn: &ConnHandle,
    sid: &str,
    p: &Path,
    data: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    conn.send_msg(&ft_msg("put_file", sid).with_body(path_body(p)));
    let mut acked: i64 = -1;
    let take = |m: Option<ProtoMsg>, acked: &mut i64| -> Result<(), String> {
        let m = m.ok_or("upload: no ack in time")?;
        if m.hdr.typ != "ack" {
            return Err(format!("upload: {m:?}"));
        }
        *acked = (*acked).max(offset_of(&m).ok_or("upload: ack without offset")?);
        Ok(())
    };
    take(recv_for(conn, sid, timeout), &mut acked)?;
    let mut off = 0usize;
    while off < data.len() {
        while off as i64 > acked + 20 * CHUNK as i64 {
            take(recv_for(conn, sid, timeout), &mut acked)?;
        }
        while let Some(m) = conn.recv_msg(Duration::ZERO) {
            if m.hdr.sid == sid && m.hdr.proto != PROTO_CONTROL {
                take(Some(m), &mut acked)?;
            }
        }
        let end = (off + CHUNK).min(data.len());
        let chunk = ft_msg("file_chunk", sid).with_prop("offset", Value::I64(off as i64));
        conn.send_msg(&chunk.with_body(data[off..end].to_vec()));
        off = end;
    }
    conn.send_msg(&ft_msg("file_chunk", sid).with_prop("offset", Value::I64(off as i64)));
    while acked < data.len() as i64 {
        take(recv_for(conn, sid, timeout), &mut acked)?;
    }
    Ok(())
}
