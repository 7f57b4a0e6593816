//! Resources an attacker can exhaust, against the real binary on loopback: stress mode (idle
//! connections, NOOP keepalives and trickled messages must not lock everyone else out) and the
//! `min_free_space` reserve for messages in flight.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;

/// Connect from `local_ip` to 127.0.0.1:`port` and say nothing (an idle client that never
/// starts its TLS handshake).
/// The line stress mode starts with: `rule="stress"` and why it started.
const STRESS_ON: [(&str, &str); 2] = [("rule", "stress"), ("why", "*")];

/// Whether the log shows stress mode ended: a `rule="stress"` line without the `why=` of
/// the start line follows one with it.
fn stress_ended(log: &str) -> bool {
    let mut on = false;
    for line in log.lines() {
        if STRESS_ON.iter().all(|(k, v)| line_has_field(line, k, v)) {
            on = true;
        } else if on && line_has_field(line, "rule", "stress") {
            return true;
        }
    }
    false
}

fn silent_connection(local_ip: &str, port: u16) -> TcpStream {
    let ip: IpAddr = local_ip.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    socket
        .connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    tcp
}

/// 40 idle connections fill `max_connections = 40` (from five addresses, within the per-IP
/// cap): a client from another address is refused with `421 4.3.2`, stress mode starts, and
/// within `stress_timeout` (2 s here, `command_timeout` staying 5 min) the idlers are told
/// `421 4.4.2` — those waiting for a command, the one pausing in DATA — or closed (those that
/// never start their TLS handshake), so the newcomer gets its `220` in seconds rather than
/// after `command_timeout`.
#[test]
fn idle_connections_cannot_lock_out_a_newcomer_under_stress() {
    let mx = free_port();
    let smtps = free_port();
    let toml = config(
        &[
            listener("mx", mx, "none"),
            listener("smtps", smtps, "implicit"),
        ],
        free_port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n\n\
         [limits]\nmax_connections = 40\nmax_connections_per_ip = 20\n\
         stress_timeout = \"2s\"\n",
    );
    let relay = Relay::start(&toml);

    // Ten that never start TLS on the implicit listener, first (accepted by the time the
    // plain ones have their greeting).
    let mut silent: Vec<TcpStream> = (0..10)
        .map(|_| silent_connection("127.0.1.5", smtps))
        .collect();
    let mut idle: Vec<SmtpClient> = (0..29)
        .map(|i| {
            let mut c = SmtpClient::connect_from(&format!("127.0.1.{}", 1 + i % 3), mx);
            c.expect_reply(220);
            c
        })
        .collect();
    let mut in_data = SmtpClient::connect_from("127.0.1.4", mx);
    in_data.expect_reply(220);
    in_data.expect("EHLO idle.test", 250);
    in_data.expect("MAIL FROM:<a@example.org>", 250);
    in_data.expect("RCPT TO:<b@example.com>", 250);
    in_data.expect("DATA", 354);
    in_data.send_raw(b"Subject: slow\r\n");

    let started = Instant::now();
    let mut first = SmtpClient::connect_from("127.0.2.1", mx);
    assert_reply(&first.read_reply(), 421, "4.3.2");
    assert_log_fields(&relay, &STRESS_ON);

    let greeted = loop {
        let mut c = SmtpClient::connect_from("127.0.2.1", mx);
        let reply = c.read_reply();
        if reply.0 == 220 {
            break c;
        }
        assert_reply(&reply, 421, "4.3.2");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no 220 within 15 s under stress"
        );
        // Pacing: a newcomer retrying a refused connection, as a client would.
        sleep(Duration::from_millis(200));
    };
    let waited = started.elapsed();
    eprintln!("newcomer greeted after {waited:?}");
    assert!(waited < Duration::from_secs(15), "{waited:?}");

    for c in &mut idle {
        assert_reply(&c.read_reply(), 421, "4.4.2");
    }
    assert_reply(&in_data.read_reply(), 421, "4.4.2");
    for tcp in &mut silent {
        let mut buf = [0u8; 64];
        match tcp.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a client silent before TLS was not closed: {other:?}"),
        }
    }
    assert_log_fields(&relay, &[("rule", "stress_timeout")]);

    // Pressure gone: stress mode ends, logged once; the greeted client is served normally.
    let mut greeted = greeted;
    greeted.expect("EHLO new.test", 250);
    drop((idle, in_data, silent, first));
    assert!(
        wait_until(LOG_WAIT, || stress_ended(&relay.log())),
        "stress mode never ended:\n{}",
        relay.log()
    );
    greeted.expect("NOOP", 250);
    assert_eq!(
        count_log_fields(&relay.log(), &STRESS_ON),
        1,
        "{}",
        relay.log()
    );
}

/// Free space for unprivileged writers on the file system holding `path`, in bytes.
fn free_space(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs is plain old data, valid when zeroed; `c` outlives the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut stat) }, 0);
    #[allow(clippy::unnecessary_cast)]
    let free = (stat.f_bavail as u64) * (stat.f_frsize as u64);
    free
}

/// `min_free_space` must hold for messages in flight, not only at each MAIL: with
/// `max_message_size` at three quarters of the free space, one transaction without `SIZE`
/// reserves that much, so a second one is refused `452 4.3.1` (before, both got `250` and
/// could fill the disk together). A transaction declaring a small `SIZE` still fits; RSET
/// gives the space back.
#[test]
fn min_free_space_holds_for_parallel_transactions() {
    let dir = TestDir::new();
    let max = free_space(dir.path()) / 4 * 3;
    let port = free_port();
    let toml = config(
        &[listener("mx", port, "none")],
        free_port(),
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\n\
             [limits]\nmax_message_size = {max}\nmin_free_space = \"1MiB\"\n"
        ),
    );
    let relay = Relay::start_in(dir, &toml);

    let mut first = SmtpClient::greeted(port);
    first.expect("MAIL FROM:<a@example.org>", 250);
    let mut second = SmtpClient::connect_from("127.0.0.2", port);
    second.expect_reply(220);
    second.expect("EHLO second.test", 250);
    assert_reply(&second.cmd("MAIL FROM:<b@example.org>"), 452, "4.3.1");
    assert_log_fields(&relay, &[("rule", "min_free_space")]);

    let mut small = SmtpClient::connect_from("127.0.0.3", port);
    small.expect_reply(220);
    small.expect("EHLO small.test", 250);
    small.expect("MAIL FROM:<c@example.org> SIZE=1000", 250);
    small.expect("RCPT TO:<x@example.com>", 250);
    small.expect("DATA", 354);
    small.send_raw(b"Subject: small\r\n\r\nfits\r\n.\r\n");
    small.expect_reply(250);

    first.expect("RSET", 250);
    second.expect("MAIL FROM:<b@example.org>", 250);
    assert_reply(&first.cmd("MAIL FROM:<a@example.org>"), 452, "4.3.1");
}

/// Idle clients that send `NOOP` more often than `stress_timeout` renew their per-command
/// deadline forever: 39 of them (from two addresses) plus one refused newcomer start stress
/// mode, and they keep sending NOOP every 500 ms. The second command without progress in stress
/// mode is answered `421 4.7.0` and the session closes (rule `stress_junk_commands`), so the
/// newcomer gets its `220` in seconds; before, it got `421 4.3.2` for as long as the
/// keepalives went on.
#[test]
fn noop_keepalives_cannot_hold_connection_slots_under_stress() {
    let mx = free_port();
    let toml = config(
        &[listener("mx", mx, "none")],
        free_port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n\n\
         [limits]\nmax_connections = 40\nmax_connections_per_ip = 20\n\
         stress_timeout = \"2s\"\n",
    );
    let relay = Relay::start(&toml);
    let mut idle: Vec<Option<SmtpClient>> = (0..40)
        .map(|i| {
            let mut c = SmtpClient::connect_from(&format!("127.0.3.{}", 1 + i % 2), mx);
            c.expect_reply(220);
            c.expect("EHLO keepalive.test", 250);
            Some(c)
        })
        .collect();
    let started = Instant::now();
    let mut refused = SmtpClient::connect_from("127.0.4.1", mx);
    assert_reply(&refused.read_reply(), 421, "4.3.2");
    assert_log_fields(&relay, &STRESS_ON);

    let mut closed_for_junk = 0;
    let greeted = loop {
        for slot in &mut idle {
            let Some(c) = slot else { continue };
            c.send_raw(b"NOOP\r\n");
            let reply = c.read_reply();
            if reply.0 != 250 {
                assert_reply(&reply, 421, "4.7.0");
                c.read_to_close();
                closed_for_junk += 1;
                *slot = None;
            }
        }
        let mut c = SmtpClient::connect_from("127.0.4.1", mx);
        let reply = c.read_reply();
        if reply.0 == 220 {
            break c;
        }
        assert_reply(&reply, 421, "4.3.2");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no 220 within 15 s while the others send NOOP"
        );
        // Pacing: a newcomer retrying a refused connection, as a client would.
        sleep(Duration::from_millis(500));
    };
    eprintln!("newcomer greeted after {:?}", started.elapsed());
    assert!(closed_for_junk > 0);
    assert_log_fields(&relay, &[("rule", "stress_junk_commands")]);
    let mut greeted = greeted;
    greeted.expect("EHLO new.test", 250);
    greeted.expect("MAIL FROM:<a@example.org>", 250);
}

/// While stressed, a message must arrive at the minimum data rate (1 KiB/s) averaged since
/// its data started, after `stress_timeout` of grace: a client trickling one octet every
/// 500 ms (never pausing as long as `stress_timeout`) is told `421 4.4.2` within seconds (rule
/// `stress_data_rate`) instead of holding its slot for `data_timeout`; a 2 MiB message sent
/// at an ordinary speed in the same stress period is queued.
#[test]
fn a_trickled_message_cannot_hold_a_slot_under_stress() {
    let mx = free_port();
    let toml = config(
        &[listener("mx", mx, "none")],
        free_port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n\n\
         [limits]\nmax_connections = 40\nstress_threshold = 5\n\
         max_message_size = \"10MiB\"\nstress_timeout = \"2s\"\n",
    );
    let relay = Relay::start(&toml);
    // The trickler on a raw socket, so that it can poll for the server's reply.
    let mut trickler = silent_connection("127.0.5.1", mx);
    assert!(raw_reply(&mut trickler).starts_with("220 "));
    // The second connection reaches the threshold (5 % of 40 = 2).
    let mut sender = SmtpClient::connect_from("127.0.5.2", mx);
    sender.expect_reply(220);
    assert_log_fields(&relay, &STRESS_ON);
    for (cmd, code) in [
        ("EHLO slow.test", "250 "),
        ("MAIL FROM:<a@example.org>", "250 "),
        ("RCPT TO:<b@example.com>", "250 "),
        ("DATA", "354 "),
    ] {
        trickler.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        let reply = raw_reply(&mut trickler);
        assert!(reply.contains(code), "{cmd}: {reply}");
    }
    sender.expect("EHLO fast.test", 250);
    sender.expect("MAIL FROM:<c@example.org>", 250);
    sender.expect("RCPT TO:<d@example.com>", 250);
    sender.expect("DATA", 354);

    trickler
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let line = [b'x'; 1022];
    let mut sent_fast = 0;
    let mut rounds = 0;
    let closed = loop {
        // The ordinary sender: 64 KiB every 100 ms (640 KiB/s), up to 2 MiB.
        if sent_fast < 2 << 20 {
            let mut chunk = Vec::new();
            for _ in 0..64 {
                chunk.extend_from_slice(&line);
                chunk.extend_from_slice(b"\r\n");
            }
            sender.send_raw(&chunk);
            sent_fast += chunk.len();
        }
        if rounds % 5 == 0 {
            // One octet every 500 ms; a write after the server closed may fail.
            let _ = trickler.write_all(b"y");
        }
        rounds += 1;
        let mut buf = [0u8; 256];
        match trickler.read(&mut buf) {
            Ok(n) => break String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("trickler: {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the trickling client was not closed"
        );
    };
    eprintln!("trickler closed after {:?}", started.elapsed());
    assert!(closed.starts_with("421 4.4.2 "), "{closed:?}");
    assert_log_fields(&relay, &[("rule", "stress_data_rate")]);
    while sent_fast < 2 << 20 {
        let mut chunk = Vec::new();
        for _ in 0..64 {
            chunk.extend_from_slice(&line);
            chunk.extend_from_slice(b"\r\n");
        }
        sender.send_raw(&chunk);
        sent_fast += chunk.len();
        // Pacing: a fast sender, well above the data rate the relay requires under stress.
        sleep(Duration::from_millis(100));
    }
    sender.send_raw(b".\r\n");
    sender.expect_reply(250);
    assert!(relay.wait_for_queue_len(1, Duration::from_secs(5)));
}

/// Read one complete reply (up to its last line) from a raw socket.
fn raw_reply(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tcp.read(&mut byte).unwrap();
        assert_eq!(n, 1, "closed: {:?}", String::from_utf8_lossy(&out));
        out.push(byte[0]);
        if out.ends_with(b"\r\n") {
            let text = String::from_utf8_lossy(&out);
            let last = text.trim_end().rsplit("\r\n").next().unwrap_or("");
            if last.as_bytes().get(3) == Some(&b' ') {
                return text.into_owned();
            }
        }
    }
}
