//! Interoperability with real clients and upstreams, against the real binary on loopback: the
//! replies the RFCs fix (STARTTLS without parameters, postmaster, `552 5.5.3` at RCPT, the
//! session time limit, a failing password verifier), line endings from real submission clients
//! (`bare_lf`), what is passed on upstream (`BODY=8BITMIME` from the octets received, TLS
//! verification), and the delivery status notifications (RFC 3464) sent back.

mod common;

use std::time::Duration;

use common::sink::{Sink, SinkConfig};
use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// `[relay]` accepting mail for example.com, plus `extra`.
fn relay_extra(extra: &str) -> String {
    format!("[relay]\naccepted_domains = [\"example.com\"]\n\n{extra}")
}

/// One listener `mx` (`tls`, plus `listener_keys`) before an upstream at `upstream_port`.
fn start_with(listener_keys: &str, tls: &str, upstream_port: u16, extra: &str) -> Relay {
    let l = listener("mx", free_port(), tls) + listener_keys;
    Relay::start(&config(&[l], upstream_port, &relay_extra(extra)))
}

/// Connected, greeted and after `EHLO client.test`.
fn ready(port: u16) -> SmtpClient {
    let mut c = SmtpClient::greeted(port);
    c.expect("EHLO client.test", 250);
    c
}

// --- STARTTLS takes no parameters (RFC 3207 §4) ---------------------------------------------

#[test]
fn starttls_with_a_parameter_is_501_and_the_session_stays_in_plaintext() {
    let sink = Sink::start(SinkConfig::default());
    let relay = start_with("", "starttls", sink.port(), "");
    let mut c = ready(relay.port(0));
    assert_reply(&c.cmd("STARTTLS foo"), 501, "5.5.4");
    // Still plaintext: the next command is answered in the clear, and the message goes through.
    assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
    assert_reply(&c.cmd("DATA now"), 501, "5.5.4");
    assert_reply(&c.cmd("RSET all"), 501, "5.5.4");
    let reply = c.send_message(
        "a@example.com",
        &["b@example.com"],
        "Subject: t\r\n\r\nok\r\n",
    );
    assert_reply(&reply, 250, "2.0.0");
    assert!(
        sink.wait_for(1, WAIT),
        "nothing delivered:\n{}",
        relay.log()
    );
    let m = &sink.messages()[0];
    assert_eq!(m.rcpts, ["b@example.com"]);
    assert!(!m.tls);
    assert_log_fields(&relay, &[("rule", "starttls_argument")]);
    // A plain STARTTLS (trailing blanks allowed) still works afterwards.
    c.expect("STARTTLS ", 220);
    c.upgrade_tls(&relay.cert_path(), "localhost");
    c.expect("EHLO client.test", 250);
    c.expect("QUIT", 221);
}

// --- postmaster (RFC 5321 §4.5.1) -----------------------------------------------------------

#[test]
fn postmaster_from_a_stranger_is_accepted_despite_recipients_file_and_goes_to_relay_postmaster() {
    let sink = Sink::start(SinkConfig::default());
    let dir = TestDir::new();
    dir.write("recipients.txt", "kate@example.com\n");
    let l = listener("mx", free_port(), "none");
    let relay = Relay::start_in(
        dir,
        &config(
            &[l],
            sink.port(),
            "[relay]\naccepted_domains = [\"example.com\"]\n\
             recipients_file = \"{dir}/recipients.txt\"\npostmaster = \"hostmaster@corp.test\"\n",
        ),
    );
    let mut c = ready(relay.port(0));
    c.expect("MAIL FROM:<someone@stranger.test>", 250);
    assert_reply(&c.cmd("RCPT TO:<Postmaster>"), 250, "2.1.5");
    assert_reply(&c.cmd("RCPT TO:<POSTMASTER@Example.COM>"), 250, "2.1.5");
    // The list still applies to everyone else, and other domains are still not relayed.
    assert_reply(&c.cmd("RCPT TO:<nobody@example.com>"), 550, "5.1.1");
    assert_reply(&c.cmd("RCPT TO:<postmaster@other.test>"), 550, "5.7.1");
    assert_reply(&c.cmd("RCPT TO:<hostmaster@corp.test>"), 550, "5.7.1");
    c.expect("DATA", 354);
    c.send_raw(b"Subject: abuse report\r\n\r\nhello\r\n.\r\n");
    assert_reply(&c.read_reply(), 250, "2.0.0");
    assert!(
        sink.wait_for(1, WAIT),
        "nothing delivered:\n{}",
        relay.log()
    );
    let m = &sink.messages()[0];
    assert_eq!(m.mail_from, "someone@stranger.test");
    // The domain goes upstream in its canonical form (lower case), the local part as written.
    assert_eq!(m.rcpts, ["hostmaster@corp.test", "POSTMASTER@example.com"]);
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn postmaster_without_the_key_goes_to_postmaster_at_the_first_accepted_domain() {
    let sink = Sink::start(SinkConfig::default());
    let relay = start_with("", "none", sink.port(), "");
    let mut c = ready(relay.port(0));
    let reply = c.send_message("", &["postmaster"], "Subject: t\r\n\r\nok\r\n");
    assert_reply(&reply, 250, "2.0.0");
    assert!(
        sink.wait_for(1, WAIT),
        "nothing delivered:\n{}",
        relay.log()
    );
    assert_eq!(sink.messages()[0].rcpts, ["postmaster@example.com"]);
}

// --- 552 5.5.3 at RCPT is "too many recipients" (RFC 5321 §4.5.3.1.10) ----------------------

/// Fast retries, so a deferred recipient is retried within a test.
/// Whether every message the relay finished had no recipient failed: each `queue_id=` line
/// with a `failed=` count says `failed=0`.
fn nothing_failed(relay: &Relay) -> bool {
    let log = relay.log();
    count_log_fields(&log, &[("queue_id", "*"), ("failed", "*")])
        == count_log_fields(&log, &[("queue_id", "*"), ("failed", "0")])
}

const FAST_RETRY: &str = "[queue]\nretry = [\"1s\"]\n";

fn too_many(n: usize) -> SinkConfig {
    SinkConfig {
        max_rcpts: Some((n, "552 5.5.3 Too many recipients".to_owned())),
        ..SinkConfig::default()
    }
}

#[test]
fn upstream_552_5_5_3_at_rcpt_continues_on_the_same_connection_and_bounces_nothing() {
    too_many_continues(true);
}

#[test]
fn upstream_552_5_5_3_without_pipelining_continues_on_the_same_connection() {
    too_many_continues(false);
}

fn too_many_continues(pipelining: bool) {
    let sink = Sink::start(SinkConfig {
        pipelining,
        ..too_many(2)
    });
    let relay = start_with("", "none", sink.port(), FAST_RETRY);
    let mut c = ready(relay.port(0));
    let rcpts = [
        "r1@example.com",
        "r2@example.com",
        "r3@example.com",
        "r4@example.com",
        "r5@example.com",
    ];
    // Over the size kept in memory: each transaction reads the spool file again.
    let body = format!(
        "Subject: many\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(70)).repeat(1600)
    );
    let reply = c.send_message("s@example.com", &rcpts, &body);
    assert_reply(&reply, 250, "2.0.0");
    assert!(
        sink.wait_for(3, WAIT),
        "not all delivered:\n{}",
        relay.log()
    );
    let got: Vec<(Vec<String>, usize)> = sink
        .messages()
        .iter()
        .map(|m| (m.rcpts.clone(), m.conn))
        .collect();
    assert_eq!(
        got,
        [
            (
                vec!["r1@example.com".to_owned(), "r2@example.com".to_owned()],
                1
            ),
            (
                vec!["r3@example.com".to_owned(), "r4@example.com".to_owned()],
                1
            ),
            (vec!["r5@example.com".to_owned()], 1),
        ]
    );
    let first = &sink.messages()[0].data;
    for m in sink.messages() {
        // The whole message each time (the same Received: header first, then the body).
        assert!(
            m.data == *first && m.data.ends_with(body.as_bytes()),
            "message {:?} differs",
            m.rcpts
        );
    }
    assert!(
        relay.wait_for_queue_len(0, WAIT),
        "still queued:\n{}",
        relay.log()
    );
    // No bounce (a message from <>) ever reached the upstream.
    assert_eq!(sink.messages().len(), 3, "{:?}", sink.messages());
    assert!(nothing_failed(&relay), "{}", relay.log());
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn upstream_refusing_every_rcpt_as_too_many_is_not_looped_on_and_retried_later() {
    let sink = Sink::start(too_many(0));
    let relay = start_with("", "none", sink.port(), "[queue]\nretry = [\"4s\"]\n");
    let mut c = ready(relay.port(0));
    let reply = c.send_message(
        "s@example.com",
        &["x@example.com", "y@example.com"],
        "Subject: t\r\n\r\nhi\r\n",
    );
    assert_reply(&reply, 250, "2.0.0");
    assert_log_fields(
        &relay,
        &[
            ("rcpt", "y@example.com"),
            ("reply", "RCPT: 552 5.5.3 Too many recipients"),
        ],
    );
    let rcpt_commands = || {
        sink.commands()
            .iter()
            .filter(|l| l.starts_with("RCPT"))
            .count()
    };
    // The attempt is over (both deferred) after one transaction of two RCPTs, not a new
    // transaction per refusal; the retry is seconds away.
    assert_eq!(rcpt_commands(), 2, "{:?}", sink.commands());
    sink.set_config(SinkConfig::default());
    assert!(sink.wait_for(1, WAIT), "never retried:\n{}", relay.log());
    let m = &sink.messages()[0];
    assert_eq!(m.rcpts, ["x@example.com", "y@example.com"]);
    assert_eq!(
        m.mail_from,
        "s@example.com",
        "a bounce was sent: {:?}",
        sink.messages()
    );
    assert!(nothing_failed(&relay), "{}", relay.log());
}

#[test]
fn upstream_552_mailbox_full_at_rcpt_still_bounces() {
    let mut config = SinkConfig::default();
    config.rcpt_replies.insert(
        "full@example.com".to_owned(),
        "552 5.2.2 Mailbox full".to_owned(),
    );
    let sink = Sink::start(config);
    let relay = start_with("", "none", sink.port(), FAST_RETRY);
    let mut c = ready(relay.port(0));
    let reply = c.send_message(
        "s@example.com",
        &["full@example.com", "ok@example.com"],
        "Subject: t\r\n\r\nhi\r\n",
    );
    assert_reply(&reply, 250, "2.0.0");
    // The message to ok@, then the bounce for full@ to the sender.
    assert!(sink.wait_for(2, WAIT), "{}", relay.log());
    let messages = sink.messages();
    assert_eq!(messages[0].rcpts, ["ok@example.com"]);
    let bounce = &messages[1];
    assert_eq!(
        (bounce.mail_from.as_str(), bounce.rcpts.as_slice()),
        ("", &["s@example.com".to_owned()][..])
    );
    assert!(
        contains(&bounce.data, b"Status: 5.2.2"),
        "{}",
        String::from_utf8_lossy(&bounce.data)
    );
}

// --- 421 4.4.2 at the session time limit (RFC 5321 §4.5.3.2) --------------------------------

#[test]
fn session_time_limit_sends_421_4_4_2_before_closing_busy_and_in_data() {
    let relay = start_with(
        "",
        "none",
        free_port(),
        "[limits]\nsession_timeout = \"2s\"\n",
    );
    let started = std::time::Instant::now();
    // A busy session: a command every 200 ms, each answered, until the limit.
    let mut busy = ready(relay.port(0));
    // A session in the middle of a message, trickling a line every 200 ms.
    let mut data = ready(relay.port(0));
    data.expect("MAIL FROM:<a@example.com>", 250);
    data.expect("RCPT TO:<b@example.com>", 250);
    data.expect("DATA", 354);
    data.send_raw(b"Subject: slow\r\n\r\n");
    let mut busy_reply = None;
    while busy_reply.is_none() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        // `busy` connected first, so it reaches the limit first: while it is open, so is `data`.
        let r = busy.cmd("NOOP");
        if r.0 != 250 {
            busy_reply = Some(r);
        } else {
            data.send_raw(b"line\r\n");
        }
    }
    let busy_reply = busy_reply.expect("the busy session was never closed");
    assert_reply(&busy_reply, 421, "4.4.2");
    assert!(started.elapsed() >= Duration::from_secs(2), "closed early");
    assert!(busy.read_to_close().is_empty());
    assert_reply(&data.read_reply(), 421, "4.4.2");
    assert!(data.read_to_close().is_empty());
    assert!(
        relay.queued_messages().is_empty(),
        "a partial message was queued"
    );
    assert_log_fields(&relay, &[("rule", "session_time_limit")]);
}

#[test]
fn session_time_limit_holds_during_a_stalled_tls_handshake() {
    // No SMTP reply can be sent in the middle of a handshake: the connection is closed at the
    // session's limit (2 s) instead of after the 30 s handshake timeout.
    let relay = start_with(
        "",
        "starttls",
        free_port(),
        "[limits]\nsession_timeout = \"2s\"\n",
    );
    let mut c = ready(relay.port(0));
    c.expect("STARTTLS", 220);
    let started = std::time::Instant::now();
    // The first bytes of a TLS record header, then nothing.
    c.send_raw(b"\x16\x03\x01\x00\x50\x01");
    assert!(c.read_to_close().is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        started.elapsed()
    );
    assert_log_fields(&relay, &[("rule", "session_time_limit")]);
}

// --- A password check that fails inside the relay is 454 4.7.0, not counted ------------------

/// Parses as an argon2id PHC string, but argon2 refuses its parameters (m=1 KiB).
const UNUSABLE_HASH: &str =
    "$argon2id$v=19$m=1,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE";

/// A submission listener (STARTTLS, AUTH required) with the users of `users_toml`, then `extra`.
fn submission(users_toml: &str, upstream_port: u16, extra: &str) -> Relay {
    let dir = TestDir::new();
    dir.write("users.toml", users_toml);
    let toml = config(
        &[listener("submission", free_port(), "starttls")
            + "require_tls = true\nauth = \"required\"\n"],
        upstream_port,
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n{extra}"
        ),
    );
    Relay::start_in(dir, &toml)
}

/// Greeted, through STARTTLS, EHLO again: ready for AUTH.
fn over_tls(relay: &Relay) -> SmtpClient {
    let mut c = ready(relay.port(0));
    c.starttls(&relay.cert_path());
    c.expect("EHLO client.test", 250);
    c
}

#[test]
fn a_hash_argon2_cannot_use_is_refused_at_load_not_found_at_the_first_login() {
    // Such a hash once loaded, and every AUTH for its user failed inside the relay (now 454
    // 4.7.0, not counted: see inbound::verifier's tests), faster than a real check. It is bad
    // configuration: check-config and `run` refuse it, naming the entry.
    let users = format!(
        "[[users]]\nname = \"broken\"\npassword_hash = \"{UNUSABLE_HASH}\"\n\n\
         [[users]]\nname = \"alice\"\npassword_hash = \"{}\"\nsenders = [\"alice@example.com\"]\n",
        passwd("secret")
    );
    let dir = TestDir::new();
    dir.write("users.toml", &users);
    write_certs(&dir.join("certs"));
    let toml = dir.expand(&config(
        &[listener("submission", free_port(), "starttls") + "auth = \"required\"\n"],
        free_port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n\n[auth]\nusers_file = \"{dir}/users.toml\"\n",
    ));
    let path = dir.write("portcullis.toml", &toml);
    for cmd in ["check-config", "run"] {
        let out = std::process::Command::new(BIN)
            .args([cmd, "--config"])
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}: {out:?}");
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("users[0].password_hash") && text.contains("cannot be used"),
            "{cmd}: {text}"
        );
    }
}

// --- Delivery status notifications (RFC 3464) ------------------------------------------------

/// The upstream's long refusal, as Postfix words it: folding it must not change it.
const LONG_REFUSAL: &str = "550 5.1.1 <kate@example.com>: Recipient address rejected: \
                            User unknown in virtual mailbox table";

/// The bounce the sink received (the message from `<>`), once there is one.
fn bounce_of(sink: &Sink, relay: &Relay) -> common::sink::Received {
    assert!(
        wait_until(WAIT, || sink
            .messages()
            .iter()
            .any(|m| m.mail_from.is_empty())),
        "no bounce:\n{}",
        relay.log()
    );
    sink.messages()
        .into_iter()
        .find(|m| m.mail_from.is_empty())
        .unwrap()
}

/// The bounce for a message to `rcpt`, which the upstream refuses at RCPT with `refusal`.
fn bounce_for_refused(rcpt: &str, refusal: &str) -> common::sink::Received {
    let mut config = SinkConfig::default();
    config
        .rcpt_replies
        .insert(rcpt.to_owned(), refusal.to_owned());
    let sink = Sink::start(config);
    let relay = start_with("", "none", sink.port(), FAST_RETRY);
    let mut c = ready(relay.port(0));
    let reply = c.send_message("s@example.com", &[rcpt], "Subject: t\r\n\r\nhi\r\n");
    assert_reply(&reply, 250, "2.0.0");
    bounce_of(&sink, &relay)
}

/// Unfold a header section or part (RFC 5322 §2.2.3): remove each CRLF before a space or tab.
fn unfold(text: &str) -> String {
    text.replace("\r\n ", " ").replace("\r\n\t", "\t")
}

#[test]
fn dsn_diagnostic_code_unfolds_to_the_upstream_reply_unchanged() {
    let bounce = bounce_for_refused("kate@example.com", LONG_REFUSAL);
    let text = String::from_utf8(bounce.data.clone()).unwrap();
    // Folded (the field is longer than 76), and unfolded it is the reply exactly.
    let field = format!("Diagnostic-Code: smtp; {LONG_REFUSAL}");
    assert!(!text.contains(&field), "not folded:\n{text}");
    assert!(unfold(&text).contains(&format!("{field}\r\n")), "{text}");
    assert!(text.lines().all(|l| l.len() <= 998));
}

#[test]
fn dsn_text_part_for_a_utf8_address_is_utf8_quoted_printable() {
    let mut config = SinkConfig::default();
    config.rcpt_replies.insert(
        "ü@example.com".to_owned(),
        "550 5.1.1 no such user".to_owned(),
    );
    let sink = Sink::start(config);
    let relay = start_with("", "none", sink.port(), FAST_RETRY);
    let mut c = ready(relay.port(0));
    c.expect("MAIL FROM:<s@example.com> SMTPUTF8", 250);
    c.expect("RCPT TO:<ü@example.com>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: t\r\n\r\nhi\r\n.\r\n");
    assert_reply(&c.read_reply(), 250, "2.0.0");
    let bounce = bounce_of(&sink, &relay);
    let text = String::from_utf8_lossy(&bounce.data).into_owned();
    assert!(
        text.contains(
            "Content-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n"
        ),
        "{text}"
    );
    // The text part is 7-bit, and reads back as the address itself (not `?@`).
    assert!(
        text.contains("<=C3=BC@example.com>: the upstream server said: 550 5.1.1"),
        "{text}"
    );
    let parsed = mail_parser::MessageParser::default()
        .parse(&bounce.data)
        .unwrap();
    let human = parsed.body_text(0).unwrap();
    assert!(human.contains("<ü@example.com>: "), "{human}");
    assert!(!human.contains("<?@example.com>"), "{human}");
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

// --- tls = "opportunistic" with a ca: warned, since nothing is verified against it -----------

#[test]
fn opportunistic_upstream_with_a_ca_is_warned_about_by_check_config_and_at_start() {
    let dir = TestDir::new();
    let (cert, _) = write_certs(&dir.join("certs"));
    let base = config(
        &[listener("mx", free_port(), "none")],
        free_port(),
        &relay_extra(""),
    );
    let with = |tls: &str| {
        base.replace(
            "tls = \"none\"\n\n[relay]",
            &format!("tls = \"{tls}\"\nca = \"{}\"\n\n[relay]", cert.display()),
        )
    };
    let warning = "Upstream \"up\" sets ca but has tls = \"opportunistic\": its certificate is \
                   not verified against that CA (only tls = \"required\" verifies)";
    let opportunistic = with("opportunistic");
    assert_ne!(opportunistic, base);
    assert!(check_config(&dir, &opportunistic).contains(warning));
    assert!(!check_config(&dir, &with("required")).contains("sets ca"));
    let relay = Relay::start_in(dir, &opportunistic);
    // The running relay reports the same warning as check-config, word for word: this is
    // that output's text, not log prose.
    assert_log(&relay, warning);
}

// --- 8-bit content without BODY=8BITMIME (smtplib send_message, msmtp) -----------------------

const EIGHT_BIT: &str = "Subject: Gr\u{fc}\u{df}e\r\nMIME-Version: 1.0\r\n\
                         Content-Type: text/plain; charset=utf-8\r\n\
                         Content-Transfer-Encoding: 8bit\r\n\r\nSch\u{f6}ne Gr\u{fc}\u{df}e\r\n";

#[test]
fn undeclared_8bit_content_is_passed_upstream_with_body_8bitmime() {
    let sink = Sink::start(SinkConfig::default());
    let relay = start_with("", "none", sink.port(), "");
    let mut c = ready(relay.port(0));
    // Small (kept in memory), then over 64 KiB (the spool file's header is on disk by then),
    // then 7-bit: only the 8-bit ones are declared.
    let big = format!("{EIGHT_BIT}{}", "0123456789abcdef\r\n".repeat(5000));
    for body in [EIGHT_BIT, big.as_str(), "Subject: ascii\r\n\r\nplain\r\n"] {
        let reply = c.send_message("a@example.com", &["b@example.com"], body);
        assert_reply(&reply, 250, "2.0.0");
    }
    assert!(sink.wait_for(3, WAIT), "{}", relay.log());
    // Deliveries run concurrently: find each message by its end.
    let messages = sink.messages();
    for (eight, body) in [
        (true, EIGHT_BIT),
        (true, big.as_str()),
        (false, "plain\r\n"),
    ] {
        let m = messages
            .iter()
            .find(|m| m.data.ends_with(body.as_bytes()))
            .expect("a message is missing or changed");
        let declared = m.mail_params.contains(&"BODY=8BITMIME".to_owned());
        assert_eq!(declared, eight, "{:?}", m.mail_params);
    }
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn undeclared_8bit_content_for_a_route_without_8bitmime_is_554_5_6_3_and_not_queued() {
    let sink = Sink::start(SinkConfig {
        eightbitmime: false,
        ..SinkConfig::default()
    });
    let relay = start_with("", "none", sink.port(), "");
    let mut c = ready(relay.port(0));
    let reply = c.send_message("a@example.com", &["b@example.com"], EIGHT_BIT);
    assert_reply(&reply, 554, "5.6.3");
    assert_log_fields(&relay, &[("rule", "route_8bit_undeclared")]);
    assert!(relay.queued_messages().is_empty(), "queued after 554");
    // The session goes on; 7-bit mail still goes through.
    let reply = c.send_message(
        "a@example.com",
        &["b@example.com"],
        "Subject: ascii\r\n\r\nplain\r\n",
    );
    assert_reply(&reply, 250, "2.0.0");
    assert!(sink.wait_for(1, WAIT), "{}", relay.log());
    assert_eq!(sink.messages().len(), 1);
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

// --- bare_lf: LF-only messages from real clients; smuggling refused in every mode ------------

/// What a mode does with a message whose only fault is a bare LF.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Refused,
    Normalized,
}

/// A plaintext MX listener with `bare_lf = mode` (none: the default), and `relay_networks`.
fn mx_with_bare_lf(mode: Option<&str>, relay_networks: &str, upstream_port: u16) -> Relay {
    let keys = mode
        .map(|m| format!("bare_lf = \"{m}\"\n"))
        .unwrap_or_default();
    let l = listener("mx", free_port(), "none") + &keys;
    Relay::start(&config(
        &[l],
        upstream_port,
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\nrelay_networks = [{relay_networks}]\n"
        ),
    ))
}

#[test]
fn smuggling_is_refused_in_every_bare_lf_mode_and_lf_only_lines_follow_the_mode() {
    let variants = [
        "\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\n.\r", "\r\n.\r", "\r.\n",
    ];
    let cases = [
        (Some("reject"), "\"127.0.0.0/8\"", Expect::Refused),
        (Some("normalize"), "", Expect::Normalized),
        // trusted (also the default): strangers are refused, relay_networks normalised.
        (Some("trusted"), "", Expect::Refused),
        (None, "", Expect::Refused),
        (None, "\"127.0.0.0/8\"", Expect::Normalized),
    ];
    for (mode, networks, expect) in cases {
        let sink = Sink::start(SinkConfig::default());
        let relay = mx_with_bare_lf(mode, networks, sink.port());
        let mut c = ready(relay.port(0));
        let mut accepted = 0;
        for variant in variants {
            c.expect("MAIL FROM:<a@example.com>", 250);
            c.expect("RCPT TO:<b@example.com>", 250);
            c.expect("DATA", 354);
            let mut data = format!("Subject: smuggling\r\n\r\nhello{variant}").into_bytes();
            data.extend_from_slice(
                b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n",
            );
            data.extend_from_slice(b"\r\n.\r\n");
            c.send_raw(&data);
            let bare_cr = variant.contains("\r.") || variant.ends_with('\r');
            let reply = c.read_reply();
            if expect == Expect::Normalized && !bare_cr {
                assert_reply(&reply, 250, "2.0.0");
                accepted += 1;
            } else {
                assert_reply(&reply, 550, "5.5.2");
            }
            // Exactly one reply for the whole thing: the next one belongs to the NOOP.
            assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
        }
        c.expect("QUIT", 221);
        let case = format!("{mode:?} relay_networks=[{networks}]");
        assert!(sink.wait_for(accepted, WAIT), "{case}: {}", relay.log());
        assert!(relay.wait_for_queue_len(0, WAIT), "{case}: {}", relay.log());
        let messages = sink.messages();
        assert_eq!(messages.len(), accepted, "{case}");
        for m in &messages {
            // One envelope, ours; the smuggled commands are only text inside the message.
            assert_eq!(
                (m.mail_from.as_str(), m.rcpts.as_slice()),
                ("a@example.com", &["b@example.com".to_owned()][..]),
                "{case}"
            );
            assert!(
                contains(&m.data, b"\r\nMAIL FROM:<evil@x.test>\r\n"),
                "{case}"
            );
        }
        // What reached the upstream is clean SMTP: no bare LF or CR, lines dot-stuffed.
        assert!(
            sink.violations().is_empty(),
            "{case}: {:?}",
            sink.violations()
        );
        assert_eq!(
            sink.commands()
                .iter()
                .filter(|l| l.contains("evil"))
                .count(),
            0,
            "{case}"
        );
    }
}

#[test]
fn bare_lf_normalize_stores_crlf_and_restuffs_dots_upstream() {
    let sink = Sink::start(SinkConfig::default());
    let relay = mx_with_bare_lf(Some("normalize"), "", sink.port());
    let mut c = ready(relay.port(0));
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b@example.com>", 250);
    c.expect("DATA", 354);
    // As smtplib sends an LF-only message: dots doubled after LF, CRLF before the terminator.
    c.send_raw(b"Subject: lf\n\none\n..dot\n.\ntwo\n\r\n.\r\n");
    assert_reply(&c.read_reply(), 250, "2.0.0");
    // Command lines still need CRLF.
    c.send_raw(b"NOOP\n");
    assert_reply(&c.read_reply(), 500, "5.5.2");
    assert!(sink.wait_for(1, WAIT), "{}", relay.log());
    let m = &sink.messages()[0];
    assert!(
        m.data
            .ends_with(b"Subject: lf\r\n\r\none\r\n.dot\r\n.\r\ntwo\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&m.data)
    );
    assert!(
        contains(&m.raw_data, b"\r\n..dot\r\n..\r\ntwo\r\n"),
        "{:?}",
        String::from_utf8_lossy(&m.raw_data)
    );
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

// --- Real clients ----------------------------------------------------------------------------

/// Environment variable that turns a missing client (python3, curl) into a test failure (set by
/// `.ci/run`, which installs them).
const REQUIRE_CLIENTS: &str = "PORTCULLIS_REQUIRE_CLIENTS";

/// The path of `program` on PATH; `None` (the test is skipped, saying why) when it is missing,
/// unless [`REQUIRE_CLIENTS`] is `1`: then the test fails.
fn client(program: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var(REQUIRE_CLIENTS).as_deref() != Ok("1"),
            "{REQUIRE_CLIENTS}=1 but {program} is missing: apt-get install -y {program}"
        );
        eprintln!("skipped: {program} is not installed");
    }
    found
}

/// A submission relay (STARTTLS, AUTH required, bare_lf left at its default) with the user
/// `alice` (password `secret`) owning alice@example.com, in front of `sink`.
fn submission_for_clients(sink: &Sink) -> Relay {
    let users = format!(
        "[[users]]\nname = \"alice\"\npassword_hash = \"{}\"\nsenders = [\"alice@example.com\"]\n",
        passwd("secret")
    );
    submission(&users, sink.port(), "")
}

/// The body of an LF-only test message as the sink must receive it, with CRLF.
const CLIENT_BODY_CRLF: &[u8] = b"line one\r\n.dot line\r\nline three\r\n";

const SMTPLIB_SCRIPT: &str = r#"
import smtplib, sys
from email.message import EmailMessage
port = int(sys.argv[1])
m = EmailMessage()
m["From"] = "alice@example.com"
m["To"] = "bob@example.com"
m["Subject"] = "smtplib LF-only"
m.set_content("line one\n.dot line\nline three\n")
data = m.as_bytes()
assert b"\r" not in data, "expected an LF-only message"
with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as s:
    s.starttls()
    s.login("alice", "secret")
    refused = s.sendmail("alice@example.com", ["bob@example.com"], data)
    assert not refused, refused
print("sent")
"#;

#[test]
fn python_smtplib_lf_only_submission_is_accepted_and_forwarded_with_crlf() {
    let Some(python) = client("python3") else {
        return;
    };
    let sink = Sink::start(SinkConfig::default());
    let relay = submission_for_clients(&sink);
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(SMTPLIB_SCRIPT)
        .arg(relay.port(0).to_string())
        .output()
        .expect("run python3");
    assert_client_delivered_with_crlf(
        "smtplib",
        &out,
        &sink,
        &relay,
        b"\r\nSubject: smtplib LF-only\r\n",
    );
}

#[test]
fn curl_upload_of_an_lf_only_file_is_accepted_and_forwarded_with_crlf() {
    let Some(curl) = client("curl") else {
        return;
    };
    let sink = Sink::start(SinkConfig::default());
    let relay = submission_for_clients(&sink);
    let file = relay.dir().write(
        "mail.txt",
        "From: alice@example.com\nTo: bob@example.com\nSubject: curl LF-only\n\n\
         line one\n.dot line\nline three\n",
    );
    let out = std::process::Command::new(curl)
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--ssl-reqd",
            "--insecure",
        ])
        .arg("--url")
        .arg(format!("smtp://127.0.0.1:{}/client.test", relay.port(0)))
        .args(["--user", "alice:secret", "--mail-from", "alice@example.com"])
        .args(["--mail-rcpt", "bob@example.com", "--upload-file"])
        .arg(&file)
        .output()
        .expect("run curl");
    assert_client_delivered_with_crlf(
        "curl",
        &out,
        &sink,
        &relay,
        b"\r\nSubject: curl LF-only\r\n\r\n",
    );
}

/// The real client `name` succeeded, and its one message from alice to bob reached the
/// upstream with `subject` and the body in CRLF form, without protocol violations.
fn assert_client_delivered_with_crlf(
    name: &str,
    out: &std::process::Output,
    sink: &Sink,
    relay: &Relay,
    subject: &[u8],
) {
    assert!(
        out.status.success(),
        "{name} failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        relay.log()
    );
    assert!(sink.wait_for(1, WAIT), "{}", relay.log());
    let m = &sink.messages()[0];
    assert_eq!(
        (m.mail_from.as_str(), m.rcpts.as_slice()),
        ("alice@example.com", &["bob@example.com".to_owned()][..])
    );
    for wanted in [subject, CLIENT_BODY_CRLF] {
        assert!(
            contains(&m.data, wanted),
            "{}",
            String::from_utf8_lossy(&m.data)
        );
    }
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn postmaster_on_a_listener_with_auth_required_still_requires_auth() {
    let users = format!(
        "[[users]]\nname = \"alice\"\npassword_hash = \"{}\"\nsenders = [\"alice@example.com\"]\n",
        passwd("secret")
    );
    let sink = Sink::start(SinkConfig::default());
    let relay = submission(&users, sink.port(), "");
    let mut c = over_tls(&relay);
    assert_reply(&c.cmd("MAIL FROM:<someone@stranger.test>"), 530, "5.7.0");
    assert_reply(&c.cmd("RCPT TO:<postmaster>"), 503, "5.5.1");
    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");
    let reply = c.send_message(
        "alice@example.com",
        &["postmaster"],
        "From: alice@example.com\r\nSubject: t\r\n\r\nhi\r\n",
    );
    assert_reply(&reply, 250, "2.0.0");
    assert!(sink.wait_for(1, WAIT), "{}", relay.log());
    assert_eq!(sink.messages()[0].rcpts, ["postmaster@example.com"]);
}

// --- A DSN crosses a 7-bit path; RCPTs stop at too many recipients; folding and addresses ----

/// The default route `up` at `sink`, and `up7` (an upstream without 8BITMIME or SMTPUTF8) for
/// no8bit.test at `sink7`.
fn with_7bit_route(sink: &Sink, sink7: &Sink) -> Relay {
    let extra = format!(
        "{FAST_RETRY}\n[[upstreams]]\nname = \"up7\"\naddress = \"127.0.0.1:{}\"\n\
         tls = \"none\"\ndomains = [\"no8bit.test\"]\n",
        sink7.port()
    );
    start_with("", "none", sink.port(), &extra)
}

fn sink_7bit() -> Sink {
    Sink::start(SinkConfig {
        eightbitmime: false,
        smtputf8: false,
        ..SinkConfig::default()
    })
}

#[test]
fn dsn_for_a_utf8_recipient_reaches_a_sender_whose_route_lacks_8bitmime() {
    let mut config = SinkConfig::default();
    config.rcpt_replies.insert(
        "ü@example.com".to_owned(),
        "550 5.1.1 no such user".to_owned(),
    );
    let sink = Sink::start(config);
    let sink7 = sink_7bit();
    let relay = with_7bit_route(&sink, &sink7);
    let mut c = ready(relay.port(0));
    c.expect("MAIL FROM:<snd@no8bit.test> SMTPUTF8", 250);
    c.expect("RCPT TO:<ü@example.com>", 250);
    c.expect("DATA", 354);
    c.send_raw("Subject: Grüße\r\n\r\nhi\r\n.\r\n".as_bytes());
    assert_reply(&c.read_reply(), 250, "2.0.0");
    let bounce = bounce_of(&sink7, &relay);
    assert_eq!(bounce.rcpts, ["snd@no8bit.test"]);
    // 7-bit: no BODY=8BITMIME, no SMTPUTF8, and not one 8-bit octet.
    assert!(
        !bounce
            .mail_params
            .iter()
            .any(|p| p.starts_with("BODY") || p == "SMTPUTF8"),
        "{:?}",
        bounce.mail_params
    );
    assert!(bounce.data.is_ascii());
    let text = String::from_utf8(bounce.data.clone()).unwrap();
    assert!(
        text.contains(
            "Content-Type: message/global-delivery-status\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("\r\nFinal-Recipient: utf-8; =C3=BC@example.com\r\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "Content-Type: message/global-headers\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n"
        ),
        "{text}"
    );
    assert!(text.contains("\r\nSubject: Gr=C3=BC=C3=9Fe\r\n"), "{text}");
    assert!(relay.wait_for_queue_len(0, WAIT), "{}", relay.log());
    assert!(
        !relay.has_fields(&[("rule", "dsn_lost")]),
        "{}",
        relay.log()
    );
    assert!(sink7.violations().is_empty(), "{:?}", sink7.violations());
}

#[test]
fn undeliverable_dsn_is_logged_as_lost_with_the_reason() {
    let mut config = SinkConfig::default();
    config.rcpt_replies.insert(
        "x@example.com".to_owned(),
        "550 5.1.1 no such user".to_owned(),
    );
    config.rcpt_replies.insert(
        "gone@example.com".to_owned(),
        "550 5.1.1 sender mailbox gone".to_owned(),
    );
    let sink = Sink::start(config);
    let relay = start_with("", "none", sink.port(), FAST_RETRY);
    let mut c = ready(relay.port(0));
    let reply = c.send_message(
        "gone@example.com",
        &["x@example.com"],
        "Subject: t\r\n\r\nhi\r\n",
    );
    assert_reply(&reply, 250, "2.0.0");
    assert_log_fields(
        &relay,
        &[
            ("rule", "dsn_lost"),
            (
                "reason",
                "<gone@example.com> 5.1.1 550 5.1.1 sender mailbox gone",
            ),
        ],
    );
    assert!(relay.wait_for_queue_len(0, WAIT), "{}", relay.log());
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
}

#[test]
fn without_pipelining_no_rcpt_is_sent_after_too_many_recipients() {
    let sink = Sink::start(SinkConfig {
        pipelining: false,
        ..too_many(7)
    });
    let relay = start_with("", "none", sink.port(), FAST_RETRY);
    let mut c = ready(relay.port(0));
    let rcpts: Vec<String> = (0..60).map(|i| format!("r{i:02}@example.com")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let reply = c.send_message("s@example.com", &rcpts, "Subject: many\r\n\r\nhi\r\n");
    assert_reply(&reply, 250, "2.0.0");
    // 60 recipients, 7 a transaction: 9 transactions on one connection.
    assert!(sink.wait_for(9, WAIT), "{}", relay.log());
    assert!(relay.wait_for_queue_len(0, WAIT), "{}", relay.log());
    let messages = sink.messages();
    let delivered: Vec<String> = messages.iter().flat_map(|m| m.rcpts.clone()).collect();
    assert_eq!(delivered, rcpts);
    assert!(messages.iter().all(|m| m.conn == 1 && m.rcpts.len() <= 7));
    // Each of the 8 full transactions asks for one recipient too many, and no more: 60 + 8.
    let rcpt_commands = sink
        .commands()
        .iter()
        .filter(|l| l.starts_with("RCPT"))
        .count();
    assert_eq!(rcpt_commands, 68, "{:?}", sink.commands());
    assert!(nothing_failed(&relay), "{}", relay.log());
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn dsn_diagnostic_code_keeps_tabs_and_has_no_whitespace_only_line() {
    let refusal = format!(
        "550 5.1.1 a tab\there, then {}end ",
        "words to fold ".repeat(8)
    );
    let bounce = bounce_for_refused("kate@example.com", &refusal);
    let text = String::from_utf8(bounce.data.clone()).unwrap();
    let field = format!("Diagnostic-Code: smtp; {}", refusal.trim_end());
    assert!(!text.contains(&field), "not folded:\n{text}");
    assert!(unfold(&text).contains(&format!("{field}\r\n")), "{text}");
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        assert!(
            !line.trim().is_empty(),
            "white space only line {line:?}:\n{text}"
        );
    }
}

#[test]
fn dsn_text_part_shows_a_quoted_address_with_its_spaces() {
    let bounce = bounce_for_refused("\"a  b\"@example.com", "550 5.1.1 no such user");
    let parsed = mail_parser::MessageParser::default()
        .parse(&bounce.data)
        .unwrap();
    let human = parsed.body_text(0).unwrap();
    assert!(
        human.contains("<\"a  b\"@example.com>: the upstream server said: 550 5.1.1"),
        "{human}"
    );
    let text = String::from_utf8(bounce.data.clone()).unwrap();
    assert!(
        text.contains("\r\nFinal-Recipient: rfc822; \"a  b\"@example.com\r\n"),
        "{text}"
    );
}
