//! Hostile clients and limits, against the real binary over raw TCP: SMTP smuggling, STARTTLS
//! injection, early talkers, malformed command lines, size, session and connection limits,
//! access lists, relay control, TLS gates and spool trouble. Each test asserts the exact reply
//! (code and enhanced code), what is (not) in the spool and, where it helps, the logged rule.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

/// `[relay]` accepting mail for example.com, plus `extra`.
fn relay_extra(extra: &str) -> String {
    format!("[relay]\naccepted_domains = [\"example.com\"]\n\n{extra}")
}

/// A relay with one plaintext listener `mx` (plus `listener_keys`), mail accepted for
/// example.com, an upstream that is not listening (so queued mail stays queued), and `extra`.
fn start(listener_keys: &str, extra: &str) -> Relay {
    start_tls(listener_keys, "none", extra)
}

fn start_tls(listener_keys: &str, tls: &str, extra: &str) -> Relay {
    let l = listener("mx", free_port(), tls) + listener_keys;
    Relay::start(&config(&[l], free_port(), &relay_extra(extra)))
}

/// Connect to the relay's listener and read the 220 greeting.
fn greeted(relay: &Relay) -> SmtpClient {
    greeted_from("127.0.0.1", relay)
}

fn greeted_from(ip: &str, relay: &Relay) -> SmtpClient {
    let mut c = SmtpClient::connect_from(ip, relay.port(0));
    c.expect_reply(220);
    c
}

/// Connected, greeted and after `EHLO client.test`.
fn ready(relay: &Relay) -> SmtpClient {
    let mut c = greeted(relay);
    c.expect("EHLO client.test", 250);
    c
}

/// MAIL + RCPT + DATA (354), ready for content.
fn in_data(c: &mut SmtpClient) {
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b@example.com>", 250);
    c.expect("DATA", 354);
}

/// The fields of the line the relay logs when a session from `peer` ends (`"127.0.0.2:*"`:
/// that address, any port), with why it ended.
fn session_end(peer: &str) -> [(&str, &str); 2] {
    [("peer", peer), ("reason", "*")]
}

/// Wait until the relay has seen the harness's readiness probe close, so it holds no
/// connection slot when a test of connection limits starts.
fn wait_probe_gone(relay: &Relay) {
    assert!(
        relay.wait_for_fields(&session_end("127.0.0.1"), LOG_WAIT),
        "readiness probe never ended:\n{}",
        relay.log()
    );
}

#[track_caller]
fn assert_closed(c: &mut SmtpClient) {
    let rest = c.read_to_close();
    assert!(rest.is_empty(), "expected close, got {rest:?}");
}

// --- 1. SMTP smuggling --------------------------------------------------------------------

#[test]
fn smuggled_end_of_data_with_bare_line_endings_is_rejected_and_nothing_queued() {
    let relay = start("", "");
    for variant in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n"] {
        let mut c = ready(&relay);
        in_data(&mut c);
        let mut data = b"Subject: smuggling\r\n\r\nhello".to_vec();
        data.extend_from_slice(variant.as_bytes());
        data.extend_from_slice(
            b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n",
        );
        data.extend_from_slice(b"\r\n.\r\n");
        c.send_raw(&data);
        assert_reply(&c.read_reply(), 550, "5.5.2");
        // Exactly one reply for the whole thing: the next reply belongs to the NOOP.
        assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
        assert!(
            relay.queued_messages().is_empty(),
            "variant {variant:?} queued something"
        );
        // The session is still usable.
        let reply = c.send_message(
            "a@example.com",
            &["b@example.com"],
            "Subject: clean\r\n\r\nok\r\n",
        );
        assert_reply(&reply, 250, "2.0.0");
        let queued = relay.queued_messages();
        assert_eq!(queued.len(), 1, "variant {variant:?}");
        let (env, msg) = &queued[0];
        let text = String::from_utf8_lossy(msg);
        assert!(text.contains("Subject: clean") && !text.contains("smuggled"));
        assert!(!env.to_string().contains("evil@x.test"), "{env}");
        for f in relay.spool_files() {
            fs::remove_file(&f).unwrap();
            let _ = fs::remove_file(f.with_extension("state"));
        }
        c.expect("QUIT", 221);
    }
}

// --- 2. STARTTLS injection ----------------------------------------------------------------

#[test]
fn commands_pipelined_after_starttls_are_discarded_not_executed_under_tls() {
    let relay = start_tls("", "starttls", "");
    let mut c = ready(&relay);
    c.send_raw(b"STARTTLS\r\nMAIL FROM:<a@example.com>\r\n");
    assert_reply(&c.read_reply(), 220, "2.0.0");
    c.upgrade_tls(&relay.cert_path(), "localhost");
    // The injected MAIL was not run, and the session state was reset: EHLO required again.
    assert_reply(&c.cmd("MAIL FROM:<a@example.com>"), 503, "5.5.1");
    assert_log_fields(&relay, &[("rule", "starttls_injection")]);
    c.expect("EHLO client.test", 250);
    assert_reply(&c.cmd("MAIL FROM:<a@example.com>"), 250, "2.1.0");
}

// --- 3. Early talkers ---------------------------------------------------------------------

#[test]
fn client_talking_before_banner_is_rejected() {
    let relay = start("", "[limits]\npregreet_wait = \"1s\"\n");
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    c.send_raw(b"EHLO x\r\n");
    assert_reply(&c.read_reply(), 554, "5.5.0");
    assert_closed(&mut c);
    assert_log_fields(&relay, &[("rule", "pregreet")]);
}

#[test]
fn ehlo_pipelined_with_mail_is_an_early_talker() {
    let relay = start("", "");
    let mut c = greeted(&relay);
    c.send_raw(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n");
    assert_reply(&c.read_reply(), 554, "5.5.0");
    assert_closed(&mut c);
    assert_log_fields(&relay, &[("rule", "early_talker")]);
    assert!(relay.queued_messages().is_empty());
}

#[test]
fn message_sent_before_354_is_an_early_talker() {
    let relay = start("", "");
    let mut c = ready(&relay);
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b@example.com>", 250);
    c.send_raw(b"DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\n");
    assert_reply(&c.read_reply(), 554, "5.5.0");
    assert_closed(&mut c);
    assert!(relay.queued_messages().is_empty());
}

#[test]
fn final_dot_pipelined_with_quit_is_legal() {
    let relay = start("", "");
    let mut c = ready(&relay);
    in_data(&mut c);
    c.send_raw(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    assert_reply(&c.read_reply(), 250, "2.0.0");
    assert_reply(&c.read_reply(), 221, "2.0.0");
    assert_closed(&mut c);
    assert_eq!(relay.queued_messages().len(), 1);
}

// --- 4. Command lines ---------------------------------------------------------------------

#[test]
fn bare_lf_in_command_is_rejected_and_not_executed() {
    let relay = start("", "");
    let mut c = ready(&relay);
    c.send_raw(b"MAIL FROM:<a@example.com>\nRCPT TO:<b@example.com>\r\n");
    assert_reply(&c.read_reply(), 500, "5.5.2");
    assert_reply(&c.cmd("RCPT TO:<b@example.com>"), 503, "5.5.1");
    assert_log_fields(&relay, &[("rule", "bare_lf_in_command")]);
}

#[test]
fn bare_cr_in_command_is_rejected() {
    let relay = start("", "");
    let mut c = ready(&relay);
    c.send_raw(b"MAIL FROM:<a@example.com>\rRCPT TO:<b@example.com>\r\n");
    assert_reply(&c.read_reply(), 500, "5.5.2");
    assert_reply(&c.cmd("RCPT TO:<b@example.com>"), 503, "5.5.1");
    assert_log_fields(&relay, &[("rule", "bare_cr_in_command")]);
}

#[test]
fn nul_in_command_is_rejected() {
    let relay = start("", "");
    let mut c = ready(&relay);
    c.send_raw(b"MAIL FROM:<a@example.com>\0\r\n");
    assert_reply(&c.read_reply(), 500, "5.5.2");
    assert_reply(&c.cmd("RCPT TO:<b@example.com>"), 503, "5.5.1");
    assert_log_fields(&relay, &[("rule", "nul_in_command")]);
}

#[test]
fn overlong_command_line_is_rejected_and_session_continues() {
    let relay = start("", "[limits]\nmax_command_length = 1024\n");
    let mut c = ready(&relay);
    let line = format!("NOOP {}\r\n", "x".repeat(1993));
    assert_eq!(line.len(), 2000);
    c.send_raw(line.as_bytes());
    assert_reply(&c.read_reply(), 500, "5.5.2");
    assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
    assert_log_fields(&relay, &[("rule", "command_too_long")]);
}

#[test]
fn endless_line_without_line_end_closes_the_connection() {
    let relay = start("", "");
    let mut c = ready(&relay);
    c.send_raw(&vec![b'a'; 70 * 1024]);
    // The line is refused as soon as it passes max_command_length (500, its rest discarded),
    // then the session is closed once 64 KiB went by without a line end.
    assert_reply(&c.read_reply(), 500, "5.5.2");
    assert_reply(&c.read_reply(), 421, "4.7.0");
    assert_closed(&mut c);
    assert_log_fields(&relay, &[("rule", "line_flood")]);
}

// --- 5. Size ------------------------------------------------------------------------------

#[test]
fn message_over_max_size_is_rejected_after_reading_it_all() {
    let relay = start("", "[limits]\nmax_message_size = \"10KiB\"\n");
    let mut c = ready(&relay);
    let body = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789abcdef\r\n".repeat(1024)
    );
    let reply = c.send_message("a@example.com", &["b@example.com"], &body);
    assert_reply(&reply, 552, "5.3.4");
    assert!(relay.queued_messages().is_empty());
    // The whole message was read: the session is in sync.
    assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
}

#[test]
fn declared_size_over_max_is_rejected_at_mail() {
    let relay = start("", "[limits]\nmax_message_size = \"10KiB\"\n");
    let mut c = ready(&relay);
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com> SIZE=99999999"),
        552,
        "5.3.4",
    );
    let overflow = c.cmd("MAIL FROM:<a@example.com> SIZE=999999999999999999999999999999");
    assert_reply(&overflow, 552, "5.3.4");
    assert!(relay.queued_messages().is_empty());
}

// --- 6. Limits ----------------------------------------------------------------------------

#[test]
fn too_many_errors_closes_the_session() {
    let relay = start("", "[limits]\nmax_errors = 3\n");
    let mut c = ready(&relay);
    assert_reply(&c.cmd("FOO"), 500, "5.5.1");
    assert_reply(&c.cmd("BAR"), 500, "5.5.1");
    // The third error is answered, then the session ends.
    assert_reply(&c.cmd("BAZ"), 500, "5.5.1");
    assert_reply(&c.read_reply(), 421, "4.7.0");
    assert_closed(&mut c);
}

#[test]
fn recipients_over_max_are_refused() {
    let relay = start("", "[limits]\nmax_recipients = 2\n");
    let mut c = ready(&relay);
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b1@example.com>", 250);
    c.expect("RCPT TO:<b2@example.com>", 250);
    assert_reply(&c.cmd("RCPT TO:<b3@example.com>"), 452, "4.5.3");
    c.expect("DATA", 354);
    c.send_raw(b"Subject: x\r\n\r\nbody\r\n.\r\n");
    assert_reply(&c.read_reply(), 250, "2.0.0");
    let queued = relay.queued_messages();
    assert_eq!(queued.len(), 1);
    let env = queued[0].0.to_string();
    assert!(
        env.contains("b2@example.com") && !env.contains("b3@example.com"),
        "{env}"
    );
}

#[test]
fn connections_over_global_max_are_refused() {
    let relay = start(
        "",
        "[limits]\nmax_connections = 2\nmax_connections_per_ip = 10\n",
    );
    wait_probe_gone(&relay);
    let _a = greeted_from("127.0.0.2", &relay);
    let _b = greeted_from("127.0.0.3", &relay);
    let mut c = SmtpClient::connect_from("127.0.0.4", relay.port(0));
    assert_reply(&c.read_reply(), 421, "4.3.2");
    assert_closed(&mut c);
    assert!(relay.queued_messages().is_empty());
}

#[test]
fn connections_over_per_ip_max_are_refused_for_that_ip_only() {
    let relay = start("", "[limits]\nmax_connections_per_ip = 1\n");
    let _a = greeted_from("127.0.0.2", &relay);
    let mut b = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    assert_reply(&b.read_reply(), 421, "4.7.0");
    assert_closed(&mut b);
    let mut other = greeted_from("127.0.0.3", &relay);
    other.expect("EHLO client.test", 250);
    assert_log_fields(&relay, &[("rule", "max_connections_per_ip")]);
    // A closed connection gives its slot back.
    drop(_a);
    assert_log_fields(&relay, &session_end("127.0.0.2"));
    let mut again = greeted_from("127.0.0.2", &relay);
    again.expect("EHLO client.test", 250);
}

#[test]
fn idle_client_is_timed_out() {
    let relay = start("", "[limits]\ncommand_timeout = \"1s\"\n");
    let mut c = ready(&relay);
    assert_reply(&c.read_reply(), 421, "4.4.2");
    assert_closed(&mut c);
    assert_log_fields(&relay, &[("rule", "timeout")]);
}

fn message_with_hops(hops: usize) -> String {
    let mut m = String::new();
    for i in 0..hops {
        m.push_str(&format!(
            "Received: from h{i}.test by h{}.test; Sun, 22 Nov 2026 10:00:00 +0000\r\n",
            i + 1
        ));
    }
    m.push_str("Subject: loop\r\n\r\nbody\r\n");
    m
}

#[test]
fn mail_loop_over_hop_limit_is_rejected() {
    let relay = start("", "[limits]\nhop_limit = 3\n");
    let mut c = ready(&relay);
    let reply = c.send_message("a@example.com", &["b@example.com"], &message_with_hops(4));
    assert_reply(&reply, 554, "5.4.6");
    assert!(relay.queued_messages().is_empty());
    assert_log_fields(&relay, &[("rule", "hop_limit")]);
    let reply = c.send_message("a@example.com", &["b@example.com"], &message_with_hops(3));
    assert_reply(&reply, 250, "2.0.0");
    assert_eq!(relay.queued_messages().len(), 1);
}

// --- 7. Access ----------------------------------------------------------------------------

#[test]
fn denied_client_is_refused_for_everything_but_quit() {
    let relay = start("deny = [\"127.0.0.2/32\"]\n", "");
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    assert_reply(&c.read_reply(), 554, "5.7.1");
    assert_reply(&c.cmd("EHLO x"), 503, "5.7.1");
    assert_reply(&c.cmd("MAIL FROM:<a@example.com>"), 503, "5.7.1");
    assert_reply(&c.cmd("QUIT"), 221, "2.0.0");
    assert_log_fields(&relay, &[("rule", "listener_deny")]);
    let mut ok = greeted_from("127.0.0.3", &relay);
    ok.expect("EHLO x", 250);
}

#[test]
fn client_outside_allow_list_is_refused() {
    let relay = start("allow = [\"127.0.0.4/32\"]\n", "");
    let mut c = SmtpClient::connect_from("127.0.0.5", relay.port(0));
    assert_reply(&c.read_reply(), 554, "5.7.1");
    assert_reply(&c.cmd("EHLO x"), 503, "5.7.1");
    assert_log_fields(&relay, &[("rule", "listener_allow")]);
    let mut ok = greeted_from("127.0.0.4", &relay);
    ok.expect("EHLO x", 250);
}

// --- 8. Relay -----------------------------------------------------------------------------

#[test]
fn open_relay_is_refused() {
    let relay = start("", "");
    let mut c = ready(&relay);
    c.expect("MAIL FROM:<a@example.com>", 250);
    assert_reply(&c.cmd("RCPT TO:<x@other.test>"), 550, "5.7.1");
    assert_reply(&c.cmd("RCPT TO:<x%other.test@example.com>"), 550, "5.7.1");
    assert_reply(&c.cmd("RCPT TO:<x@example.com>"), 250, "2.1.5");
    assert_log_fields(&relay, &[("rule", "relay_denied")]);
}

#[test]
fn relay_networks_may_send_anywhere() {
    let l = listener("mx", free_port(), "none");
    let extra =
        "[relay]\naccepted_domains = [\"example.com\"]\nrelay_networks = [\"127.0.0.0/8\"]\n";
    let relay = Relay::start(&config(&[l], free_port(), extra));
    let mut c = ready(&relay);
    c.expect("MAIL FROM:<a@example.com>", 250);
    assert_reply(&c.cmd("RCPT TO:<x@other.test>"), 250, "2.1.5");
}

// --- 9. TLS gates -------------------------------------------------------------------------

#[test]
fn require_tls_refuses_mail_in_plaintext() {
    let relay = start_tls("require_tls = true\n", "starttls", "");
    let mut c = greeted(&relay);
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(ehlo.lines().any(|l| &l[4..] == "STARTTLS"), "{ehlo}");
    let reply = c.cmd("MAIL FROM:<a@example.com>");
    assert_reply(&reply, 530, "5.7.0");
    assert!(
        reply.1.contains("Must issue a STARTTLS command first"),
        "{}",
        reply.1
    );
    c.starttls(&relay.cert_path());
    c.expect("EHLO client.test", 250);
    assert_reply(&c.cmd("MAIL FROM:<a@example.com>"), 250, "2.1.0");
}

#[test]
fn garbage_instead_of_client_hello_never_falls_back_to_plaintext() {
    let relay = start_tls("", "starttls", "");
    let mut c = ready(&relay);
    c.expect("STARTTLS", 220);
    c.send_raw(b"EHLO plaintext.test\r\nMAIL FROM:<a@example.com>\r\n");
    assert_no_plaintext_after_starttls(&c.read_to_close());
    assert_log_fields(&relay, &[("reason", "TLS handshake failed")]);
}

/// What the relay sent after its STARTTLS 220 to a client that did not speak TLS: nothing, or
/// a TLS alert record (content type 21), but never an SMTP reply line.
#[track_caller]
fn assert_no_plaintext_after_starttls(rest: &str) {
    assert!(
        rest.is_empty() || (rest.starts_with('\u{15}') && !rest.contains("\r\n")),
        "relay answered in plaintext after STARTTLS: {rest:?}"
    );
}

// --- 10. Spool trouble --------------------------------------------------------------------

#[test]
fn spool_without_free_space_refuses_mail() {
    let relay = start("", "[limits]\nmin_free_space = \"1000000GiB\"\n");
    let mut c = ready(&relay);
    assert_reply(&c.cmd("MAIL FROM:<a@example.com>"), 452, "4.3.1");
    assert_log_fields(&relay, &[("rule", "min_free_space")]);
}

#[test]
fn spool_write_error_is_a_temporary_failure_and_queues_nothing() {
    let relay = start("", "");
    let tmp = relay.spool.join("tmp");
    fs::remove_dir_all(&tmp).unwrap();
    fs::write(&tmp, b"not a directory").unwrap();
    let mut c = ready(&relay);
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b@example.com>", 250);
    assert_reply(&c.cmd("DATA"), 451, "4.3.0");
    assert!(relay.queued_messages().is_empty());
    assert_log_fields(&relay, &[("rule", "spool_create")]);
    // Once the spool is repaired, the same session can send.
    fs::remove_file(&tmp).unwrap();
    fs::create_dir(&tmp).unwrap();
    c.expect("RSET", 250);
    let reply = c.send_message(
        "a@example.com",
        &["b@example.com"],
        "Subject: x\r\n\r\nbody\r\n",
    );
    assert_reply(&reply, 250, "2.0.0");
    assert_eq!(relay.queued_messages().len(), 1);
}

/// The smuggling sequences again, but with the payload arriving one octet per write, so the
/// decoder sees the dot and its line ends in separate reads.
#[test]
fn smuggled_end_of_data_split_across_reads_is_rejected() {
    let relay = start("", "");
    for variant in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n"] {
        let mut c = ready(&relay);
        in_data(&mut c);
        c.send_raw(b"Subject: smuggling\r\n\r\nhello");
        for &b in variant.as_bytes() {
            c.send_raw(&[b]);
            // Pacing: each octet in its own read on the relay's side.
            std::thread::sleep(Duration::from_millis(5));
        }
        c.send_raw(b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n");
        c.send_raw(b"smuggled\r\n\r\n.\r\n");
        assert_reply(&c.read_reply(), 550, "5.5.2");
        assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
        assert!(relay.queued_messages().is_empty(), "variant {variant:?}");
    }
}

/// A bare LF right after the 354 (the dot at the very start of the content).
#[test]
fn smuggled_end_of_data_at_start_of_content_is_rejected() {
    let relay = start("", "");
    for start_of_content in [".\n", ".\r", "\n.\r\n"] {
        let mut c = ready(&relay);
        in_data(&mut c);
        let mut data = start_of_content.as_bytes().to_vec();
        data.extend_from_slice(b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.com>\r\n");
        data.extend_from_slice(b"DATA\r\nsmuggled\r\n.\r\n");
        c.send_raw(&data);
        assert_reply(&c.read_reply(), 550, "5.5.2");
        assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
        assert!(relay.queued_messages().is_empty(), "{start_of_content:?}");
    }
}

/// STARTTLS with the injected command in a separate write that arrives before the client
/// starts the handshake: the relay must treat it as (broken) TLS, never as a command.
#[test]
fn plaintext_command_after_starttls_220_is_never_executed() {
    let relay = start_tls("", "starttls", "");
    let mut c = ready(&relay);
    c.expect("STARTTLS", 220);
    c.send_raw(b"MAIL FROM:<a@example.com>\r\n");
    assert_no_plaintext_after_starttls(&c.read_to_close());
    assert!(relay.queued_messages().is_empty());
    assert_log_fields(&relay, &[("reason", "TLS handshake failed")]);
}

#[test]
fn starttls_twice_is_refused() {
    let relay = start_tls("", "starttls", "");
    let mut c = ready(&relay);
    c.starttls(&relay.cert_path());
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_reply(&c.cmd("STARTTLS"), 503, "5.5.1");
}

#[test]
fn message_too_big_in_pipelined_writes_keeps_session_in_sync() {
    let relay = start("", "[limits]\nmax_message_size = \"10KiB\"\n");
    let mut c = ready(&relay);
    in_data(&mut c);
    let mut data = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..2048 {
        data.extend_from_slice(b"0123456789\r\n");
    }
    // A line that looks like a command inside the oversized message must stay content.
    data.extend_from_slice(b"QUIT\r\n.\r\n");
    c.send_raw(&data);
    assert_reply(&c.read_reply(), 552, "5.3.4");
    assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
    assert!(relay.queued_messages().is_empty());
    assert_log_fields(&relay, &[("rule", "max_message_size")]);
}

#[test]
fn lowercase_received_headers_count_toward_hop_limit() {
    let relay = start("", "[limits]\nhop_limit = 3\n");
    let mut c = ready(&relay);
    let body = message_with_hops(4)
        .replacen("Received:", "received:", 1)
        .replacen("Received:", "RECEIVED:", 1);
    let reply = c.send_message("a@example.com", &["b@example.com"], &body);
    assert_reply(&reply, 554, "5.4.6");
    assert!(relay.queued_messages().is_empty());
}

#[test]
fn source_routed_and_bang_path_recipients_are_not_relayed() {
    let relay = start("", "");
    let mut c = ready(&relay);
    c.expect("MAIL FROM:<a@example.com>", 250);
    for rcpt in [
        "<@example.com:x@other.test>",
        "<x!other.test@example.com>",
        "<other.test!x@example.com>",
        "<x@other.test@example.com>",
        "<\"x@other.test\"@example.com>",
    ] {
        let reply = c.cmd(&format!("RCPT TO:{rcpt}"));
        assert!(
            matches!(reply.0, 550 | 553 | 501),
            "{rcpt} accepted: {reply:?}"
        );
    }
    assert_reply(&c.cmd("DATA"), 554, "5.5.1");
    assert_log_fields(&relay, &[("rule", "routed_address")]);
}

#[test]
fn pipelined_mail_rcpt_data_is_legal() {
    let relay = start("", "");
    let mut c = ready(&relay);
    c.send_raw(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n");
    assert_reply(&c.read_reply(), 250, "2.1.0");
    assert_reply(&c.read_reply(), 250, "2.1.5");
    assert_eq!(c.read_reply().0, 354);
    c.send_raw(b"Subject: x\r\n\r\nbody\r\n.\r\n");
    assert_reply(&c.read_reply(), 250, "2.0.0");
    assert_eq!(relay.queued_messages().len(), 1);
}

#[test]
fn stalled_message_data_is_timed_out_and_not_queued() {
    let relay = start("", "[limits]\ndata_timeout = \"1s\"\n");
    let mut c = ready(&relay);
    in_data(&mut c);
    c.send_raw(b"Subject: slow\r\n\r\nstarted but never finished\r\n");
    assert_reply(&c.read_reply(), 421, "4.4.2");
    assert_closed(&mut c);
    assert!(relay.queued_messages().is_empty());
}

#[test]
fn recipient_count_restarts_with_each_transaction() {
    let relay = start("", "[limits]\nmax_recipients = 2\n");
    let mut c = ready(&relay);
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b1@example.com>", 250);
    c.expect("RCPT TO:<b2@example.com>", 250);
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b3@example.com>", 250);
    c.expect("RCPT TO:<b4@example.com>", 250);
    assert_reply(&c.cmd("RCPT TO:<b5@example.com>"), 452, "4.5.3");
}

#[test]
fn refused_global_connection_gives_no_slot_away() {
    let relay = start("", "[limits]\nmax_connections = 1\n");
    wait_probe_gone(&relay);
    let a = greeted_from("127.0.0.2", &relay);
    for _ in 0..3 {
        let mut c = SmtpClient::connect_from("127.0.0.3", relay.port(0));
        assert_reply(&c.read_reply(), 421, "4.3.2");
        assert_closed(&mut c);
    }
    drop(a);
    // Once the relay has seen `a` close, one client fits again.
    assert_log_fields(&relay, &session_end("127.0.0.2"));
    let mut c = greeted_from("127.0.0.3", &relay);
    c.expect("EHLO x", 250);
}

/// Content of exactly `len` octets (headers, blank line, body lines of 'x', CRLF ends).
fn content_of_len(len: usize) -> Vec<u8> {
    let mut m = b"Subject: size\r\n\r\n".to_vec();
    while m.len() < len {
        let room = len - m.len();
        if room <= 2 {
            m.extend_from_slice(&b"\r\n"[..room]);
            break;
        }
        let n = (room - 2).min(76);
        m.extend(std::iter::repeat_n(b'x', n));
        m.extend_from_slice(b"\r\n");
    }
    m.truncate(len);
    if !m.ends_with(b"\r\n") {
        let l = m.len();
        m[l - 2..].copy_from_slice(b"\r\n");
    }
    m
}

#[test]
fn message_size_limit_is_exact_at_the_boundary() {
    let relay = start("", "[limits]\nmax_message_size = \"10KiB\"\n");
    let mut c = ready(&relay);
    in_data(&mut c);
    let at = content_of_len(10 * 1024);
    assert_eq!(at.len(), 10240);
    c.send_raw(&at);
    c.send_raw(b".\r\n");
    assert_reply(&c.read_reply(), 250, "2.0.0");
    in_data(&mut c);
    let over = content_of_len(10 * 1024 + 2);
    c.send_raw(&over);
    c.send_raw(b".\r\n");
    assert_reply(&c.read_reply(), 552, "5.3.4");
    assert_eq!(relay.queued_messages().len(), 1);
}

#[test]
fn next_transaction_pipelined_after_final_dot_is_legal() {
    let relay = start("", "");
    let mut c = ready(&relay);
    in_data(&mut c);
    c.send_raw(
        b"Subject: 1\r\n\r\none\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n",
    );
    assert_reply(&c.read_reply(), 250, "2.0.0");
    assert_reply(&c.read_reply(), 250, "2.1.0");
    assert_reply(&c.read_reply(), 250, "2.1.5");
    assert_eq!(c.read_reply().0, 354);
    c.send_raw(b"Subject: 2\r\n\r\ntwo\r\n.\r\n");
    assert_reply(&c.read_reply(), 250, "2.0.0");
    assert_eq!(relay.queued_messages().len(), 2);
}

#[test]
fn spool_commit_error_is_a_temporary_failure_and_leaves_no_temp_file() {
    let relay = start("", "");
    let queue = relay.spool.join("queue");
    fs::remove_dir_all(&queue).unwrap();
    fs::write(&queue, b"not a directory").unwrap();
    let mut c = ready(&relay);
    let reply = c.send_message(
        "a@example.com",
        &["b@example.com"],
        "Subject: x\r\n\r\nbody\r\n",
    );
    assert_reply(&reply, 451, "4.3.0");
    let leftovers: Vec<_> = fs::read_dir(relay.spool.join("tmp")).unwrap().collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    assert_log_fields(&relay, &[("rule", "spool_commit")]);
    assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
}

/// A slow-loris client trickling one octet at a time must not stretch the command timeout.
#[test]
fn trickled_command_does_not_extend_the_command_timeout() {
    let relay = start("", "[limits]\ncommand_timeout = \"1s\"\n");
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", relay.port(0))).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    raw_read_until(&mut tcp, "220 ");
    let text = trickle(&mut tcp, b"N");
    assert!(text.contains("421 4.4.2"), "no timeout reply: {text:?}");
}

#[test]
fn starttls_mid_transaction_leaves_no_transaction_behind() {
    let relay = start_tls("", "starttls", "");
    let mut c = ready(&relay);
    c.expect("MAIL FROM:<a@example.com>", 250);
    let (code, text) = c.cmd("STARTTLS");
    if code == 220 {
        c.upgrade_tls(&relay.cert_path(), "localhost");
        c.expect("EHLO client.test", 250);
        assert_reply(&c.cmd("RCPT TO:<b@example.com>"), 503, "5.5.1");
    } else {
        assert_eq!(code, 503, "{text}");
    }
}

/// The DATA timeout bounds the whole message, not each read.
#[test]
fn trickled_message_does_not_extend_the_data_timeout() {
    let relay = start("", "[limits]\ndata_timeout = \"1s\"\n");
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", relay.port(0))).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    raw_read_until(&mut tcp, "220 ");
    raw_write(&mut tcp, b"EHLO client.test\r\n");
    raw_read_until(&mut tcp, "250 ");
    raw_write(
        &mut tcp,
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
    );
    raw_read_until(&mut tcp, "354 ");
    raw_write(&mut tcp, b"Subject: slow\r\n\r\n");
    let text = trickle(&mut tcp, b"x\r\n");
    assert!(text.contains("421 4.4.2"), "no timeout reply: {text:?}");
    assert!(relay.queued_messages().is_empty());
}

/// Write, ignoring errors (the relay may have closed).
fn raw_write(tcp: &mut std::net::TcpStream, bytes: &[u8]) {
    use std::io::Write;
    let _ = tcp.write_all(bytes);
}

/// Read until `needle` has been received; everything read.
fn raw_read_until(tcp: &mut std::net::TcpStream, needle: &str) -> String {
    use std::io::Read;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = tcp.read(&mut chunk).expect("read");
        assert!(
            n > 0,
            "closed before {needle:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Send `unit` every 200 ms for up to 3 s, stopping when the relay closes; what it sent.
/// Panics if the relay was still reading after 2.5 s (a 1 s timeout plus slack).
fn trickle(tcp: &mut std::net::TcpStream, unit: &[u8]) -> String {
    use std::io::Read;
    use std::time::Instant;
    tcp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    while started.elapsed() < Duration::from_secs(3) {
        raw_write(tcp, unit);
        match tcp.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) => {}
        }
        // Pacing: a slow sender, the client under test.
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(2500),
        "closed only after {elapsed:?}"
    );
    String::from_utf8_lossy(&got).into_owned()
}

// --- 11. Header firewall and trace header -------------------------------------------------

/// Headers a stranger must not be able to set on mail to Exchange.
const FORGED: &str = "X-MS-Exchange-Organization-SCL: -1\r\n\
X-MS-Exchange-Forest-RulesExecuted: relay\r\n\
Authentication-Results: relay.test; spf=pass smtp.mailfrom=example.com\r\n\
Authentication-Results: other.test; spf=fail\r\n\
Subject: forged\r\n\r\nX-MS-Exchange-Organization-SCL: -1 stays in the body\r\n";

/// The queued message, as text.
fn only_message(relay: &Relay) -> String {
    let queued = relay.queued_messages();
    assert_eq!(queued.len(), 1);
    String::from_utf8(queued[0].1.clone()).unwrap()
}

#[test]
fn exchange_headers_from_strangers_are_removed_before_queuing() {
    let relay = start("", "");
    let mut c = ready(&relay);
    let reply = c.send_message("a@example.com", &["b@example.com"], FORGED);
    assert_reply(&reply, 250, "2.0.0");
    let msg = only_message(&relay);
    let headers = &msg[..msg.find("\r\n\r\n").unwrap()];
    assert!(!headers.contains("X-MS-Exchange-Organization-SCL"), "{msg}");
    assert!(!headers.contains("X-MS-Exchange-Forest"), "{msg}");
    assert!(!headers.contains("relay.test; spf=pass"), "{msg}");
    assert!(headers.contains("other.test; spf=fail"), "{msg}");
    assert!(headers.contains("Subject: forged"), "{msg}");
    assert!(msg.ends_with("\r\n\r\nX-MS-Exchange-Organization-SCL: -1 stays in the body\r\n"));
    // The fields removed are logged (how many, and which).
    assert_log_fields(&relay, &[("headers", "*"), ("count", "*")]);
}

#[test]
fn exchange_headers_from_relay_networks_are_kept() {
    let relay = start("", "relay_networks = [\"127.0.0.0/8\"]\n");
    let mut c = ready(&relay);
    let reply = c.send_message("a@example.com", &["b@example.com"], FORGED);
    assert_reply(&reply, 250, "2.0.0");
    let msg = only_message(&relay);
    assert!(
        msg.contains("\r\nX-MS-Exchange-Organization-SCL: -1\r\n"),
        "{msg}"
    );
    assert!(msg.contains("relay.test; spf=pass"), "{msg}");
}

#[test]
fn received_header_names_smtp_for_helo_and_esmtp_for_ehlo() {
    for (greeting, protocol) in [
        ("HELO client.test", "with SMTP id"),
        ("EHLO client.test", "with ESMTP id"),
    ] {
        let relay = start("", "");
        let mut c = greeted(&relay);
        c.expect(greeting, 250);
        let reply = c.send_message(
            "a@example.com",
            &["b@example.com"],
            "Subject: t\r\n\r\nx\r\n",
        );
        assert_reply(&reply, 250, "2.0.0");
        let msg = only_message(&relay);
        assert!(
            msg.starts_with("Received: from client.test ([127.0.0.1])"),
            "{msg}"
        );
        assert!(msg.contains(protocol), "{greeting}: {msg}");
    }
}

// --- 12. AUTH line length and implicit TLS --------------------------------------------------

#[test]
fn auth_line_over_12288_octets_is_refused_with_5_5_6() {
    let relay = start("", "");
    let mut c = ready(&relay);
    // Up to 12288 octets an AUTH line is framed normally (here refused: AUTH is off).
    let long_ok = format!("AUTH PLAIN {}", "A".repeat(5000));
    assert_reply(&c.cmd(&long_ok), 502, "5.5.1");
    let too_long = format!("AUTH PLAIN {}", "A".repeat(13000));
    assert_reply(&c.cmd(&too_long), 500, "5.5.6");
    assert_reply(&c.cmd("NOOP"), 250, "2.0.0");
    assert_log_fields(&relay, &[("rule", "auth_line_too_long")]);
}

#[test]
fn plaintext_on_an_implicit_tls_port_gets_no_smtp_reply() {
    let relay = start_tls("", "implicit", "");
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", relay.port(0))).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw_write(
        &mut tcp,
        b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\n",
    );
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut tcp, &mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("220") && !text.contains("250"), "{text:?}");
    assert!(relay.queued_messages().is_empty());
}
