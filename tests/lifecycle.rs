//! Loopback tests of the command line and the process lifecycle: config checking, helper
//! commands, the embedded default, crash safety (DESIGN invariant 1), SIGTERM, SIGHUP reload
//! and spool recovery.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mx_config(port: u16) -> String {
    config(
        &[listener("mx", port, "none")],
        free_port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n",
    )
}

/// Four distinct mistakes, each naming its key.
const INVALID_KEYS: [&str; 4] = [
    "server.bogus_key",
    "limits.command_timeout",
    "listeners[0].allow",
    "server.hostname",
];

fn invalid_config(port: u16) -> String {
    format!(
        "[server]\nspool_dir = \"{{dir}}/spool\"\nbogus_key = 1\n\n\
         [[listeners]]\nname = \"mx\"\nbind = \"127.0.0.1:{port}\"\ntls = \"none\"\n\
         allow = [\"10.0.0.0/33\"]\n\n\
         [limits]\ncommand_timeout = \"5 fortnights\"\n\n\
         [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n",
        free_port()
    )
}

#[test]
fn check_config_accepts_valid_and_reports_every_error() {
    let dir = TestDir::new();
    let good = dir.write("good.toml", dir.expand(&mx_config(free_port())));
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!out.stdout.is_empty(), "no summary printed");

    let port = free_port();
    let bad = dir.write("bad.toml", dir.expand(&invalid_config(port)));
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let report = text(&out);
    for key in INVALID_KEYS {
        assert!(
            report.contains(key),
            "check-config does not name {key}:\n{report}"
        );
    }

    // `run` refuses the same file with the same keys, and never listens.
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&bad)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "run listens on an invalid config"
        );
        assert!(
            Instant::now() < deadline,
            "run did not exit on an invalid config"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let report = text(&out);
    for key in INVALID_KEYS {
        assert!(report.contains(key), "run does not name {key}:\n{report}");
    }
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn gen_cert_and_passwd() {
    let dir = TestDir::new();
    let out = Command::new(BIN)
        .args(["gen-cert", "--out"])
        .arg(dir.join("c"))
        .args(["--name", "localhost"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let cert = fs::read_to_string(dir.join("c/cert.pem")).unwrap();
    assert!(cert.contains("BEGIN CERTIFICATE"));
    let key = dir.join("c/key.pem");
    assert!(fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"));
    let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key.pem mode {mode:o}");

    let passwd = |input: &[u8]| {
        let mut child = Command::new(BIN)
            .arg("passwd")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = passwd(b"secret\n");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout:?}");
    assert!(lines[0].starts_with("$argon2id$"), "{stdout:?}");
    assert!(
        portcullis::policy::credentials::verify_password(lines[0], "secret"),
        "hash does not verify"
    );
    let out = passwd(b"");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn run_without_config_uses_embedded_default() {
    let dir = TestDir::new();
    // The embedded default binds fixed ports: if something else already holds them, fail
    // clearly instead of testing that other process.
    for p in [2525, 2587] {
        assert!(
            TcpStream::connect(("127.0.0.1", p)).is_err(),
            "port {p} is already in use by another process; this test needs it free"
        );
    }
    let child = Command::new(BIN)
        .arg("run")
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = Kill(child);
    let deadline = Instant::now() + START_TIMEOUT;
    while [2525, 2587]
        .iter()
        .any(|&p| TcpStream::connect(("127.0.0.1", p)).is_err())
    {
        assert!(
            guard.0.try_wait().unwrap().is_none(),
            "default relay exited"
        );
        assert!(Instant::now() < deadline, "default relay not listening");
        thread::sleep(Duration::from_millis(20));
    }
    let mut c = SmtpClient::greeted(2525);
    let (code, reply) = c.send_message("a@example.com", &["b@example.com"], "Subject: d\n\nhi\n");
    assert_eq!(code, 250, "{reply}");
    let id = queue_id(&reply).unwrap();
    assert!(
        dir.join("spool/queue").join(&id).is_file(),
        "not in ./spool"
    );
    drop(guard);
}

#[test]
fn kill9_loses_no_acknowledged_message() {
    let port = free_port();
    let mut relay = Relay::start(&mx_config(port));
    const THREADS: usize = 8;
    const PER_THREAD: usize = 25;
    let acked: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let acked = Arc::clone(&acked);
        handles.push(thread::spawn(move || {
            // Every failure after the kill is expected: stop at the first one.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut c = SmtpClient::greeted(port);
                for i in 0..PER_THREAD {
                    let body = format!(
                        "Subject: crash {t}/{i}\r\n\r\nthread {t} message {i}\r\n.dot line\r\n{}\r\n",
                        "x".repeat(100 * (i + 1))
                    );
                    let (code, reply) = c.send_message("a@example.com", &["b@example.com"], &body);
                    if code != 250 {
                        return;
                    }
                    let id = queue_id(&reply).expect("queue id");
                    acked.lock().unwrap().insert(id, body.into_bytes());
                }
            }));
            drop(result);
        }));
    }
    let half = THREADS * PER_THREAD / 2;
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < half {
        assert!(Instant::now() < deadline, "too slow to reach half");
        thread::sleep(Duration::from_millis(2));
    }
    relay.kill9();
    for h in handles {
        h.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= half);
    eprintln!("acked {} of {}", acked.len(), THREADS * PER_THREAD);

    // Straight after the crash, before recovery: every queue file is complete.
    for path in relay.spool_files() {
        parse_spool_file(&fs::read(&path).unwrap());
    }
    relay.restart();
    // No unfinished message survives recovery. (Delivery, already running again, may be
    // writing `ID.state.PID.N.tmp` files there: those are its own, not leftovers.)
    let tmp: Vec<_> = fs::read_dir(relay.spool.join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| !p.to_string_lossy().contains(".state."))
                .collect()
        })
        .unwrap_or_default();
    assert!(tmp.is_empty(), "left in spool/tmp: {tmp:?}");
    // A partial file would be rejected by recovery and so vanish from the queue unseen.
    let rejected: Vec<_> = fs::read_dir(relay.spool.join("rejected"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(rejected.is_empty(), "recovery rejected {rejected:?}");
    let queued: HashMap<String, (serde_json::Value, Vec<u8>)> = relay
        .queued_messages()
        .into_iter()
        .map(|(env, msg)| (env["id"].as_str().unwrap().to_owned(), (env, msg)))
        .collect();
    for (id, body) in &acked {
        let (_, msg) = queued
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged message {id} lost"));
        assert!(msg.starts_with(b"Received: "));
        assert!(
            msg.ends_with(body),
            "{id}: body differs:\n{}",
            String::from_utf8_lossy(msg)
        );
        let header_end = msg.len() - body.len();
        assert!(
            !String::from_utf8_lossy(&msg[..header_end]).contains("Subject"),
            "{id}: something besides the Received header precedes the body"
        );
    }
}

#[test]
fn sigterm_drains_sessions_and_exits_zero() {
    let port = free_port();
    let mut relay = Relay::start(&mx_config(port));
    let mut idle = SmtpClient::connect(port);
    idle.expect_reply(220);
    idle.expect("EHLO idle.test", 250);
    let mut busy = SmtpClient::connect(port);
    busy.expect_reply(220);
    busy.expect("EHLO busy.test", 250);
    busy.expect("MAIL FROM:<a@example.com>", 250);
    busy.expect("RCPT TO:<b@example.com>", 250);
    busy.expect("DATA", 354);
    busy.send_raw(b"Subject: in flight\r\n\r\nfirst half\r\n");
    // Both sessions are established on the relay before the signal: it answered each (the
    // EHLO, the 354), so `busy` is in DATA and `idle` between transactions.

    relay.sigterm();
    let (code, text) = idle.read_reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.3.0"), "{text}");
    idle.read_to_close();

    busy.send_raw(b"second half\r\n.\r\n");
    let (code, text) = busy.read_reply();
    assert_eq!(code, 250, "in-flight message after SIGTERM: {text}");
    let id = queue_id(&text).unwrap();

    // No new sessions once the signal is in: refused, or at most a 421.
    let mut refused = false;
    for _ in 0..50 {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut buf = [0u8; 256];
                let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
                assert!(
                    !buf[..n].starts_with(b"220"),
                    "new session greeted after SIGTERM: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                );
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = busy.cmd("QUIT");
    drop(busy);
    let status = relay
        .wait_exit(Duration::from_secs(10))
        .expect("relay did not exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(refused || TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(relay.spool.join("queue").join(&id).is_file());
}

#[test]
fn sighup_reloads_valid_policy_and_keeps_it_on_invalid() {
    let port = free_port();
    let upstream = free_port();
    let listeners = |deny: &str| [listener("mx", port, "none") + deny];
    let extra = "[relay]\naccepted_domains = [\"example.com\"]\n";
    let relay = Relay::start(&config(&listeners(""), upstream, extra));

    let mut c = SmtpClient::connect_from("127.0.0.2", port);
    c.expect_reply(220);
    drop(c);

    let text = relay.dir().expand(&config(
        &listeners("deny = [\"127.0.0.2/32\"]\n"),
        upstream,
        extra,
    ));
    fs::write(relay.config_path(), text).unwrap();
    relay.sighup();
    assert!(
        relay.wait_for_fields(&[("rule", "reload")], Duration::from_secs(10)),
        "no reload in the log"
    );
    let mut c = SmtpClient::connect_from("127.0.0.2", port);
    let text = c.expect_reply(554);
    assert!(text.starts_with("554 5.7.1"), "{text}");
    let text = c.expect("EHLO client.test", 503);
    assert!(text.starts_with("503 5.7.1"), "{text}");
    c.expect("QUIT", 221);
    drop(c);

    fs::write(relay.config_path(), "[server]\nbogus = [\n").unwrap();
    relay.sighup();
    assert!(
        relay.wait_for_fields(&[("rule", "reload_refused")], Duration::from_secs(10)),
        "invalid reload not refused in the log"
    );
    let mut c = SmtpClient::connect_from("127.0.0.3", port);
    c.expect_reply(220);
    c.expect("QUIT", 221);
    let mut c = SmtpClient::connect_from("127.0.0.2", port);
    c.expect_reply(554);
}

#[test]
fn restart_rejects_garbage_and_clears_tmp() {
    let port = free_port();
    let mut relay = Relay::start(&mx_config(port));
    let mut ids = Vec::new();
    let mut c = SmtpClient::greeted(port);
    for i in 0..2 {
        let (code, reply) = c.send_message(
            "a@example.com",
            &["b@example.com"],
            &format!("Subject: {i}\n\nx\n"),
        );
        assert_eq!(code, 250, "{reply}");
        ids.push(queue_id(&reply).unwrap());
    }
    c.expect("QUIT", 221);
    relay.sigterm();
    relay
        .wait_exit(Duration::from_secs(10))
        .expect("relay did not stop");

    let garbage = b"this is not a spool file\n\x00\x01garbage";
    fs::write(relay.spool.join("queue/GARBAGE"), garbage).unwrap();
    fs::create_dir_all(relay.spool.join("tmp")).unwrap();
    let leftover = relay.spool.join("tmp/0123456789ABCDEF");
    fs::write(&leftover, b"PORTCULLIS-SPOOL 1\n{\"partial").unwrap();
    relay.restart();

    assert!(!relay.spool.join("queue/GARBAGE").exists());
    assert_eq!(
        fs::read(relay.spool.join("rejected/GARBAGE")).expect("GARBAGE not rejected"),
        garbage
    );
    assert!(!leftover.exists(), "tmp leftover not removed");
    let out = relay.command(&["queue", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    for id in &ids {
        assert!(
            listing.lines().any(|l| l.starts_with(id.as_str())),
            "{id} missing:\n{listing}"
        );
    }
    assert!(!listing.contains("GARBAGE"));
}

/// A SIGHUP (e.g. `systemctl reload`) while the relay is still starting, here waiting for the
/// capability probe of an upstream that accepts and never answers, does not kill it: it goes
/// on to serve.
#[test]
fn sighup_during_start_does_not_kill_the_relay() {
    let upstream = free_port();
    let hole = std::net::TcpListener::bind(("127.0.0.1", upstream)).unwrap();
    hole.set_nonblocking(true).unwrap();
    let port = free_port();
    let dir = TestDir::new();
    let policy = dir.expand(&config(&[listener("mx", port, "none")], upstream, ""));
    let path = dir.write("portcullis.toml", &policy);
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The probe has connected: the spool is recovered and the relay waits for the upstream.
    let mut held = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            held = hole.accept().ok();
            held.is_some()
        }),
        "no capability probe"
    );
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let serving = wait_until(Duration::from_secs(15), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(exited.is_none(), "the relay died of the SIGHUP: {exited:?}");
    assert!(serving, "the relay never listened");
}
