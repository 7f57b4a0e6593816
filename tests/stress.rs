//! Resources an attacker can exhaust, against the real binary on loopback: stress mode (idle
//! connections must not lock everyone else out) and the `min_free_space` reserve for messages
//! in flight.

mod common;

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;

/// Connect from `local_ip` to 127.0.0.1:`port` and say nothing (an idle client that never
/// starts its TLS handshake).
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
    assert_log(&relay, "stress mode on");

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
    assert_log(&relay, "rule=\"stress_timeout\"");

    // Pressure gone: stress mode ends, logged once; the greeted client is served normally.
    let mut greeted = greeted;
    greeted.expect("EHLO new.test", 250);
    drop((idle, in_data, silent, first));
    assert_log(&relay, "stress mode off");
    greeted.expect("NOOP", 250);
    assert_eq!(
        relay.log().matches("stress mode on").count(),
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
    assert_log(&relay, "rule=\"min_free_space\"");

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
