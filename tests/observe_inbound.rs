//! `[log] format = "json"` with the real binary: every line the relay writes is one JSON
//! object, every line of an SMTP session names the session's peer in its `session` span, and
//! every line about a message its queue id.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{BIN, SmtpClient, TestDir, config, free_port, listener, wait_until};
use serde_json::Value;

/// The relay on `dir`'s `portcullis.toml`, its stdout and stderr in `relay.log`.
fn spawn(dir: &TestDir) -> Child {
    let log = std::fs::File::create(dir.join("relay.log")).unwrap();
    Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(dir.join("portcullis.toml"))
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn portcullis run")
}

/// Every line of the log, each parsed as JSON (a line that is not fails the test).
fn json_lines(dir: &TestDir) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("relay.log")).unwrap_or_default();
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

fn message(line: &Value) -> &str {
    line["message"].as_str().unwrap_or_default()
}

/// Stop the relay with SIGTERM (its shutdown lines are logged too) and wait for it.
fn stop(mut child: Child) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the relay this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
        panic!("the relay did not stop on SIGTERM");
    }
}

#[test]
fn json_logs_are_one_object_per_line_with_the_peer_of_every_session_line_and_the_queue_id() {
    let dir = TestDir::new();
    let port = free_port();
    let extra = "[relay]\naccepted_domains = [\"example.com\"]\n[log]\nformat = \"json\"\n";
    // An upstream nobody listens on: the message is attempted, deferred and stays queued.
    let policy = config(&[listener("mx", port, "none")], free_port(), extra);
    dir.write("portcullis.toml", dir.expand(&policy));
    let child = spawn(&dir);
    let listening = wait_until(Duration::from_secs(10), || {
        json_lines(&dir).iter().any(|l| message(l) == "listening")
    });
    assert!(listening, "no listening line");

    let mut client = SmtpClient::connect(port);
    client.expect_reply(220);
    client.expect("EHLO client.test", 250);
    client.expect("MAIL FROM:<a@sender.test>", 250);
    client.expect("RCPT TO:<u@other.test>", 550);
    client.expect("RSET", 250);
    let body = "Message-ID: <json@client.test>\r\nSubject: hi\r\n\r\nbody\r\n";
    let (code, text) = client.send_message("a@sender.test", &["u@example.com"], body);
    assert_eq!(code, 250, "{text}");
    let queue_id = text.rsplit(' ').next().unwrap().trim().to_string();
    client.expect("QUIT", 221);
    let attempted = wait_until(Duration::from_secs(10), || {
        json_lines(&dir)
            .iter()
            .any(|l| message(l) == "session end" && span(l, "session").is_some())
            && json_lines(&dir)
                .iter()
                .any(|l| span(l, "delivery").is_some())
    });
    assert!(attempted, "no session end or delivery line");
    stop(child);

    let lines = json_lines(&dir);
    let peer = client.local_addr().ip().to_string();
    let mut session_lines = Vec::new();
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
        if let Some(session) = span(line, "session") {
            assert_eq!(session["peer"], peer.as_str(), "{line}");
            assert_eq!(session["listener"], "mx", "{line}");
            session_lines.push(message(line));
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
