//! `[limits] shutdown_grace`: after SIGTERM, sessions in the middle of DATA get this long to
//! finish their message. One finished in time is answered `250` and delivered (after a
//! restart, when delivery had stopped); one still unfinished when the grace ends is dropped,
//! not queued, and the relay exits then rather than after the default 30 s.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkConfig};
use common::*;

/// An open MX listener that may relay anywhere from loopback, upstream `up` at
/// `upstream_port`, retries after 1 s, and `shutdown_grace`.
fn grace_config(port: u16, upstream_port: u16, grace: &str) -> String {
    config(
        &[listener("mx", port, "none")],
        upstream_port,
        &format!(
            "[relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n[limits]\nshutdown_grace = \"{grace}\"\n\n\
             [queue]\nretry = [\"1s\"]\n"
        ),
    )
}

/// A session that has had its `354` and sent the first part of a message.
fn in_data(port: u16) -> SmtpClient {
    let mut client = SmtpClient::greeted(port);
    client.expect("MAIL FROM:<a@example.com>", 250);
    client.expect("RCPT TO:<b@example.net>", 250);
    client.expect("DATA", 354);
    client.send_raw(b"Subject: grace\r\n\r\nfirst half\r\n");
    client
}

/// Wait until the relay no longer accepts connections on `port`: its listeners are closed,
/// so the shutdown (and the grace) has begun.
fn wait_listener_closed(port: u16) {
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_err()),
        "the listener still accepts after SIGTERM"
    );
}

#[test]
fn a_session_stuck_in_data_is_cut_when_the_shutdown_grace_ends() {
    let port = free_port();
    let mut relay = Relay::start(&grace_config(port, free_port(), "1s"));
    let mut stuck = in_data(port);

    let signalled = Instant::now();
    relay.sigterm();
    let status = relay
        .wait_exit(Duration::from_secs(15))
        .expect("relay still running 15 s after SIGTERM with shutdown_grace = 1s");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        took >= Duration::from_millis(900),
        "the session in DATA was not given its grace: exit after {took:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "exit {took:?} after SIGTERM: the 1 s grace was not applied"
    );
    // The connection is gone without a 250, and nothing was queued.
    let rest = stuck.read_to_close();
    assert!(!rest.contains("250"), "{rest}");
    assert!(relay.spool_files().is_empty(), "{:?}", relay.spool_files());
}

#[test]
fn a_message_finished_within_the_shutdown_grace_is_queued_and_delivered_after_restart() {
    let port = free_port();
    let upstream = free_port();
    let mut relay = Relay::start(&grace_config(port, upstream, "20s"));
    let mut busy = in_data(port);

    relay.sigterm();
    wait_listener_closed(port);
    busy.send_raw(b"second half\r\n.\r\n");
    let (code, text) = busy.read_reply();
    assert_eq!(code, 250, "message finished within the grace: {text}");
    let id = queue_id(&text).expect("queue id in the 250");
    let _ = busy.cmd("QUIT");
    let status = relay
        .wait_exit(Duration::from_secs(15))
        .expect("relay did not exit once its last session ended");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(relay.spool.join("queue").join(&id).is_file());

    // The upstream was down while the relay stopped; it is up for the next start.
    let sink = Sink::start_on(upstream, SinkConfig::default());
    relay.restart();
    assert!(
        sink.wait_for(1, Duration::from_secs(15)),
        "not delivered after the restart"
    );
    let delivered = &sink.messages()[0];
    assert_eq!(delivered.rcpts, ["b@example.net"]);
    let data = String::from_utf8_lossy(&delivered.data);
    assert!(data.contains(&format!("id {id}")), "{data}");
    assert!(data.ends_with("first half\r\nsecond half\r\n"), "{data}");
    assert!(relay.wait_for_queue_len(0, Duration::from_secs(10)));
}
