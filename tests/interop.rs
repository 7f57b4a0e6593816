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
    let reply = c.send_message("a@example.com", &["b@example.com"], "Subject: t\r\n\r\nok\r\n");
    assert_reply(&reply, 250, "2.0.0");
    assert!(sink.wait_for(1, WAIT), "nothing delivered:\n{}", relay.log());
    let m = &sink.messages()[0];
    assert_eq!(m.rcpts, ["b@example.com"]);
    assert!(!m.tls);
    assert_log(&relay, "rule=\"starttls_argument\"");
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
    assert!(sink.wait_for(1, WAIT), "nothing delivered:\n{}", relay.log());
    let m = &sink.messages()[0];
    assert_eq!(m.mail_from, "someone@stranger.test");
    assert_eq!(m.rcpts, ["hostmaster@corp.test", "POSTMASTER@Example.COM"]);
    assert!(sink.violations().is_empty(), "{:?}", sink.violations());
}

#[test]
fn postmaster_without_the_key_goes_to_postmaster_at_the_first_accepted_domain() {
    let sink = Sink::start(SinkConfig::default());
    let relay = start_with("", "none", sink.port(), "");
    let mut c = ready(relay.port(0));
    let reply = c.send_message("", &["postmaster"], "Subject: t\r\n\r\nok\r\n");
    assert_reply(&reply, 250, "2.0.0");
    assert!(sink.wait_for(1, WAIT), "nothing delivered:\n{}", relay.log());
    assert_eq!(sink.messages()[0].rcpts, ["postmaster@example.com"]);
}
