//! The audit log against the real binary: each command that changes something leaves exactly
//! one entry (command, arguments as typed, affected ids, who), `--dry-run` none; `portcullis
//! audit` prints it (text, `--json`, `--since`), skips a line torn by a crash with a note, and
//! a record that cannot be written makes the command exit 1 with its action done.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::{Value, json};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `portcullis ARGS --spool SPOOL`.
fn run(spool: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--spool")
        .arg(spool)
        .output()
        .expect("spawn portcullis")
}

/// An empty spool, as a relay leaves it, for the commands that need no message.
fn bare_spool(dir: &TestDir) -> PathBuf {
    let spool = dir.join("spool");
    for sub in ["tmp", "queue", "rejected", "control", "free"] {
        fs::create_dir_all(spool.join(sub)).unwrap();
    }
    spool
}

/// The login uid this test runs with, as the kernel tells it; `None` when unset (4294967295,
/// as in a container started outside a login session): then the entries have no `login_uid`.
fn login_uid() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/loginuid").ok()?;
    text.trim()
        .parse()
        .ok()
        .filter(|&uid| uid != u64::from(u32::MAX))
}

fn user_name() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// What every entry of this test's commands says about who ran them.
fn assert_who(entry: &Value) {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_eq!(entry["uid"], json!(uid), "{entry}");
    assert_eq!(entry["user"], json!(user_name()), "{entry}");
    assert_eq!(entry.get("login_uid").and_then(Value::as_u64), login_uid());
    let at_ms = entry["at_ms"].as_u64().unwrap();
    let now = portcullis::observe::event::unix_millis();
    assert!(at_ms <= now && now - at_ms < 60_000, "{entry}");
    assert_eq!(
        entry["time"],
        json!(portcullis::queue::journal::show::rfc3339_ms(at_ms))
    );
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn ids_of(value: &Value) -> Vec<String> {
    let ids = value.as_array().unwrap().iter();
    sorted(ids.map(|v| v.as_str().unwrap().to_owned()).collect())
}

#[test]
fn delete_purge_and_retry_each_leave_one_entry_and_a_dry_run_none() {
    let relay = example_com_relay("");
    let ids = send_from(
        &relay,
        &[
            "a@example.org",
            "spam1@junk.example",
            "spam2@junk.example",
            "b@example.org",
            "c@example.org",
        ],
    );
    let out = relay.command(&["queue", "delete", &ids[0].to_lowercase()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let log = audit_entries(&relay.spool);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["command"], "queue delete");
    // The arguments as typed (without the global --config), what was affected canonical.
    assert_eq!(log[0]["args"], json!([ids[0].to_lowercase()]));
    assert_eq!(log[0]["affected"], json!([ids[0]]));
    assert_who(&log[0]);

    let purge = ["queue", "purge", "--from", "@junk.example"];
    let out = relay.command(&[&purge[..], &["--dry-run"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        audit_entries(&relay.spool).len(),
        1,
        "a dry run was recorded"
    );
    let out = relay.command(&purge);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let log = audit_entries(&relay.spool);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1]["command"], "queue purge");
    assert_eq!(log[1]["args"], json!(["--from", "@junk.example"]));
    assert_eq!(ids_of(&log[1]["affected"]), sorted(ids[1..3].to_vec()));
    assert_who(&log[1]);

    // An unknown id: exit 1, recorded with what was affected.
    let out = relay.command(&["queue", "retry", &ids[3], "0000000000000000"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let out = relay.command(&["queue", "retry", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let log = audit_entries(&relay.spool);
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(log[2]["command"], "queue retry");
    assert_eq!(log[2]["args"], json!([ids[3], "0000000000000000"]));
    assert_eq!(log[2]["affected"], json!([ids[3]]));
    assert_eq!(log[3]["command"], "queue retry");
    assert_eq!(log[3]["args"], json!(["--all"]));
    assert_eq!(ids_of(&log[3]["affected"]), sorted(ids[3..].to_vec()));
}

#[test]
fn listeners_pause_and_resume_record_what_they_changed() {
    let dir = TestDir::new();
    let spool = bare_spool(&dir);
    for args in [
        &["listeners", "pause"][..],
        &["listeners", "pause"],
        &["listeners", "resume"],
        &["listeners", "resume"],
    ] {
        let out = run(&spool, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", show(&out));
    }
    let log = audit_entries(&spool);
    let seen = audit_summary(&log);
    assert_eq!(
        seen,
        [
            (json!("listeners pause"), json!([]), json!(["listeners"])),
            (json!("listeners pause"), json!([]), json!([])),
            (json!("listeners resume"), json!([]), json!(["listeners"])),
            (json!("listeners resume"), json!([]), json!([])),
        ]
    );
    log.iter().for_each(assert_who);
    let mode = fs::metadata(spool.join("audit.jsonl")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
}

/// A line as `Spool::audit` writes it.
fn line(at_ms: u64, command: &str, args: &[&str], affected: &[&str]) -> String {
    format!(
        "{}\n",
        json!({"at_ms": at_ms, "command": command, "args": args, "uid": 0, "affected": affected})
    )
}

#[test]
fn since_keeps_only_recent_entries_and_a_bad_duration_is_exit_2() {
    let dir = TestDir::new();
    let spool = bare_spool(&dir);
    let now = portcullis::observe::event::unix_millis();
    let hour = 3_600_000;
    let old = line(now - 3 * hour, "queue delete", &["2QBQXBTZBCKWRXDM"], &[]);
    let new = line(now - hour / 6, "listeners pause", &[], &["listeners"]);
    fs::write(spool.join("audit.jsonl"), format!("{old}{new}")).unwrap();
    let commands = |since: &str| {
        let out = run(&spool, &["audit", "--json", "--since", since]);
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        let lines = stdout(&out);
        let values = lines
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap());
        values.map(|v| v["command"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(commands("1h"), [json!("listeners pause")]);
    assert_eq!(
        commands("4h"),
        [json!("queue delete"), json!("listeners pause")]
    );
    let out = run(&spool, &["audit", "--since", "1m"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), "");
    assert!(
        stderr(&out).contains("no audit entry in the last 1m"),
        "{}",
        show(&out)
    );

    let out = run(&spool, &["audit", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("--since"), "{}", show(&out));
    let out = run(&dir.join("nowhere"), &["audit"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("no spool at"), "{}", show(&out));
}

#[test]
fn text_output_is_one_line_per_entry_with_long_lists_shortened() {
    let dir = TestDir::new();
    let spool = bare_spool(&dir);
    let ids = [
        "2QBQXBTZBCKWRXDM",
        "2QBQXBTZBCKWRXDN",
        "2QBQXBTZBCKWRXDP",
        "2QBQXBTZBCKWRXDQ",
    ];
    let purge = line(1_764_576_000_250, "queue purge", &["--from", "<>"], &ids);
    let pause = line(1_764_576_060_000, "listeners pause", &[], &["listeners"]);
    fs::write(spool.join("audit.jsonl"), format!("{purge}{pause}")).unwrap();
    let out = run(&spool, &["audit"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        "2025-12-01T08:00:00.250Z  root(0)  queue purge --from '<>'  \
         → 4 messages: 2QBQXBTZBCKWRXDM 2QBQXBTZBCKWRXDN 2QBQXBTZBCKWRXDP …\n\
         2025-12-01T08:01:00.000Z  root(0)  listeners pause  → listeners\n"
    );
    assert_eq!(stderr(&out), "");
}

#[test]
fn an_empty_log_is_said_on_stderr_and_is_exit_0() {
    let dir = TestDir::new();
    let spool = bare_spool(&dir);
    let out = run(&spool, &["audit"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(
        stderr(&out),
        format!(
            "portcullis: no audit entry in {}\n",
            spool.join("audit.jsonl").display()
        )
    );
}

/// A crash in the middle of a write leaves a line without its end: `audit` skips it with a
/// note and prints the rest; the next command's entry, written after it, is read whole.
#[test]
fn a_torn_last_line_is_skipped_with_a_note() {
    let dir = TestDir::new();
    let spool = bare_spool(&dir);
    let out = run(&spool, &["listeners", "pause"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let path = spool.join("audit.jsonl");
    let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(br#"{"at_ms":17645760002"#).unwrap();
    let out = run(&spool, &["audit", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out).lines().count(), 1, "{}", show(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "portcullis: note: {} line 2 skipped: a torn last line (no end of line: a write \
             cut short by a crash)\n",
            path.display()
        )
    );

    let out = run(&spool, &["listeners", "resume"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = run(&spool, &["audit", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let commands: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["command"].clone())
        .collect();
    assert_eq!(
        commands,
        [json!("listeners pause"), json!("listeners resume")]
    );
    assert!(
        stderr(&out).contains("line 2 skipped: not an audit entry"),
        "{}",
        show(&out)
    );
}

/// The action comes first: when its record cannot be written the message is deleted all the
/// same, and the command says so and exits 1, never silently.
#[test]
fn a_record_that_cannot_be_written_is_exit_1_and_the_action_stays_done() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org"]);
    // A directory where the log should be: opening it for appending fails.
    fs::create_dir(relay.spool.join("audit.jsonl")).unwrap();
    let out = relay.command(&["queue", "delete", &ids[0]]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!("deleted {}\n1 message deleted\n", ids[0])
    );
    assert!(
        stderr(&out)
            .contains("the queue delete was done, but it could not be recorded in the audit log"),
        "{}",
        show(&out)
    );
    assert!(
        relay.spool_files().is_empty(),
        "the message was not deleted"
    );

    let out = relay.command(&["listeners", "pause"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains("the listeners pause was done, but"),
        "{}",
        show(&out)
    );
    assert!(relay.spool.join("paused").is_file());
}

/// Run through sudo, a command still carries the login uid of the person's session
/// (/proc/self/loginuid, inherited): here a session of `nobody` (65534) runs it as this user.
/// Setting a process's login uid takes CAP_AUDIT_CONTROL (root here); a kernel that refuses
/// (no audit support, or login uids made immutable) cannot stage the case, and the test says
/// so on stderr instead.
#[test]
fn the_login_uid_names_the_person_behind_sudo() {
    let dir = TestDir::new();
    let spool = bare_spool(&dir);
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo 65534 > /proc/self/loginuid || exit 99; exec "$@""#)
        .arg("sh")
        .args([BIN, "listeners", "pause", "--spool"])
        .arg(&spool)
        .output()
        .unwrap();
    if out.status.code() == Some(99) {
        eprintln!("cannot set a login uid here ({}); not tested", stderr(&out));
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let log = audit_entries(&spool);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["login_uid"], 65534);
    assert_eq!(log[0]["login_user"], "nobody");
    let out = run(&spool, &["audit"]);
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "  {}({uid}) login nobody(65534)  listeners pause  → listeners\n",
            user_name()
        )),
        "{}",
        show(&out)
    );
}

/// A command run as root on the relay's spool gives the log it creates to the spool's owner
/// (the tests run as root; `nobody` plays the relay's user), and refuses to append to a hard
/// link the relay's user planted in its place: neither root's privileges nor another file
/// are handed out through the log.
#[test]
fn the_log_belongs_to_the_spools_owner_and_a_planted_link_is_refused() {
    use std::os::unix::fs::MetadataExt;
    const NOBODY: u32 = 65534;
    let dir = TestDir::new();
    let spool = bare_spool(&dir);
    for path in [spool.clone(), spool.join("tmp"), spool.join("queue")] {
        std::os::unix::fs::lchown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let out = run(&spool, &["listeners", "pause"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let meta = fs::metadata(spool.join("audit.jsonl")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (NOBODY, NOBODY, 0o600)
    );

    let precious = dir.join("precious");
    fs::write(&precious, "root's file\n").unwrap();
    fs::remove_file(spool.join("audit.jsonl")).unwrap();
    fs::hard_link(&precious, spool.join("audit.jsonl")).unwrap();
    let out = run(&spool, &["listeners", "resume"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("2 hard links"), "{}", show(&out));
    assert!(!spool.join("paused").exists(), "the resume was not done");
    let meta = fs::metadata(&precious).unwrap();
    assert_eq!(
        (meta.uid(), fs::read_to_string(&precious).unwrap().as_str()),
        (0, "root's file\n")
    );
}

/// The incident-response commands record themselves like the others; a dry run does not.
#[test]
fn hold_release_quarantine_and_restore_each_leave_one_entry_and_a_dry_run_none() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org", "spam@junk.example"]);
    let steps: [(&[&str], &str, Vec<&str>, &str); 4] = [
        (&["queue", "hold"], "queue hold", vec![&ids[0]], &ids[0]),
        (
            &["queue", "release"],
            "queue release",
            vec![&ids[0]],
            &ids[0],
        ),
        (
            &["queue", "purge"],
            "queue purge",
            vec!["--from", "@junk.example", "--quarantine"],
            &ids[1],
        ),
        (
            &["queue", "restore"],
            "queue restore",
            vec![&ids[1]],
            &ids[1],
        ),
    ];
    for (n, (words, command, args, affected)) in steps.into_iter().enumerate() {
        let dry = relay.command(&[words, &args[..], &["--dry-run"]].concat());
        assert_eq!(dry.status.code(), Some(0), "{command}: {}", show(&dry));
        assert_eq!(
            audit_entries(&relay.spool).len(),
            n,
            "{command} --dry-run was recorded"
        );
        let out = relay.command(&[words, &args[..]].concat());
        assert_eq!(out.status.code(), Some(0), "{command}: {}", show(&out));
        let log = audit_entries(&relay.spool);
        assert_eq!(log.len(), n + 1, "{log:?}");
        assert_eq!(log[n]["command"], command);
        assert_eq!(log[n]["args"], json!(args));
        assert_eq!(log[n]["affected"], json!([affected]));
        assert_who(&log[n]);
    }
}
