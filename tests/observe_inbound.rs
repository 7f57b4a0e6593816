//! `[log] format = "json"` with the real binary: every line the relay writes is one JSON
//! object, every line of an SMTP session names the session's peer in its `session` span, and
//! every line about a message its queue id.

mod common;

use std::time::Duration;

use common::{Relay, SmtpClient, config, free_port, listener, queue_id, wait_until};
use serde_json::Value;

/// The test's SMTP client connects from here.
const CLIENT_IP: &str = "127.0.0.9";
/// Where [`Relay::start`]'s readiness probe connects from.
const PROBE_IP: &str = "127.0.0.1";

/// Every line of the relay's log, each parsed as JSON (a line that is not fails the test).
fn json_lines(relay: &Relay) -> Vec<Value> {
    let text = relay.log();
    text.lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\nlog:\n{text}"))
        })
        .collect()
}

/// The span named `name` a line was written in, if any.
fn span<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line.get("spans")?
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// The `peer` of the `session` span a line was written in.
fn peer_of(line: &Value) -> Option<&str> {
    span(line, "session")?["peer"].as_str()
}

fn message(line: &Value) -> &str {
    line["message"].as_str().unwrap_or_default()
}

#[test]
fn json_logs_are_one_object_per_line_with_the_peer_of_every_session_line_and_the_queue_id() {
    let extra = "[relay]\naccepted_domains = [\"example.com\"]\n[log]\nformat = \"json\"\n";
    // An upstream nobody listens on: the message is attempted, deferred and stays queued.
    let policy = config(&[listener("mx", free_port(), "none")], free_port(), extra);
    // Started once its JSON `listening` line names the port (and the port accepts).
    let mut relay = Relay::start(&policy);

    // From an address of its own: the harness's readiness probe is a session from 127.0.0.1.
    let mut client = SmtpClient::connect_from(CLIENT_IP, relay.port(0));
    client.expect_reply(220);
    client.expect("EHLO client.test", 250);
    client.expect("MAIL FROM:<a@sender.test>", 250);
    client.expect("RCPT TO:<u@other.test>", 550);
    client.expect("RSET", 250);
    let body = "Message-ID: <json@client.test>\r\nSubject: hi\r\n\r\nbody\r\n";
    let (code, text) = client.send_message("a@sender.test", &["u@example.com"], body);
    assert_eq!(code, 250, "{text}");
    let queue_id = queue_id(&text).expect("queue id in the 250");
    client.expect("QUIT", 221);
    let attempted = wait_until(Duration::from_secs(10), || {
        json_lines(&relay)
            .iter()
            .any(|l| message(l) == "session end" && peer_of(l) == Some(CLIENT_IP))
            && json_lines(&relay)
                .iter()
                .any(|l| span(l, "delivery").is_some())
    });
    assert!(attempted, "no session end or delivery line");
    // Stopped with SIGTERM: its shutdown lines are logged too.
    relay.stop();

    let lines = json_lines(&relay);
    assert_eq!(client.local_addr().ip().to_string(), CLIENT_IP);
    let mut session_lines = Vec::new();
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
        if let Some(session) = span(line, "session") {
            let peer = session["peer"].as_str();
            assert!(peer == Some(CLIENT_IP) || peer == Some(PROBE_IP), "{line}");
            assert_eq!(session["listener"], "mx", "{line}");
            if peer == Some(CLIENT_IP) {
                session_lines.push(message(line));
            }
        }
        for name in ["message", "delivery"] {
            if let Some(span) = span(line, name) {
                assert_eq!(span["queue_id"], queue_id.as_str(), "{line}");
            }
        }
    }
    for expected in ["session start", "rejected", "queued", "session end"] {
        assert!(
            session_lines.contains(&expected),
            "{expected}: {session_lines:?}"
        );
    }
    let refusal = lines
        .iter()
        .find(|l| message(l) == "rejected")
        .expect("the refusal's line");
    assert_eq!(refusal["rule"], "relay_denied");
    let queued = lines.iter().find(|l| message(l) == "queued").unwrap();
    assert_eq!(queued["queue_id"], queue_id.as_str());
}
