//! `portcullis trace` end to end: the real relay receives a message from 127.0.0.9 and
//! delivers it to the test sink, which answers like Exchange (`250 2.6.0 <…>
//! [InternalId=…] Queued mail for delivery`); `trace` then finds the message by its queue
//! id, its Message-ID (with and without brackets), an address and the client IP, each time
//! with its `queued` and `delivered` events and the upstream's own id, while the relay runs
//! (the open journal segment is read). A refused RCPT without queue id shows too.

mod common;

use std::process::Output;
use std::time::Duration;

use common::sink::{Sink, SinkConfig};
use common::*;

const WAIT: Duration = Duration::from_secs(15);
const CLIENT_IP: &str = "127.0.0.9";
const MESSAGE_ID: &str = "<trace-e2e-1@client.example>";
const INTERNAL_ID: &str = "1099511627781";

/// The relay: an MX listener, loopback 127.0.0.1 alone may relay, example.com accepted, the
/// sink as upstream.
fn start(sink_port: u16) -> Relay {
    let extra = "[relay]\naccepted_domains = [\"example.com\"]\n\
                 relay_networks = [\"127.0.0.1/32\"]\n\n[queue]\nretry = [\"1s\"]\n";
    Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        sink_port,
        extra,
    ))
}

fn exchange_sink() -> Sink {
    Sink::start(SinkConfig {
        data_reply: Some(format!(
            "250 2.6.0 <sinkid-42@ex01.corp.test> [InternalId={INTERNAL_ID}, \
             Hostname=EX01.corp.test] Queued mail for delivery"
        )),
        ..SinkConfig::default()
    })
}

/// From 127.0.0.9: one message to bob@example.com (queued), and one refused RCPT to
/// x@elsewhere.test (not ours, no relaying for this client). Returns the queue id.
fn send(relay: &Relay) -> String {
    let mut c = SmtpClient::connect_from(CLIENT_IP, relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.example", 250);
    c.expect("MAIL FROM:<alice@sender.example>", 250);
    c.expect("RCPT TO:<x@elsewhere.test>", 550);
    c.expect("RCPT TO:<bob@example.com>", 250);
    c.expect("DATA", 354);
    let body = format!(
        "From: <alice@sender.example>\r\nTo: <bob@example.com>\r\nMessage-ID: {MESSAGE_ID}\r\n\
         Subject: trace\r\n\r\nhello\r\n"
    );
    c.send_raw(&dot_stuff(&body));
    c.send_raw(b".\r\n");
    let text = c.expect_reply(250);
    c.cmd("QUIT");
    queue_id(&text).expect("queue id in the 250")
}

fn trace(relay: &Relay, args: &[&str]) -> Output {
    let mut all = vec!["trace"];
    all.extend_from_slice(args);
    relay.command(&all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text lines of one kind (`queued`, `delivered`) in a trace's output.
fn lines_of<'a>(text: &'a str, kind: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(kind))
        .collect()
}

/// The relay and its Exchange-like sink after [`send`]: the message delivered and its
/// `delivered` event found by `trace`. The sink (kept alive), the relay, the queue id.
fn delivered_and_journaled() -> (Sink, Relay, String) {
    let sink = exchange_sink();
    let relay = start(sink.port());
    let id = send(&relay);
    assert!(
        wait_until(WAIT, || sink.messages().len() == 1),
        "not delivered"
    );
    // The journal is written out within a fraction of a second; wait for the delivery.
    let done = wait_until(WAIT, || {
        stdout(&trace(&relay, &[&id])).contains(" delivered ")
    });
    assert!(
        done,
        "no delivered event: {}",
        stdout(&trace(&relay, &[&id]))
    );
    (sink, relay, id)
}

#[test]
fn trace_finds_a_delivered_message_by_each_kind_of_query() {
    let (_sink, relay, id) = delivered_and_journaled();
    let bare_mid = MESSAGE_ID.trim_matches(['<', '>']);
    for query in [
        id.as_str(),
        MESSAGE_ID,
        bare_mid,
        "bob@EXAMPLE.com",
        CLIENT_IP,
    ] {
        let out = trace(&relay, &[query]);
        assert_eq!(out.status.code(), Some(0), "{query}: {out:?}");
        let text = stdout(&out);
        assert!(
            text.starts_with(&format!("message {id}  Message-ID {MESSAGE_ID}\n")),
            "{query}:\n{text}"
        );
        let queued = lines_of(&text, "queued");
        assert_eq!(queued.len(), 1, "{query}:\n{text}");
        for field in [
            &format!("client={CLIENT_IP}"),
            "listener=mx",
            "from=<alice@sender.example>",
            "rcpts=<bob@example.com>",
            &format!("message_id={MESSAGE_ID}"),
        ] {
            assert!(
                queued[0].contains(field),
                "{query}: {field} missing in {}",
                queued[0]
            );
        }
        let delivered = lines_of(&text, "delivered");
        assert_eq!(delivered.len(), 1, "{query}:\n{text}");
        for field in [
            "upstream=up",
            &format!("upstream_id={INTERNAL_ID}"),
            "rcpts=<bob@example.com>",
        ] {
            assert!(
                delivered[0].contains(field),
                "{query}: {field} missing in {}",
                delivered[0]
            );
        }
        assert!(
            delivered[0].contains("reply=\"250 2.6.0 <sinkid-42@ex01.corp.test>"),
            "{}",
            delivered[0]
        );
    }
}

#[test]
fn trace_json_refusals_and_exit_codes() {
    let (_sink, relay, id) = delivered_and_journaled();

    let out = trace(&relay, &[MESSAGE_ID, "--json", "--since", "1h"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let events: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let of = |kind: &str| {
        events
            .iter()
            .find(|e| e["kind"] == kind)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(of("queued")["id"], id.as_str());
    assert_eq!(of("queued")["message_id"], MESSAGE_ID);
    assert_eq!(of("queued")["client"], CLIENT_IP);
    assert_eq!(of("delivered")["upstream_id"], INTERNAL_ID);
    assert!(
        of("delivered")["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 24)
    );

    // The refused RCPT has no queue id; it matches the client and the refused address.
    for query in [CLIENT_IP, "x@elsewhere.test"] {
        let text = stdout(&trace(&relay, &[query]));
        let refused = lines_of(&text, "refused");
        assert_eq!(refused.len(), 1, "{query}:\n{text}");
        assert!(
            refused[0].contains("rcpts=<x@elsewhere.test>"),
            "{}",
            refused[0]
        );
        assert!(refused[0].contains("reply=\"550 "), "{}", refused[0]);
        assert!(refused[0].contains(" rule="), "{}", refused[0]);
        assert!(text.contains("refused without a queue id\n"), "{text}");
    }

    let none = trace(&relay, &["nobody@example.com"]);
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    assert!(none.stdout.is_empty());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no journaled event matches"));
    for bad in [&["not a query"][..], &[id.as_str(), "--since", "yesterday"]] {
        let out = trace(&relay, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
}

/// The relay of [`start`] with `[limits]` and `[admin]` tables added.
fn start_with(sink_port: u16, more: &str) -> Relay {
    let extra = format!(
        "[relay]\naccepted_domains = [\"example.com\"]\n\
         relay_networks = [\"127.0.0.1/32\"]\n\n[queue]\nretry = [\"1s\"]\n\n{more}"
    );
    Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        sink_port,
        &extra,
    ))
}

/// Free octets for unprivileged writers on the file system of `path`.
fn free_space(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: statvfs is plain old data, valid when zeroed; `c` outlives the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut stat) }, 0);
    #[allow(clippy::unnecessary_cast)]
    let free = (stat.f_bavail as u64) * (stat.f_frsize as u64);
    free
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The relay accepts a quoted local part and prints it back; `trace` takes it as the relay
/// wrote it (blanks and `<>` inside the quotes included), and shows the null sender as `<>`.
#[test]
fn trace_finds_quoted_local_parts_and_shows_the_null_sender_as_brackets() {
    let sink = exchange_sink();
    let relay = start(sink.port());
    let mut c = SmtpClient::connect_from(CLIENT_IP, relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.example", 250);
    c.expect("MAIL FROM:<>", 250);
    c.expect("RCPT TO:<\"john doe\"@example.com>", 250);
    c.expect("RCPT TO:<\"<script>alert(1)</script>\"@example.com>", 250);
    c.expect("DATA", 354);
    c.send_raw(&dot_stuff("Subject: quoted\r\n\r\nhello\r\n"));
    c.send_raw(b".\r\n");
    let id = queue_id(&c.expect_reply(250)).expect("queue id in the 250");
    c.cmd("QUIT");
    for query in [
        "\"john doe\"@example.com",
        "\"John Doe\"@EXAMPLE.com",
        "\"<script>alert(1)</script>\"@example.com",
    ] {
        let found = wait_until(WAIT, || trace(&relay, &[query]).status.code() == Some(0));
        let out = trace(&relay, &[query]);
        assert!(found, "{query}: {out:?}");
        let text = stdout(&out);
        assert!(
            text.starts_with(&format!("message {id}")),
            "{query}:\n{text}"
        );
        let queued = lines_of(&text, "queued");
        assert_eq!(queued.len(), 1, "{query}:\n{text}");
        assert!(queued[0].contains(" from=<> "), "{}", queued[0]);
        assert!(!text.contains("<<>>"), "{text}");
    }
}

/// A clean stop (SIGTERM) seals the open segment: every segment has its sidecar and no
/// temporary file is left, so the next start has nothing to re-index.
#[test]
fn a_clean_stop_seals_the_open_journal_segment() {
    let (_sink, mut relay, _id) = delivered_and_journaled();
    relay.stop();
    let journal = relay.dir().join("spool/journal");
    let names: Vec<String> = std::fs::read_dir(&journal)
        .expect("journal dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let segments: Vec<&String> = names.iter().filter(|n| n.ends_with(".jsonl")).collect();
    assert!(!segments.is_empty(), "{names:?}");
    for seg in segments {
        let idx = seg.replace(".jsonl", ".idx");
        assert!(names.contains(&idx), "{seg} not sealed: {names:?}");
    }
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
}

/// A journal that stops for want of space says so: in the live status (JSON and text), to
/// `trace` on stderr, and still after the relay stopped (the marker it leaves). Here the
/// space floor is set above the free space so that the journal stops at once while mail is
/// still accepted (mail needs `min_free_space`, the journal that plus its margin).
#[test]
fn a_stopped_journal_is_visible_in_the_status_and_to_trace_running_or_not() {
    let sink = exchange_sink();
    let probe = TestDir::new();
    let min_free_mib = (free_space(probe.path()) * 6 / 10) >> 20;
    let admin = free_port();
    let mut relay = start_with(
        sink.port(),
        &format!(
            "[limits]\nmin_free_space = \"{min_free_mib}MiB\"\n\n\
             [admin]\nbind = \"127.0.0.1:{admin}\"\n"
        ),
    );
    let journal = relay.dir().join("spool/journal");
    let marker = || {
        std::fs::read_dir(&journal).ok().is_some_and(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("stopped-since-")
            })
        })
    };
    assert!(
        wait_until(WAIT, marker),
        "no stopped marker in {}",
        journal.display()
    );
    let id = send(&relay);
    assert!(
        wait_until(WAIT, || sink.messages().len() == 1),
        "not delivered"
    );

    // Live: the JSON has the journal's state, the text a line for it. The journal's thread
    // counts the message's events as dropped when it next drains its channel (every 50 ms).
    let live = || {
        let out = relay.command(&["status", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("status JSON")
    };
    let mut status = live();
    assert!(
        wait_until(WAIT, || {
            status = live();
            status["journal"]["dropped"].as_u64().is_some_and(|n| n > 0)
        }),
        "{status}"
    );
    assert_eq!(status["live"], true, "{status}");
    assert!(status["journal"]["stopped_since"].is_u64(), "{status}");
    assert!(
        status["journal"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("short of space")),
        "{status}"
    );
    assert!(
        status["journal"]["dropped"].as_u64().is_some_and(|n| n > 0),
        "{status}"
    );
    let text = stdout(&relay.command(&["status"]));
    assert!(text.contains("\njournal: STOPPED since "), "{text}");

    // trace: no match, read correctly.
    for running in [true, false] {
        let out = trace(&relay, &[&id]);
        assert_eq!(out.status.code(), Some(1), "running {running}: {out:?}");
        let err = stderr(&out);
        assert!(
            err.contains("note: the journal is STOPPED: it has not written since "),
            "running {running}: {err}"
        );
        assert!(err.contains("no journaled event matches"), "{err}");
        if running {
            relay.stop();
            // Stopped: the status comes from the spool, and still says so.
            let out = relay.command(&["status", "--json"]);
            let status: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("status JSON");
            assert_eq!(status["live"], false, "{status}");
            assert!(status["journal"]["stopped_since"].is_u64(), "{status}");
        }
    }
}

/// `trace` without a spool is a usage error (exit 2), like `queue` and `listeners`; a spool
/// without a journal yet is not (exit 1, said so).
#[test]
fn trace_without_a_spool_exits_2_and_without_a_journal_1() {
    let dir = TestDir::new();
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("spawn portcullis")
    };
    let missing = dir.join("nowhere");
    for args in [
        vec!["trace", "bob@example.com"],
        vec![
            "trace",
            "bob@example.com",
            "--spool",
            missing.to_str().unwrap(),
        ],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(stderr(&out).contains("no spool at "), "{args:?}: {out:?}");
    }
    std::fs::create_dir_all(dir.join("spool/queue")).expect("mkdir");
    let out = run(&["trace", "bob@example.com"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("has no journal yet"), "{out:?}");
}
