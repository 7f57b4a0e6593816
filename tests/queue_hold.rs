//! Loopback tests of `portcullis queue hold|release`, of `queue retry` skipping held mail, and
//! of the `queue purge` filters, against the real binary: a held message is never delivered
//! to the recording sink while held (proved by later messages that are), keeps its hold over a
//! restart and a kill -9, and is delivered once released; `--dry-run` changes nothing; the
//! filters select exactly what they say; bad input exits 2.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::queue::{accept, delivered, listed, refusing_sink, wait_state};
use common::sink::{Sink, SinkConfig};
use common::*;
use portcullis::envelope::{
    Address, Envelope, MailParams, QueueId, RcptStatus, Recipient, ReversePath, unix_now,
};
use portcullis::queue::control::NOTICE_MAX_IDS;
use portcullis::queue::{DeliveryState, Spool};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// The note `queue hold|release` ends with.
const NOTE: &str = "the running relay records this within a second (a stopped relay when it \
                    next starts); a message being sent at that moment is held once its attempt \
                    ends";

/// The note `queue release` ends with.
const RELEASE_NOTE: &str = "the running relay records this within a second (a stopped relay \
                            when it next starts); released messages are due at once";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A relay forwarding to `upstream_port`, retrying every second: listener 0 is submission
/// (STARTTLS, AUTH required; `alice` and `bob`, password `secret`, each sending as
/// LOGIN@example.com), listener 1 an open MX for 127.0.0.0/8.
fn relay(upstream_port: u16) -> Relay {
    relay_retrying(upstream_port, "1s")
}

/// [`relay`] retrying every `retry`.
fn relay_retrying(upstream_port: u16, retry: &str) -> Relay {
    let dir = TestDir::new();
    write_alice_and_bob(&dir);
    let toml = config(
        &[
            listener("submission", free_port(), "starttls") + "auth = \"required\"\n",
            listener("mx", free_port(), "none"),
        ],
        upstream_port,
        "[relay]\naccepted_domains = [\"example.com\"]\nrelay_networks = [\"127.0.0.0/8\"]\n\n\
         [auth]\nusers_file = \"{dir}/users.toml\"\n\n[queue]\nretry = [\"RETRY\"]\n",
    )
    .replace("RETRY", retry)
    .replace(
        "tls = \"none\"\n\n[relay]",
        "tls = \"none\"\nbackoff = \"1s\"\n\n[relay]",
    );
    Relay::start_in(dir, &toml)
}

/// Send one message over the MX listener from `from` to rcpt@dest.example, `Subject: tag`;
/// its queue id.
fn send(relay: &Relay, from: &str, tag: &str) -> String {
    let mut c = SmtpClient::greeted(relay.port(1));
    let (code, reply) = c.send_message(
        from,
        &["rcpt@dest.example"],
        &format!("Subject: {tag}\n\nhello\n"),
    );
    assert_eq!(code, 250, "{reply}");
    c.expect("QUIT", 221);
    queue_id(&reply).expect("queue id")
}

fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// Run a queue command and check its exit status; its stdout.
#[track_caller]
fn run(relay: &Relay, args: &[&str], code: i32) -> String {
    let out = relay.command(args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", show(&out));
    stdout(&out)
}

/// Every audit log entry as (command, args, affected).
fn audit(spool: &Path) -> Vec<(String, Vec<String>, Vec<String>)> {
    let text = fs::read_to_string(spool.join("audit.jsonl")).unwrap_or_default();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["command"].as_str().unwrap().to_string(),
                strings(&v["args"]),
                strings(&v["affected"]),
            )
        })
        .collect()
}

#[test]
fn held_messages_are_not_delivered_until_released() {
    let sink = refusing_sink();
    let relay = relay(sink.port());
    let a = send(&relay, "a@src.example", "A");
    let b = send(&relay, "b@src.example", "B");
    let c = send(&relay, "c@src.example", "C");

    let out = run(&relay, &["queue", "hold", &a, &b.to_lowercase()], 0);
    assert_eq!(
        out,
        format!(
            "hold requested for {a} from a@src.example\nhold requested for {b} from \
             b@src.example\nhold requested for 2 messages\n{NOTE}\n"
        )
    );
    wait_state(&relay, &[&a, &b], "held");
    let list = listed(&relay);
    assert_eq!(list[&a]["hold"]["reason"], "queue hold");
    assert!(list[&a]["hold"]["since"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        (list[&c]["state"].clone(), list[&c]["hold"].clone()),
        ("queued".into(), Value::Null)
    );
    let table = run(&relay, &["queue", "list"], 0);
    let row = table.lines().find(|l| l.starts_with(&a)).unwrap();
    assert!(row.contains("  held (queue hold)  "), "{table}");

    // Holding again is no change.
    let out = run(&relay, &["queue", "hold", &a], 0);
    assert_eq!(
        out,
        format!("{a} already held\nhold requested for 0 messages, 1 already held\n{NOTE}\n")
    );

    // Retry skips the held messages and says so; then the upstream takes mail again, and the
    // others (C, then a new D) are delivered while A and B stay.
    let out = run(&relay, &["queue", "retry", "--all"], 0);
    assert!(
        out.starts_with("retry requested for all queued messages (1 now; 2 held, skipped)\n"),
        "{out}"
    );
    let out = run(&relay, &["queue", "retry", &a, &c], 0);
    assert!(
        out.starts_with(&format!(
            "{a} held, skipped (queue release {a} delivers it)\nretry requested for {c}\n"
        )),
        "{out}"
    );
    accept(&sink);
    assert!(sink.wait_for(1, WAIT));
    send(&relay, "d@src.example", "D");
    assert!(sink.wait_for(2, WAIT));
    assert_eq!(sorted(&delivered(&sink)), ["C", "D"]);
    assert_eq!(
        sorted(&listed(&relay).into_keys().collect::<Vec<_>>()),
        sorted(&[a.clone(), b.clone()])
    );

    let out = run(&relay, &["queue", "release", &a], 0);
    assert_eq!(
        out,
        format!(
            "release requested for {a} from a@src.example\nrelease requested for 1 message\n{RELEASE_NOTE}\n"
        )
    );
    assert!(sink.wait_for(3, WAIT));
    assert_eq!(delivered(&sink)[2], "A");
    let out = run(&relay, &["queue", "release", "--all"], 0);
    assert!(out.starts_with(&format!("release requested for {b} from b@src.example\n")));
    assert!(sink.wait_for(4, WAIT));
    assert_eq!(delivered(&sink)[3], "B");
    assert!(relay.wait_for_queue_len(0, WAIT));
    assert_eq!(sink.messages().len(), 4, "a message was delivered twice");

    let expect = |cmd: &str, args: &[&String], affected: &[&String]| {
        let s = |v: &[&String]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        (cmd.to_string(), s(args), s(affected))
    };
    let all = String::from("--all");
    let b_lower = b.to_lowercase();
    assert_eq!(
        audit(&relay.spool)
            .into_iter()
            .filter(|(cmd, _, _)| cmd.starts_with("queue hold") || cmd.starts_with("queue release"))
            .collect::<Vec<_>>(),
        [
            expect("queue hold", &[&a, &b_lower], &[&a, &b]),
            expect("queue hold", &[&a], &[]),
            expect("queue release", &[&a], &[&a]),
            expect("queue release", &[&all], &[&b]),
        ]
    );
}

#[test]
fn hold_by_user_or_sender_takes_exactly_their_mail_and_release_gives_it_back() {
    let sink = refusing_sink();
    let relay = relay(sink.port());
    let alice1 = send_as(&relay, "alice", "alice1");
    let bob = send_as(&relay, "bob", "bob");
    let alice2 = send_as(&relay, "alice", "alice2");
    // Same sender as alice, but not submitted by her: --user does not take it.
    let forged = send(&relay, "alice@example.com", "forged");
    let junk = send(&relay, "x@Junk.example", "junk");

    let out = run(
        &relay,
        &["queue", "hold", "--user", "alice", "--dry-run"],
        0,
    );
    assert_eq!(
        out,
        format!(
            "would hold {alice1} from alice@example.com\nwould hold {alice2} from \
             alice@example.com\n2 messages would be held (dry run)\n"
        )
    );
    assert!(
        fs::read_dir(relay.spool.join("control"))
            .unwrap()
            .next()
            .is_none()
    );
    let out = run(&relay, &["queue", "hold", "--user", "alice"], 0);
    assert!(
        out.ends_with(&format!("hold requested for 2 messages\n{NOTE}\n")),
        "{out}"
    );
    let out = run(&relay, &["queue", "hold", "--from", "@junk.example"], 0);
    assert_eq!(
        out,
        format!(
            "hold requested for {junk} from x@junk.example\nhold requested for 1 message\n{NOTE}\n"
        )
    );
    // Both filters at once: the messages matching both (already held).
    let out = run(
        &relay,
        &[
            "queue",
            "hold",
            "--user",
            "alice",
            "--from",
            "alice@example.com",
        ],
        0,
    );
    assert!(
        out.starts_with("hold requested for 0 messages, 2 already held\n"),
        "{out}"
    );
    wait_state(&relay, &[&alice1, &alice2, &junk], "held");
    wait_state(&relay, &[&bob, &forged], "queued");

    accept(&sink);
    run(&relay, &["queue", "retry", "--all"], 0);
    assert!(sink.wait_for(2, WAIT));
    send(&relay, "later@src.example", "later");
    assert!(sink.wait_for(3, WAIT));
    assert_eq!(sorted(&delivered(&sink)), ["bob", "forged", "later"]);

    let out = run(&relay, &["queue", "release", "--user", "alice"], 0);
    assert_eq!(
        out,
        format!(
            "release requested for {alice1} from alice@example.com\nrelease requested for \
             {alice2} from alice@example.com\nrelease requested for 2 messages\n{RELEASE_NOTE}\n"
        )
    );
    assert!(sink.wait_for(5, WAIT));
    assert_eq!(sorted(&delivered(&sink)[3..]), ["alice1", "alice2"]);
    // Released already: nothing to do for alice; the junk is still held.
    let out = run(&relay, &["queue", "release", "--user", "alice"], 0);
    assert!(
        out.starts_with("release requested for 0 messages\n"),
        "{out}"
    );
    assert_eq!(listed(&relay)[&junk]["state"], "held");
    run(&relay, &["queue", "release", "--from", "@JUNK.example"], 0);
    assert!(sink.wait_for(6, WAIT));
    assert_eq!(delivered(&sink)[5], "junk");
    assert!(relay.wait_for_queue_len(0, WAIT));
}

#[test]
fn a_hold_survives_restart_and_kill9_and_a_stopped_relay_takes_requests_at_start() {
    let sink = refusing_sink();
    let mut relay = relay(sink.port());
    let a = send(&relay, "a@src.example", "A");
    let b = send(&relay, "b@src.example", "B");
    let c = send(&relay, "c@src.example", "C");
    run(&relay, &["queue", "hold", &a], 0);
    wait_state(&relay, &[&a], "held");

    // Stopped: B is held by request; at the next start it must be held before anything is
    // attempted, although it is due and the upstream now takes mail.
    relay.stop();
    // B is due at the next start (its next attempt, a second after its last, has passed).
    let state = relay.spool.join("queue").join(format!("{b}.state"));
    let state: Value = serde_json::from_slice(&fs::read(state).unwrap()).unwrap();
    assert!(state["attempts"].as_u64() >= Some(1), "{state}");
    let due = state["next_attempt"].as_u64().unwrap();
    assert!(wait_until(WAIT, || unix_now() > due));
    accept(&sink);
    let out = run(&relay, &["queue", "hold", &b], 0);
    assert!(
        out.starts_with(&format!("hold requested for {b} ")),
        "{out}"
    );
    let list = listed(&relay);
    assert_eq!(
        (list[&a]["state"].as_str(), list[&b]["state"].as_str()),
        (Some("held"), Some("queued"))
    );
    relay.restart();
    assert!(sink.wait_for(1, WAIT));
    send(&relay, "d@src.example", "D");
    assert!(sink.wait_for(2, WAIT));
    assert_eq!(sorted(&delivered(&sink)), ["C", "D"]);
    wait_state(&relay, &[&a, &b], "held");
    assert!(!listed(&relay).contains_key(&c));

    // A crash keeps the holds.
    relay.kill9();
    relay.restart();
    send(&relay, "e@src.example", "E");
    assert!(sink.wait_for(3, WAIT));
    assert_eq!(delivered(&sink)[2], "E");
    wait_state(&relay, &[&a, &b], "held");

    run(&relay, &["queue", "release", "--all"], 0);
    assert!(sink.wait_for(5, WAIT));
    assert_eq!(sorted(&delivered(&sink)[3..]), ["A", "B"]);
    assert!(relay.wait_for_queue_len(0, WAIT));
}

#[test]
fn the_last_of_a_hold_and_a_release_made_while_stopped_wins() {
    let sink = refusing_sink();
    let mut relay = relay(sink.port());
    let a = send(&relay, "a@src.example", "A");
    let b = send(&relay, "b@src.example", "B");
    run(&relay, &["queue", "hold", &a], 0);
    wait_state(&relay, &[&a], "held");
    // Its request goes once the hold is recorded.
    assert!(wait_until(WAIT, || control_files(&relay).is_empty()));
    relay.stop();
    // A: released, then held again. B: held, then released. Each command sees the one
    // before it, though the relay has read neither.
    let out = run(&relay, &["queue", "release", &a], 0);
    assert!(
        out.starts_with(&format!("release requested for {a} ")),
        "{out}"
    );
    let out = run(&relay, &["queue", "hold", &a], 0);
    assert!(
        out.starts_with(&format!("hold requested for {a} ")),
        "{out}"
    );
    run(&relay, &["queue", "hold", &b], 0);
    let out = run(&relay, &["queue", "release", &b], 0);
    assert!(
        out.starts_with(&format!("release requested for {b} ")),
        "{out}"
    );
    // One request file each, numbered in the order asked; the relay applies them in it.
    let asked: Vec<String> = control_files(&relay)
        .iter()
        .map(|path| fs::read_to_string(path).unwrap())
        .collect();
    assert_eq!(
        asked,
        [
            format!("release {a}\n"),
            format!("hold {a}\n"),
            format!("hold {b}\n"),
            format!("release {b}\n")
        ]
    );
    accept(&sink);
    relay.restart();
    assert!(sink.wait_for(1, WAIT));
    send(&relay, "d@src.example", "D");
    assert!(sink.wait_for(2, WAIT));
    assert_eq!(sorted(&delivered(&sink)), ["B", "D"]);
    wait_state(&relay, &[&a], "held");
}

/// The files in `SPOOL/control/`, by name (hold requests: in the order they were asked).
fn control_files(relay: &Relay) -> Vec<PathBuf> {
    sorted(
        &fs::read_dir(relay.spool.join("control"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>(),
    )
}

/// Queue `n` messages submitted by `login` (from LOGIN@example.com, `Subject: LOGIN`), due
/// now, written into the spool at `root` as the relay writes them, on 8 threads; their ids.
fn fill(root: &Path, login: &str, n: usize) -> Vec<String> {
    let spool = Spool::open(root).unwrap();
    let body = format!("Subject: {login}\r\n\r\nhello\r\n");
    let one = || {
        let envelope = Envelope {
            id: QueueId::generate(),
            received_at: unix_now(),
            listener: "submission".into(),
            client_ip: "127.0.0.1".parse().unwrap(),
            client_port: 1000,
            helo: "client.test".into(),
            tls: None,
            auth_user: Some(login.into()),
            mail_from: ReversePath::Address(
                Address::parse(&format!("{login}@example.com")).unwrap(),
            ),
            mail_params: MailParams::default(),
            recipients: vec![Recipient::new(Address::parse("rcpt@dest.example").unwrap())],
        };
        spool
            .enqueue(&envelope, body.as_bytes())
            .unwrap()
            .to_string()
    };
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|k| scope.spawn(move || (k..n).step_by(8).map(|_| one()).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

#[test]
fn a_hold_of_thousands_is_one_request_file_taken_at_start_before_any_attempt() {
    const N: usize = 2_500;
    let sink = Sink::start(SinkConfig::default());
    let mut relay = relay(sink.port());
    relay.stop();
    let mallory = fill(&relay.spool, "mallory", N);
    fill(&relay.spool, "alice", 1);

    let out = run(&relay, &["queue", "hold", "--user", "mallory"], 0);
    assert!(
        out.contains(&format!("\nhold requested for {N} messages\n")),
        "{out}"
    );
    let files = control_files(&relay);
    assert_eq!(files.len(), N.div_ceil(NOTICE_MAX_IDS), "{files:?}");
    let asked = fs::read_to_string(&files[0]).unwrap();
    assert_eq!(asked.lines().count(), N);
    // The requests not yet taken count as done.
    let out = run(
        &relay,
        &["queue", "hold", "--user", "mallory", "--dry-run"],
        0,
    );
    assert_eq!(
        out.lines().last(),
        Some(format!("0 messages would be held (dry run), {N} already held").as_str())
    );

    // Every message is due; the relay takes the request before its first attempt. Alice's
    // message and one sent now are delivered, none of Mallory's.
    relay.restart();
    assert!(sink.wait_for(1, WAIT));
    send(&relay, "d@src.example", "D");
    assert!(sink.wait_for(2, WAIT));
    assert_eq!(sorted(&delivered(&sink)), ["D", "alice"]);
    let ids: Vec<&String> = mallory.iter().collect();
    wait_state(&relay, &ids, "held");
    assert_eq!(listed(&relay).len(), N);
    assert!(control_files(&relay).is_empty());
}

#[test]
fn release_is_due_at_once_and_a_release_of_a_message_not_held_keeps_its_back_off() {
    let sink = refusing_sink();
    let relay = relay_retrying(sink.port(), "1h");
    let a = send(&relay, "a@src.example", "A");
    let b = send(&relay, "b@src.example", "B");
    // Both tried once: next attempt in an hour.
    assert!(wait_until(WAIT, || {
        let list = listed(&relay);
        [&a, &b].iter().all(|id| list[*id]["attempts"] == 1)
    }));
    run(&relay, &["queue", "hold", &a], 0);
    wait_state(&relay, &[&a], "held");
    accept(&sink);
    // A release of B, which is not held (the command itself would not ask: "not held"),
    // and of A.
    let control = relay.spool.join("control");
    fs::write(control.join(format!("release.{b}")), "").unwrap();
    assert_eq!(
        run(&relay, &["queue", "release", &b, "--dry-run"], 0),
        format!("{b} not held\n0 messages would be released (dry run), 1 not held\n")
    );
    run(&relay, &["queue", "release", &a], 0);
    assert!(
        sink.wait_for(1, WAIT),
        "the released message was not sent at once"
    );
    assert_eq!(delivered(&sink), ["A"]);
    assert!(wait_until(WAIT, || fs::read_dir(&control)
        .unwrap()
        .next()
        .is_none()));
    send(&relay, "c@src.example", "C");
    assert!(sink.wait_for(2, WAIT));
    assert_eq!(delivered(&sink), ["A", "C"]);
    let list = listed(&relay);
    assert_eq!((list.len(), list[&b]["attempts"].as_u64()), (1, Some(1)));
}

/// Names and contents of every file under `dir`, recursively.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(snapshot(&path));
        } else {
            out.insert(path.clone(), fs::read(&path).unwrap());
        }
    }
    out
}

#[test]
fn dry_runs_change_nothing() {
    let sink = refusing_sink();
    let mut relay = relay(sink.port());
    let a = send_as(&relay, "alice", "A");
    let b = send(&relay, "b@src.example", "B");
    run(&relay, &["queue", "hold", &a], 0);
    wait_state(&relay, &[&a], "held");
    relay.stop();
    let before = snapshot(&relay.spool);
    for (args, expected) in [
        (
            vec!["hold", b.as_str()],
            format!("would hold {b} from b@src.example\n1 message would be held (dry run)\n"),
        ),
        (
            vec!["hold", "--user", "alice"],
            "0 messages would be held (dry run), 1 already held\n".into(),
        ),
        (
            vec!["hold", "--from", "@src.example"],
            format!("would hold {b} from b@src.example\n1 message would be held (dry run)\n"),
        ),
        (
            vec!["release", a.as_str()],
            format!(
                "would release {a} from alice@example.com\n1 message would be released (dry run)\n"
            ),
        ),
        (
            vec!["release", "--all"],
            format!(
                "would release {a} from alice@example.com\n1 message would be released (dry run), 1 not held\n"
            ),
        ),
        (
            vec!["purge", "--user", "alice"],
            format!(
                "would delete {a} from alice@example.com\n1 message would be deleted (dry run)\n"
            ),
        ),
        (
            vec!["purge", "--since", "1h", "--to", "@dest.example"],
            format!(
                "would delete {a} from alice@example.com\nwould delete {b} from b@src.example\n2 messages would be deleted (dry run)\n"
            ),
        ),
    ] {
        let mut argv = vec!["queue"];
        argv.extend(&args);
        argv.push("--dry-run");
        assert_eq!(run(&relay, &argv, 0), expected, "{argv:?}");
    }
    assert_eq!(
        snapshot(&relay.spool),
        before,
        "a dry run changed the spool"
    );
    // The audit log (in the snapshot too) has only the real hold.
    assert_eq!(audit(&relay.spool).len(), 1);
}

#[test]
fn bad_input_is_exit_2_and_changes_nothing() {
    let sink = refusing_sink();
    let mut relay = relay(sink.port());
    let a = send(&relay, "a@src.example", "A");
    relay.stop();
    let before = snapshot(&relay.spool);
    for args in [
        &["queue", "hold"][..],
        &["queue", "hold", "--dry-run"],
        &["queue", "hold", "not-an-id"],
        &["queue", "hold", a.as_str(), "../../etc/passwd"],
        &["queue", "hold", a.as_str(), "--user", "alice"],
        &["queue", "hold", "--all"],
        &["queue", "hold", "--user", ""],
        &["queue", "hold", "--user", "a b"],
        &["queue", "hold", "--from", "not an address"],
        &["queue", "release"],
        &["queue", "release", "--all", "--user", "alice"],
        &["queue", "release", a.as_str(), "--all"],
        &["queue", "release", "--from", "@"],
        &["queue", "purge", "--since", "1h", "--older-than", "2h"],
        &["queue", "purge", "--since", "5"],
        &["queue", "purge", "--older-than", "soon"],
        &["queue", "purge", "--to", "dest.example"],
        &["queue", "purge", "--to", "rcpt@dest.example"],
        &["queue", "purge", "--user", "a\tb"],
        &["queue", "purge", "--user", "alice", "--all"],
        &["queue", "purge", "--to", "@dest.example", "--all"],
        &["queue", "purge", "--dry-run"],
    ] {
        let out = relay.command(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(out.stdout.is_empty(), "{args:?}: {}", show(&out));
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
    assert_eq!(
        snapshot(&relay.spool),
        before,
        "bad input changed the spool"
    );

    // Well formed but unknown: reported, the known one still held, exit 1.
    let unknown = "0000000000000000";
    let out = relay.command(&["queue", "hold", unknown, &a]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no message {unknown}")));
    assert!(stdout(&out).starts_with(&format!("hold requested for {a} from a@src.example\n")));
    let asked: Vec<String> = control_files(&relay)
        .iter()
        .map(|path| fs::read_to_string(path).unwrap())
        .collect();
    assert_eq!(asked, [format!("hold {a}\n")]);
}

// ---- purge filters, on a spool written directly (messages of chosen ages) --------------------

/// One message of the filter table.
struct Msg {
    from: &'static str,
    user: Option<&'static str>,
    age_secs: u64,
    rcpts: &'static [&'static str],
    /// Recipients (by index) already delivered.
    delivered: &'static [usize],
}

const MSGS: &[Msg] = &[
    // 0: alice's spam to the victim, 10 minutes old
    Msg {
        from: "alice@example.com",
        user: Some("alice"),
        age_secs: 600,
        rcpts: &["x@victim.example"],
        delivered: &[],
    },
    // 1: alice, 3 hours old, to a partner
    Msg {
        from: "alice@example.com",
        user: Some("alice"),
        age_secs: 3 * 3600,
        rcpts: &["y@partner.example"],
        delivered: &[],
    },
    // 2: bob, 1 day old, to the victim and a partner; the victim already has it
    Msg {
        from: "bob@example.com",
        user: Some("bob"),
        age_secs: 86_400,
        rcpts: &["x@victim.example", "z@partner.example"],
        delivered: &[0],
    },
    // 3: a stranger's bounce-like message, 100 minutes old, to a subdomain of the victim
    Msg {
        from: "",
        user: None,
        age_secs: 6000,
        rcpts: &["x@mail.victim.example"],
        delivered: &[],
    },
    // 4: a stranger in alice's name (not authenticated), just now, to the victim
    Msg {
        from: "ALICE@Example.com",
        user: None,
        age_secs: 0,
        rcpts: &["w@Victim.Example"],
        delivered: &[],
    },
    // 5: "Alice" is another login than "alice"; 110 minutes old
    Msg {
        from: "alice@example.com",
        user: Some("Alice"),
        age_secs: 6600,
        rcpts: &["v@victim.example"],
        delivered: &[],
    },
];

fn write_spool(root: &Path) -> Vec<String> {
    let spool = Spool::open(root).unwrap();
    let now = unix_now();
    MSGS.iter()
        .map(|m| {
            let envelope = Envelope {
                id: QueueId::generate(),
                received_at: now - m.age_secs,
                listener: "submission".into(),
                client_ip: "192.0.2.1".parse().unwrap(),
                client_port: 1000,
                helo: "client.test".into(),
                tls: None,
                auth_user: m.user.map(String::from),
                mail_from: if m.from.is_empty() {
                    ReversePath::Null
                } else {
                    ReversePath::Address(Address::parse(m.from).unwrap())
                },
                mail_params: MailParams::default(),
                recipients: (m.rcpts.iter())
                    .map(|r| Recipient::new(Address::parse(r).unwrap()))
                    .collect(),
            };
            let id = spool
                .enqueue(&envelope, b"Subject: t\r\n\r\nhi\r\n")
                .unwrap();
            if !m.delivered.is_empty() {
                let mut state = DeliveryState::fresh(envelope.received_at);
                state.attempts = 1;
                state.recipients = (0..m.rcpts.len())
                    .map(|i| {
                        if m.delivered.contains(&i) {
                            RcptStatus::Delivered
                        } else {
                            RcptStatus::Pending
                        }
                    })
                    .collect();
                spool.write_state(&id, &state).unwrap();
            }
            id.to_string()
        })
        .collect()
}

fn purge(spool: &Path, filters: &[&str], dry_run: bool) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["queue", "purge"])
        .args(filters)
        .arg("--spool")
        .arg(spool);
    if dry_run {
        cmd.arg("--dry-run");
    }
    cmd.output().unwrap()
}

#[test]
fn purge_filters_select_exactly_what_they_say() {
    let dir = TestDir::new();
    let root = dir.join("spool");
    let ids = write_spool(&root);
    let table: &[(&[&str], &[usize])] = &[
        (&["--user", "alice"], &[0, 1]),
        (&["--user", "Alice"], &[5]),
        (&["--from", "alice@example.com"], &[0, 1, 4, 5]),
        (&["--from", "alice@example.com", "--user", "alice"], &[0, 1]),
        (&["--from", "<>"], &[3]),
        (&["--since", "1h"], &[0, 4]),
        (&["--since", "2h"], &[0, 3, 4, 5]),
        (&["--older-than", "2h"], &[1, 2]),
        (&["--older-than", "1h"], &[1, 2, 3, 5]),
        (&["--older-than", "30d"], &[]),
        (&["--to", "@victim.example"], &[0, 4, 5]),
        (&["--to", "@VICTIM.example."], &[0, 4, 5]),
        (&["--to", "@partner.example"], &[1, 2]),
        (&["--to", "@victim.example", "--since", "1h"], &[0, 4]),
        (
            &[
                "--to",
                "@victim.example",
                "--user",
                "alice",
                "--older-than",
                "5m",
            ],
            &[0],
        ),
        (
            &[
                "--from",
                "@example.com",
                "--to",
                "@partner.example",
                "--older-than",
                "5h",
            ],
            &[2],
        ),
        (&["--all"], &[0, 1, 2, 3, 4, 5]),
    ];
    for (filters, expected) in table {
        let out = purge(&root, filters, true);
        assert_eq!(out.status.code(), Some(0), "{filters:?}: {}", show(&out));
        let got: Vec<usize> = stdout(&out)
            .lines()
            .filter_map(|l| l.strip_prefix("would delete "))
            .map(|l| {
                ids.iter()
                    .position(|id| l.starts_with(id.as_str()))
                    .unwrap()
            })
            .collect();
        assert_eq!(got, *expected, "{filters:?}");
    }
    // --since and --older-than of one duration split the queue with nothing left out.
    let listed = |f: &[&str]| stdout(&purge(&root, f, true)).lines().count() - 1;
    assert_eq!(
        listed(&["--since", "2h"]) + listed(&["--older-than", "2h"]),
        MSGS.len()
    );

    // For real: exactly the selection goes, the audit log says so, the rest stays.
    let out = purge(&root, &["--to", "@victim.example", "--since", "1h"], false);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out).ends_with("2 messages deleted\n"),
        "{}",
        show(&out)
    );
    let left: Vec<String> = sorted(
        &fs::read_dir(root.join("queue"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".state"))
            .collect::<Vec<_>>(),
    );
    assert_eq!(left, sorted(&[1, 2, 3, 5].map(|i| ids[i].clone())));
    assert_eq!(
        audit(&root),
        [(
            "queue purge".to_string(),
            // As typed (the global --spool left out).
            ["--to", "@victim.example", "--since", "1h"]
                .map(String::from)
                .to_vec(),
            vec![ids[0].clone(), ids[4].clone()],
        )]
    );
}
