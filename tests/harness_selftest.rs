//! Checks the pure parts of the integration-test harness (`tests/common`) against a tiny
//! in-process fake server, so the harness compiles and works before the relay exists.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use common::*;

/// A fake server on a free port: sends each reply of `script` after reading one line (the
/// first reply, the greeting, without reading), then closes its side; returns everything the
/// client sent.
fn fake_server(script: &'static [&'static str]) -> (u16, thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream, script)
    });
    (port, handle)
}

fn serve(mut stream: TcpStream, script: &[&str]) -> Vec<u8> {
    // A test that forgets to drop its client must fail, not hang.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut received = Vec::new();
    let mut in_data = false;
    for (i, reply) in script.iter().enumerate() {
        if i > 0 {
            // One command line, or after a 354 the whole content through the final dot.
            loop {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line).unwrap() == 0 {
                    break;
                }
                received.extend_from_slice(&line);
                if !in_data || line == b".\r\n" {
                    break;
                }
            }
        }
        in_data = reply.starts_with("354");
        stream.write_all(reply.as_bytes()).unwrap();
    }
    // Like a server after its last reply (221, 421): close our side.
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    received.extend_from_slice(&rest);
    received
}

#[test]
fn multi_line_reply_is_one_reply() {
    let (port, server) = fake_server(&["220 fake ready\r\n", "250-a\r\n250 b\r\n", "221 bye\r\n"]);
    let mut c = SmtpClient::connect(port);
    assert_eq!(c.read_reply(), (220, "220 fake ready".to_owned()));
    let (code, text) = c.cmd("EHLO client.test");
    assert_eq!(code, 250);
    assert_eq!(text, "250-a\n250 b");
    c.expect("QUIT", 221);
    assert_eq!(c.read_to_close(), "");
    drop(c);
    let sent = server.join().unwrap();
    assert_eq!(sent, b"EHLO client.test\r\nQUIT\r\n");
}

#[test]
fn send_message_dot_stuffs_and_returns_final_reply() {
    let (port, server) = fake_server(&[
        "220 fake\r\n",
        "250 2.1.0 Ok\r\n",
        "250 2.1.5 Ok\r\n",
        "354 go ahead\r\n",
        "250 2.0.0 Ok: queued as 01ABC\r\n",
    ]);
    let mut c = SmtpClient::connect(port);
    c.expect_reply(220);
    let (code, text) = c.send_message("a@x.test", &["b@y.test"], "Subject: t\n\n.hidden\nend\n");
    assert_eq!(code, 250, "{text}");
    assert_eq!(queue_id(&text).as_deref(), Some("01ABC"));
    drop(c);
    let sent = String::from_utf8(server.join().unwrap()).unwrap();
    assert_eq!(
        sent,
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n\
         Subject: t\r\n\r\n..hidden\r\nend\r\n.\r\n"
    );
}

#[test]
fn send_message_stops_at_first_refusal() {
    let (port, server) = fake_server(&["220 fake\r\n", "250 Ok\r\n", "550 5.1.1 no such user\r\n"]);
    let mut c = SmtpClient::connect(port);
    c.expect_reply(220);
    let (code, _) = c.send_message("a@x.test", &["nobody@y.test", "other@y.test"], "x");
    assert_eq!(code, 550);
    drop(c);
    server.join().unwrap();
}

#[test]
#[should_panic(expected = "expected 250")]
fn expect_panics_on_other_code() {
    let (port, _server) = fake_server(&["220 fake\r\n", "500 5.5.2 what\r\n"]);
    let mut c = SmtpClient::connect(port);
    c.expect_reply(220);
    c.expect("HELO x", 250);
}

#[test]
fn malformed_and_missing_replies_are_errors() {
    let (port, server) = fake_server(&["22x nope\r\n"]);
    let mut c = SmtpClient::connect(port);
    assert!(c.try_read_reply().is_err());
    drop(c);
    server.join().unwrap();

    let (port, server) = fake_server(&["250-first\r\n251 second\r\n"]);
    let mut c = SmtpClient::connect(port);
    assert!(c.try_read_reply().is_err(), "codes differ between lines");
    drop(c);
    server.join().unwrap();

    let (port, server) = fake_server(&[]);
    let mut c = SmtpClient::connect(port);
    assert!(c.try_read_reply().unwrap().is_none(), "EOF before a reply");
    drop(c);
    server.join().unwrap();
}

#[test]
fn connect_from_binds_the_local_address() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let c = SmtpClient::connect_from("127.0.0.2", port);
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), "127.0.0.2");
    assert_eq!(c.local_addr().ip().to_string(), "127.0.0.2");
}

#[test]
fn dot_stuffing() {
    assert_eq!(dot_stuff(""), b"");
    assert_eq!(dot_stuff("a"), b"a\r\n");
    assert_eq!(dot_stuff(".\r\n..x\n"), b"..\r\n...x\r\n");
}

#[test]
fn config_helper_is_valid_toml_with_ports_and_tls() {
    let dir = TestDir::new();
    let text = config(
        &[
            listener("mx", 2500, "none"),
            listener("sub", 2501, "starttls") + "auth = \"required\"\n",
        ],
        2502,
        "[limits]\nmax_recipients = 2\n",
    );
    let text = dir.expand(&text);
    assert!(!text.contains(DIR));
    assert_eq!(listener_ports(&text), vec![2500, 2501]);
    assert_eq!(spool_dir(&text, dir.path()), dir.join("spool"));
    let table: toml::Table = text.parse().unwrap();
    assert_eq!(
        table["tls"]["cert"].as_str().unwrap(),
        dir.join("certs/cert.pem").to_str().unwrap()
    );
    assert_eq!(table["listeners"][1]["auth"].as_str(), Some("required"));
    assert_eq!(
        table["upstreams"][0]["address"].as_str(),
        Some("127.0.0.1:2502")
    );
    assert_eq!(table["limits"]["max_recipients"].as_integer(), Some(2));

    let plain = config(&[listener("mx", 1, "none")], 2, "");
    assert!(!plain.contains("[tls]"));
}

#[test]
fn spool_file_parsing() {
    let (env, msg) = parse_spool_file(b"PORTCULLIS-SPOOL 1\n{\"id\":\"X\"}\nSubject: a\r\n\r\nb\n");
    assert_eq!(env["id"], "X");
    assert_eq!(msg, b"Subject: a\r\n\r\nb\n");
}

#[test]
#[should_panic(expected = "PORTCULLIS-SPOOL")]
fn spool_file_without_magic_panics() {
    parse_spool_file(b"{}\nbody");
}

#[test]
fn test_dir_writes_nested_files() {
    let dir = TestDir::new();
    let p = dir.write("a/b/users.toml", "x");
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "x");
    assert!(p.starts_with(dir.path()));
    assert_ne!(free_port(), 0);
}

/// Guards against a reply split across TCP segments being read as two replies.
#[test]
fn reply_split_across_writes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        for part in ["25", "0-one\r", "\n250 t", "wo\r\n"] {
            s.write_all(part.as_bytes()).unwrap();
            s.flush().unwrap();
            thread::sleep(std::time::Duration::from_millis(10));
        }
    });
    let mut c = SmtpClient::connect(port);
    assert_eq!(c.read_reply(), (250, "250-one\n250 two".to_owned()));
    server.join().unwrap();
}

#[test]
fn log_field_matcher_finds_whole_fields_in_span_prefix_and_event() {
    let event = "2026-11-30T19:20:25Z  INFO rejected peer=127.0.0.1:46287 listener=mx \
                 rule=\"max_message_size\" reply=552 5.3.4 Message size exceeds";
    let span = "2026-11-30T19:20:25Z  INFO delivery{queue_id=2QBWTJKDK8KE4ETM}: delivered \
                upstream=up rcpt=b@example.com";
    let session = "2026-11-30T19:20:25Z  INFO session{peer=127.0.0.2:5555}: session end \
                   reason=\"TLS handshake failed\"";
    let cases: &[(&str, &str, &str, bool)] = &[
        (event, "rule", "max_message_size", true),
        // A value must end where the field does: no prefix of it matches…
        (event, "rule", "max_message", false),
        (event, "rule", "message_size", false),
        // …unless asked for with `*`.
        (event, "rule", "max_*", true),
        (event, "reply", "552 5.3.4 Message size exceeds", true),
        (event, "reply", "552 5.3.4*", true),
        // A bare value has no end mark of its own: one with spaces matches word by word.
        (event, "reply", "552", true),
        (event, "reply", "552 5.3", false),
        (event, "listener", "mx", true),
        // A key must start a field: `id` is not the end of `queue_id`.
        (span, "id", "2QBWTJKDK8KE4ETM", false),
        (span, "queue_id", "2QBWTJKDK8KE4ETM", true),
        (span, "queue_id", "2QBWTJKDK8KE4ET", false),
        (span, "upstream", "up", true),
        (session, "peer", "127.0.0.2:*", true),
        (session, "peer", "127.0.0.3:*", false),
        (session, "reason", "TLS handshake failed", true),
        (session, "reason", "TLS handshake", false),
        (session, "rule", "*", false),
    ];
    for &(line, key, value, want) in cases {
        assert_eq!(
            line_has_field(line, key, value),
            want,
            "{key}={value} in {line:?}"
        );
    }
    let log = format!("{event}\n{span}\n{session}\n");
    assert!(log_has_fields(
        &log,
        &[("upstream", "up"), ("queue_id", "*")]
    ));
    // Every field on the same line, not spread over two.
    assert!(!log_has_fields(&log, &[("upstream", "up"), ("rule", "*")]));
    assert_eq!(count_log_fields(&log, &[("peer", "*")]), 2);
}
