//! `portcullis user list|suspend|resume` against the real binary: suspend and resume write and
//! remove the login's record under `SPOOL/suspended/` (and `user list` shows it), a dry run
//! changes and records nothing, an unknown login exits 2 (whatever it holds), a login removed
//! from the users file while suspended can still be resumed, the audit log holds each change
//! with the login affected, and `user list` reads the messages of the last hour from the
//! running relay's `/api/users` (token required), or shows them unknown and says why.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::http::{get, get_bearer, wait_accepting};
use common::*;
use serde_json::{Value, json};

/// The admin token of [`relay_with_admin`].
const TOKEN: &str = "users-token";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Write `{dir}/users.toml` naming `names` (password `secret`).
fn write_users(dir: &TestDir, names: &[&str]) {
    let users: String = (names.iter())
        .map(|name| {
            format!(
                "[[users]]\nname = \"{name}\"\npassword_hash = \"{}\"\nsenders = [\"{name}@example.com\"]\n\n",
                secret_hash()
            )
        })
        .collect();
    dir.write("users.toml", users);
}

/// A policy with a submission listener, users alice and bob, and `extra`.
fn policy(dir: &TestDir, extra: &str) -> String {
    write_users(dir, &["bob", "alice"]);
    config(
        &[listener("submission", free_port(), "none") + "auth = \"optional\"\n"],
        free_port(),
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n{extra}"
        ),
    )
}

/// A policy file and its spool (made as the relay makes it), without a relay running.
struct Setup {
    dir: TestDir,
    config: PathBuf,
    spool: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = TestDir::new();
        let text = dir.expand(&policy(&dir, ""));
        let config = dir.write("portcullis.toml", text);
        let spool = dir.join("spool");
        portcullis::queue::Spool::open(&spool).expect("make spool");
        Setup { dir, config, spool }
    }

    /// `portcullis ARGS --config FILE`.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("spawn portcullis")
    }

    fn record_path(&self, login: &str) -> PathBuf {
        record_path(&self.spool, login)
    }
}

/// The file of `login`'s suspension: its name is the login in hex.
fn record_path(spool: &Path, login: &str) -> PathBuf {
    let hex: String = login.bytes().map(|b| format!("{b:02x}")).collect();
    spool.join("suspended").join(hex)
}

fn suspended_files(spool: &Path) -> usize {
    fs::read_dir(spool.join("suspended")).map_or(0, Iterator::count)
}

/// Exit status `code`, else a panic showing the output.
fn expect(out: &Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "{}", show(out));
    stdout(out)
}

/// `user list --json` (exit 0): the array.
fn list_json(run: impl Fn(&[&str]) -> Output) -> Vec<Value> {
    let out = run(&["user", "list", "--json"]);
    let text = expect(&out, 0);
    assert_eq!(text.lines().count(), 1, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The audit log's entries for `user` commands.
fn user_entries(spool: &Path) -> Vec<Value> {
    (audit_entries(spool).into_iter())
        .filter(|e| e["command"].as_str().unwrap().starts_with("user "))
        .collect()
}

#[test]
fn suspend_and_resume_write_and_remove_the_record_and_list_follows() {
    let s = Setup::new();
    let before = portcullis::observe::event::unix_millis();
    let out = s.run(&["user", "suspend", "alice", "--reason", "phished"]);
    let text = expect(&out, 0);
    let config = s.config.display().to_string();
    assert!(
        text.starts_with("suspended alice (rule operator: phished), recorded in "),
        "{text}"
    );
    assert!(text.contains("refuses its AUTH (535 5.7.8"), "{text}");
    assert!(
        text.ends_with(&format!(
            "held mail stays held until released: portcullis queue release --user alice --config {config}\n"
        )),
        "{text}"
    );
    let record: Value = serde_json::from_slice(&fs::read(s.record_path("alice")).unwrap()).unwrap();
    let since_ms = record["since_ms"].as_u64().unwrap();
    assert!(since_ms >= before && since_ms <= portcullis::observe::event::unix_millis());
    assert_eq!(
        record,
        json!({"login": "alice", "rule": "operator", "reason": "phished", "since_ms": since_ms})
    );
    let since = portcullis::queue::journal::show::rfc3339_ms(since_ms);
    assert_eq!(
        list_json(|a| s.run(a)),
        [
            json!({"login": "alice", "suspended": true, "rule": "operator", "reason": "phished",
                   "since": since, "messages_last_hour": null}),
            json!({"login": "bob", "suspended": false, "rule": null, "reason": null,
                   "since": null, "messages_last_hour": null}),
        ]
    );

    // Again: said, nothing changed (the first record stays).
    let bytes = fs::read(s.record_path("alice")).unwrap();
    let out = s.run(&["user", "suspend", "alice"]);
    assert_eq!(
        expect(&out, 0),
        format!(
            "alice is already suspended since {since} (rule operator: phished); nothing changed\n"
        )
    );
    assert_eq!(fs::read(s.record_path("alice")).unwrap(), bytes);

    let out = s.run(&["user", "resume", "alice"]);
    let text = expect(&out, 0);
    assert!(
        text.starts_with(&format!(
            "resumed alice, suspended since {since} (rule operator: phished)\n"
        )),
        "{text}"
    );
    assert!(text.contains("its held mail stays held"), "{text}");
    assert!(!s.record_path("alice").exists());
    assert_eq!(suspended_files(&s.spool), 0);
    let out = s.run(&["user", "resume", "alice"]);
    assert_eq!(expect(&out, 0), "alice is not suspended; nothing changed\n");
    let list = list_json(|a| s.run(a));
    assert_eq!(list[0]["login"], "alice");
    assert_eq!(list[0]["suspended"], false);

    // Each command recorded, with the login affected when it changed something.
    let summary = audit_summary(&user_entries(&s.spool));
    assert_eq!(
        summary,
        [
            (
                json!("user suspend"),
                json!(["alice", "--reason", "phished"]),
                json!(["alice"])
            ),
            (json!("user suspend"), json!(["alice"]), json!([])),
            (json!("user resume"), json!(["alice"]), json!(["alice"])),
            (json!("user resume"), json!(["alice"]), json!([])),
        ]
    );
}

#[test]
fn the_text_list_shows_unknown_counts_as_dashes_and_says_why_once() {
    let s = Setup::new();
    expect(&s.run(&["user", "suspend", "bob"]), 0);
    let out = s.run(&["user", "list"]);
    let text = expect(&out, 0);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("LOGIN  STATE      SINCE "), "{text}");
    let cells = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(cells(lines[1]), ["alice", "active", "-", "-", "-", "-"]);
    let bob = cells(lines[2]);
    assert_eq!(
        [&bob[..2], &bob[3..]].concat(),
        [
            "bob",
            "suspended",
            "operator",
            "-",
            "suspended",
            "by",
            "an",
            "operator"
        ]
    );
    assert_eq!(
        stderr(&out),
        "portcullis: messages in the last hour unknown (shown as -): no [admin] listener configured\n"
    );
}

#[test]
fn a_dry_run_changes_nothing_and_records_nothing() {
    let s = Setup::new();
    let out = s.run(&["user", "suspend", "bob", "--reason", "test", "--dry-run"]);
    assert_eq!(
        expect(&out, 0),
        "would suspend bob (rule operator: test); nothing changed (--dry-run)\n"
    );
    assert_eq!(suspended_files(&s.spool), 0);
    assert!(!s.spool.join("audit.jsonl").exists());

    expect(&s.run(&["user", "suspend", "bob"]), 0);
    let bytes = fs::read(s.record_path("bob")).unwrap();
    let out = s.run(&["user", "resume", "bob", "--dry-run"]);
    let text = expect(&out, 0);
    assert!(
        text.starts_with("would resume bob, suspended since "),
        "{text}"
    );
    assert!(text.ends_with("; nothing changed (--dry-run)\n"), "{text}");
    assert_eq!(fs::read(s.record_path("bob")).unwrap(), bytes);
    assert_eq!(user_entries(&s.spool).len(), 1);
}

#[test]
fn an_unknown_login_exits_2_and_changes_nothing_whatever_it_holds() {
    let s = Setup::new();
    let long = "x".repeat(10 * 1024);
    let cases: [(&str, &str); 5] = [
        ("mallory", "\"mallory\""),
        ("Alice", "\"Alice\""),
        ("alice\r\n", "\"alice??\""),
        ("ali\r\nRCPT TO:<x@y>", "\"ali??RCPT TO:<x@y>\""),
        (&long, "… (10240 octets)\""),
    ];
    for (login, shown) in cases {
        for verb in ["suspend", "resume"] {
            let out = s.run(&["user", verb, login]);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{verb} {login:?}: {}",
                show(&out)
            );
            assert!(out.stdout.is_empty(), "{}", show(&out));
            let err = stderr(&out);
            assert!(err.starts_with("portcullis: unknown login \""), "{err}");
            assert!(err.contains(shown), "{verb} {login:?}: {err}");
            assert!(err.contains("not in the users file ("), "{err}");
            // One line, short, no control character of the login on the terminal.
            assert_eq!(err.matches('\n').count(), 1, "{err:?}");
            assert!(!err.contains('\r') && err.len() < 400, "{err:?}");
        }
    }
    // A bad --reason is bad input too; neither --config nor --spool, likewise; with --spool
    // only, a login --user would not take.
    let out = s.run(&["user", "suspend", "alice", "--reason", "two\nlines"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let out = Command::new(BIN)
        .args(["user", "suspend", "alice"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let out = Command::new(BIN)
        .args(["user", "suspend", "bad login", "--spool"])
        .arg(&s.spool)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert_eq!(suspended_files(&s.spool), 0);
    assert!(!s.spool.join("audit.jsonl").exists());
}

/// In an emergency the policy may not load (a typo while changing a password): `--spool`
/// alone still suspends and resumes, saying the login was not checked.
#[test]
fn with_only_the_spool_a_login_is_suspended_and_resumed_unchecked() {
    let s = Setup::new();
    let spool_only = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--spool")
            .arg(&s.spool)
            .output()
            .unwrap()
    };
    let out = spool_only(&["user", "suspend", "alice", "--reason", "phished"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not checked against a users file"));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!(
        "portcullis queue release --user alice --spool {}",
        s.spool.display()
    )));
    assert_eq!(suspended_files(&s.spool), 1);
    let out = spool_only(&["user", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["login"], "alice");
    assert_eq!(list[0]["suspended"], true);
    assert_eq!(list[0]["messages_last_hour"], Value::Null);
    let out = spool_only(&["user", "resume", "alice"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(suspended_files(&s.spool), 0);
}

#[test]
fn a_login_removed_from_the_users_file_while_suspended_can_still_be_resumed() {
    let s = Setup::new();
    expect(&s.run(&["user", "suspend", "bob", "--reason", "left"]), 0);
    write_users(&s.dir, &["alice"]);
    let list = list_json(|a| s.run(a));
    let logins: Vec<(&str, bool)> = (list.iter())
        .map(|r| (r["login"].as_str().unwrap(), r["suspended"] == true))
        .collect();
    assert_eq!(logins, [("alice", false), ("bob", true)]);
    let text = expect(&s.run(&["user", "resume", "bob"]), 0);
    assert!(text.starts_with("resumed bob, suspended since "), "{text}");
    assert!(!s.record_path("bob").exists());
    // Gone from both now: unknown.
    let out = s.run(&["user", "resume", "bob"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let log = user_entries(&s.spool);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1]["command"], "user resume");
    assert_eq!(log[1]["affected"], json!(["bob"]));
}

/// As root on a spool that belongs to the relay's user (`nobody` here), made before
/// suspensions existed: the directory and the record are the relay's, as if it wrote them.
#[test]
fn run_as_root_the_record_belongs_to_the_spools_owner() {
    const NOBODY: u32 = 65534;
    let s = Setup::new();
    fs::remove_dir(s.spool.join("suspended")).unwrap();
    for entry in fs::read_dir(&s.spool).unwrap() {
        std::os::unix::fs::lchown(entry.unwrap().path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::os::unix::fs::lchown(&s.spool, Some(NOBODY), Some(NOBODY)).unwrap();
    expect(&s.run(&["user", "suspend", "alice"]), 0);
    for path in [s.spool.join("suspended"), s.record_path("alice")] {
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (NOBODY, NOBODY),
            "{}",
            path.display()
        );
    }
    assert_eq!(
        fs::metadata(s.record_path("alice")).unwrap().mode() & 0o777,
        0o600
    );
    expect(&s.run(&["user", "resume", "alice"]), 0);
    assert!(!s.record_path("alice").exists());
}

/// A relay on [`policy`] with `[admin]` and a token; the admin port.
fn relay_with_admin() -> (Relay, u16) {
    let dir = TestDir::new();
    dir.write("admin.token", format!("{TOKEN}\n"));
    let admin = free_port();
    let extra =
        format!("\n[admin]\nbind = \"127.0.0.1:{admin}\"\ntoken_file = \"{{dir}}/admin.token\"\n");
    let toml = policy(&dir, &extra);
    let relay = Relay::start_in(dir, &toml);
    assert!(
        wait_accepting(admin, std::time::Duration::from_secs(10)),
        "admin listener not accepting on {admin}"
    );
    (relay, admin)
}

#[test]
fn the_users_route_needs_the_token_and_list_reads_it_from_the_running_relay() {
    let (mut relay, admin) = relay_with_admin();
    assert_eq!(get(admin, "/api/users", &[]).status, 401);
    assert_eq!(get_bearer(admin, "/api/users", "wrong").status, 401);
    let response = get_bearer(admin, "/api/users", TOKEN);
    assert_eq!(response.status, 200);
    // Nobody has sent anything through this relay.
    assert_eq!(
        serde_json::from_str::<Value>(&response.body).unwrap(),
        json!({"messages_last_hour": {}})
    );

    // Suspended while the relay runs; the counts come from it.
    expect(&relay.command(&["user", "suspend", "alice"]), 0);
    assert!(record_path(&relay.spool, "alice").exists());
    let out = relay.command(&["user", "list", "--json"]);
    let list: Vec<Value> = serde_json::from_str(&expect(&out, 0)).unwrap();
    assert_eq!(stderr(&out), "", "{}", show(&out));
    let counts: Vec<(&str, bool, &Value)> = (list.iter())
        .map(|r| {
            (
                r["login"].as_str().unwrap(),
                r["suspended"] == true,
                &r["messages_last_hour"],
            )
        })
        .collect();
    assert_eq!(
        counts,
        [("alice", true, &json!(0)), ("bob", false, &json!(0))]
    );
    let out = relay.command(&["user", "list"]);
    let text = expect(&out, 0);
    assert!(
        text.lines()
            .nth(2)
            .unwrap()
            .starts_with("bob    active     -  "),
        "{text}"
    );
    assert_eq!(
        text.lines().nth(2).unwrap().split_whitespace().nth(4),
        Some("0"),
        "{text}"
    );

    // A token the relay refuses: the counts are unknown, and why is said (the list is still
    // printed: the counts are the only part that comes from the relay).
    relay.dir().write("wrong.token", "not-the-token\n");
    let text = fs::read_to_string(relay.config_path()).unwrap();
    let wrong = relay
        .dir()
        .write("wrong.toml", text.replace("admin.token", "wrong.token"));
    let out = Command::new(BIN)
        .args(["user", "list", "--config"])
        .arg(&wrong)
        .output()
        .unwrap();
    let text = expect(&out, 0);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert_eq!(
        stderr(&out),
        format!(
            "portcullis: messages in the last hour unknown (shown as -): the admin API on \
             127.0.0.1:{admin} refused the token (401 Unauthorized): check [admin] token_file \
             against the running relay's\n"
        )
    );

    // The relay gone: unknown, and said why.
    relay.kill9();
    let out = relay.command(&["user", "list", "--json"]);
    let list: Vec<Value> = serde_json::from_str(&expect(&out, 0)).unwrap();
    assert!(
        list.iter().all(|r| r["messages_last_hour"].is_null()),
        "{list:?}"
    );
    assert_eq!(
        stderr(&out),
        format!(
            "portcullis: messages in the last hour unknown (shown as -): relay not answering on 127.0.0.1:{admin}\n"
        )
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_output_not_the_command() {
    let s = Setup::new();
    // `portcullis user suspend bob | head -0`: the pipe is closed before anything is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["user", "suspend", "bob", "--reason", "closed pipe"])
        .arg("--config")
        .arg(&s.config)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("spawn portcullis");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    assert!(s.record_path("bob").exists());
    let entries = user_entries(&s.spool);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["command"], "user suspend");
}

#[test]
fn output_lost_to_a_full_device_is_said_and_exits_1_after_the_work_is_done() {
    let s = Setup::new();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(BIN)
        .args(["user", "suspend", "bob", "--reason", "full device"])
        .arg("--config")
        .arg(&s.config)
        .stdout(full)
        .output()
        .expect("spawn portcullis");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out)
            .matches("portcullis: cannot write to stdout: ")
            .count(),
        1,
        "{}",
        stderr(&out)
    );
    assert!(s.record_path("bob").exists());
    assert_eq!(user_entries(&s.spool).len(), 1);
}
