//! Loopback tests of `queue purge --quarantine`, `queue list --quarantined` and `queue
//! restore` against the real binary, with a recording upstream (the sink): what moves on disk
//! (byte for byte), what the running relay delivers afterwards and under which id, what it
//! counts and journals, `[queue] quarantine_keep`, exit codes and the audit log.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::sink::{Sink, SinkConfig};
use common::*;

const WAIT: Duration = Duration::from_secs(15);
const JUNK: &str = "junk@spam.test";
const GOOD: &str = "good@example.org";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A sink that defers every message to user@example.com (`451` at RCPT): accepted mail stays
/// queued with a delivery state, until [`accept`] turns it into an accepting one.
fn deferring_sink() -> Sink {
    Sink::start(SinkConfig {
        rcpt_replies: HashMap::from([(
            "user@example.com".to_owned(),
            "451 4.3.0 try later".to_owned(),
        )]),
        ..SinkConfig::default()
    })
}

fn accept(sink: &Sink) {
    sink.set_config(SinkConfig::default());
}

/// The relay for example.com, delivering to `upstream`, with `extra` tables.
fn relay_to(upstream: u16, extra: &str) -> Relay {
    Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        upstream,
        &format!("[relay]\naccepted_domains = [\"example.com\"]\n\n{extra}"),
    ))
}

fn queue_dir(relay: &Relay) -> PathBuf {
    relay.spool.join("queue")
}

fn quarantine_dir(relay: &Relay) -> PathBuf {
    relay.spool.join("quarantine")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Wait until every message of `ids` has a state file (its first attempt was deferred).
fn wait_deferred(relay: &Relay, ids: &[String]) {
    let done = wait_until(WAIT, || {
        ids.iter()
            .all(|id| queue_dir(relay).join(format!("{id}.state")).exists())
    });
    assert!(done, "not deferred: {:?}", names(&queue_dir(relay)));
}

/// The bytes of `DIR/ID` and `DIR/ID.state`.
fn files(dir: &Path, id: &str) -> (Vec<u8>, Vec<u8>) {
    let read = |name: String| fs::read(dir.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    (read(id.to_owned()), read(format!("{id}.state")))
}

/// The expected output of quarantining `ids` from JUNK.
fn quarantined_output(ids: &[String]) -> String {
    let mut out: String = ids
        .iter()
        .map(|id| format!("quarantined {id} from {JUNK}\n"))
        .collect();
    out.push_str(&format!("{} messages quarantined\n", ids.len()));
    out
}

/// Send two junk messages and one good one, all deferred; (junk ids, good id).
fn junk_and_good(relay: &Relay) -> (Vec<String>, String) {
    let ids = send_from(relay, &[JUNK, GOOD, JUNK]);
    wait_deferred(relay, &ids);
    (vec![ids[0].clone(), ids[2].clone()], ids[1].clone())
}

#[test]
fn purge_quarantine_then_restore_gives_back_byte_identical_messages_delivered_under_their_ids() {
    let sink = deferring_sink();
    let admin = free_port();
    let relay = relay_to(
        sink.port(),
        &format!("[admin]\nbind = \"127.0.0.1:{admin}\"\n"),
    );
    let (junk, good) = junk_and_good(&relay);
    let before: Vec<_> = junk
        .iter()
        .map(|id| files(&queue_dir(&relay), id))
        .collect();

    let out = relay.command(&["queue", "purge", "--from", JUNK, "--quarantine"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), quarantined_output(&junk));
    assert_eq!(
        names(&queue_dir(&relay)),
        [good.clone(), format!("{good}.state")]
    );
    for (id, (message, state)) in junk.iter().zip(&before) {
        let moved = files(&quarantine_dir(&relay), id);
        assert!(
            moved.0 == *message && moved.1 == *state,
            "{id} changed in the move"
        );
    }
    // The running relay counts and journals each, once.
    for id in &junk {
        assert!(
            relay.wait_for_fields(&[("queue_id", id), ("how", "quarantine")], WAIT),
            "no removal logged for {id}"
        );
    }
    // Counted as removed, and no longer as queued (the good message alone is).
    let removed = "portcullis_messages_removed_total{how=\"quarantine\"} 2";
    let queued = "portcullis_queue_messages{upstream=\"up\",state=\"queued\"} 1";
    assert!(
        wait_until(WAIT, || {
            let body = http::get(admin, "/metrics", &[]).body;
            body.contains(removed) && body.contains(queued)
        }),
        "{}",
        http::get(admin, "/metrics", &[]).body
    );

    accept(&sink);
    let out = relay.command(&["queue", "restore", &junk[0], &junk[1].to_lowercase()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out).starts_with(&format!(
            "restored {}\nrestored {}\n2 messages restored\n",
            junk[0], junk[1]
        )),
        "{}",
        show(&out)
    );
    // Delivered by the running relay, not the good one (still deferred for a minute).
    assert!(sink.wait_for(2, WAIT), "restored messages not delivered");
    let delivered: Vec<Vec<u8>> = sink.messages().into_iter().map(|m| m.data).collect();
    for (id, (message, _)) in junk.iter().zip(&before) {
        let (_, bytes) = parse_spool_file(message);
        assert!(
            delivered.contains(&bytes),
            "{id}: not delivered byte for byte"
        );
        let trace = stdout(&relay.command(&["trace", id]));
        assert!(
            wait_until(WAIT, || {
                let t = stdout(&relay.command(&["trace", id]));
                t.contains(" quarantined") && t.contains(" restored") && t.contains(" delivered ")
            }),
            "{trace}"
        );
    }
    assert!(names(&quarantine_dir(&relay)).is_empty());
    assert!(wait_until(WAIT, || relay.spool_files().len() == 1));
}

#[test]
fn restore_dry_run_lists_and_changes_nothing() {
    let relay = relay_to(free_port(), "");
    let ids = send_from(&relay, &[JUNK]);
    let out = relay.command(&["queue", "purge", "--all", "--quarantine", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "would quarantine {} from {JUNK}\n1 message would be quarantined (dry run)\n",
            ids[0]
        )
    );
    assert_eq!(relay.spool_files().len(), 1);
    assert!(names(&quarantine_dir(&relay)).is_empty());

    let out = relay.command(&["queue", "purge", "--all", "--quarantine"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let quarantined = names(&quarantine_dir(&relay));
    let audit_before = fs::read(relay.spool.join("audit.jsonl")).unwrap();
    let out = relay.command(&["queue", "restore", "--all", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "would restore {}\n1 message would be restored (dry run)\n",
            ids[0]
        )
    );
    assert_eq!(names(&quarantine_dir(&relay)), quarantined);
    assert!(relay.spool_files().is_empty());
    assert_eq!(
        fs::read(relay.spool.join("audit.jsonl")).unwrap(),
        audit_before,
        "a dry run was recorded in the audit log"
    );
    // A request the dry run had made would be read no later than this later one.
    relay.command(&["queue", "retry", "--all"]);
    assert!(relay.wait_for_log("queue retry --all", WAIT));
    assert!(
        !relay.log().contains("restored from quarantine"),
        "a dry run asked the relay"
    );
}

#[test]
fn a_relay_killed_and_restarted_around_the_commands_neither_delivers_nor_loses_quarantined_mail() {
    let sink = deferring_sink();
    let mut relay = relay_to(sink.port(), "");
    let (junk, good) = junk_and_good(&relay);
    let before: Vec<_> = junk
        .iter()
        .map(|id| files(&queue_dir(&relay), id))
        .collect();
    relay.kill9();
    let out = relay.command(&["queue", "purge", "--from", JUNK, "--quarantine"]);
    assert_eq!(stdout(&out), quarantined_output(&junk), "{}", show(&out));

    // Restarted: recovery leaves quarantine/ alone; only the good message is delivered.
    accept(&sink);
    relay.restart();
    let out = relay.command(&["queue", "retry", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(sink.wait_for(1, WAIT), "the good message was not delivered");
    assert!(wait_until(WAIT, || relay.spool_files().is_empty()));
    assert_eq!(sink.messages()[0].mail_from, GOOD);
    let listed = stdout(&relay.command(&["queue", "list", "--quarantined"]));
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(names(&relay.spool.join("rejected")).is_empty());
    let _ = good;

    // Killed again; restored while it is down: exactly the files it had.
    relay.kill9();
    let out = relay.command(&["queue", "restore", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for (id, (message, state)) in junk.iter().zip(&before) {
        let back = files(&queue_dir(&relay), id);
        assert!(
            back.0 == *message && back.1 == *state,
            "{id} came back changed"
        );
    }
    relay.restart();
    assert!(
        sink.wait_for(3, WAIT),
        "restored messages not delivered after the restart"
    );
    let from_junk = sink
        .messages()
        .iter()
        .filter(|m| m.mail_from == JUNK)
        .count();
    assert_eq!(from_junk, 2);
    assert!(wait_until(WAIT, || relay.spool_files().is_empty()));
}

#[test]
fn quarantine_keep_expiry_deletes_quarantined_messages_and_logs_their_ids() {
    let relay = relay_to(free_port(), "[queue]\nquarantine_keep = \"2s\"\n");
    let ids = send_from(&relay, &[JUNK, JUNK]);
    let out = relay.command(&["queue", "purge", "--all", "--quarantine"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // Each message with its record (and its state file, once an attempt has written one).
    let messages = names(&quarantine_dir(&relay))
        .into_iter()
        .filter(|n| !n.contains('.'))
        .count();
    assert_eq!(messages, 2);
    for id in &ids {
        let logged = wait_until(WAIT, || {
            relay.log().lines().any(|l| {
                l.contains("quarantined message deleted: quarantine_keep has passed")
                    && line_has_field(l, "queue_id", id)
            })
        });
        assert!(logged, "no expiry logged for {id}");
    }
    assert!(names(&quarantine_dir(&relay)).is_empty());
    let out = relay.command(&["queue", "restore", &ids[0]]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
}

#[test]
fn quarantined_messages_are_not_counted_as_queued_by_status() {
    let relay = relay_to(free_port(), "");
    send_from(&relay, &[JUNK, JUNK, GOOD]);
    let out = relay.command(&["queue", "purge", "--from", JUNK, "--quarantine"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = relay.command(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("status JSON");
    let queued: u64 = status["queue"]["by_upstream"]
        .as_array()
        .unwrap_or_else(|| panic!("{status}"))
        .iter()
        .map(|u| u["queued"].as_u64().unwrap() + u["held"].as_u64().unwrap())
        .sum();
    assert_eq!(queued, 1, "{status}");
    let list = stdout(&relay.command(&["queue", "list"]));
    assert_eq!(list.lines().count(), 2, "{list}");
}

#[test]
fn list_quarantined_says_when_and_by_which_command() {
    let relay = relay_to(free_port(), "");
    let ids = send_from(&relay, &[JUNK]);
    let out = relay.command(&["queue", "list", "--quarantined"]);
    assert_eq!(
        stdout(&out),
        "ID  QUARANTINED  AGE  SIZE  FROM  RCPTS  BY\n"
    );
    relay.command(&["queue", "purge", "--from", JUNK, "--quarantine"]);
    let out = relay.command(&["queue", "list", "--quarantined", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    let q = &lines[0];
    assert_eq!(q["id"], ids[0].as_str());
    assert_eq!(q["state"], "quarantined");
    assert_eq!(q["command"], "queue purge");
    assert_eq!(
        q["args"],
        serde_json::json!(["--from", JUNK, "--quarantine"])
    );
    assert_eq!(q["from"], JUNK);
    assert_eq!(q["rcpts"], serde_json::json!(["user@example.com"]));
    assert!(q["quarantined_at"].as_str().unwrap().ends_with('Z'), "{q}");
    let table = stdout(&relay.command(&["queue", "list", "--quarantined"]));
    let row = table.lines().nth(1).expect("a row");
    assert!(row.starts_with(&ids[0]), "{table}");
    assert!(
        row.ends_with(&format!(
            "queue purge --from {JUNK} --quarantine (uid {})",
            unsafe { libc::getuid() }
        )),
        "{table}"
    );
}

#[test]
fn restore_refuses_unknown_queued_and_malformed_ids_with_their_exit_codes() {
    let relay = relay_to(free_port(), "");
    let ids = send_from(&relay, &[JUNK]);
    relay.command(&["queue", "purge", "--all", "--quarantine"]);
    let quarantined = names(&quarantine_dir(&relay));
    for args in [
        &["queue", "restore"][..],
        &["queue", "restore", "--all", ids[0].as_str()],
        &["queue", "restore", ids[0].as_str(), "../../etc/passwd"],
    ] {
        let out = relay.command(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(stdout(&out).is_empty(), "{args:?}: {}", show(&out));
    }
    assert_eq!(names(&quarantine_dir(&relay)), quarantined);

    // A copy queued under the same id: that id is refused, the quarantined copy kept.
    let message = fs::read(quarantine_dir(&relay).join(&ids[0])).unwrap();
    fs::write(queue_dir(&relay).join(&ids[0]), &message).unwrap();
    let unknown = "0000000000000000";
    let out = relay.command(&["queue", "restore", &ids[0], unknown]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        "0 messages restored, 1 not found, 1 already queued\n"
    );
    assert!(
        stderr(&out).contains(&format!("{} is queued already", ids[0])),
        "{}",
        show(&out)
    );
    assert!(
        stderr(&out).contains(&format!("no quarantined message {unknown}")),
        "{}",
        show(&out)
    );
    assert_eq!(names(&quarantine_dir(&relay)), quarantined);

    // What recovery refused (rejected/) is never restored.
    fs::remove_file(queue_dir(&relay).join(&ids[0])).unwrap();
    fs::remove_file(quarantine_dir(&relay).join(&ids[0])).unwrap();
    fs::write(relay.spool.join("rejected").join(&ids[0]), &message).unwrap();
    let out = relay.command(&["queue", "restore", &ids[0]]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(relay.spool_files().is_empty());
}

#[test]
fn purge_quarantine_and_restore_are_recorded_in_the_audit_log() {
    let relay = relay_to(free_port(), "");
    let ids = send_from(&relay, &[JUNK]);
    relay.command(&["queue", "purge", "--from", JUNK, "--quarantine"]);
    relay.command(&["queue", "restore", &ids[0]]);
    let log = fs::read_to_string(relay.spool.join("audit.jsonl")).expect("audit log");
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2, "{log}");
    assert_eq!(entries[0]["command"], "queue purge");
    assert_eq!(
        entries[0]["args"],
        serde_json::json!(["--from", JUNK, "--quarantine"])
    );
    assert_eq!(entries[0]["affected"], serde_json::json!([ids[0]]));
    assert_eq!(entries[1]["command"], "queue restore");
    assert_eq!(entries[1]["args"], serde_json::json!([ids[0]]));
    assert_eq!(entries[1]["affected"], serde_json::json!([ids[0]]));
}
