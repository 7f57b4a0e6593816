//! Loopback tests of `queue adopt DIR` against the real binary: a dead node's spool (made by a
//! real relay whose upstream defers, with queued, held and partly delivered messages) adopted
//! into a running relay with an accepting upstream (the sink): what reaches the sink, byte for
//! byte and once; held mail stays held; a rerun imports nothing; an id taken here gets a new
//! one; a read-only DIR is imported and not marked; hostile files are refused one by one; and
//! the dead node, started again on its adopted spool, exits 2.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkConfig};
use common::*;

const WAIT: Duration = Duration::from_secs(15);

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A relay for example.com delivering to `upstream`.
fn relay_to(upstream: u16) -> Relay {
    Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        upstream,
        "[relay]\naccepted_domains = [\"example.com\"]\n",
    ))
}

/// The dead node: its spool holds `plain` (to user@, deferred), `held` (deferred, then held
/// by `queue hold`) and `part` (delivered to other@, deferred for user@), in id order; the
/// node is killed with SIGKILL. Its sink is returned to keep what it accepted.
struct Dead {
    relay: Relay,
    _sink: Sink,
    plain: String,
    held: String,
    part: String,
}

fn dead_node() -> Dead {
    let sink = Sink::start(SinkConfig {
        rcpt_replies: HashMap::from([(
            "user@example.com".to_owned(),
            "451 4.3.0 try later".to_owned(),
        )]),
        ..SinkConfig::default()
    });
    let mut relay = relay_to(sink.port());
    let mut c = SmtpClient::greeted(relay.port(0));
    let mut send = |rcpts: &[&str], subject: &str| {
        let body =
            format!("Subject: {subject}\nMessage-ID: <{subject}@src.example>\n\n{subject} body\n");
        let (code, reply) = c.send_message("sender@src.example", rcpts, &body);
        assert_eq!(code, 250, "{reply}");
        queue_id(&reply).unwrap()
    };
    let plain = send(&["user@example.com"], "plain");
    let held = send(&["user@example.com"], "held");
    let part = send(&["user@example.com", "other@example.com"], "part");
    c.expect("QUIT", 221);
    let state =
        |id: &str| fs::read_to_string(relay.spool.join("queue").join(format!("{id}.state")));
    let deferred = wait_until(WAIT, || {
        [&plain, &held, &part].iter().all(|id| state(id).is_ok())
    });
    assert!(deferred, "not deferred");
    let out = relay.command(&["queue", "hold", &held]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(wait_until(WAIT, || state(&held).is_ok_and(|s| s.contains("\"hold\""))));
    assert!(
        state(&part).unwrap().contains("\"delivered\""),
        "{:?}",
        state(&part)
    );
    relay.kill9();
    Dead {
        relay,
        _sink: sink,
        plain,
        held,
        part,
    }
}

/// The message bytes (after the spool header) of `DIR/queue/ID`.
fn message_bytes(spool: &Path, id: &str) -> Vec<u8> {
    parse_spool_file(&fs::read(spool.join("queue").join(id)).unwrap()).1
}

/// `cp -a FROM TO`.
fn copy_tree(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
}

fn adopt(relay: &Relay, dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["queue", "adopt", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    relay.command(&args)
}

/// `portcullis run` on the dead node's policy: its exit status and stderr (killed after 10 s).
fn start_again(dead: &Relay) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dead.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), stderr(&out))
}

#[test]
fn adopted_mail_is_delivered_once_byte_for_byte_held_stays_held_and_a_rerun_takes_nothing() {
    let dead = dead_node();
    let from = dead.relay.spool.clone();
    let sink = Sink::start(SinkConfig::default());
    let relay = relay_to(sink.port());
    let out = adopt(&relay, &from, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    let marker = from.join("adopted");
    assert!(
        text.starts_with(&format!(
            "imported {}\nimported {} (held)\nimported {}\n3 messages imported (1 held, 0 under \
             a new id), 0 already here, 0 refused\n",
            dead.plain, dead.held, dead.part
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{} marked adopted ({}): its node refuses to start on it\n",
            from.display(),
            marker.display()
        )),
        "{text}"
    );
    // Delivered by the running relay within the wait, each once: the queue is down to the
    // held one when the sink holds exactly two.
    assert!(sink.wait_for(2, WAIT), "not delivered: {:?}", relay.log());
    assert!(relay.wait_for_queue_len(1, WAIT));
    let got = sink.messages();
    assert_eq!(got.len(), 2);
    for (id, rcpts) in [
        (&dead.plain, ["user@example.com"]),
        (&dead.part, ["user@example.com"]),
    ] {
        let bytes = message_bytes(&from, id);
        let m = got
            .iter()
            .find(|m| m.data == bytes)
            .unwrap_or_else(|| panic!("{id} not intact"));
        assert_eq!(m.rcpts, rcpts, "{id}: only the pending recipient");
    }
    let held = fs::read_to_string(
        relay
            .spool
            .join("queue")
            .join(format!("{}.state", dead.held)),
    );
    assert!(held.unwrap().contains("\"reason\":\"queue hold\""));
    assert_eq!(
        relay.spool_files(),
        [relay.spool.join("queue").join(&dead.held)]
    );

    let again = adopt(&relay, &from, &[]);
    assert_eq!(again.status.code(), Some(0), "{}", show(&again));
    let text = stdout(&again);
    assert!(
        text.starts_with(&format!(
            "already here {}\nalready here {}\nalready here {}\n0 messages imported (0 held, 0 \
             under a new id), 3 already here, 0 refused\n",
            dead.plain, dead.held, dead.part
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{} was marked adopted already by relay.test into ",
            from.display()
        )),
        "{text}"
    );
    assert_eq!(sink.messages().len(), 2);
    let audit = stdout(&relay.command(&["audit", "--json"]));
    let adopts: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"queue adopt\""))
        .collect();
    assert_eq!(adopts.len(), 2, "{audit}");
    assert!(
        adopts[0].contains(&format!(
            "\"affected\":[\"{}\",\"{}\",\"{}\"]",
            dead.plain, dead.held, dead.part
        )),
        "{audit}"
    );

    let (code, err) = start_again(&dead.relay);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "spool {} was adopted by relay.test into ",
            from.display()
        )),
        "{err}"
    );
    // Refused before recovery touched anything: the messages are still there, untouched.
    assert_eq!(fs::read_dir(from.join("queue")).unwrap().count(), 6);
}
