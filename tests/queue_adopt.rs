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
    // The hold's request file goes once the hold is recorded: a node killed in between would
    // leave it, and `queue adopt` would report it as a request not carried over.
    let control = relay.spool.join("control");
    assert!(wait_until(WAIT, || std::fs::read_dir(&control)
        .is_ok_and(|mut d| d.next().is_none())));
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
    assert!(relay.has_fields(&[("queue_id", &dead.plain), ("adopted_from", &dead.plain)]));
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

    let check = dead.relay.command(&["check-config"]);
    assert_eq!(check.status.code(), Some(2), "{}", show(&check));
    assert!(
        stderr(&check).contains(&format!(
            "server.spool_dir: spool {} was adopted by relay.test into ",
            from.display()
        )),
        "{}",
        show(&check)
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

#[test]
fn a_message_whose_id_is_taken_here_gets_a_new_one_and_is_delivered_under_it() {
    let dead = dead_node();
    let from = dead.relay.spool.clone();
    // A copy of the dead node's spool taken earlier, in which `held` differs.
    let other = dead.relay.dir().join("other-copy");
    copy_tree(&from, &other);
    let path = other.join("queue").join(&dead.held);
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(b"changed since\r\n");
    fs::write(&path, bytes).unwrap();
    let sink = Sink::start(SinkConfig::default());
    let relay = relay_to(sink.port());
    assert_eq!(adopt(&relay, &from, &[]).status.code(), Some(0));
    assert!(sink.wait_for(2, WAIT));

    let out = adopt(&relay, &other, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    let line = text.lines().nth(1).unwrap();
    let new = line
        .strip_prefix(&format!("imported {} as ", dead.held))
        .and_then(|rest| rest.strip_suffix(" (its id is taken here) (held)"))
        .unwrap_or_else(|| panic!("{text}"));
    assert_ne!(new, dead.held);
    assert_eq!(new.len(), 16);
    assert!(
        text.starts_with(&format!(
            "already here {}\n{line}\nalready here {}\n1 message imported (1 held, 1 under a new \
             id), 2 already here, 0 refused\n",
            dead.plain, dead.part
        )),
        "{text}"
    );
    // Both are here, each with its own bytes; released, the new one goes under its new id.
    assert!(
        relay.wait_for_queue_len(2, WAIT),
        "{:?}",
        relay.spool_files()
    );
    let changed = message_bytes(&other, &dead.held);
    assert_eq!(message_bytes(&relay.spool, new), changed);
    assert_eq!(
        message_bytes(&relay.spool, &dead.held),
        message_bytes(&from, &dead.held)
    );
    let out = relay.command(&["queue", "release", new]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(sink.wait_for(3, WAIT));
    assert!(sink.messages().iter().any(|m| m.data == changed));
    assert!(relay.wait_for_fields(&[("queue_id", new), ("upstream", "up")], WAIT));
    let audit = stdout(&relay.command(&["audit", "--json"]));
    assert!(
        audit.contains(&format!("\"{new}<-{}\"", dead.held)),
        "{audit}"
    );
    // Logged and journaled with both ids.
    assert!(relay.has_fields(&[("queue_id", new), ("adopted_from", &dead.held)]));
    let adopted = format!(" adopted     adopted_from={}\n", dead.held);
    let traced = wait_until(WAIT, || {
        let trace = stdout(&relay.command(&["trace", new]));
        trace.contains(&adopted) && trace.contains(" delivered ")
    });
    assert!(traced, "{}", show(&relay.command(&["trace", new])));
}

/// Make `dir` read-only: a read-only bind mount when root (`chmod` does not stop root),
/// else mode 0500. `None` (said on stderr) when neither can be had here.
fn read_only(dir: &Path) -> Option<ReadOnly> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o500)).unwrap();
        return Some(ReadOnly(None));
    }
    let mount = |args: &[&str]| {
        Command::new("mount")
            .args(args)
            .arg(dir)
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if mount(&["--bind"]) {
        if mount(&["-o", "remount,bind,ro"]) {
            return Some(ReadOnly(Some(dir.to_path_buf())));
        }
        let _ = Command::new("umount").arg(dir).status();
    }
    eprintln!("skipped: cannot make a read-only bind mount here");
    None
}

/// Undoes the bind mount on drop.
struct ReadOnly(Option<PathBuf>);

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = Command::new("umount").arg(dir).status();
        }
    }
}

#[test]
fn a_read_only_spool_is_imported_and_the_report_says_it_is_not_marked() {
    let dead = dead_node();
    let ro = dead.relay.dir().join("mounted");
    copy_tree(&dead.relay.spool, &ro);
    let Some(_guard) = read_only(&ro) else {
        return;
    };
    let sink = Sink::start(SinkConfig::default());
    let relay = relay_to(sink.port());
    let dry = adopt(&relay, &ro, &["--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", show(&dry));
    assert_eq!(
        stdout(&dry),
        format!(
            "would import {}\nwould import {} (held)\nwould import {}\n3 messages would be \
             imported (1 held, 0 under a new id), 0 already here, 0 refused (dry run)\n",
            dead.plain, dead.held, dead.part
        )
    );
    assert!(relay.spool_files().is_empty());
    let out = adopt(&relay, &ro, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains("3 messages imported (1 held, 0 under a new id)"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{} NOT marked adopted (Read-only file system (os error 30)): wipe it before its \
             node returns, or that node delivers these messages again\n",
            ro.display()
        )) || text.contains(" NOT marked adopted (Permission denied"),
        "{text}"
    );
    assert!(!ro.join("adopted").exists());
    assert!(sink.wait_for(2, WAIT));
    assert!(relay.wait_for_queue_len(1, WAIT), "the held one stays");
}

#[test]
fn hostile_files_are_refused_one_by_one_and_reported_the_rest_imported() {
    let dead = dead_node();
    let copy = dead.relay.dir().join("copy");
    copy_tree(&dead.relay.spool, &copy);
    let q = copy.join("queue");
    let (link, other, huge) = ("0000000000000001", "0000000000000002", "0000000000000003");
    let secret = dead.relay.dir().write("secret", "PORTCULLIS-SPOOL 1\n");
    std::os::unix::fs::symlink(&secret, q.join(link)).unwrap();
    fs::write(q.join(other), "From: x@y\r\n\r\nnot a spool file\r\n").unwrap();
    let mut big = b"PORTCULLIS-SPOOL 1\n{\"id\":\"".to_vec();
    big.resize(2 * 1024 * 1024, b'A');
    fs::write(q.join(huge), big).unwrap();
    let sink = Sink::start(SinkConfig::default());
    let relay = relay_to(sink.port());
    let out = adopt(&relay, &copy, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let q = q.display();
    assert_eq!(
        stderr(&out),
        format!(
            "portcullis: refused {q}/{link}: a symlink (never followed); left in place\n\
             portcullis: refused {q}/{other}: missing PORTCULLIS-SPOOL 1 header; left in place\n\
             portcullis: refused {q}/{huge}: envelope line truncated or longer than the limit; \
             left in place\nportcullis: 3 files of {q} refused\n"
        )
    );
    assert!(
        stdout(&out).contains(
            "3 messages imported (1 held, 0 under a new id), 0 already here, 3 refused\n"
        ),
        "{}",
        show(&out)
    );
    // Not marked while refused files are left: wiping it would lose them.
    assert!(
        stdout(&out).contains("NOT marked adopted: 3 refused file(s) are still in its queue/"),
        "{}",
        show(&out)
    );
    assert!(!copy.join("adopted").exists());
    assert!(sink.wait_for(2, WAIT));
    assert_eq!(fs::read(&secret).unwrap(), b"PORTCULLIS-SPOOL 1\n");
    // The refused files taken away, the same command marks it and takes nothing twice.
    for name in [link, other, huge] {
        fs::remove_file(copy.join("queue").join(name)).unwrap();
    }
    let again = adopt(&relay, &copy, &[]);
    assert_eq!(again.status.code(), Some(0), "{}", show(&again));
    assert!(copy.join("adopted").exists());
}

/// A spool of `n` copies of `template` (a message file of queue id `id`), each under its own
/// id; the ids, sorted.
fn large_spool(dir: &Path, template: &[u8], id: &str, n: usize) -> Vec<String> {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    for sub in ["queue", "tmp", "control", "rejected"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let ids: Vec<String> = (0..n)
        .map(|i| {
            let tail: String = (0..6)
                .rev()
                .map(|k| ALPHABET[(i >> (5 * k)) & 31] as char)
                .collect();
            format!("{}{tail}", &id[..10])
        })
        .collect();
    let text = String::from_utf8_lossy(template).into_owned();
    for new in &ids {
        fs::write(dir.join("queue").join(new), text.replacen(id, new, 1)).unwrap();
    }
    ids
}

#[test]
fn an_adopt_killed_midway_and_run_again_imports_every_message_exactly_once() {
    use std::os::unix::fs::PermissionsExt as _;
    let dead = dead_node();
    let template = fs::read(dead.relay.spool.join("queue").join(&dead.plain)).unwrap();
    let big = dead.relay.dir().join("big");
    let ids = large_spool(&big, &template, &dead.plain, 3000);
    let target = dead.relay.dir().join("target");
    fs::create_dir_all(target.join("queue")).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).unwrap();
    let ledger = target.join("adoptions.jsonl");
    let args = |dir: &Path| {
        let mut cmd = Command::new(BIN);
        cmd.args(["queue", "adopt"])
            .arg(dir)
            .arg("--spool")
            .arg(&target);
        cmd
    };
    let mut child = args(&big)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = || fs::read_to_string(&ledger).map_or(0, |t| t.lines().count());
    // Killed once its first batch is in (or at the latest when it ends by itself).
    assert!(wait_until(WAIT, || lines() > 0 || child.try_wait().unwrap().is_some()));
    // SAFETY: the pid of our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    let at_kill = lines();
    eprintln!(
        "killed ({status}) with {at_kill} of {} in the ledger",
        ids.len()
    );
    assert!(!big.join("adopted").exists() || at_kill == ids.len());

    let out = args(&big).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let mut here: Vec<String> = fs::read_dir(target.join("queue"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    here.sort();
    assert_eq!(here, ids, "each message once, under its own id");
    let mut ledgered: Vec<String> = fs::read_to_string(&ledger)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["from"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    ledgered.sort();
    assert_eq!(ledgered, ids, "one ledger line per message");
    for id in [&ids[0], &ids[ids.len() - 1]] {
        assert_eq!(message_bytes(&target, id), message_bytes(&big, id));
    }
    assert!(big.join("adopted").exists());
}
