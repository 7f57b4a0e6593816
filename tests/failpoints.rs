//! The I/O-error matrix: every named step of `src/failpoint.rs` (but the crash points of
//! `failpoint::CRASH_ONLY`, see `tests/crash_loop.rs`) failed once, with `EIO` and, where the client
//! is waiting for the answer, `ENOSPC`, in the real binary built with `--features failpoints`.
//!
//! What each ring guards (DESIGN invariants 1 and 2: nothing acknowledged that is not
//! durable, nothing lost that was):
//! - commit (`spool.write`, `spool.commit.*`): the client gets the exact temporary reply at the
//!   exact command, nothing is left in `queue/` or `tmp/`, the session goes on and its next
//!   message is delivered once with its bytes; the refused one never reaches the upstream;
//! - state (`spool.state.*`): a deferred message whose state cannot be recorded is logged,
//!   kept scheduled from memory and delivered once when the upstream takes it;
//! - removal (`spool.remove.*`): a delivered message whose removal fails is neither lost nor
//!   delivered again while the relay runs; an operator's `queue delete` that fails says so;
//! - control (`control.*`): `queue retry --all` fails with a clear message, exit 1, and leaves
//!   no request behind; run again it works;
//! - recovery (`recover.*`): the relay refuses to start (`recover.tmp`, before it listens), the
//!   queue untouched, and started again it recovers and delivers; or (`recover.orphan`, in the
//!   recovery of `queue/` that runs while it accepts mail) it logs the file, leaves it, and
//!   delivers the rest.
//!
//! Plus [`every_step_in_the_sources_is_in_steps_and_back`], so a step cannot be added without
//! this matrix knowing it.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::queue::delivery_counts;
use common::sink::{Sink, SinkConfig};
use common::*;

/// How long a test waits for the relay to deliver, retry or log.
const WAIT: Duration = Duration::from_secs(15);

/// `EIO` and `ENOSPC` as the relay's log prints them (`std::io::Error`'s `Display`).
const EIO: &str = "(os error 5)";
const ENOSPC: &str = "(os error 28)";

/// A relay for loopback to the upstream on `sink_port`, retrying every `retry` (e.g. `"1s"`),
/// with a 1 s back-off of the upstream, armed with `failpoints` (`FAILPOINTS`, may be empty).
fn relay(sink_port: u16, retry: &str, failpoints: &str) -> Relay {
    let text = config_text(sink_port, retry);
    Relay::start_in_env(TestDir::new(), &text, &[("FAILPOINTS", failpoints)])
}

fn config_text(sink_port: u16, retry: &str) -> String {
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n\
         [relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n\
         [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{sink_port}\"\ntls = \"none\"\n\
         backoff = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"2s\"\n\n\
         [queue]\nretry = [\"{retry}\"]\n",
        listener("mx", free_port(), "none"),
    )
}

/// The message tagged `tag` as the client sends it (CRLF line ends, no dot-stuffing needed).
fn body(tag: &str) -> String {
    format!(
        "From: <a@example.org>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@example.org>\r\n\r\n\
         {tag} line one\r\n{tag} line two\r\n"
    )
}

/// Send the message tagged `tag` on `c`; the reply to its final dot (or the first refusal).
fn send(c: &mut SmtpClient, tag: &str) -> (u16, String) {
    c.send_message("a@example.org", &["b@example.com"], &body(tag))
}

/// Send `tag` in its own session; its queue id (`250` asserted).
fn send_one(relay: &Relay, tag: &str) -> String {
    let mut c = SmtpClient::greeted(relay.port(0));
    let (code, text) = send(&mut c, tag);
    assert_eq!(code, 250, "{tag}: {text}\n{}", relay.log());
    c.expect("QUIT", 221);
    queue_id(&text).expect("queue id in the 250")
}

/// The names in `spool/SUB`, sorted (none when it does not exist).
fn names(relay: &Relay, sub: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(relay.spool.join(sub)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Wait until one line of the relay's log contains every one of `needles`; panics (with the
/// log) after [`WAIT`].
#[track_caller]
fn assert_line(relay: &Relay, needles: &[&str]) {
    let found = wait_until(WAIT, || {
        relay
            .log()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    });
    assert!(
        found,
        "no log line with all of {needles:?}:\n{}",
        relay.log()
    );
}

/// How many lines of the log contain every one of `needles`.
fn count_lines(relay: &Relay, needles: &[&str]) -> usize {
    (relay.log().lines())
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Wait until the queue is empty and `sink` has accepted each tag of `expected` that often;
/// then assert exactly that (no duplicate, nothing else).
#[track_caller]
fn assert_delivered(relay: &Relay, sink: &Sink, expected: &[(&str, usize)]) {
    let expected: BTreeMap<String, usize> =
        expected.iter().map(|(t, n)| (t.to_string(), *n)).collect();
    let total = expected.values().sum();
    assert!(sink.wait_for(total, WAIT), "{}", relay.log());
    assert!(relay.wait_for_queue_len(0, WAIT), "{}", relay.log());
    assert_eq!(delivery_counts(sink), expected, "{}", relay.log());
    for m in sink.messages() {
        let text = String::from_utf8_lossy(&m.data).into_owned();
        let tag = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap()
            .to_owned();
        assert!(
            m.data.ends_with(body(&tag).as_bytes()),
            "{tag}: the bytes delivered end otherwise than those sent:\n{text}"
        );
    }
}

/// Where a commit-step failure is answered.
#[derive(Clone, Copy, Debug)]
enum At {
    /// At the `DATA` command (the spool file could not be created): no `354`.
    Data,
    /// At the final dot.
    Dot,
}

/// Every step of a message being received and committed: the step and when it fires (the
/// action follows), where the client is answered, the rule of the refusal when the error is
/// `EIO`, and the failing operation as the error names it (`spool OP PATH: …`).
///
/// `spool.write` is met first while the spool file is created at `DATA` (its header: 4
/// writes, then our `Received:`, 1 more), then for the message octets: its sixth hit
/// (`5*off->`) is the first write of the message itself. `spool.commit.reply` comes after the
/// directory fsync, before the `250`: the relay handles it as a failed directory fsync.
const COMMIT_STEPS: &[(&str, At, &str, &str)] = &[
    ("spool.write=1*", At::Data, "spool_create", "spool write"),
    (
        "spool.write=5*off->1*",
        At::Dot,
        "spool_write",
        "spool write",
    ),
    (
        "spool.commit.write=1*",
        At::Dot,
        "spool_commit",
        "spool write",
    ),
    (
        "spool.commit.fsync=1*",
        At::Dot,
        "spool_commit",
        "spool fsync",
    ),
    (
        "spool.commit.rename=1*",
        At::Dot,
        "spool_commit",
        "spool rename",
    ),
    (
        "spool.commit.dir_fsync=1*",
        At::Dot,
        "spool_commit",
        "spool fsync",
    ),
    (
        "spool.commit.reply=1*",
        At::Dot,
        "spool_commit",
        "spool commit",
    ),
];

/// One row of the commit matrix: `failpoints` (the `FAILPOINTS` value) answered at `at` with
/// `code enhanced` under `rule`, the error `errno` of the operation `op` logged.
struct CommitCase<'a> {
    failpoints: &'a str,
    at: At,
    code: u16,
    enhanced: &'a str,
    rule: &'a str,
    op: &'a str,
    errno: &'a str,
}

/// One row: the refusal, exactly, at its command; a log line naming the failing operation and
/// the error, and the refusal's line naming the rule and the reply; nothing in `queue/` or
/// `tmp/`; then the same session's next message is taken and delivered once, intact, and the
/// refused one never.
fn commit_fails_once(case: &CommitCase<'_>) {
    let sink = Sink::start(SinkConfig::default());
    let relay = relay(sink.port(), "1s", case.failpoints);
    let name = case.failpoints;
    let mut c = SmtpClient::greeted(relay.port(0));
    c.expect("MAIL FROM:<a@example.org>", 250);
    c.expect("RCPT TO:<b@example.com>", 250);
    let reply = match case.at {
        At::Data => c.cmd("DATA"),
        At::Dot => {
            c.expect("DATA", 354);
            c.send_raw(body("refused").as_bytes());
            c.send_raw(b".\r\n");
            c.read_reply()
        }
    };
    assert_eq!(
        (reply.0, reply.1.get(4..9)),
        (case.code, Some(case.enhanced)),
        "{name}: {reply:?}\n{}",
        relay.log()
    );
    assert_reply(&reply, case.code, case.enhanced);
    assert_line(&relay, &["error=", &format!("{} ", case.op), case.errno]);
    let rule = format!("rule=\"{}\"", case.rule);
    let replied = format!("reply={} {} ", case.code, case.enhanced);
    assert_line(&relay, &["rejected", &rule, &replied]);
    assert_eq!(names(&relay, "queue"), Vec::<String>::new(), "{name}");
    assert_eq!(names(&relay, "tmp"), Vec::<String>::new(), "{name}");
    // The session goes on: the next message is taken and delivered, once, intact. A `451`
    // to DATA itself leaves the transaction open (RFC 5321 §4.1.1.4 has DATA fail without
    // ending it: MAIL now gets `503 5.5.1`), so the client resets it first, as clients do
    // after a refused DATA; after a refusal at the final dot the transaction is over.
    if let At::Data = case.at {
        c.expect("RSET", 250);
    }
    let (code, text) = send(&mut c, "next");
    assert_eq!(code, 250, "{name}: {text}\n{}", c.transcript());
    c.expect("QUIT", 221);
    assert_delivered(&relay, &sink, &[("next", 1)]);
    assert_eq!(names(&relay, "tmp"), Vec::<String>::new(), "{name}");
}

#[test]
fn a_failing_commit_step_gets_the_exact_temporary_reply_and_loses_no_session() {
    for &(step, at, rule, op) in COMMIT_STEPS {
        // A failing disk: try again later; a full one: insufficient storage (RFC 3463 4.3.1),
        // whatever the operation that met it.
        for (code, enhanced, rule, action, errno) in [
            (451, "4.3.0", rule, "return(eio)", EIO),
            (452, "4.3.1", "min_free_space", "return(enospc)", ENOSPC),
        ] {
            commit_fails_once(&CommitCase {
                failpoints: &format!("{step}{action}"),
                at,
                code,
                enhanced,
                rule,
                op,
                errno,
            });
        }
    }
}

/// The upstream defers the first attempt at the final dot, so a delivery state must be
/// written; writing it fails once at `step`. The relay logs it ("cannot record delivery
/// progress", with the queue id and the error), keeps the message scheduled from what it has
/// in memory (a restart before the next state write would only repeat an attempt), and
/// delivers it once when the upstream takes it.
fn state_fails_once(step: &str) {
    let sink = Sink::start(SinkConfig {
        data_reply: Some("451 4.3.0 try later".into()),
        ..SinkConfig::default()
    });
    let relay = relay(sink.port(), "1s", &format!("{step}=1*return(eio)"));
    let id = send_one(&relay, "deferred");
    assert_line(
        &relay,
        &[
            &format!("queue_id={id}"),
            "cannot record delivery progress",
            EIO,
        ],
    );
    // The temp file of the failed state is gone; only the message (and, when only the
    // directory fsync failed, its state, renamed in) is in queue/.
    assert_eq!(names(&relay, "tmp"), Vec::<String>::new(), "{step}");
    assert!(names(&relay, "queue").contains(&id), "{step}: lost");
    sink.set_config(SinkConfig::default());
    assert_delivered(&relay, &sink, &[("deferred", 1)]);
    assert_eq!(names(&relay, "queue"), Vec::<String>::new(), "{step}");
}

#[test]
fn a_failing_state_write_is_logged_and_the_message_still_delivered_once() {
    for step in [
        "spool.state.write",
        "spool.state.fsync",
        "spool.state.rename",
        "spool.state.dir_fsync",
    ] {
        state_fails_once(step);
    }
}

#[test]
fn a_hold_whose_state_cannot_be_recorded_is_logged_and_recorded_on_a_retry() {
    // The other writer of delivery states: the relay recording an operator's hold (the
    // batched form, one directory fsync for many). The first hit of each step is the state of
    // the deferral, the second the hold's. The relay logs the failure with the queue id and
    // keeps the message as it was; the hold is asked again after `HOLD_RETRY` (5 s) and
    // recorded, without the operator asking twice, and only then is the request file, kept
    // in control/ meanwhile, unlinked; released, the message is delivered once.
    for step in [
        "spool.state.write",
        "spool.state.fsync",
        "spool.state.rename",
        "spool.state.dir_fsync",
    ] {
        let sink = common::queue::refusing_sink();
        let relay = relay(sink.port(), "1h", &format!("{step}=1*off->1*return(eio)"));
        let id = send_one(&relay, "held");
        assert_line(
            &relay,
            &[&format!("queue_id={id}"), "deferred", "pending=1"],
        );
        let out = relay.command(&["queue", "hold", &id]);
        assert_eq!(out.status.code(), Some(0), "{step}: {}", show(&out));
        assert_line(
            &relay,
            &[&format!("queue_id={id}"), "cannot record the hold", EIO],
        );
        held_then_released(&relay, &sink, &id, "held");
    }
}

/// `id` (tagged `tag`) ends held, its request gone from `control/` (unlinked once recorded);
/// then the upstream accepts, an operator releases it, and it is delivered once.
#[track_caller]
fn held_then_released(relay: &Relay, sink: &Sink, id: &str, tag: &str) {
    common::queue::wait_state(relay, &[&id.to_owned()], "held");
    assert!(
        wait_until(WAIT, || names(relay, "control").is_empty()),
        "the hold request is not unlinked once recorded: {:?}",
        names(relay, "control")
    );
    common::queue::accept(sink);
    let out = relay.command(&["queue", "release", id]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_delivered(relay, sink, &[(tag, 1)]);
}

#[test]
fn a_hold_the_relay_took_but_did_not_record_is_not_lost() {
    // Taking the requests of control/ and recording a hold are two steps; the relay may die
    // between them (`control.take` is a crash point). The request file stays until the hold
    // is recorded: read again at the next start.
    let (sink, mut relay, id) = queued_message_with("queued", "control.take=return(crash)");
    let out = relay.command(&["queue", "hold", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let status = relay
        .wait_exit(WAIT)
        .expect("the relay crashed at control.take");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert_log(&relay, "failpoint control.take: crash");
    relay.restart_env(&[]);
    held_then_released(&relay, &sink, &id, "queued");
}

#[test]
fn a_delivered_message_whose_unlink_fails_is_removed_later_not_sent_again() {
    // Delivered, then its removal fails at the unlink: the relay records the message as
    // finished in its state and tries the removal again at its next attempt, which sends
    // nothing (no recipient is pending).
    let sink = Sink::start(SinkConfig::default());
    let relay = relay(sink.port(), "1s", "spool.remove.unlink=1*return(eio)");
    let id = send_one(&relay, "once");
    assert_line(
        &relay,
        &[
            &format!("queue_id={id}"),
            "cannot remove a finished message; recorded as finished",
            EIO,
        ],
    );
    // Removed by the next attempt (the queue empties only then), which sent it no more.
    assert_delivered(&relay, &sink, &[("once", 1)]);
    assert_eq!(names(&relay, "queue"), Vec::<String>::new());
    assert_eq!(
        count_lines(
            &relay,
            &[&format!("queue_id={id}"), "removed from queue: finished"]
        ),
        1,
        "{}",
        relay.log()
    );
}

#[test]
fn a_delivered_message_whose_unlink_fails_is_not_sent_again_after_a_restart() {
    // As above, but the removal is tried again only in an hour, and the relay is killed and
    // started again (without the failpoint) first: the leftover's state says no recipient is
    // pending, so recovery's attempt removes it without sending it.
    let sink = Sink::start(SinkConfig::default());
    let mut relay = relay(sink.port(), "1h", "spool.remove.unlink=1*return(eio)");
    let id = send_one(&relay, "once");
    assert_line(&relay, &[&format!("queue_id={id}"), "recorded as finished"]);
    assert_eq!(
        names(&relay, "queue"),
        vec![id.clone(), format!("{id}.state")]
    );
    relay.kill9();
    relay.restart_env(&[]);
    assert_delivered(&relay, &sink, &[("once", 1)]);
    assert_eq!(names(&relay, "queue"), Vec::<String>::new());
}

#[test]
fn a_delivered_message_neither_removed_nor_recorded_finished_is_delivered_again() {
    // The removal fails and so does the state write that would record it finished (the
    // same failing disk): the next attempt finds it pending and sends it again. The one
    // duplicate invariant 1 allows (at-least-once), said in the log; then it leaves.
    let sink = Sink::start(SinkConfig::default());
    let relay = relay(
        sink.port(),
        "1s",
        "spool.remove.unlink=1*return(eio);spool.state.write=1*return(eio)",
    );
    let id = send_one(&relay, "twice");
    assert_line(
        &relay,
        &[
            &format!("queue_id={id}"),
            "nor record it finished; it may be delivered again",
            EIO,
        ],
    );
    assert_delivered(&relay, &sink, &[("twice", 2)]);
}

#[test]
fn a_delivered_message_whose_state_unlink_fails_leaves_an_orphan_removed_at_restart() {
    // Deferred once (so it has a state file), then delivered; the message file goes, its
    // state's unlink fails: an orphan state, which the next attempt (message not found) leaves
    // alone and recovery removes at the next start. Never sent again.
    let sink = Sink::start(SinkConfig {
        data_reply: Some("451 4.3.0 try later".into()),
        ..SinkConfig::default()
    });
    let mut relay = relay(sink.port(), "1s", "spool.remove.state=1*return(eio)");
    let id = send_one(&relay, "orphan");
    assert_line(
        &relay,
        &[&format!("queue_id={id}"), "deferred", "pending=1"],
    );
    sink.set_config(SinkConfig::default());
    assert_line(
        &relay,
        &[
            &format!("queue_id={id}"),
            "cannot remove a finished message's state; left to recovery",
            EIO,
        ],
    );
    assert_delivered(&relay, &sink, &[("orphan", 1)]);
    let state = format!("{id}.state");
    assert_eq!(names(&relay, "queue"), vec![state.clone()]);
    relay.restart();
    assert_line(
        &relay,
        &[
            &format!("queue_id={id}"),
            "removed the delivery state of a message no longer queued",
        ],
    );
    assert_eq!(names(&relay, "queue"), Vec::<String>::new());
    assert_eq!(
        delivery_counts(&sink),
        BTreeMap::from([("orphan".to_owned(), 1)])
    );
}

/// A message kept queued: the upstream refuses MAIL, the retry interval is an hour.
fn queued_message(tag: &str) -> (Sink, Relay, String) {
    queued_message_with(tag, "")
}

/// [`queued_message`] on a relay armed with `failpoints`.
fn queued_message_with(tag: &str, failpoints: &str) -> (Sink, Relay, String) {
    let sink = common::queue::refusing_sink();
    let relay = relay(sink.port(), "1h", failpoints);
    let id = send_one(&relay, tag);
    // The line after its state is written.
    assert_line(
        &relay,
        &[&format!("queue_id={id}"), "deferred", "pending=1"],
    );
    (sink, relay, id)
}

/// Whether the audit log of `relay` has a `queue delete` that removed `id`.
fn audited_delete(relay: &Relay, id: &str) -> bool {
    audit_summary(&audit_entries(&relay.spool))
        .iter()
        .any(|(command, _, affected)| {
            *command == "queue delete"
                && affected
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| *x == id))
        })
}

#[test]
fn a_queue_delete_whose_removal_fails_says_so_and_records_what_it_removed() {
    // `queue delete` removes in its own process (Spool::remove: unlink the message, then its
    // state, then fsync queue/), so FAILPOINTS is given to the command. Unlinking the message
    // is the deletion: a failure before it changes nothing (run again, it works); a failure
    // after it leaves the message deleted, and then the command says so, records it in the
    // audit log and tells the relay, which logs the removal, all with the queue id (DESIGN
    // invariant 2), besides failing (exit 1) with the error.
    for (step, deleted) in [
        ("spool.remove.unlink", false),
        ("spool.remove.state", true),
        ("spool.remove.dir_fsync", true),
    ] {
        let (sink, mut relay, id) = queued_message("delete-me");
        let state = format!("{id}.state");
        assert_eq!(names(&relay, "queue"), vec![id.clone(), state.clone()]);
        let fp = format!("{step}=1*return(eio)");
        let out = relay.command_env(&["queue", "delete", &id], &[("FAILPOINTS", &fp)]);
        assert_eq!(out.status.code(), Some(1), "{step}: {}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("portcullis: ") && stderr.matches(EIO).count() == 1,
            "{step}: {}",
            show(&out)
        );
        let said_deleted = stderr.contains(&format!("{id} was deleted, but not cleanly"));
        assert_eq!(said_deleted, deleted, "{step}: {}", show(&out));
        assert_eq!(names(&relay, "queue").contains(&id), !deleted, "{step}");
        assert_eq!(audited_delete(&relay, &id), deleted, "{step}");
        if !deleted {
            let again = relay.command(&["queue", "delete", &id]);
            assert_eq!(again.status.code(), Some(0), "{step}: {}", show(&again));
            assert!(audited_delete(&relay, &id), "{step}");
        }
        assert_line(
            &relay,
            &[&format!("queue_id={id}"), "removed by an operator"],
        );
        // What is left: nothing, or (its state's unlink failed) an orphan state, removed by
        // recovery at the next start.
        let orphan = step == "spool.remove.state";
        let expected = if orphan {
            vec![state.clone()]
        } else {
            Vec::new()
        };
        assert_eq!(names(&relay, "queue"), expected, "{step}");
        if orphan {
            relay.restart();
            assert_eq!(names(&relay, "queue"), Vec::<String>::new(), "{step}");
        }
        assert!(
            sink.messages().is_empty(),
            "{step}: a deleted message was delivered"
        );
    }
}

/// `queue retry --all` with `step` failing once: exit 1 with the error on stderr, no request
/// left in `control/` or `tmp/` (the relay is asked nothing), the message still waiting; run
/// again, it works and the message is delivered.
fn control_fails_once(step: &str) {
    let (sink, relay, id) = queued_message("retried");
    common::queue::accept(&sink);
    let fp = format!("{step}=1*return(eio)");
    let out = relay.command_env(&["queue", "retry", "--all"], &[("FAILPOINTS", &fp)]);
    assert_eq!(out.status.code(), Some(1), "{step}: {}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One line: what failed, on which file, and the error, said once.
    assert!(
        stderr.starts_with("portcullis: spool ") && stderr.matches(EIO).count() == 1,
        "{step}: {}",
        show(&out)
    );
    assert_eq!(stderr.lines().count(), 1, "{step}: {}", show(&out));
    assert_eq!(names(&relay, "control"), Vec::<String>::new(), "{step}");
    assert_eq!(names(&relay, "tmp"), Vec::<String>::new(), "{step}");
    assert!(names(&relay, "queue").contains(&id), "{step}");
    let out = relay.command(&["queue", "retry", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{step}: {}", show(&out));
    assert_delivered(&relay, &sink, &[("retried", 1)]);
}

#[test]
fn a_queue_command_whose_control_file_fails_changes_nothing_and_works_again() {
    for step in ["control.write", "control.rename", "control.dir_fsync"] {
        control_fails_once(step);
    }
}

/// Start the relay of `relay` (stopped) on its config with `FAILPOINTS=failpoints`, expecting
/// it to exit within [`WAIT`]: its output.
fn start_expecting_exit(relay: &Relay, failpoints: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(relay.config_path())
        .current_dir(relay.dir().path())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("FAILPOINTS", failpoints)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis run");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the relay started with {failpoints}: {}", show(&out));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// The files in `spool/queue/` with their bytes.
fn queue_contents(relay: &Relay) -> Vec<(String, Vec<u8>)> {
    (names(relay, "queue").into_iter())
        .map(|n| {
            let bytes = fs::read(relay.spool.join("queue").join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

/// A queued message and a leftover that startup recovery must remove (`crash` makes it and
/// stops the relay, as a crash would; the leftover's path): the relay started with `step`
/// failing refuses to start (exit 1), naming the file and the error, and changes nothing in
/// `queue/`; started without, it removes the leftover and delivers the message, once.
fn recovery_fails_once(step: &str, crash: impl FnOnce(&mut Relay, &str) -> String) {
    let (sink, mut relay, id) = queued_message("recovered");
    let path = crash(&mut relay, &id);
    let before = queue_contents(&relay);
    let out = start_expecting_exit(&relay, &format!("{step}=1*return(eio)"));
    assert_eq!(out.status.code(), Some(1), "{step}: {}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = format!("portcullis: spool: spool unlink {path}: Input/output error {EIO}");
    assert!(stderr.contains(&said), "{step}: {}", show(&out));
    assert!(
        before == queue_contents(&relay),
        "{step}: the queue changed"
    );
    assert!(Path::new(&path).exists(), "{step}: {path} removed");
    common::queue::accept(&sink);
    relay.restart();
    // Its next attempt is an hour away: ask for it now.
    let out = relay.command(&["queue", "retry", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{step}: {}", show(&out));
    assert_delivered(&relay, &sink, &[("recovered", 1)]);
    assert!(!Path::new(&path).exists(), "{step}: {path} left");
    assert_eq!(names(&relay, "tmp"), Vec::<String>::new(), "{step}");
    assert_eq!(names(&relay, "queue"), Vec::<String>::new(), "{step}");
}

#[test]
fn a_failing_recovery_refuses_to_start_and_the_next_start_recovers() {
    // A message cut short mid-DATA by a crash: its file in tmp/ (created at DATA), never
    // delivered.
    recovery_fails_once("recover.tmp", |relay, _| {
        let mut c = SmtpClient::greeted(relay.port(0));
        c.expect("MAIL FROM:<a@example.org>", 250);
        c.expect("RCPT TO:<b@example.com>", 250);
        c.expect("DATA", 354);
        c.send_raw(b"Subject: cut\r\n\r\nhalf a mess");
        assert!(wait_until(WAIT, || names(relay, "tmp").len() == 1));
        relay.kill9();
        let name = &names(relay, "tmp")[0];
        relay.spool.join("tmp").join(name).display().to_string()
    });
}

#[test]
fn an_orphan_state_recovery_cannot_remove_is_logged_and_left_and_the_queue_still_delivered() {
    // The state of a message no longer queued (its removal cut short by a crash), here a copy
    // of the queued message's own. The recovery of queue/ runs while the relay accepts mail:
    // one file it cannot deal with must not stop the delivery of the rest.
    let (sink, mut relay, id) = queued_message("recovered");
    relay.kill9();
    let queue = relay.spool.join("queue");
    let orphan = queue.join("0000000000000001.state");
    fs::copy(queue.join(format!("{id}.state")), &orphan).unwrap();
    common::queue::accept(&sink);
    relay.restart_env(&[("FAILPOINTS", "recover.orphan=1*return(eio)")]);
    let path = orphan.display().to_string();
    assert_line(
        &relay,
        &[
            "cannot remove the delivery state of a message no longer queued; left in place",
            "rule=\"spool_recovery\"",
            &path,
            EIO,
        ],
    );
    assert_line(&relay, &["spool recovered", "1 left in place"]);
    let out = relay.command(&["queue", "retry", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_delivered(&relay, &sink, &[("recovered", 1)]);
    assert!(orphan.exists(), "left in place");
    relay.restart_env(&[("FAILPOINTS", "")]);
    assert_line(&relay, &["removed the delivery state", &path]);
    assert!(!orphan.exists());
    assert_eq!(delivery_counts(&sink).len(), 1, "{}", relay.log());
}

#[test]
fn the_relay_accepts_mail_while_it_recovers_the_queue_and_delivers_all_after() {
    // The recovery of queue/ runs while the relay listens (queue::recover); held up here by
    // 3 s at its one orphan state (`sleep` is the fail crate's own action).
    let (sink, mut relay, id) = queued_message("old");
    relay.kill9();
    let queue = relay.spool.join("queue");
    let orphan = queue.join("0000000000000001.state");
    fs::copy(queue.join(format!("{id}.state")), &orphan).unwrap();
    common::queue::accept(&sink);
    let first_life = relay.log().len();
    relay.restart_env(&[("FAILPOINTS", "recover.orphan=sleep(3000)")]);
    assert_line(&relay, &["recovering the queue; accepting mail meanwhile"]);
    // Accepted, and durable, before the recovery ends; nothing delivered before it ends.
    let new = send_one(&relay, "new");
    let log = relay.log().split_off(first_life);
    assert!(
        !log.contains("spool recovered"),
        "the 250 came after the recovery:\n{log}"
    );
    assert!(names(&relay, "queue").contains(&new));
    assert_eq!(sink.messages().len(), 0, "{log}");
    assert_line(
        &relay,
        &[
            "spool recovered; loading the queue",
            "1 orphan states removed",
        ],
    );
    assert!(!orphan.exists());
    // The old message's next attempt is an hour away: asked for now.
    let out = relay.command(&["queue", "retry", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_delivered(&relay, &sink, &[("old", 1), ("new", 1)]);
    let delivered: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect();
    assert!(delivered[0].contains("Subject: new"), "new mail goes first");
}

/// Every `failpoint::step("NAME")` call in `src/`, by name.
fn steps_in(dir: &Path, found: &mut Vec<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            steps_in(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).unwrap();
            for (at, _) in text.match_indices("failpoint::step(") {
                let rest = text[at + "failpoint::step(".len()..].trim_start();
                // The definition (`pub fn step(name…`) has no `failpoint::` before it; a
                // call with something else than a literal would escape this test: refuse it.
                let name = rest
                    .strip_prefix('"')
                    .and_then(|r| r.split_once('"'))
                    .map(|(name, _)| name)
                    .unwrap_or_else(|| panic!("{}: a step named by no literal", path.display()));
                found.push(name.to_owned());
            }
        }
    }
}

#[test]
fn every_step_in_the_sources_is_in_steps_and_back() {
    let mut used = Vec::new();
    steps_in(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut used,
    );
    used.sort();
    used.dedup();
    let mut listed: Vec<String> = portcullis::failpoint::STEPS
        .iter()
        .map(|s| s.to_string())
        .collect();
    listed.sort();
    assert_eq!(
        used, listed,
        "failpoint::STEPS and the steps in src/ differ"
    );
    // And this matrix names every step but the crash-only ones, so none is left untested.
    let this = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file!())).unwrap();
    for step in portcullis::failpoint::STEPS {
        assert!(
            portcullis::failpoint::CRASH_ONLY.contains(step) || this.contains(&format!("\"{step}")),
            "{step} is not exercised here"
        );
    }
}
