//! File-transfer throughput over loopback: a 50 MiB download and upload
//! through the stand-in server, acting like deviceconnect. Prints MiB/s and
//! the daemon's CPU time (utime + stime from /proc) per MiB.
//!
//! `cargo bench --bench filetransfer`

use std::path::Path;
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{PROTO_CONTROL, PROTO_FILETRANSFER, ProtoMsg, Value};
use mender_connect::wire::control::{Open, encode_map};
use testbed::{
    AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, TempDir, default_config,
};

const SIZE: usize = 50 << 20;
const CHUNK: usize = 4096;

fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // fields after the parenthesised command name; utime and stime are fields 14 and 15
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

fn recv(conn: &ConnHandle, sid: &str) -> ProtoMsg {
    conn.recv_msg_matching(TIMEOUT, |m| {
        m.hdr.sid == sid && m.hdr.proto != PROTO_CONTROL || m.hdr.typ == "accept"
    })
    .expect("message from the device")
}

fn open(conn: &ConnHandle, sid: &str) {
    let body = Open { versions: vec![1] }.encode();
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "open", sid).with_body(body));
    assert_eq!(recv(conn, sid).hdr.typ, "accept");
}

fn ft(typ: &str, sid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_FILETRANSFER, typ, sid).with_prop("user_id", Value::Str("bench".into()))
}

fn body(p: &Path) -> Vec<u8> {
    encode_map(&[("path", Value::Str(p.display().to_string()))])
}

fn download(conn: &ConnHandle, p: &Path) -> usize {
    let sid = "11111111-0000-4000-8000-000000000001";
    open(conn, sid);
    conn.send_msg(&ft("get_file", sid).with_body(body(p)));
    let (mut got, mut n) = (0usize, 0usize);
    loop {
        let m = recv(conn, sid);
        assert_eq!(m.hdr.typ, "file_chunk");
        let ack = |o: usize| ft("ack", sid).with_prop("offset", Value::I64(o as i64));
        match m.body {
            Some(b) => {
                got += b.len();
                n += 1;
                if n.is_multiple_of(10) {
                    conn.send_msg(&ack(got));
                }
            }
            None => {
                conn.send_msg(&ack(got));
                break;
            }
        }
    }
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "close", sid));
    got
}

fn upload(conn: &ConnHandle, p: &Path, data: &[u8]) {
    let sid = "11111111-0000-4000-8000-000000000002";
    open(conn, sid);
    conn.send_msg(&ft("put_file", sid).with_body(body(p)));
    assert_eq!(recv(conn, sid).hdr.typ, "ack");
    let mut acked: i64 = 0;
    let take = |m: ProtoMsg, acked: &mut i64| {
        assert_eq!(m.hdr.typ, "ack", "{m:?}");
        if let Some(Value::I64(o)) = m.prop("offset") {
            *acked = (*acked).max(*o);
        }
    };
    let mut off = 0usize;
    while off < data.len() {
        while off as i64 > acked + 20 * CHUNK as i64 {
            take(recv(conn, sid), &mut acked);
        }
        while let Some(m) = conn.recv_msg(Duration::ZERO) {
            take(m, &mut acked);
        }
        let end = (off + CHUNK).min(data.len());
        let chunk = ft("file_chunk", sid).with_prop("offset", Value::I64(off as i64));
        conn.send_msg(&chunk.with_body(data[off..end].to_vec()));
        off = end;
    }
    conn.send_msg(&ft("file_chunk", sid).with_prop("offset", Value::I64(off as i64)));
    acked = -1;
    while acked < data.len() as i64 {
        take(recv(conn, sid), &mut acked);
    }
    conn.send_msg(&ProtoMsg::new(PROTO_CONTROL, "close", sid));
}

fn main() {
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "bench", &server.url());
    // info-level logs: per-chunk debug lines would measure the logger
    let daemon = Daemon::spawn_with_binary(
        Path::new(testbed::daemon::binary().expect("bench binary")),
        &default_config(),
        bus.address(),
        &[],
        false,
    );
    let conn = server.wait_connection(TIMEOUT).expect("daemon connected");
    let dir = TempDir::new("ft-bench");
    let src = dir.join("src.bin");
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&src, &data).expect("write source");
    let mib = SIZE as f64 / (1 << 20) as f64;

    let cpu0 = cpu_ms(daemon.pid());
    let t = Instant::now();
    assert_eq!(download(&conn, &src), SIZE);
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_ms(daemon.pid()) - cpu0;
    println!(
        "download {mib:.0} MiB: {:.1} MiB/s, daemon CPU {:.2} ms/MiB",
        mib / secs,
        cpu / mib
    );

    let dst = dir.join("dst.bin");
    let cpu0 = cpu_ms(daemon.pid());
    let t = Instant::now();
    upload(&conn, &dst, &data);
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_ms(daemon.pid()) - cpu0;
    assert!(
        std::fs::read(&dst).expect("uploaded") == data,
        "upload differs"
    );
    println!(
        "upload   {mib:.0} MiB: {:.1} MiB/s, daemon CPU {:.2} ms/MiB (incl. fsync)",
        mib / secs,
        cpu / mib
    );
}
