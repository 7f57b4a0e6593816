//! Loopback tests of `portcullis status [--json]`: from the running relay's admin API (with
//! the token; a wrong one exits 1), and from the spool and journal when the relay does not
//! answer (first line says so), with exact counts. The relay's upstream is a closed port, so
//! accepted mail stays queued.

mod common;

use std::fs;

use common::http;
use common::*;

#[test]
fn without_admin_the_status_comes_from_the_spool_and_says_so() {
    let mut relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org", "b@example.org", "a@example.org"]);
    // Stop only once the three first attempts are deferred and in the journal (read as the
    // command reads it: without [admin], `status` reads the spool and journal even now).
    for id in &ids {
        assert_log_fields(&relay, &[("queue_id", id), ("attempts", "1")]);
    }
    assert!(
        wait_until(LOG_WAIT, || {
            let out = relay.command(&["status", "--json"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["last_60m"]["deferred"] == 3)
        }),
        "three deferrals journaled"
    );
    relay.stop();
    // The second message is held: counted apart, not among the top senders or the oldest.
    let state = relay.spool.join("queue").join(format!("{}.state", ids[1]));
    fs::write(
        &state,
        br#"{"attempts":0,"next_attempt":0,"hold":{"since":1,"reason":"test"}}"#,
    )
    .unwrap();

    let out = relay.command(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "no [admin] listener configured: live state unavailable; from the spool and journal:"
    );
    assert!(lines[1].ends_with(": not live"), "{text}");
    assert_eq!(lines[2], "alerts: unknown (live state unavailable)");
    let queue = lines.iter().position(|l| l.starts_with("queue: ")).unwrap();
    assert!(
        lines[queue].starts_with("queue: 2 queued, 1 held; oldest "),
        "{text}"
    );
    assert!(
        lines[queue].contains(&format!("({}, since ", ids[0])),
        "{text}"
    );
    assert_eq!(lines[queue + 1], "  up: 2 queued, 1 held");
    assert_eq!(lines[queue + 2], "  top senders: a@example.org 2");
    // From the journal: the refused connections to the upstream, and the last hour's flow.
    let up = lines.iter().position(|l| *l == "upstreams:").unwrap();
    assert!(
        lines[up + 1].starts_with("  up: DOWN since ")
            && lines[up + 1].ends_with("; delivered in the last 5 min: 0; last success: none"),
        "{text}"
    );
    assert!(lines[up + 2].starts_with("    last error: "), "{text}");
    assert!(lines[up + 2].contains("Connection refused"), "{text}");
    let sixty = |name: &str| {
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap();
        line.split_whitespace().last().unwrap().to_owned()
    };
    assert_eq!(sixty("accepted"), "3", "{text}");
    assert_eq!(sixty("deferred"), "3", "{text}");
    assert_eq!(sixty("delivered"), "0", "{text}");
    assert_eq!(lines.last(), Some(&"top refusal rules (last hour): none"));
}

#[test]
fn json_from_the_spool_is_one_status_object_with_the_notice_on_stderr() {
    let port = free_port();
    let mut relay = example_com_relay(&format!("[admin]\nbind = \"127.0.0.1:{port}\"\n"));
    let ids = send_from(&relay, &["a@example.org", ""]);
    relay.stop();

    let out = relay.command(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "relay not answering on 127.0.0.1:{port}: live state unavailable; from the spool and journal:"
        )
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(status["live"], false);
    assert_eq!(status["ready"], false);
    assert_eq!(status["node"], "relay.test");
    assert_eq!(
        status["queue"]["by_upstream"],
        serde_json::json!([{"upstream": "up", "queued": 2, "held": 0}])
    );
    assert_eq!(
        status["queue"]["top_senders"],
        serde_json::json!([["<>", 1], ["a@example.org", 1]])
    );
    assert_eq!(status["queue"]["oldest"][0], ids[0].as_str());
    // The one gauge among the totals agrees with the oldest message found.
    let age = status["now"].as_u64().unwrap() - status["queue"]["oldest"][1].as_u64().unwrap();
    assert_eq!(status["totals"]["queue_oldest_seconds"], age);
    assert_eq!(status["alerts"], serde_json::json!([]));
    assert_eq!(status["minutes"].as_array().unwrap().len(), 60);
    assert_eq!(status["upstreams"][0]["name"], "up");
    assert_eq!(status["upstreams"][0]["up"], false);
    assert_eq!(status["last_60m"]["accepted"], 2);
}

#[test]
fn status_needs_a_valid_policy() {
    let dir = TestDir::new();
    let out = std::process::Command::new(BIN)
        .arg("status")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("status needs --config FILE"));
    let bad = dir.write("bad.toml", "[server]\nhostname = 3\n");
    let out = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

/// `[admin]` on a free loopback port with `token` (written to `{dir}/admin.token`).
fn admin_with_token(dir: &TestDir, token: &str) -> (String, u16) {
    let port = free_port();
    dir.write("admin.token", format!("{token}\n"));
    (
        format!("[admin]\nbind = \"127.0.0.1:{port}\"\ntoken_file = \"{{dir}}/admin.token\"\n"),
        port,
    )
}

#[test]
fn status_asks_the_running_relay_with_its_token() {
    let dir = TestDir::new();
    let (admin, _) = admin_with_token(&dir, "s3cret-token");
    let relay = Relay::start_in(
        dir,
        &config(
            &[listener("mx", free_port(), "none")],
            free_port(),
            &format!("[relay]\naccepted_domains = [\"example.com\"]\n\n{admin}"),
        ),
    );
    send_from(&relay, &["a@example.org", "a@example.org"]);
    let mut c = SmtpClient::greeted(relay.port(0));
    c.expect("MAIL FROM:<x@example.org>", 250);
    c.expect("RCPT TO:<x@elsewhere.test>", 550);
    c.expect("QUIT", 221);

    let out = relay.command(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(out.stderr.is_empty(), "{}", show(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["live"], true);
    assert_eq!(status["totals"]["accepted"], serde_json::json!([["mx", 2]]));
    assert_eq!(
        status["top_refusals"],
        serde_json::json!([["relay_denied", 1]])
    );
    assert_eq!(status["last_5m"]["accepted"], 2);
    assert_eq!(status["last_5m"]["refused"], 1);

    let out = relay.command(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("node relay.test (portcullis "), "{text}");
    assert!(
        text.contains("top refusal rules (since start): relay_denied 1\n"),
        "{text}"
    );
}

#[test]
fn a_wrong_token_exits_1_with_a_clear_message() {
    let dir = TestDir::new();
    let (admin, port) = admin_with_token(&dir, "right-token");
    let relay = Relay::start_in(
        dir,
        &config(&[listener("mx", free_port(), "none")], free_port(), &admin),
    );
    // The running relay read the right token at start; the file now says something else.
    relay.dir().write("admin.token", "wrong-token\n");
    let out = relay.command(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(out.stdout.is_empty(), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "portcullis: the admin API on 127.0.0.1:{port} refused the token (401 Unauthorized): \
             check [admin] token_file against the running relay's"
        )
    );
}

#[test]
fn an_admin_api_answering_503_falls_back_to_the_spool_and_says_why() {
    let dir = TestDir::new();
    let (admin, port) = admin_with_token(&dir, "s3cret-token");
    let relay = Relay::start_in(
        dir,
        &config(
            &[listener("mx", free_port(), "none")],
            free_port(),
            &format!("[relay]\naccepted_domains = [\"example.com\"]\n\n{admin}"),
        ),
    );
    assert!(http::wait_accepting(port, LOG_WAIT));
    send_from(&relay, &["a@example.org"]);
    // Every general admin slot held: /api/status answers 503.
    let held: Vec<_> = (0..64)
        .map(|_| {
            let mut tcp = http::connect(port);
            assert_eq!(http::get_on(&mut tcp, "/healthz").status, 200);
            tcp
        })
        .collect();
    let out = relay.command(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().next(),
        Some(
            format!(
                "the admin API on 127.0.0.1:{port} answered 503 Service Unavailable: live state \
                 unavailable; from the spool and journal:"
            )
            .as_str()
        ),
        "{text}"
    );
    assert!(
        text.contains("\nqueue: 1 queued, 0 held; oldest "),
        "{text}"
    );
    drop(held);
}
