//! One canonical form for an address, against the real binary on loopback: what the policy
//! checks is what reaches the upstream, the spool and the queue commands.
//!
//! - Quoted local parts keep their quotes upstream (`"x>y"@example.com` must not become
//!   `x>y@example.com`, a `>` inside the next hop's command).
//! - Local parts compare ASCII case-insensitively and otherwise byte for byte: U+212A KELVIN
//!   SIGN is not `k`.
//! - Domains compare as A-labels (UTS #46): U-label and A-label forms are one domain in the
//!   envelope, in `accepted_domains`, recipients_file, `senders` and upstream routes; the
//!   A-label is what goes upstream.
//!
//! Each test checks exact replies, the exact command lines the sink received, and the rule in
//! the log for refusals.

mod common;

use std::process::Command;
use std::time::Duration;

use common::sink::{Sink, SinkConfig};
use common::*;

const DELIVERY_WAIT: Duration = Duration::from_secs(10);

/// An `mx` listener (plaintext) delivering to `upstream_port`, with `relay` as the body of the
/// `[relay]` table.
fn mx(upstream_port: u16, relay: &str) -> Relay {
    Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        upstream_port,
        &format!("[relay]\n{relay}\n"),
    ))
}

/// Like [`mx`], with a recipients file holding `recipients` (`{dir}/recipients.txt`).
fn mx_with_recipients(upstream_port: u16, relay: &str, recipients: &str) -> Relay {
    let dir = TestDir::new();
    dir.write("recipients.txt", recipients);
    let toml = config(
        &[listener("mx", free_port(), "none")],
        upstream_port,
        &format!("[relay]\n{relay}\nrecipients_file = \"{{dir}}/recipients.txt\"\n"),
    );
    Relay::start_in(dir, &toml)
}

/// The MAIL and RCPT command lines the sink received, in order.
fn envelope_commands(sink: &Sink) -> Vec<String> {
    sink.commands()
        .into_iter()
        .filter(|c| {
            let upper = c.to_ascii_uppercase();
            upper.starts_with("MAIL ") || upper.starts_with("RCPT ")
        })
        .collect()
}

/// Send one message with exactly these MAIL and RCPT lines (parameters included); assert 250.
fn send_raw_envelope(relay: &Relay, mail: &str, rcpts: &[&str]) -> String {
    let mut c = SmtpClient::greeted(relay.port(0));
    c.expect(mail, 250);
    for rcpt in rcpts {
        c.expect(rcpt, 250);
    }
    c.expect("DATA", 354);
    c.send_raw(b"Subject: address forms\r\n\r\nhello\r\n.\r\n");
    let (code, text) = c.read_reply();
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221);
    queue_id(&text).expect("queue id")
}

#[test]
fn quoted_local_part_with_angle_bracket_reaches_upstream_quoted_not_as_parameter_injection() {
    let sink = Sink::start(SinkConfig::default());
    let relay = mx(sink.port(), "accepted_domains = [\"example.com\"]");
    send_raw_envelope(
        &relay,
        "MAIL FROM:<s@other.test>",
        &[
            "RCPT TO:<\"x>y\"@example.com>",
            "RCPT TO:<\"a;b\\\"c\"@example.com>",
        ],
    );
    assert!(sink.wait_for(1, DELIVERY_WAIT), "{}", relay.log());
    assert_eq!(
        envelope_commands(&sink),
        [
            "MAIL FROM:<s@other.test>",
            "RCPT TO:<\"x>y\"@example.com>",
            "RCPT TO:<\"a;b\\\"c\"@example.com>",
        ]
    );
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn quoted_local_part_with_space_is_accepted_and_forwarded_quoted() {
    let sink = Sink::start(SinkConfig::default());
    let relay = mx(sink.port(), "accepted_domains = [\"example.com\"]");
    send_raw_envelope(
        &relay,
        "MAIL FROM:<\"jane roe\"@other.test>",
        // Needless quotes are dropped: `"plain"` is the dot-string `plain`.
        &[
            "RCPT TO:<\"john doe\"@example.com>",
            "RCPT TO:<\"plain\"@Example.COM>",
        ],
    );
    assert!(sink.wait_for(1, DELIVERY_WAIT), "{}", relay.log());
    assert_eq!(
        envelope_commands(&sink),
        [
            "MAIL FROM:<\"jane roe\"@other.test>",
            "RCPT TO:<\"john doe\"@example.com>",
            "RCPT TO:<plain@example.com>",
        ]
    );
}

#[test]
fn kelvin_sign_local_part_does_not_match_an_ascii_recipients_file_entry() {
    let sink = Sink::start(SinkConfig::default());
    let relay = mx_with_recipients(
        sink.port(),
        "accepted_domains = [\"example.com\"]",
        "kate@example.com\n",
    );
    let mut c = SmtpClient::greeted(relay.port(0));
    c.expect("MAIL FROM:<x@other.test> SMTPUTF8", 250);
    // U+212A KELVIN SIGN lower-cases to `k` under Unicode rules; it is another mailbox.
    let reply = c.cmd("RCPT TO:<\u{212A}ate@example.com>");
    assert_reply(&reply, 550, "5.1.1");
    assert!(
        !reply.1.contains("recipients"),
        "reply names the rule: {}",
        reply.1
    );
    assert_log_fields(&relay, &[("rule", "recipients_file")]);
    // ASCII case is ignored, as before.
    c.expect("RCPT TO:<Kate@Example.com>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: k\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.read_reply().0, 250);
    c.expect("QUIT", 221);
    assert!(sink.wait_for(1, DELIVERY_WAIT), "{}", relay.log());
    let msg = &sink.messages()[0];
    assert_eq!(msg.rcpts, ["Kate@example.com"]);
}

#[test]
fn u_label_recipient_is_accepted_for_an_a_label_domain_and_forwarded_as_the_a_label() {
    let sink = Sink::start(SinkConfig::default());
    let relay = mx(
        sink.port(),
        "accepted_domains = [\"xn--bcher-kva.example\"]",
    );
    send_raw_envelope(
        &relay,
        "MAIL FROM:<x@other.test> SMTPUTF8",
        &[
            "RCPT TO:<info@bücher.example>",
            "RCPT TO:<sales@BÜCHER.example>",
        ],
    );
    assert!(sink.wait_for(1, DELIVERY_WAIT), "{}", relay.log());
    assert_eq!(
        envelope_commands(&sink)[1..],
        [
            "RCPT TO:<info@xn--bcher-kva.example>",
            "RCPT TO:<sales@xn--bcher-kva.example>",
        ]
    );
}

#[test]
fn a_label_recipient_is_accepted_for_a_u_label_domain_and_recipients_file() {
    let sink = Sink::start(SinkConfig::default());
    let relay = mx_with_recipients(
        sink.port(),
        "accepted_domains = [\"bücher.example\", \"faß.example\"]",
        "info@Bücher.example\n@faß.example\n",
    );
    let mut c = SmtpClient::greeted(relay.port(0));
    c.expect("MAIL FROM:<x@other.test>", 250);
    c.expect("RCPT TO:<info@xn--bcher-kva.example>", 250);
    let reply = c.cmd("RCPT TO:<other@xn--bcher-kva.example>");
    assert_reply(&reply, 550, "5.1.1");
    // UTS #46 non-transitional: faß.example is xn--fa-hia.example, not fass.example.
    c.expect("RCPT TO:<anyone@xn--fa-hia.example>", 250);
    let reply = c.cmd("RCPT TO:<anyone@fass.example>");
    assert_reply(&reply, 550, "5.7.1");
    assert_log_fields(&relay, &[("rule", "relay_denied")]);
    c.expect("QUIT", 221);
}

#[test]
fn invalid_idna_domain_is_refused_with_553_and_logged() {
    let relay = mx(free_port(), "accepted_domains = [\"example.com\"]");
    let mut c = SmtpClient::greeted(relay.port(0));
    assert_reply(&c.cmd("MAIL FROM:<a@xn--a.example>"), 553, "5.1.7");
    assert_log_fields(&relay, &[("rule", "bad_idna")]);
    c.expect("MAIL FROM:<a@other.test> SMTPUTF8", 250);
    assert_reply(&c.cmd("RCPT TO:<b@b\u{fffd}cher.example>"), 553, "5.1.3");
    // A U-label without SMTPUTF8 is still 8-bit text in the command.
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<a@other.test>", 250);
    assert_reply(&c.cmd("RCPT TO:<info@bücher.example>"), 553, "5.6.7");
    c.expect("QUIT", 221);
    assert!(relay.spool_files().is_empty());
}

#[test]
fn check_config_accepts_u_labels_and_utf8_senders_and_reports_a_labels() {
    let dir = TestDir::new();
    dir.write(
        "users.toml",
        "[[users]]\nname = \"jörg\"\n\
         password_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG\"\n\
         senders = [\"jörg@bücher.example\", \"\\\"j r\\\"@bücher.example\", \"@faß.example\"]\n",
    );
    dir.write(
        "recipients.txt",
        "info@bücher.example  # shop\na#b@example.com\n",
    );
    let toml = dir.expand(&config(
        &[listener("mx", free_port(), "none")],
        free_port(),
        "[relay]\naccepted_domains = [\"bücher.example\", \"example.com\"]\n\
         recipients_file = \"{dir}/recipients.txt\"\n\n\
         [auth]\nusers_file = \"{dir}/users.toml\"\n\n\
         [[upstreams]]\nname = \"shop\"\naddress = \"127.0.0.1:25\"\ntls = \"none\"\n\
         domains = [\"Bücher.example\"]\n",
    ));
    let path = dir.write("portcullis.toml", toml);
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("xn--bcher-kva.example"), "{stdout}");

    // An invalid IDN is an error naming its key.
    let bad = dir.write(
        "bad.toml",
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"example.com\"]", "\"xn--a.example\"]"),
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("relay.accepted_domains[1]")
            || String::from_utf8_lossy(&out.stdout).contains("relay.accepted_domains[1]"),
        "{}",
        show(&out)
    );
}

#[test]
fn queue_commands_show_and_match_the_canonical_form() {
    // An upstream with SMTPUTF8 is seen at start (so the non-ASCII sender passes the route
    // check at RCPT), then goes away: the messages stay queued.
    let sink = Sink::start(SinkConfig::default());
    let relay = mx(sink.port(), "accepted_domains = [\"example.com\"]");
    sink.stop();
    let quoted = send_raw_envelope(
        &relay,
        "MAIL FROM:<\"Jane Roe\"@Other.test>",
        &["RCPT TO:<\"john doe\"@example.com>"],
    );
    let kelvin = send_raw_envelope(
        &relay,
        "MAIL FROM:<\u{212A}ate@other.test> SMTPUTF8",
        &["RCPT TO:<info@example.com>"],
    );

    let out = relay.command(&["queue", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = rows.iter().find(|r| r["id"] == quoted.as_str()).unwrap();
    assert_eq!(row["from"], "\"Jane Roe\"@other.test");
    assert_eq!(
        row["rcpts"],
        serde_json::json!(["\"john doe\"@example.com"])
    );

    let out = relay.command(&["queue", "show", &quoted]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"john doe\"@example.com"), "{text}");

    // The spool holds the canonical form too.
    let spooled: Vec<_> = relay
        .queued_messages()
        .into_iter()
        .map(|(env, _)| env["mail_from"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        spooled.contains(&"\"Jane Roe\"@other.test".to_owned()),
        "{spooled:?}"
    );

    // purge --from compares like the policy: ASCII case ignored, KELVIN SIGN is not `k`.
    let out = relay.command(&["queue", "purge", "--dry-run", "--from", "kate@other.test"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&kelvin),
        "{}",
        show(&out)
    );
    let out = relay.command(&[
        "queue",
        "purge",
        "--dry-run",
        "--from",
        "\"jane roe\"@OTHER.test",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&quoted) && !text.contains(&kelvin),
        "{}",
        show(&out)
    );
    let out = relay.command(&["queue", "purge", "--from", "\u{212A}ate@other.test"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&kelvin) && !text.contains(&quoted),
        "{}",
        show(&out)
    );
}

#[test]
fn bounce_names_quoted_addresses_in_their_canonical_form() {
    let mut cfg = SinkConfig::default();
    // The sink keys replies by the lower-cased text between `<` and the first `>`.
    cfg.rcpt_replies.insert(
        "\"john doe\"@example.com".into(),
        "550 5.1.1 Recipient address rejected: User unknown".into(),
    );
    let sink = Sink::start(cfg);
    let relay = mx(sink.port(), "accepted_domains = [\"example.com\"]");
    send_raw_envelope(
        &relay,
        "MAIL FROM:<\"jane roe\"@Other.test>",
        &[
            "RCPT TO:<\"john doe\"@example.com>",
            "RCPT TO:<ok@example.com>",
        ],
    );
    assert!(
        sink.wait_for(2, DELIVERY_WAIT),
        "expected the message and a bounce\n{}",
        relay.log()
    );
    let messages = sink.messages();
    let dsn = messages
        .iter()
        .find(|m| m.mail_from.is_empty())
        .expect("a DSN from <>");
    assert_eq!(dsn.rcpts, ["\"jane roe\"@other.test"]);
    assert!(
        sink.commands()
            .contains(&"RCPT TO:<\"jane roe\"@other.test>".to_owned()),
        "{:?}",
        sink.commands()
    );
    let text = String::from_utf8_lossy(&dsn.data);
    for needle in [
        "To: <\"jane roe\"@other.test>",
        "Final-Recipient: rfc822; \"john doe\"@example.com",
        "<\"john doe\"@example.com>: ",
    ] {
        assert!(text.contains(needle), "DSN lacks {needle:?}:\n{text}");
    }
}
