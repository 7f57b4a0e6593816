//! Message content security against the real binary on loopback, with the test sink as the
//! upstream: the one header-field reader that the header firewall, the `Received:` count and
//! the `From:` check share, the `Authentication-Results:` rule, display-name spoofing and the
//! memory bound of the header section.
//!
//! Each test asserts the exact reply, what reached the upstream (the sink), and that refused
//! mail never reaches the spool. "Nothing was delivered" is proved without waiting: a second,
//! honest message on the same session is delivered, and it is the only one the sink has.

mod common;

use std::time::Duration;

use base64::Engine;
use common::sink::{Sink, SinkConfig};
use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// An Exchange-internal field a stranger sets to make its spam look clean.
const SCL: &str = "X-MS-Exchange-Organization-SCL";

/// A plaintext MX for example.com in front of a fresh sink; `server_keys` go into `[server]`.
fn mx(server_keys: &str) -> (Sink, Relay) {
    let sink = Sink::start(SinkConfig::default());
    let toml = config(
        &[listener("mx", free_port(), "none")],
        sink.port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n",
    )
    .replace(
        "hostname = \"relay.test\"\n",
        &format!("hostname = \"relay.test\"\n{server_keys}"),
    );
    (sink, Relay::start(&toml))
}

/// Submission (STARTTLS, AUTH required) with user `alice` (password `secret`) owning
/// `alice@example.com`, in front of a fresh sink; `auth_keys` go into `[auth]`.
fn submission(auth_keys: &str) -> (Sink, Relay) {
    let sink = Sink::start(SinkConfig::default());
    let dir = TestDir::new();
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{}\"\nsenders = [\"alice@example.com\"]\n",
            secret_hash()
        ),
    );
    let toml = config(
        &[listener("submission", free_port(), "starttls")
            + "require_tls = true\nauth = \"required\"\n"],
        sink.port(),
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n{auth_keys}\n"
        ),
    );
    (sink, Relay::start_in(dir, &toml))
}

/// Greeted from a stranger's address (not the harness probe's 127.0.0.1), EHLO done.
fn stranger(relay: &Relay) -> SmtpClient {
    stranger_from(relay, "127.0.0.2")
}

fn stranger_from(relay: &Relay, ip: &str) -> SmtpClient {
    let mut c = SmtpClient::connect_from(ip, relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c
}

/// Over TLS and authenticated as alice.
fn alice(relay: &Relay) -> SmtpClient {
    let mut c = stranger(relay);
    c.starttls(&relay.cert_path());
    c.expect("EHLO client.test", 250);
    let token = base64::engine::general_purpose::STANDARD.encode("\0alice\0secret");
    assert_reply(&c.cmd(&format!("AUTH PLAIN {token}")), 235, "2.7.0");
    c
}

/// The header section of a message as the sink received it.
fn headers_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let end = text.find("\r\n\r\n").expect("a header section");
    text[..end + 2].to_string()
}

/// Sends an honest message on `c` and checks it is the only one that reached the sink: what
/// was refused before it on this session was never delivered.
fn only_the_honest_message_arrives(c: &mut SmtpClient, sink: &Sink, from: &str, header: &str) {
    let body = format!("From: {header}\r\nSubject: honest\r\n\r\nok\r\n");
    assert_reply(
        &c.send_message(from, &["b@example.com"], &body),
        250,
        "2.0.0",
    );
    assert!(sink.wait_for(1, WAIT), "the honest message did not arrive");
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert!(headers_of(&messages[0].data).contains("Subject: honest"));
}

// --- Header firewall -------------------------------------------------------------------------

#[test]
fn whitespace_before_the_colon_does_not_get_an_exchange_header_past_the_firewall() {
    let (sink, relay) = mx("");
    let mut c = stranger(&relay);
    let body = format!(
        "{SCL} : -1\r\n{SCL}\t:-1\r\nX-MS-Exchange-CrossTenant-AuthAs: Internal\r\n\
         X-MS-Exchange-CrossPremises-AuthSource: x\r\nSubject: t\r\n\r\nbody\r\n"
    );
    assert_reply(
        &c.send_message("a@other.test", &["b@example.com"], &body),
        250,
        "2.0.0",
    );
    assert!(sink.wait_for(1, WAIT));
    let headers = headers_of(&sink.messages()[0].data);
    assert!(!headers.contains("X-MS-Exchange"), "{headers}");
    assert!(headers.ends_with("Subject: t\r\n"), "{headers}");
    assert_log_fields(&relay, &[("headers", "*"), ("count", "4")]);
}

#[test]
fn a_header_section_over_1_mib_does_not_turn_the_firewall_off() {
    let (sink, relay) = mx("");
    let pad = format!("X-Pad: {}\r\n", "p".repeat(110));
    let mut body = format!("{SCL}: -1\r\n");
    for _ in 0..9_500 {
        body.push_str(&pad);
    }
    body.push_str(&format!("{SCL}: -1\r\nSubject: big\r\n\r\nbody\r\n"));
    assert!(body.len() > 1 << 20);
    let mut c = stranger(&relay);
    assert_reply(
        &c.send_message("a@other.test", &["b@example.com"], &body),
        250,
        "2.0.0",
    );
    assert!(sink.wait_for(1, WAIT));
    let headers = headers_of(&sink.messages()[0].data);
    assert!(
        !headers.contains(SCL),
        "an Exchange field reached the upstream"
    );
    assert_eq!(headers.matches("X-Pad: ").count(), 9_500);
    assert!(headers.ends_with("Subject: big\r\n"));
    assert_log_fields(&relay, &[("headers", "*"), ("count", "2")]);
}

#[test]
fn authentication_results_in_our_name_are_stripped_in_every_rfc_8601_form() {
    let (sink, relay) = mx("");
    let mut c = stranger(&relay);
    let body = "Authentication-Results: (x) relay.test; dmarc=pass\r\n\
                Authentication-Results: \"RELAY.test.\"; spf=pass\r\n\
                Authentication-Results : relay.test;\r\n dkim=pass\r\n\
                Authentication-Results: mx.other.test; dmarc=fail\r\n\
                Subject: ar\r\n\r\nbody\r\n";
    assert_reply(
        &c.send_message("a@other.test", &["b@example.com"], body),
        250,
        "2.0.0",
    );
    assert!(sink.wait_for(1, WAIT));
    let headers = headers_of(&sink.messages()[0].data);
    assert_eq!(
        headers.matches("Authentication-Results").count(),
        1,
        "{headers}"
    );
    assert!(headers.contains("Authentication-Results: mx.other.test; dmarc=fail\r\n"));
}

#[test]
fn authserv_id_decides_which_authentication_results_are_ours() {
    let (sink, relay) = mx("authserv_id = \"cluster.example.com\"\n");
    let mut c = stranger(&relay);
    let body = "Authentication-Results: (node 2) Cluster.Example.Com; dmarc=pass\r\n\
                Authentication-Results: relay.test; spf=pass\r\n\
                Subject: ar\r\n\r\nbody\r\n";
    assert_reply(
        &c.send_message("a@other.test", &["b@example.com"], body),
        250,
        "2.0.0",
    );
    assert!(sink.wait_for(1, WAIT));
    let headers = headers_of(&sink.messages()[0].data);
    assert!(!headers.contains("luster"), "{headers}");
    assert!(headers.contains("Authentication-Results: relay.test; spf=pass\r\n"));
}

#[test]
fn received_fields_with_whitespace_before_the_colon_count_towards_the_hop_limit() {
    let sink = Sink::start(SinkConfig::default());
    let toml = config(
        &[listener("mx", free_port(), "none")],
        sink.port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n[limits]\nhop_limit = 2\n",
    );
    let relay = Relay::start(&toml);
    let mut c = stranger(&relay);
    let body = "Received : from a\r\nReceived\t: from b\r\n received: from c\r\nSubject: loop\r\n\r\nx\r\n";
    // The third line folds into the second field: two Received fields, within the limit.
    assert_reply(
        &c.send_message("a@other.test", &["b@example.com"], body),
        250,
        "2.0.0",
    );
    let body =
        "Received : from a\r\nReceived\t: from b\r\nSubject: x\r\nreceived : from c\r\n\r\nx\r\n";
    assert_reply(
        &c.send_message("a@other.test", &["b@example.com"], body),
        554,
        "5.4.6",
    );
    assert_log_fields(&relay, &[("rule", "hop_limit")]);
}

// --- From: ownership -------------------------------------------------------------------------

#[test]
fn a_second_from_past_64_kib_is_refused() {
    let (sink, relay) = submission("");
    let mut c = alice(&relay);
    let mut body = String::from("From: alice@example.com\r\n");
    for _ in 0..700 {
        body.push_str(&format!("X-Pad: {}\r\n", "p".repeat(100)));
    }
    assert!(body.len() > 64 * 1024);
    body.push_str("From : ceo@example.com\r\nSubject: x\r\n\r\nhi\r\n");
    let reply = c.send_message("alice@example.com", &["b@example.com"], &body);
    assert_reply(&reply, 550, "5.7.1");
    assert_log_fields(&relay, &[("rule", "from_header_not_owned")]);
    assert!(relay.spool_files().is_empty());
    only_the_honest_message_arrives(&mut c, &sink, "alice@example.com", "alice@example.com");
}

#[test]
fn display_names_naming_another_address_are_refused() {
    let (sink, relay) = submission("");
    let mut c = alice(&relay);
    for from in [
        "\"ceo@example.com\" <alice@example.com>",
        "\"CEO (ceo@example.com)\" <alice@example.com>",
        "=?utf-8?Q?CEO_<ceo=40example.com>?= <alice@example.com>",
    ] {
        let body = format!("From: {from}\r\nSubject: wire transfer\r\n\r\nplease pay\r\n");
        let reply = c.send_message("alice@example.com", &["b@example.com"], &body);
        assert_reply(&reply, 550, "5.7.1");
        assert!(
            !reply.1.contains("display"),
            "the reply names the rule: {}",
            reply.1
        );
        c.expect("RSET", 250);
    }
    assert_log_fields(&relay, &[("rule", "from_display_name")]);
    assert!(relay.spool_files().is_empty());
    only_the_honest_message_arrives(
        &mut c,
        &sink,
        "alice@example.com",
        "Alice Example <alice@example.com>",
    );
}

#[test]
fn display_names_are_not_checked_when_check_display_name_is_off() {
    let (sink, relay) = submission("check_display_name = false\n");
    let mut c = alice(&relay);
    let body = "From: \"ceo@example.com\" <alice@example.com>\r\nSubject: x\r\n\r\nhi\r\n";
    let reply = c.send_message("alice@example.com", &["b@example.com"], body);
    assert_reply(&reply, 250, "2.0.0");
    assert!(sink.wait_for(1, WAIT));
}

// --- Bounded header fields -------------------------------------------------------------------

#[test]
fn a_from_field_over_64_kib_is_refused_with_552_and_nothing_is_queued() {
    let (sink, relay) = mx("");
    let mut c = stranger(&relay);
    let body = format!(
        "Subject: big from\r\nFrom: \"{}\" <a@other.test>\r\n\r\nbody\r\n",
        "n".repeat(70 * 1024)
    );
    let reply = c.send_message("a@other.test", &["b@example.com"], &body);
    assert_reply(&reply, 552, "5.3.4");
    assert_log_fields(&relay, &[("rule", "header_too_large")]);
    assert!(relay.spool_files().is_empty());
    only_the_honest_message_arrives(&mut c, &sink, "a@other.test", "a@other.test");
}

/// Peak resident memory of the relay process (VmHWM), in KiB.
fn peak_rss_kib(relay: &Relay) -> u64 {
    let pid = relay.pid().expect("relay running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_2_mb_header_line_without_crlf_gets_a_clean_reply_in_bounded_memory() {
    let (sink, relay) = mx("");
    // Warm up: one ordinary message, so the baseline includes a session in DATA.
    let mut warm = stranger(&relay);
    assert_reply(
        &warm.send_message(
            "a@other.test",
            &["b@example.com"],
            "Subject: w\r\n\r\nw\r\n",
        ),
        250,
        "2.0.0",
    );
    assert!(sink.wait_for(1, WAIT));
    let before = peak_rss_kib(&relay);
    // Twenty sessions each in the middle of a 2 MB line with no CRLF at once: before the
    // reader was bounded, each held over 1 MiB of it.
    let line = vec![b'x'; 2_000_000];
    let mut sessions: Vec<SmtpClient> = (0..20)
        .map(|i| {
            let mut c = stranger_from(&relay, &format!("127.0.1.{}", i + 1));
            c.expect("MAIL FROM:<a@other.test>", 250);
            c.expect("RCPT TO:<b@example.com>", 250);
            c.expect("DATA", 354);
            // Half of them in a field name (no colon), half in an ordinary field's value.
            if i % 2 == 1 {
                c.send_raw(b"X-Long: ");
            }
            c.send_raw(&line);
            c
        })
        .collect();
    for (i, c) in sessions.iter_mut().enumerate() {
        c.send_raw(b"\r\n\r\nbody\r\n.\r\n");
        if i % 2 == 0 {
            // A name of 2 MB cannot be read within the bound: refused, never passed on.
            assert_reply(&c.read_reply(), 552, "5.3.4");
        } else {
            // Lines over 998 octets in other fields pass.
            assert_reply(&c.read_reply(), 250, "2.0.0");
        }
    }
    let grown = peak_rss_kib(&relay).saturating_sub(before);
    eprintln!("peak RSS grew by {grown} KiB with 20 sessions in a 2 MB line");
    assert!(
        grown < 12 * 1024,
        "20 sessions with a 2 MB line grew the peak RSS by {grown} KiB"
    );
    assert!(sink.wait_for(11, WAIT));
    let long = &sink.messages()[1].data;
    assert!(long.len() > 2_000_000);
}

// --- From: fields readers disagree on, invisible characters, trace and folding -----------------

#[test]
fn from_fields_with_group_syntax_or_an_at_outside_the_angle_addr_are_refused() {
    let (sink, relay) = submission("");
    let mut c = alice(&relay);
    // python3's email package (policy=default) reads each as from ceo@example.com.
    for from in [
        "CEO <ceo@example.com>: alice@example.com;",
        "ceo@example.com: alice@example.com;",
        "<ceo@example.com>:;alice@example.com",
        "ceo @ example.com <alice@example.com>",
        "\"ceo\"@example.com <alice@example.com>",
        "ceo(x)@example.com <alice@example.com>",
        "ceo\r\n @example.com <alice@example.com>",
        "\"ceo@example.com\": alice@example.com;",
    ] {
        let body = format!("From: {from}\r\nSubject: wire transfer\r\n\r\nplease pay\r\n");
        let reply = c.send_message("alice@example.com", &["b@example.com"], &body);
        assert_reply(&reply, 550, "5.7.1");
        c.expect("RSET", 250);
    }
    assert_log_fields(&relay, &[("rule", "from_header_ambiguous")]);
    // A bare addr-spec with CFWS inside is the address it denotes.
    let body = "From: ceo @ example.com\r\nSubject: x\r\n\r\nhi\r\n";
    let reply = c.send_message("alice@example.com", &["b@example.com"], body);
    assert_reply(&reply, 550, "5.7.1");
    c.expect("RSET", 250);
    assert_log_fields(&relay, &[("rule", "from_header_not_owned")]);
    assert!(relay.spool_files().is_empty());
    only_the_honest_message_arrives(
        &mut c,
        &sink,
        "alice@example.com",
        "\"Alice: the boss\" <alice@example.com>",
    );
}

#[test]
fn invisible_or_look_alike_characters_do_not_hide_an_address_in_a_display_name() {
    let (sink, relay) = submission("");
    let mut c = alice(&relay);
    for from in [
        // U+200B zero-width space, U+00AD soft hyphen, U+FF20 full-width @, U+FE6B small @,
        // U+3002 ideographic full stop, an encoded word with a raw @ inside it.
        "=?utf-8?Q?ceo=E2=80=8B=40example.com?= <alice@example.com>",
        "=?utf-8?Q?ceo=E2=80=8B@example.com?= <alice@example.com>",
        "=?utf-8?Q?ceo=C2=AD=40example.com?= <alice@example.com>",
        "=?utf-8?Q?ceo=40=E2=80=8Bexample.com?= <alice@example.com>",
        "=?utf-8?Q?ceo=EF=BC=A0example.com?= <alice@example.com>",
        "=?utf-8?Q?ceo=EF=B9=ABexample.com?= <alice@example.com>",
        "=?utf-8?Q?ceo=40example=E3=80=82com?= <alice@example.com>",
        "\"ceo @ example.com\" <alice@example.com>",
        "Alice <alice@example.com> (ceo@example.com)",
    ] {
        let body = format!("From: {from}\r\nSubject: wire transfer\r\n\r\nplease pay\r\n");
        let reply = c.send_message("alice@example.com", &["b@example.com"], &body);
        assert_reply(&reply, 550, "5.7.1");
        c.expect("RSET", 250);
    }
    assert_log_fields(&relay, &[("rule", "from_display_name")]);
    assert!(relay.spool_files().is_empty());
    only_the_honest_message_arrives(
        &mut c,
        &sink,
        "alice@example.com",
        "=?utf-8?Q?Al=C3=AFce=E2=80=8B?= <alice@example.com>",
    );
}

#[test]
fn a_stranger_cannot_continue_the_relays_received_field() {
    let (sink, relay) = mx("");
    let mut c = stranger(&relay);
    let body = "\tfrom evil ([10.9.9.9]) by mx.partner.example; Mon, 30 Nov 2026 17:00:00 +0000\r\n \
                with ESMTPS id forged\r\nSubject: trace\r\n\r\nbody\r\n";
    assert_reply(
        &c.send_message("a@other.test", &["b@example.com"], body),
        250,
        "2.0.0",
    );
    assert!(sink.wait_for(1, WAIT));
    let headers = headers_of(&sink.messages()[0].data);
    assert!(!headers.contains("10.9.9.9"), "{headers}");
    assert!(!headers.contains("forged"), "{headers}");
    assert!(headers.starts_with("Received: "), "{headers}");
    // Our Received: field, then the sender's first real field.
    let lines: Vec<&str> = headers.split("\r\n").collect();
    let first_other = lines
        .iter()
        .position(|l| !l.starts_with([' ', '\t']) && !l.starts_with("Received: "))
        .unwrap();
    assert_eq!(lines[first_other], "Subject: trace", "{headers}");
    // The fields removed are logged (how many, and which).
    assert_log_fields(&relay, &[("headers", "*"), ("count", "*")]);
}

#[test]
fn fields_folded_before_the_colon_and_arc_results_in_our_name_are_stripped() {
    let (sink, relay) = mx("");
    let mut c = stranger(&relay);
    let body = format!(
        "{SCL}\r\n : -1\r\n\
         Authentication-Results\r\n : relay.test; dmarc=pass\r\n\
         Authentication-Results: \"relay.test \"; spf=pass\r\n\
         ARC-Authentication-Results: i=1; relay.test; dmarc=pass\r\n\
         ARC-Authentication-Results: i=1; mx.other.test; dmarc=fail\r\n\
         Subject: folded\r\n\r\nbody\r\n"
    );
    assert_reply(
        &c.send_message("a@other.test", &["b@example.com"], &body),
        250,
        "2.0.0",
    );
    assert!(sink.wait_for(1, WAIT));
    let headers = headers_of(&sink.messages()[0].data);
    assert!(!headers.contains("SCL"), "{headers}");
    assert!(!headers.contains("relay.test;"), "{headers}");
    assert!(!headers.contains("relay.test \""), "{headers}");
    assert!(
        headers.contains("ARC-Authentication-Results: i=1; mx.other.test; dmarc=fail\r\n"),
        "{headers}"
    );
    assert!(headers.ends_with("Subject: folded\r\n"), "{headers}");
}
