//! No accept-then-bounce: what the relay can know at SMTP time is refused at SMTP time, so no
//! delivery status notification goes to a (possibly forged) sender for it. The real binary,
//! the test sink as the upstream, loopback only.
//!
//! - The route's capabilities (SMTPUTF8, 8BITMIME, SIZE), learnt from the upstream's EHLO at
//!   start and kept in the spool, decide at RCPT and after the final dot.
//! - DSNs return a bounded header section and name a `Remote-MTA` only for an upstream that
//!   answered and is configured by host name.
//! - Concurrent failures move the circuit breaker's back-off one step, not one per message.
//! - check-config warns about accepting every local part of an accepted domain.

mod common;

use std::fs;
use std::time::Duration;

use common::sink::{Sink, SinkConfig, Stage};
use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// The spool file that keeps each upstream's capabilities.
const CAPS_FILE: &str = "upstream-capabilities.json";

/// A public MX for `example.com` (loopback clients are strangers: no relay_networks), one
/// upstream `up` at `upstream` (`host:port`) with short timers, then `extra` tables.
fn mx_config(upstream: &str, extra: &str) -> String {
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n\
         [[upstreams]]\nname = \"up\"\naddress = \"{upstream}\"\ntls = \"none\"\n\
         backoff = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"2s\"\n\n\
         [relay]\naccepted_domains = [\"example.com\", \"strict.test\"]\n\n\
         [queue]\nretry = [\"1s\"]\n{extra}",
        listener("mx", free_port(), "none")
    )
}

fn start_mx(upstream_port: u16, extra: &str) -> Relay {
    Relay::start(&mx_config(&format!("127.0.0.1:{upstream_port}"), extra))
}

fn no_smtputf8() -> SinkConfig {
    SinkConfig {
        smtputf8: false,
        ..SinkConfig::default()
    }
}

/// MAIL (with `params`), RCPT for each recipient, DATA, `message` (CRLF, not dot-stuffed: no
/// line starts with a dot), the final dot; the reply to the first command that is not 2xx/354,
/// or to the final dot.
fn transaction(c: &mut SmtpClient, mail: &str, rcpts: &[&str], message: &str) -> (u16, String) {
    let reply = c.cmd(&format!("MAIL FROM:{mail}"));
    if reply.0 != 250 {
        return reply;
    }
    for r in rcpts {
        let reply = c.cmd(&format!("RCPT TO:<{r}>"));
        if reply.0 != 250 {
            return reply;
        }
    }
    let reply = c.cmd("DATA");
    if reply.0 != 354 {
        return reply;
    }
    c.send_raw(message.as_bytes());
    c.send_raw(b".\r\n");
    c.read_reply()
}

const ASCII_MESSAGE: &str = "From: <victim@third.test>\r\nTo: <kate@example.com>\r\n\
                             Subject: plain\r\n\r\nhello\r\n";

#[test]
fn stranger_smtputf8_to_a_route_without_smtputf8_is_553_at_rcpt_and_nothing_is_queued_or_bounced() {
    let sink = Sink::start(no_smtputf8());
    let relay = start_mx(sink.port(), "");
    let mut c = SmtpClient::greeted(relay.port(0));

    // The reported case: a forged ASCII sender, a non-ASCII local recipient.
    c.expect("MAIL FROM:<victim@third.test> SMTPUTF8", 250);
    assert_reply(&c.cmd("RCPT TO:<j\u{f6}rg@example.com>"), 553, "5.6.7");
    c.expect("RSET", 250);
    // A non-ASCII sender makes every recipient of such a route impossible.
    c.expect("MAIL FROM:<j\u{f6}rg@third.test> SMTPUTF8", 250);
    assert_reply(&c.cmd("RCPT TO:<kate@example.com>"), 553, "5.6.7");
    c.expect("RSET", 250);
    assert_log_fields(&relay, &[("rule", "route_smtputf8")]);

    // The same session then sends an ASCII message with SMTPUTF8 declared: it is accepted and
    // is the only thing that reaches the upstream (and the only thing ever queued).
    let (code, text) = transaction(
        &mut c,
        "<victim@third.test> SMTPUTF8",
        &["kate@example.com"],
        ASCII_MESSAGE,
    );
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    assert!(sink.wait_for(1, WAIT), "{}", relay.log());
    assert!(relay.wait_for_queue_len(0, WAIT));
    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "victim@third.test");
    assert_eq!(got[0].rcpts, ["kate@example.com"]);
    // Sent without SMTPUTF8: its envelope and header section are ASCII.
    assert!(
        !got[0]
            .mail_params
            .iter()
            .any(|p| p.eq_ignore_ascii_case("SMTPUTF8")),
        "{:?}",
        got[0].mail_params
    );
    // No bounce either: one would have been committed to the spool before the message was
    // removed, and sent to the same upstream, so the empty queue and the one message at the
    // sink say there was none.
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn non_ascii_subject_with_smtputf8_to_a_route_without_smtputf8_is_554_5_6_9_after_the_dot() {
    let sink = Sink::start(no_smtputf8());
    let relay = start_mx(sink.port(), "");
    let mut c = SmtpClient::greeted(relay.port(0));
    let utf8 = "From: <victim@third.test>\r\nTo: <kate@example.com>\r\n\
                Subject: caf\u{e9}\r\n\r\nhello\r\n";
    let reply = transaction(
        &mut c,
        "<victim@third.test> SMTPUTF8",
        &["kate@example.com"],
        utf8,
    );
    assert_reply(&reply, 554, "5.6.9");
    assert_log_fields(&relay, &[("rule", "route_smtputf8_headers")]);
    assert!(
        relay.spool_files().is_empty(),
        "a refused message was queued"
    );

    // Non-ASCII in the body only needs no SMTPUTF8; the session goes on.
    let body_only = "Subject: plain\r\n\r\ncaf\u{e9}\r\n";
    let (code, text) = transaction(
        &mut c,
        "<victim@third.test> SMTPUTF8 BODY=8BITMIME",
        &["kate@example.com"],
        body_only,
    );
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    assert!(sink.wait_for(1, WAIT));
    assert_eq!(sink.messages().len(), 1);
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn a_route_with_smtputf8_still_gets_utf8_addresses_and_headers_with_the_parameter() {
    let sink = Sink::start(SinkConfig::default());
    let relay = start_mx(sink.port(), "");
    let mut c = SmtpClient::greeted(relay.port(0));
    let utf8 = "Subject: caf\u{e9}\r\n\r\nhello\r\n";
    let (code, text) = transaction(
        &mut c,
        "<victim@third.test> SMTPUTF8",
        &["j\u{f6}rg@example.com"],
        utf8,
    );
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    assert!(sink.wait_for(1, WAIT));
    let m = &sink.messages()[0];
    assert!(
        m.mail_params.iter().any(|p| p == "SMTPUTF8"),
        "{:?}",
        m.mail_params
    );
    assert_eq!(m.rcpts, ["j\u{f6}rg@example.com"]);
}

#[test]
fn capabilities_are_remembered_across_a_restart_while_the_upstream_is_down() {
    let sink = Sink::start(SinkConfig::default());
    let mut relay = start_mx(sink.port(), "");
    let caps = relay.spool.join(CAPS_FILE);
    assert!(
        wait_until(WAIT, || fs::read_to_string(&caps)
            .is_ok_and(|t| t.contains("\"smtputf8\": true"))),
        "capabilities not saved:\n{}",
        relay.log()
    );
    // The upstream goes down, the relay restarts during the outage.
    sink.stop();
    relay.kill9();
    relay.restart();
    // The capabilities come from the spool: the upstream is down, yet SMTPUTF8 is accepted.
    let mut c = SmtpClient::greeted(relay.port(0));
    c.expect("MAIL FROM:<j\u{f6}rg@third.test> SMTPUTF8", 250);
    c.expect("RCPT TO:<kate@example.com>", 250);
    c.cmd("QUIT");

    // Never seen (a fresh spool, the upstream down): SMTPUTF8 counts as absent.
    let fresh = start_mx(free_port(), "");
    let mut c = SmtpClient::greeted(fresh.port(0));
    c.expect("MAIL FROM:<j\u{f6}rg@third.test> SMTPUTF8", 250);
    assert_reply(&c.cmd("RCPT TO:<kate@example.com>"), 553, "5.6.7");
}

#[test]
fn eight_bit_mime_and_size_beyond_the_route_are_refused_before_anything_is_queued() {
    // strict.test goes to an upstream without 8BITMIME and with SIZE 5000; example.com to one
    // with both.
    let strict = Sink::start(SinkConfig {
        eightbitmime: false,
        size: Some(5000),
        ..SinkConfig::default()
    });
    let lenient = Sink::start(SinkConfig::default());
    let extra = format!(
        "[[upstreams]]\nname = \"strict\"\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n\
         domains = [\"strict.test\"]\n",
        strict.port()
    );
    let relay = start_mx(lenient.port(), &extra);
    let mut c = SmtpClient::greeted(relay.port(0));

    c.expect("MAIL FROM:<a@third.test> BODY=8BITMIME", 250);
    assert_reply(&c.cmd("RCPT TO:<eight@strict.test>"), 550, "5.6.3");
    // Per recipient: the other route takes 8-bit MIME.
    c.expect("RCPT TO:<eight@example.com>", 250);
    c.expect("RSET", 250);
    assert_log_fields(&relay, &[("rule", "route_8bitmime")]);

    c.expect("MAIL FROM:<a@third.test> SIZE=6000", 250);
    assert_reply(&c.cmd("RCPT TO:<big@strict.test>"), 552, "5.3.4");
    c.expect("RSET", 250);

    // No SIZE declared: the received size decides after the dot.
    let big = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789012345678901234567890123456789\r\n".repeat(200)
    );
    assert_reply(
        &transaction(&mut c, "<a@third.test>", &["big@strict.test"], &big),
        552,
        "5.3.4",
    );
    assert_log_fields(&relay, &[("rule", "route_size")]);
    assert!(relay.spool_files().is_empty());

    // What fits goes through.
    let (code, text) = transaction(
        &mut c,
        "<a@third.test>",
        &["small@strict.test"],
        "Subject: small\r\n\r\nx\r\n",
    );
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    assert!(strict.wait_for(1, WAIT));
    assert!(relay.wait_for_queue_len(0, WAIT));
    assert!(lenient.messages().is_empty(), "a bounce was sent");
    assert!(strict.violations().is_empty(), "{:?}", strict.violations());
}

/// The `text/rfc822-headers` part of a DSN (between its blank line and the closing boundary).
fn returned_headers(dsn: &str) -> &str {
    let start = dsn
        .find("Content-Description: Undelivered message headers\r\n\r\n")
        .expect("headers part")
        + "Content-Description: Undelivered message headers\r\n\r\n".len();
    let end = start + dsn[start..].rfind("\r\n--").expect("closing boundary");
    &dsn[start..end]
}

/// A message from `a@example.org` with about 24 KB of header fields, refused by the upstream
/// for `nobody@example.com`: its DSN goes back through the same upstream.
fn bounce_with_big_headers(relay: &Relay, sink: &Sink) -> String {
    let pad: String = (0..220)
        .map(|i| format!("X-Pad-{i:03}: {}\r\n", "p".repeat(100)))
        .collect();
    let message = format!("From: <a@example.org>\r\nSubject: padded\r\n{pad}\r\nbody\r\n");
    assert!(message.len() > 24_000);
    let mut c = SmtpClient::greeted(relay.port(0));
    let (code, text) = transaction(&mut c, "<a@example.org>", &["nobody@example.com"], &message);
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    assert!(sink.wait_for(1, WAIT), "no DSN:\n{}", relay.log());
    let dsn = &sink.messages()[0];
    assert_eq!(dsn.mail_from, "");
    String::from_utf8(dsn.data.clone()).unwrap()
}

fn refusing_sink() -> Sink {
    let mut config = SinkConfig::default();
    config
        .rcpt_replies
        .insert("nobody@example.com".into(), "550 5.1.1 no such user".into());
    Sink::start(config)
}

#[test]
fn dsn_returns_at_most_8_kib_of_headers_and_names_a_remote_mta_only_by_its_host_name() {
    // Configured by host name: Remote-MTA names it.
    let sink = refusing_sink();
    let relay = Relay::start(&mx_config(&format!("localhost:{}", sink.port()), ""));
    let dsn = bounce_with_big_headers(&relay, &sink);
    assert!(dsn.contains("Remote-MTA: dns; localhost\r\n"), "{dsn}");
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    let headers = returned_headers(&dsn);
    assert!(
        headers.len() <= 8 * 1024,
        "{} octets returned",
        headers.len()
    );
    // Cut between fields, never inside one: the first fields are there, the last is not.
    assert!(headers.contains("Subject: padded\r\n"));
    assert!(!headers.contains("X-Pad-219"));
    assert!(headers.ends_with("\r\n") && !headers.ends_with(" p\r\n"));
    assert!(dsn.len() < 12 * 1024, "DSN of {} octets", dsn.len());
    drop(relay);

    // Configured by IP address: no Remote-MTA (RFC 3464 §2.3.5 wants a dns name).
    let sink = refusing_sink();
    let relay = start_mx(sink.port(), "");
    let dsn = bounce_with_big_headers(&relay, &sink);
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(!dsn.contains("Remote-MTA"), "{dsn}");
}

#[test]
fn a_failure_decided_by_the_relay_itself_names_no_remote_mta() {
    // The upstream offered SMTPUTF8 when the message was accepted, then came back without it:
    // the relay refuses to send the message (nothing reached the upstream), and the DSN says
    // so without naming the upstream as the MTA that refused.
    let sink = Sink::start(SinkConfig::default());
    let port = sink.port();
    let relay = Relay::start(&mx_config(&format!("localhost:{port}"), ""));
    let caps = relay.spool.join(CAPS_FILE);
    assert!(wait_until(WAIT, || fs::read_to_string(&caps)
        .is_ok_and(|t| t.contains("\"smtputf8\": true"))));
    sink.stop();
    let mut c = SmtpClient::greeted(relay.port(0));
    let (code, text) = transaction(
        &mut c,
        "<a@example.org> SMTPUTF8",
        &["j\u{f6}rg@example.com"],
        "Subject: x\r\n\r\nx\r\n",
    );
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    let sink = Sink::start_on(port, no_smtputf8());
    assert!(sink.wait_for(1, WAIT), "no DSN:\n{}", relay.log());
    let dsn = String::from_utf8_lossy(&sink.messages()[0].data).into_owned();
    assert!(dsn.contains("Status: 5.6.7"), "{dsn}");
    assert!(!dsn.contains("Remote-MTA"), "{dsn}");
    assert!(!sink.commands().iter().any(|c| c.contains("j\u{f6}rg")));
}

#[test]
fn six_messages_failing_at_once_move_the_backoff_one_step() {
    // The upstream greets, then never answers EHLO: every attempt fails after `timeout`, so
    // six deliveries started together fail together.
    let sink = Sink::start(SinkConfig {
        stall_at: Some(Stage::Ehlo),
        ..SinkConfig::default()
    });
    let config = format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n\
         [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n\
         backoff = \"30s\"\ntimeout = \"1s\"\nmax_connections = 10\n\n\
         [relay]\nrelay_networks = [\"127.0.0.0/8\"]\n",
        listener("mx", free_port(), "none"),
        sink.port()
    );
    let relay = Relay::start(&config);
    let mut c = SmtpClient::greeted(relay.port(0));
    for i in 0..6 {
        let message = format!("Subject: m{i}\r\n\r\nx\r\n");
        let (code, text) = transaction(&mut c, "<a@example.org>", &["b@example.com"], &message);
        assert_eq!(code, 250, "{text}");
    }
    c.cmd("QUIT");
    // Every attempt's failure is recorded by the breaker before its state reaches the spool.
    let failed_once = || {
        let out = relay.command(&["queue", "list", "--json"]);
        let list = String::from_utf8_lossy(&out.stdout).into_owned();
        list.lines()
            .filter(|l| l.contains("\"attempts\":1,"))
            .count()
    };
    assert!(wait_until(WAIT, || failed_once() == 6), "{}", relay.log());
    let log = relay.log();
    let down = [("rule", "upstream_down"), ("upstream", "up")];
    assert_eq!(count_log_fields(&log, &down), 1, "{log}");
    assert!(
        log_has_fields(
            &log,
            &[
                ("rule", "upstream_down"),
                ("backoff_secs", "30"),
                ("failed_probes", "1")
            ]
        ),
        "{log}"
    );
    // The other five failures leave the back-off as it is (their line says for how long).
    let unchanged = [("upstream", "up"), ("down_for_secs", "*")];
    assert_eq!(count_log_fields(&log, &unchanged), 5, "{log}");
    assert!(!log_has_fields(&log, &[("backoff_secs", "60")]), "{log}");
}

#[test]
fn check_config_warns_when_everyone_may_send_to_any_local_part() {
    let dir = TestDir::new();
    let open = mx_config("127.0.0.1:25", "");
    let report = check_config(&dir, &open);
    assert!(
        report.contains(
            "Listener \"mx\" is open to everyone and accepts mail for accepted_domains without \
             relay.recipients_file: mail to unknown recipients is accepted, then bounced to its \
             possibly forged sender (backscatter)"
        ),
        "{report}"
    );
    // With a recipient list, or a listener restricted to known peers, nothing to warn about.
    dir.write("recipients.txt", "kate@example.com\n");
    let listed = open.replace(
        "[relay]\n",
        "[relay]\nrecipients_file = \"{dir}/recipients.txt\"\n",
    );
    assert!(!check_config(&dir, &listed).contains("backscatter"));
    let restricted = open.replace(
        "tls = \"none\"\n\n[[upstreams]]",
        "tls = \"none\"\nallow = [\"192.0.2.0/24\"]\n\n[[upstreams]]",
    );
    assert_ne!(restricted, open);
    assert!(!check_config(&dir, &restricted).contains("backscatter"));
}

#[test]
fn a_recipient_without_any_route_is_refused_at_rcpt_not_queued_until_it_expires() {
    let sink = Sink::start(SinkConfig::default());
    let config = mx_config(&format!("127.0.0.1:{}", sink.port()), "").replace(
        "tls = \"none\"\nbackoff",
        "tls = \"none\"\ndomains = [\"strict.test\"]\nbackoff",
    );
    let relay = Relay::start(&config);
    let mut c = SmtpClient::greeted(relay.port(0));
    c.expect("MAIL FROM:<a@third.test>", 250);
    assert_reply(&c.cmd("RCPT TO:<kate@example.com>"), 550, "5.4.4");
    assert_log_fields(&relay, &[("rule", "no_route")]);
    c.expect("RCPT TO:<kate@strict.test>", 250);
    c.expect("QUIT", 221);
    assert!(relay.spool_files().is_empty());
}

/// The upstream's reply reaches the DSN as the upstream sent it: a multi-line refusal with an
/// enhanced status code gives that code as the `Status` and every line, in order, in the
/// `Diagnostic-Code` (RFC 3464 §2.3.4, §2.3.6).
#[test]
fn a_multi_line_upstream_refusal_reaches_the_dsn_with_its_enhanced_status_and_every_line() {
    let mut config = SinkConfig::default();
    config.rcpt_replies.insert(
        "nobody@example.com".into(),
        "550-5.7.26 This mail has been blocked because the sender is\r\n\
         550-5.7.26 unauthenticated. Senders must authenticate\r\n\
         550 5.7.26 with SPF or DKIM."
            .into(),
    );
    let sink = Sink::start(config);
    let relay = start_mx(sink.port(), "");
    let mut c = SmtpClient::greeted(relay.port(0));
    let (code, text) = transaction(
        &mut c,
        "<a@example.org>",
        &["nobody@example.com"],
        "Subject: blocked\r\n\r\nbody\r\n",
    );
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    assert!(sink.wait_for(1, WAIT), "no DSN:\n{}", relay.log());
    let dsn = String::from_utf8(sink.messages()[0].data.clone()).unwrap();
    assert!(dsn.contains("\r\nStatus: 5.7.26\r\n"), "{dsn}");
    // Folding puts a CRLF before a space; unfolded, the field is the reply's lines joined.
    let unfolded = dsn.replace("\r\n ", " ");
    let field = "\r\nDiagnostic-Code: smtp; 550 5.7.26 This mail has been blocked because the \
                 sender is 5.7.26 unauthenticated. Senders must authenticate 5.7.26 with SPF or \
                 DKIM.\r\n";
    assert!(unfolded.contains(field), "{dsn}");
}
