//! The spool and the files around it, against the real binary: only the relay's user may write
//! the spool (start refused otherwise), files it did not write are rejected at recovery and
//! never delivered, `queue` commands run as root leave the spool as they found it (or give
//! what they create to its owner), check-config warns about secrets others can read, and
//! `queue list|show` cannot be fooled by bidirectional characters. The tests run as root, so
//! they can play "another user" with `nobody`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::sink::{Sink, SinkConfig};
use common::*;

/// `nobody`: a user other than the relay's (root, in these tests).
const NOBODY: u32 = 65534;
/// `nogroup`, nobody's primary group.
const NOGROUP: u32 = 65534;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    chown(path, uid, gid);
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid, gid);
        }
    }
}

/// A relay on a plain MX listener for example.com whose upstream (`upstream` port) is down.
fn relay_with_upstream(upstream: u16) -> Relay {
    Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        upstream,
        "[relay]\naccepted_domains = [\"example.com\"]\n",
    ))
}

/// Send one message; its queue id.
fn queue_one(relay: &Relay, from: &str, subject: &str) -> String {
    let mut c = SmtpClient::greeted(relay.port(0));
    let (code, reply) = c.send_message(
        from,
        &["rcpt@example.com"],
        &format!("Subject: {subject}\r\n\r\nbody\r\n"),
    );
    assert_eq!(code, 250, "{reply}");
    c.expect("QUIT", 221);
    queue_id(&reply).unwrap()
}

fn stop(relay: &mut Relay) {
    relay.sigterm();
    relay
        .wait_exit(Duration::from_secs(40))
        .expect("relay did not stop");
}

/// Write a well-formed message file `queue/ID` built from `template` (another message file)
/// with a new id and `auth_user`, as someone with access to the spool could.
fn plant(spool: &Path, template: &str, id: &str, auth_user: &str) -> PathBuf {
    let bytes = fs::read(spool.join("queue").join(template)).unwrap();
    let (mut envelope, body) = parse_spool_file(&bytes);
    envelope["id"] = id.into();
    envelope["auth_user"] = auth_user.into();
    let mut out = b"PORTCULLIS-SPOOL 1\n".to_vec();
    out.extend_from_slice(envelope.to_string().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&body);
    let path = spool.join("queue").join(id);
    fs::write(&path, out).unwrap();
    chmod(&path, 0o600);
    path
}

/// A message file written by another user (forged `auth_user`), and one any user could have
/// changed (mode 0666), are moved to `rejected/` at restart, logged with their id, and never
/// delivered or listed; the relay's own message is delivered.
#[test]
fn spool_files_the_relay_did_not_write_are_rejected_at_restart_and_never_delivered() {
    let upstream = free_port();
    let mut relay = relay_with_upstream(upstream);
    let own = queue_one(&relay, "a@example.org", "own");
    // Its first attempt (upstream down) writes its state file, planted over below.
    let state = relay.spool.join("queue").join(format!("{own}.state"));
    assert!(wait_until(Duration::from_secs(10), || state.exists()));
    stop(&mut relay);

    let foreign = "0AAAAAAAAAAAAAAA";
    let writable = "0BBBBBBBBBBBBBBB";
    chown(
        &plant(&relay.spool, &own, foreign, "forged"),
        NOBODY,
        NOGROUP,
    );
    chmod(&plant(&relay.spool, &own, writable, "forged"), 0o666);
    // A state file of another owner next to the relay's own message is not believed either.
    chown(&state, NOBODY, NOGROUP);

    let sink = Sink::start_on(upstream, SinkConfig::default());
    relay.restart();
    for id in [foreign, writable] {
        assert_log_fields(&relay, &[("rule", "spool_rejected"), ("queue_id", id)]);
    }
    for id in [foreign, writable] {
        assert!(
            !relay.spool.join("queue").join(id).exists(),
            "{id} still queued"
        );
        let kept = relay.spool.join("rejected").join(id);
        assert!(kept.exists(), "{id} not in rejected/");
    }
    assert!(
        relay
            .spool
            .join("rejected")
            .join(format!("{own}.state"))
            .exists(),
        "the foreign state file was not rejected"
    );
    let out = relay.command(&["queue", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listing.contains(foreign) && !listing.contains(writable),
        "{listing}"
    );

    // Due at the next retry (its upstream was down): now.
    assert!(relay.command(&["queue", "retry", "--all"]).status.success());
    assert!(
        sink.wait_for(1, Duration::from_secs(15)),
        "own message not delivered"
    );
    assert!(relay.wait_for_queue_len(0, Duration::from_secs(10)));
    let got = sink.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(contains(&got[0].data, b"Subject: own"));
    // Still there, still not queued: a later restart does not bring them back either.
    assert!(relay.spool.join("rejected").join(foreign).exists());
}

/// Run `portcullis run` on `relay`'s config and expect it to refuse to start (exit 2) with a
/// message naming `path` and `fix`.
fn assert_start_refused(relay: &Relay, path: &Path, fix: &str) {
    assert_command_refuses("run", relay, path, fix);
}

/// `portcullis COMMAND --config …` exits 2 naming `path` and `fix`.
fn assert_command_refuses(command: &str, relay: &Relay, path: &Path, fix: &str) {
    let out = Command::new(BIN)
        .args([command, "--config"])
        .arg(relay.config_path())
        .current_dir(relay.dir().path())
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{command}: {said}");
    assert!(
        said.contains(&path.display().to_string()),
        "{command}: {said}"
    );
    assert!(said.contains(fix), "{command}: {said}");
}

/// A spool directory or subdirectory that is group- or world-writable, or owned by another
/// user, stops the start with exit status 2 and an error naming the path and the fix.
#[test]
fn relay_refuses_to_start_on_a_spool_others_can_write() {
    let mut relay = relay_with_upstream(free_port());
    stop(&mut relay);
    let queue = relay.spool.join("queue");

    chmod(&queue, 0o777);
    assert_start_refused(&relay, &queue, &format!("chmod 700 {}", queue.display()));
    // check-config says so too, rather than OK for a spool the relay will not start on.
    let fix = format!("chmod 700 {}", queue.display());
    assert_command_refuses("check-config", &relay, &queue, &fix);
    chmod(&queue, 0o700);

    chmod(&relay.spool, 0o775);
    assert_start_refused(&relay, &relay.spool, "chmod 700");
    assert_command_refuses("check-config", &relay, &relay.spool, "chmod 700");
    chmod(&relay.spool, 0o700);

    // Another user's spool: refused before anything is created in it.
    fs::remove_dir(relay.spool.join("rejected")).unwrap();
    chown(&relay.spool, NOBODY, NOGROUP);
    assert_start_refused(&relay, &relay.spool, "chown");
    assert!(!relay.spool.join("rejected").exists());
    // Fixed as the message says: the relay starts (and makes what is missing).
    chown(&relay.spool, 0, 0);
    relay.restart();
    assert!(relay.spool.join("rejected").is_dir());
}

/// Every entry under `root`: relative path → (uid, gid, mode, mtime in ns).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32, i128)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
        out.insert(
            p.strip_prefix(root).unwrap().to_path_buf(),
            (m.uid(), m.gid(), m.mode(), mtime),
        );
        if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

/// `queue list|show|purge --dry-run|delete` run as root on a spool owned by the relay's user
/// create and change nothing (before: root-owned directories after which the relay could not
/// start); `queue retry`, which writes a request, gives what it creates to the spool's owner.
#[test]
fn queue_commands_run_as_root_keep_the_spool_as_its_owner_left_it() {
    let mut relay = relay_with_upstream(free_port());
    let keep = queue_one(&relay, "a@example.org", "keep");
    let gone = queue_one(&relay, "b@example.org", "gone");
    stop(&mut relay);
    // An older spool without some of today's subdirectories, owned by the relay's user.
    fs::remove_dir(relay.spool.join("rejected")).unwrap();
    fs::remove_dir_all(relay.spool.join("free")).unwrap();
    chown_tree(&relay.spool, NOBODY, NOGROUP);
    let spool = relay.spool.to_str().unwrap().to_string();
    let before = snapshot(&relay.spool);

    for args in [
        &["queue", "list"][..],
        &["queue", "list", "--json"],
        &["queue", "show", &keep],
        &["queue", "purge", "--from", "a@example.org", "--dry-run"],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .args(["--spool", &spool])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert_eq!(snapshot(&relay.spool), before, "{args:?} changed the spool");
    }

    let out = Command::new(BIN)
        .args(["queue", "delete", &gone, "--spool", &spool])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new(BIN)
        .args(["queue", "retry", &keep, "--spool", &spool])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let after = snapshot(&relay.spool);
    assert!(
        after.contains_key(Path::new(&format!("control/retry.{keep}"))),
        "{after:?}"
    );
    for (path, (uid, gid, _, _)) in &after {
        assert_eq!(
            (*uid, *gid),
            (NOBODY, NOGROUP),
            "{} owned by root",
            path.display()
        );
    }
    assert!(!after.contains_key(Path::new(&format!("queue/{gone}"))));
}

/// check-config (and the relay at start) warn when the TLS key, the users file or an upstream
/// password file is readable by every user or by a group the relay's user (the spool's owner,
/// `nobody` here) is not in; a key `0640 root:G` with the relay's user in `G` (Debian's
/// `ssl-cert` layout) does not warn.
#[test]
fn check_config_warns_about_secrets_others_can_read() {
    let dir = TestDir::new();
    write_certs(&dir.join("certs"));
    let key = dir.join("certs/key.pem");
    let users = dir.write("users.toml", "");
    let pass = dir.write("upstream.pass", "hunter2\n");
    let spool = dir.join("spool");
    fs::create_dir(&spool).unwrap();
    chown(&spool, NOBODY, NOGROUP);
    chmod(&spool, 0o700);
    let toml = dir.expand(&config(
        &[listener("mx", free_port(), "starttls")],
        free_port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n\n\
         [auth]\nusers_file = \"{dir}/users.toml\"\n",
    ))
    .replace(
        "tls = \"none\"\n\n[relay]",
        "tls = \"opportunistic\"\nauth_user = \"relay\"\nauth_password_file = \"{dir}/upstream.pass\"\n\n[relay]",
    );
    let toml = dir.expand(&toml);
    let path = dir.write("portcullis.toml", &toml);
    let check = || {
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("warning:"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    // Debian's layout for all three: 0640, group of the relay's user.
    for f in [&key, &users, &pass] {
        chown(f, 0, NOGROUP);
        chmod(f, 0o640);
    }
    let warnings = check();
    assert!(
        !warnings.iter().any(|w| w.contains("needs to read")),
        "{warnings:#?}"
    );

    chmod(&users, 0o644);
    chown(&pass, 0, 0);
    chmod(&key, 0o604);
    let warnings = check();
    let about = |key: &str| warnings.iter().find(|w| w.contains(key)).cloned();
    let w = about("auth.users_file").expect("no warning for a users file readable by all");
    assert!(
        w.contains("every user") && w.contains(&users.display().to_string()),
        "{w}"
    );
    let w = about("upstreams[0].auth_password_file").expect("no warning for root's group");
    assert!(w.contains("not in") && w.contains("root (gid 0)"), "{w}");
    let w = about("tls.key").expect("no warning for a key readable by all");
    assert!(w.contains(&format!("chmod o-rwx {}", key.display())), "{w}");
}

/// `MAIL FROM:<\u{202e}gro.elpmaxe@knab-ecivres>` displays as `<serivce-bank@example.org>`
/// when printed raw: `queue list`, `list --json` and `show` escape it like a control
/// character.
#[test]
fn queue_list_and_show_escape_bidirectional_characters() {
    // An upstream with SMTPUTF8 is seen once at start (so the non-ASCII sender is accepted at
    // RCPT), then goes away, so the message stays in the queue to be listed.
    let sink = Sink::start(SinkConfig::default());
    let relay = relay_with_upstream(sink.port());
    sink.stop();
    let mut c = SmtpClient::greeted(relay.port(0));
    c.expect("MAIL FROM:<\u{202e}gro.elpmaxe@knab-ecivres> SMTPUTF8", 250);
    c.expect("RCPT TO:<rcpt@example.com>", 250);
    c.expect("DATA", 354);
    c.send_raw("Subject: \u{2067}invoice\u{2069}\u{200b}\r\n\r\nx\r\n.\r\n".as_bytes());
    let id = queue_id(&c.expect_reply(250)).unwrap();

    for args in [
        &["queue", "list"][..],
        &["queue", "list", "--json"],
        &["queue", "show", &id],
    ] {
        let out = relay.command(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let shown = String::from_utf8(out.stdout).unwrap();
        assert!(
            !shown.chars().any(|c| matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')),
            "{args:?} printed a bidirectional or zero-width character: {shown:?}"
        );
        if args.contains(&"--json") {
            assert!(
                shown.contains(r#""from":"\u202egro.elpmaxe@knab-ecivres""#),
                "{shown}"
            );
        } else {
            assert!(shown.contains("?gro.elpmaxe@knab-ecivres"), "{shown}");
        }
    }
    let show = String::from_utf8(relay.command(&["queue", "show", &id]).stdout).unwrap();
    assert!(show.contains("Subject: ?invoice??"), "{show}");
    // The relay's own log quotes the sender too: escaped there as well.
    assert_log_fields(&relay, &[("from", r"\u{202e}gro.elpmaxe@knab-ecivres")]);
    assert!(!relay.log().contains('\u{202e}'), "raw U+202E in the log");
}

/// Default-ignorable code points that are not format characters display as nothing too:
/// `MAIL FROM:<pay\u{34f}pal@example.org>` reads as `paypal@example.org`. The combining
/// grapheme joiner, the Hangul fillers, variation selectors and U+2800 are escaped in
/// `queue list`, `list --json` and the log.
#[test]
fn queue_list_and_log_escape_default_ignorable_code_points() {
    let sink = Sink::start(SinkConfig::default());
    let relay = relay_with_upstream(sink.port());
    sink.stop();
    let hidden = [
        '\u{34f}',
        '\u{3164}',
        '\u{115f}',
        '\u{1160}',
        '\u{ffa0}',
        '\u{fe0f}',
        '\u{e0100}',
        '\u{2800}',
    ];
    let mut c = SmtpClient::greeted(relay.port(0));
    for h in hidden {
        c.expect(&format!("MAIL FROM:<pay{h}pal@example.org> SMTPUTF8"), 250);
        c.expect("RCPT TO:<rcpt@example.com>", 250);
        c.expect("DATA", 354);
        c.send_raw(b"Subject: x\r\n\r\nx\r\n.\r\n");
        c.expect_reply(250);
    }
    let list = String::from_utf8(relay.command(&["queue", "list"]).stdout).unwrap();
    let json = String::from_utf8(relay.command(&["queue", "list", "--json"]).stdout).unwrap();
    let log = relay.log();
    for h in hidden {
        for (what, text) in [("list", &list), ("--json", &json), ("log", &log)] {
            assert!(
                !text.contains(h),
                "{what} printed U+{:04X} raw: {text:?}",
                h as u32
            );
        }
        let escaped = format!("pay{}pal@example.org", h.escape_unicode());
        assert_log_fields(&relay, &[("from", &escaped)]);
    }
    assert_eq!(
        list.matches("pay?pal@example.org").count(),
        hidden.len(),
        "{list}"
    );
    assert!(
        json.contains(r#""from":"pay\u034fpal@example.org""#),
        "{json}"
    );
    assert!(
        json.contains(r#""from":"pay\udb40\udd00pal@example.org""#),
        "{json}"
    );
}
