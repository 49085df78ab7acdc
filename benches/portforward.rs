//! Port-forward throughput and daemon CPU cost over loopback: 50 MiB from a
//! target to the client (device `forward`s, acked one by one as mender-cli
//! does) and 50 MiB from the client to a target (4 KiB `forward`s, one in
//! flight). Prints MiB/s and daemon CPU ms per MiB (utime+stime from
//! /proc/PID/stat). Run: `cargo bench --bench portforward`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use mender_connect::wire::codec::{PROTO_PORTFORWARD, ProtoMsg, Value};
use mender_connect::wire::control::encode_map;
use testbed::{AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT, default_config};

const TOTAL: usize = 50 << 20;
const SID: &str = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d";

fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // fields after the ")" of comm: state is field 3; utime/stime are 14/15
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 * 1000.0 / hz
}

fn msg(typ: &str, cid: &str) -> ProtoMsg {
    ProtoMsg::new(PROTO_PORTFORWARD, typ, SID)
        .with_prop("connection_id", Value::Str(cid.into()))
        .with_prop("user_id", Value::Str("u".into()))
}

fn open(conn: &ConnHandle, cid: &str, addr: SocketAddr) {
    let body = encode_map(&[
        ("remote_host", Value::Str("127.0.0.1".into())),
        ("remote_port", Value::U16(addr.port())),
        ("protocol", Value::Str("tcp".into())),
    ]);
    conn.send_msg(&msg("new", cid).with_body(body));
    let m = conn.recv_msg(TIMEOUT).expect("new reply");
    assert_eq!(m.hdr.typ, "new", "{m:?}");
}

fn report(name: &str, bytes: usize, took: Duration, cpu: f64, msgs: usize) {
    let mib = bytes as f64 / (1 << 20) as f64;
    println!(
        "{name}: {mib:.0} MiB in {:.2} s = {:.1} MiB/s; daemon CPU {cpu:.0} ms = {:.1} ms/MiB; {msgs} forwards (avg {:.0} B)",
        took.as_secs_f64(),
        mib / took.as_secs_f64(),
        cpu / mib,
        bytes as f64 / msgs.max(1) as f64
    );
}

fn download(conn: &ConnHandle, pid: u32) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let src = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let chunk = vec![0x5a; 256 * 1024];
        let mut left = TOTAL;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).expect("write");
            left -= n;
        }
    });
    open(conn, "down", addr);
    let cpu0 = cpu_ms(pid);
    let t = Instant::now();
    let (mut got, mut msgs) = (0, 0);
    loop {
        let m = conn.recv_msg(TIMEOUT).expect("forward");
        match m.hdr.typ.as_str() {
            "forward" => {
                got += m.body.map_or(0, |b| b.len());
                msgs += 1;
                conn.send_msg(&msg("ack", "down"));
            }
            "stop" => break,
            other => panic!("unexpected {other}"),
        }
    }
    let took = t.elapsed();
    assert_eq!(got, TOTAL);
    src.join().expect("source");
    report("target->client", got, took, cpu_ms(pid) - cpu0, msgs);
}

fn upload(conn: &ConnHandle, pid: u32, chunk: usize) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let sink = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0; 256 * 1024];
        let mut n = 0;
        while n < TOTAL {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        // kept open until the client's stop, so the device does not stop first
        (n, s)
    });
    let cid = format!("up{chunk}");
    open(conn, &cid, addr);
    let data = vec![0xa5; chunk];
    let cpu0 = cpu_ms(pid);
    let t = Instant::now();
    let mut sent = 0;
    while sent < TOTAL {
        let n = chunk.min(TOTAL - sent);
        conn.send_msg(&msg("forward", &cid).with_body(data[..n].to_vec()));
        sent += n;
        let m = conn.recv_msg(TIMEOUT).expect("ack");
        assert_eq!(m.hdr.typ, "ack");
    }
    let (got, sock) = sink.join().expect("sink");
    let took = t.elapsed();
    assert_eq!(got, TOTAL);
    report(
        &format!("client->target ({chunk} B forwards)"),
        got,
        took,
        cpu_ms(pid) - cpu0,
        TOTAL.div_ceil(chunk),
    );
    conn.send_msg(&msg("stop", &cid));
    let m = conn.recv_msg(TIMEOUT).expect("stop");
    assert_eq!(m.hdr.typ, "stop");
    drop(sock);
}

fn main() {
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let _auth = AuthService::start(bus.address(), "bench", &server.url());
    let daemon = Daemon::spawn_with_binary(
        std::path::Path::new(testbed::daemon::binary().expect("bench binary path")),
        &default_config(),
        bus.address(),
        &[],
        false,
    );
    let conn = server.wait_connection(TIMEOUT).expect("daemon connected");
    let pid = daemon.pid();
    download(&conn, pid);
    upload(&conn, pid, 4096);
    upload(&conn, pid, 64 * 1024);
}
