//! Self-tests of the test upstream ([`common::sink::Sink`]) and of the private Postfix
//! ([`common::postfix::Postfix`]) that the delivery tests rely on: if these fail, a delivery
//! test failure says nothing about the relay.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::postfix::Postfix;
use common::sink::{Sink, SinkConfig, Stage};
use common::{SmtpClient, TestDir, free_port, swaks, write_certs};

const WAIT: Duration = Duration::from_secs(10);

/// Run swaks against the sink; panics with its output unless it exits 0.
fn swaks_ok(args: &[&str]) -> String {
    let out = swaks(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "swaks {args:?} failed:\n{text}");
    text
}

/// A client that has read the greeting and sent EHLO.
fn greeted(sink: &Sink) -> SmtpClient {
    SmtpClient::greeted(sink.port())
}

/// A sink config offering STARTTLS with a fresh certificate in `dir`.
fn tls_config(dir: &TestDir) -> SinkConfig {
    let (cert, key) = write_certs(&dir.join("certs"));
    SinkConfig {
        starttls: true,
        cert: Some((cert, key)),
        ..SinkConfig::default()
    }
}

#[test]
fn plain_delivery_is_recorded_with_its_envelope() {
    let sink = Sink::start(SinkConfig::default());
    let mut c = greeted(&sink);
    let (code, text) = c.send_message(
        "sender@example.org",
        &["one@example.com", "two@example.com"],
        "Subject: hello\n\nbody\n",
    );
    assert_eq!(code, 250, "{text}");
    assert!(text.contains("2.6.0"), "{text}");
    c.expect("QUIT", 221);

    assert!(sink.wait_for(1, WAIT));
    let m = &sink.messages()[0];
    assert_eq!(m.helo, "client.test");
    assert!(!m.tls);
    assert_eq!(m.auth, None);
    assert_eq!(m.mail_from, "sender@example.org");
    assert!(m.mail_params.is_empty());
    assert_eq!(m.rcpts, ["one@example.com", "two@example.com"]);
    assert_eq!(m.data, b"Subject: hello\r\n\r\nbody\r\n");
    assert_eq!(m.raw_data, b"Subject: hello\r\n\r\nbody\r\n.\r\n");
    assert_eq!(m.conn, 1);
    assert_eq!(sink.connections(), 1);
    assert_eq!(
        sink.commands(),
        [
            "EHLO client.test",
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<one@example.com>",
            "RCPT TO:<two@example.com>",
            "DATA",
            "QUIT"
        ]
    );
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn dot_stuffed_lines_are_unstuffed_in_data_and_kept_in_raw_data() {
    let sink = Sink::start(SinkConfig::default());
    let mut c = greeted(&sink);
    let (code, _) = c.send_message("a@b.test", &["c@d.test"], ".hidden\n..two\nplain\n.\n");
    assert_eq!(code, 250);
    let m = &sink.messages()[0];
    assert_eq!(m.data, b".hidden\r\n..two\r\nplain\r\n.\r\n");
    assert_eq!(m.raw_data, b"..hidden\r\n...two\r\nplain\r\n..\r\n.\r\n");
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn per_recipient_replies_and_only_accepted_recipients_recorded() {
    let mut config = SinkConfig::default();
    config
        .rcpt_replies
        .insert("nobody@d.test".into(), "550 5.1.1 no such user".into());
    config
        .rcpt_replies
        .insert("later@d.test".into(), "451 4.3.0 try later".into());
    let sink = Sink::start(config);
    let mut c = greeted(&sink);
    c.expect("MAIL FROM:<a@b.test>", 250);
    c.expect("RCPT TO:<ok@d.test>", 250);
    let text = c.expect("RCPT TO:<NoBody@D.test>", 550);
    assert_eq!(text, "550 5.1.1 no such user");
    c.expect("RCPT TO:<later@d.test>", 451);
    c.expect("DATA", 354);
    c.send_raw(b"x\r\n.\r\n");
    c.expect_reply(250);
    assert_eq!(sink.messages()[0].rcpts, ["ok@d.test"]);

    // No accepted recipient: DATA is refused and nothing is recorded.
    c.expect("MAIL FROM:<a@b.test>", 250);
    c.expect("RCPT TO:<nobody@d.test>", 550);
    c.expect("DATA", 554);
    c.expect("RSET", 250);
    assert_eq!(sink.messages().len(), 1);
}

#[test]
fn mail_and_data_replies_can_be_overridden_and_changed_live() {
    let sink = Sink::start(SinkConfig {
        data_reply: Some("452 4.3.1 Insufficient system resources".into()),
        ..SinkConfig::default()
    });
    let mut c = greeted(&sink);
    let (code, _) = c.send_message("a@b.test", &["c@d.test"], "one\n");
    assert_eq!(code, 452);
    assert!(sink.messages().is_empty());

    sink.set_config(SinkConfig {
        mail_reply: Some("421 4.3.2 Service not available".into()),
        ..SinkConfig::default()
    });
    c.expect("MAIL FROM:<a@b.test>", 421);

    sink.set_config(SinkConfig::default());
    let (code, _) = c.send_message("a@b.test", &["c@d.test"], "two\n");
    assert_eq!(code, 250);
    c.expect("RSET", 250);
    let (code, _) = c.send_message("a@b.test", &["e@d.test"], "three\n");
    assert_eq!(code, 250);
    let messages = sink.messages();
    assert_eq!(messages.len(), 2);
    assert!(
        messages.iter().all(|m| m.conn == 1),
        "one connection reused"
    );
    assert_eq!(sink.connections(), 1);
    assert!(sink.commands().contains(&"RSET".to_owned()));
}

#[test]
fn bare_line_ends_and_long_lines_are_violations() {
    let sink = Sink::start(SinkConfig::default());
    let mut c = greeted(&sink);
    c.expect("MAIL FROM:<a@b.test>", 250);
    c.expect("RCPT TO:<c@d.test>", 250);
    c.expect("DATA", 354);
    let long = "x".repeat(999);
    c.send_raw(format!("bare lf\nbare\rcr\r\n{long}\r\nfine\r\n.\r\n").as_bytes());
    c.expect_reply(250);
    let v = sink.violations().join("\n");
    assert!(v.contains("bare LF ending message line 1"), "{v}");
    assert!(v.contains("bare CR in message line 2"), "{v}");
    assert!(v.contains("message line 3 is 999 octets"), "{v}");
    assert_eq!(sink.violations().len(), 3, "{v}");
    assert_eq!(
        sink.messages()[0].data,
        format!("bare lf\nbare\rcr\r\n{long}\r\nfine\r\n").as_bytes()
    );
}

#[test]
fn size_limit_is_advertised_and_enforced() {
    let sink = Sink::start(SinkConfig {
        size: Some(1000),
        ..SinkConfig::default()
    });
    let mut c = SmtpClient::connect(sink.port());
    c.expect_reply(220);
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(ehlo.contains("250-SIZE 1000"), "{ehlo}");
    c.expect("MAIL FROM:<a@b.test> SIZE=1001", 552);
    c.expect("MAIL FROM:<a@b.test> SIZE=10", 250);
    c.expect("RCPT TO:<c@d.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(format!("{}\r\n.\r\n", "y".repeat(998)).as_bytes());
    c.expect_reply(250);
    assert_eq!(sink.messages()[0].mail_params, ["SIZE=10"]);
}

#[test]
fn without_ehlo_the_client_must_use_helo_and_no_extensions() {
    let sink = Sink::start(SinkConfig {
        ehlo: false,
        ..SinkConfig::default()
    });
    let mut c = SmtpClient::connect(sink.port());
    c.expect_reply(220);
    c.expect("EHLO client.test", 500);
    c.expect("HELO client.test", 250);
    c.expect("MAIL FROM:<a@b.test> BODY=8BITMIME", 555);
    let (code, _) = c.send_message("a@b.test", &["c@d.test"], "hi\n");
    assert_eq!(code, 250);
    assert_eq!(sink.messages()[0].helo, "client.test");
    assert_eq!(sink.violations().len(), 1, "{:?}", sink.violations());
}

#[test]
fn swaks_pipelined_delivery_is_clean() {
    let sink = Sink::start(SinkConfig::default());
    let port = format!("127.0.0.1:{}", sink.port());
    let out = swaks_ok(&[
        "--server",
        &port,
        "--from",
        "from@example.org",
        "--to",
        "to@example.com,cc@example.com",
        "--pipeline",
        "--body",
        ".starts with a dot",
    ]);
    assert!(sink.wait_for(1, WAIT), "{out}");
    let m = &sink.messages()[0];
    assert_eq!(m.rcpts, ["to@example.com", "cc@example.com"]);
    assert!(common::contains(&m.data, b"\r\n.starts with a dot\r\n"));
    assert!(common::contains(
        &m.raw_data,
        b"\r\n..starts with a dot\r\n"
    ));
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn unannounced_pipelining_is_a_violation() {
    let sink = Sink::start(SinkConfig {
        pipelining: false,
        ..SinkConfig::default()
    });
    let mut c = greeted(&sink);
    c.send_raw(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n");
    c.expect_reply(250);
    c.expect_reply(250);
    let v = sink.violations().join("\n");
    assert!(v.contains("without PIPELINING"), "{v}");
}

#[test]
fn starttls_required_before_mail() {
    let dir = TestDir::new();
    let config = SinkConfig {
        require_tls: true,
        ..tls_config(&dir)
    };
    let cert = config.cert.clone().expect("cert").0;
    let sink = Sink::start(config);

    let mut c = greeted(&sink);
    let text = c.expect("MAIL FROM:<a@b.test>", 530);
    assert!(text.starts_with("530 5.7.0"), "{text}");
    c.starttls(&cert);
    c.expect("MAIL FROM:<a@b.test>", 503); // EHLO again after TLS
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    let (code, _) = c.send_message("a@b.test", &["c@d.test"], "secret\n");
    assert_eq!(code, 250);
    assert!(sink.messages()[0].tls);

    let port = format!("127.0.0.1:{}", sink.port());
    swaks_ok(&[
        "--server", &port, "--from", "x@y.test", "--to", "z@y.test", "--tls",
    ]);
    assert!(sink.wait_for(2, WAIT));
    assert!(sink.messages()[1].tls);
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn auth_plain_and_login_required_before_mail() {
    let sink = Sink::start(SinkConfig {
        auth: Some(("user".into(), "s3cret".into())),
        ..SinkConfig::default()
    });
    let port = format!("127.0.0.1:{}", sink.port());
    for mechanism in ["PLAIN", "LOGIN"] {
        swaks_ok(&[
            "--server",
            &port,
            "--from",
            "a@b.test",
            "--to",
            "c@d.test",
            "--auth",
            mechanism,
            "--auth-user",
            "user",
            "--auth-password",
            "s3cret",
        ]);
    }
    assert!(sink.wait_for(2, WAIT));
    assert!(
        sink.messages()
            .iter()
            .all(|m| m.auth.as_deref() == Some("user"))
    );

    let mut c = greeted(&sink);
    c.expect("MAIL FROM:<a@b.test>", 530);
    // PLAIN with a 334 continuation and a wrong password.
    c.expect("AUTH PLAIN", 334);
    c.expect("AHVzZXIAd3Jvbmc=", 535); // \0user\0wrong
    // PLAIN with an initial response.
    c.expect("AUTH PLAIN AHVzZXIAczNjcmV0", 235); // \0user\0s3cret
    c.expect("MAIL FROM:<a@b.test>", 250);

    let out = swaks(&[
        "--server",
        &port,
        "--from",
        "a@b.test",
        "--to",
        "c@d.test",
        "--auth",
        "LOGIN",
        "--auth-user",
        "user",
        "--auth-password",
        "wrong",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("535 5.7.8"));
    assert_eq!(sink.messages().len(), 2);
}

/// Whether the server closed the connection: true on EOF or reset, false on a read timeout.
fn closed(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("set timeout");
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Send the commands leading up to `stage`, reading a reply to each.
fn reach(stream: &mut TcpStream, stage: Stage) {
    let script: &[&str] = match stage {
        Stage::Greeting => &[],
        Stage::Ehlo => &["EHLO c.test"],
        Stage::Mail => &["EHLO c.test", "MAIL FROM:<a@b.test>"],
        Stage::Rcpt => &["EHLO c.test", "MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>"],
        Stage::Data => &[
            "EHLO c.test",
            "MAIL FROM:<a@b.test>",
            "RCPT TO:<c@d.test>",
            "DATA",
        ],
        Stage::Dot => &[
            "EHLO c.test",
            "MAIL FROM:<a@b.test>",
            "RCPT TO:<c@d.test>",
            "DATA",
            "msg\r\n.",
        ],
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set timeout");
    let mut buf = [0u8; 4096];
    if stage != Stage::Greeting {
        let n = stream.read(&mut buf).expect("greeting");
        assert!(buf[..n].starts_with(b"220 "));
    }
    for (i, line) in script.iter().enumerate() {
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("send");
        if i + 1 < script.len() {
            // Multi-line EHLO replies arrive in one write.
            let n = stream.read(&mut buf).expect("reply");
            assert!(n > 0, "closed early before {stage:?}");
        }
    }
}

#[test]
fn drop_and_stall_at_every_stage() {
    let stages = [
        Stage::Greeting,
        Stage::Ehlo,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Dot,
    ];
    let sink = Sink::start(SinkConfig::default());
    for stage in stages {
        sink.set_config(SinkConfig {
            drop_after: Some(stage),
            ..SinkConfig::default()
        });
        let mut s = TcpStream::connect(("127.0.0.1", sink.port())).expect("connect");
        reach(&mut s, stage);
        assert!(closed(&mut s), "drop_after {stage:?}: still open");

        sink.set_config(SinkConfig {
            stall_at: Some(stage),
            ..SinkConfig::default()
        });
        let mut s = TcpStream::connect(("127.0.0.1", sink.port())).expect("connect");
        reach(&mut s, stage);
        assert!(!closed(&mut s), "stall_at {stage:?}: closed or answered");
    }
    assert!(sink.messages().is_empty());
    assert_eq!(sink.connections(), 2 * stages.len());

    // Stopping closes the stalled connections too, promptly.
    let mut stalled = TcpStream::connect(("127.0.0.1", sink.port())).expect("connect");
    reach(&mut stalled, Stage::Greeting);
    let started = Instant::now();
    sink.stop();
    assert!(closed(&mut stalled));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn stop_refuses_connections_and_start_on_reuses_the_port() {
    let sink = Sink::start(SinkConfig::default());
    let port = sink.port();
    let mut open = greeted(&sink);
    sink.stop();
    let err = TcpStream::connect(("127.0.0.1", port)).expect_err("port still accepting");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert!(open.try_read_reply().map_or(true, |r| r.is_none()));

    let sink = Sink::start_on(port, SinkConfig::default());
    assert_eq!(sink.port(), port);
    let mut c = greeted(&sink);
    let (code, _) = c.send_message("a@b.test", &["c@d.test"], "back\n");
    assert_eq!(code, 250);
    assert_eq!(sink.connections(), 1);
}

#[test]
fn postfix_relays_to_the_sink_over_starttls() {
    let dir = TestDir::new();
    let (cert, key) = write_certs(&dir.join("certs"));
    let sink = Sink::start(SinkConfig {
        starttls: true,
        cert: Some((cert.clone(), key.clone())),
        ..SinkConfig::default()
    });
    let port = free_port();
    let Some(postfix) = Postfix::start(&dir.join("postfix"), port, sink.port(), &cert, &key) else {
        return;
    };
    let server = format!("127.0.0.1:{port}");
    swaks_ok(&[
        "--server",
        &server,
        "--from",
        "sender@example.org",
        "--to",
        "rcpt@example.com",
        "--tls",
        "--header",
        "Subject: interop",
        "--body",
        ".dot line\nlast",
    ]);
    assert!(
        sink.wait_for(1, Duration::from_secs(30)),
        "nothing reached the sink; postfix log:\n{}",
        postfix.log()
    );
    let m = &sink.messages()[0];
    assert_eq!(m.mail_from, "sender@example.org");
    assert_eq!(m.rcpts, ["rcpt@example.com"]);
    assert!(m.tls, "postfix used STARTTLS to the sink");
    let data = String::from_utf8_lossy(&m.data);
    assert!(data.contains("with ESMTPS id"), "{data}");
    assert!(data.contains(&format!("by postfix-{port}.test")), "{data}");
    assert!(data.contains("\r\n.dot line\r\n"), "{data}");
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn two_postfix_instances_run_side_by_side() {
    let dir = TestDir::new();
    let (cert, key) = write_certs(&dir.join("certs"));
    let sink = Sink::start(SinkConfig::default());
    let (port_a, port_b) = (free_port(), free_port());
    let Some(a) = Postfix::start(&dir.join("a"), port_a, sink.port(), &cert, &key) else {
        return;
    };
    let b =
        Postfix::start(&dir.join("b"), port_b, sink.port(), &cert, &key).expect("second instance");
    for port in [port_a, port_b] {
        let server = format!("127.0.0.1:{port}");
        swaks_ok(&[
            "--server",
            &server,
            "--from",
            "s@example.org",
            "--to",
            "r@example.com",
        ]);
    }
    assert!(
        sink.wait_for(2, Duration::from_secs(30)),
        "logs:\n{}\n{}",
        a.log(),
        b.log()
    );
    let data: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect();
    for port in [port_a, port_b] {
        let by = format!("by postfix-{port}.test");
        assert!(data.iter().any(|d| d.contains(&by)), "{by} in {data:?}");
    }
    drop(a);
    let err = TcpStream::connect(("127.0.0.1", port_a)).expect_err("stopped instance listens");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert!(TcpStream::connect(("127.0.0.1", port_b)).is_ok());
}

#[test]
fn postfix_stops_even_when_its_directory_was_removed_first() {
    let dir = TestDir::new();
    let (cert, key) = write_certs(&dir.join("certs"));
    let port = free_port();
    let Some(postfix) = Postfix::start(&dir.join("postfix"), port, free_port(), &cert, &key) else {
        return;
    };
    drop(dir);
    drop(postfix);
    let err = TcpStream::connect(("127.0.0.1", port)).expect_err("postfix still listens");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}
