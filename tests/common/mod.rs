//! Shared harness for the loopback integration tests (`mod common;` at the top of each file).
//!
//! It starts the real `portcullis` binary on free loopback ports ([`Relay`]), talks SMTP to it
//! over blocking sockets, plain or TLS ([`SmtpClient`]), runs `swaks` when it is installed, and
//! reads the spool the relay writes ([`parse_spool_file`]). Everything is synchronous: a test is
//! a script, and every wait is bounded so a hung relay fails the test instead of the CI job.
//!
//! Paths inside a config: the string [`DIR`] (`{dir}`) is replaced with the relay's temporary
//! directory before the file is written, so `spool_dir = "{dir}/spool"` needs no plumbing. When
//! the config mentions `{dir}/certs/`, a self-signed certificate for `localhost` is generated
//! there first (with `portcullis gen-cert`); [`Relay::cert_path`] is then the trust anchor to
//! give TLS clients.

// Each test file uses a different subset of the harness.
#![allow(dead_code)]

pub mod dns;
pub mod haproxy;
pub mod http;
pub mod page;
pub mod postfix;
pub mod queue;
pub mod sink;
pub mod webhook;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Placeholder for the relay's temporary directory in config text given to [`Relay`].
pub const DIR: &str = "{dir}";

/// How long [`Relay::start`] waits for every listener to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Read timeout of [`SmtpClient`] sockets.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval of every polling loop in the harness: short, since every wait also has an explicit
/// deadline and returns as soon as its condition holds.
const POLL: Duration = Duration::from_millis(10);

/// The relay binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A loopback TCP port that was free a moment ago, for a listener the test starts later.
///
/// Taken below the kernel's ephemeral range (32768 and up here), which the relay's and the
/// tests' outgoing connections draw their source ports from: a port picked by binding port 0
/// could be taken by such a connection before the relay binds it, and a test's readiness check
/// would then talk to the wrong process. Each test process walks its own stretch of
/// 10000–32767 (from its pid), never handing out a port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_768;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 2_003) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range")
}

/// A temporary directory, removed on drop, with helpers to fill it.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDir {
    /// A fresh empty directory.
    pub fn new() -> Self {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("portcullis-test-")
                .tempdir()
                .expect("create temp dir"),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `rel` inside the directory.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Write `contents` to `rel` (creating parent directories) and return the full path.
    pub fn write(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create parent dir");
        }
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Replace every [`DIR`] placeholder in `text` with this directory's path.
    pub fn expand(&self, text: &str) -> String {
        text.replace(DIR, &self.path().display().to_string())
    }
}

/// Poll `done` until it holds; false if it still does not after `timeout`.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        sleep(POLL);
    }
}

/// How long tests wait for an expected log line.
pub const LOG_WAIT: Duration = Duration::from_secs(5);

/// Assert that `reply` has `code` and every line carries the enhanced code `enhanced`.
#[track_caller]
pub fn assert_reply(reply: &(u16, String), code: u16, enhanced: &str) {
    assert_eq!(
        reply.0, code,
        "expected {code} {enhanced}, got {:?}",
        reply.1
    );
    for line in reply.1.lines() {
        assert!(
            line[4..].starts_with(enhanced),
            "expected enhanced code {enhanced} in {line:?}"
        );
    }
}

/// Assert that the relay prints `needle` within [`LOG_WAIT`]: for text it prints word for word
/// as part of its interface (a `check-config` warning, an escaped address under test). Log
/// events are matched by their fields instead: [`assert_log_fields`].
#[track_caller]
pub fn assert_log(relay: &Relay, needle: &str) {
    assert!(
        relay.wait_for_log(needle, LOG_WAIT),
        "log does not contain {needle:?}:\n{}",
        relay.log()
    );
}

/// Whether `line` carries the structured field `key=value`, written bare (`queue_id=ID`,
/// `%` in tracing) or quoted (`rule="hop_limit"`, `?` in tracing), in a span prefix
/// (`delivery{queue_id=ID}:`) or among the event's own fields. The key must start a field (not
/// end another key: `id` never matches `queue_id=`), and the value must end there (a space,
/// `}`, `,`, `:` or the end of the line follows it), so `rule=hop` never matches
/// `rule="hop_limit"`. A `value` ending in `*` matches every value starting with the rest
/// (`("reply", "250 2.0.0 Ok: queued as *")`). A bare value that holds spaces (a reply)
/// has no end mark of its own, so its leading words match too: give the whole value.
pub fn line_has_field(line: &str, key: &str, value: &str) -> bool {
    let needle = format!("{key}=");
    let (value, prefix) = match value.strip_suffix('*') {
        Some(start) => (start, true),
        None => (value, false),
    };
    line.match_indices(&needle).any(|(at, _)| {
        let starts_field = line[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '.'));
        let rest = &line[at + needle.len()..];
        let after = match rest.strip_prefix('"') {
            Some(quoted) if prefix => quoted.strip_prefix(value),
            Some(quoted) => quoted.strip_prefix(value).and_then(|r| r.strip_prefix('"')),
            None => rest.strip_prefix(value),
        };
        let ends_value = |r: &str| prefix || r.is_empty() || r.starts_with([' ', '}', ',', ':']);
        starts_field && after.is_some_and(ends_value)
    })
}

/// Whether one line of `log` carries every field in `fields` (see [`line_has_field`]).
/// This is how tests read the log: by the `rule=` and `queue_id=` fields (with another field
/// of the same line where one is needed), never by the prose of a message, which may change.
pub fn log_has_fields(log: &str, fields: &[(&str, &str)]) -> bool {
    log.lines()
        .any(|line| fields.iter().all(|(k, v)| line_has_field(line, k, v)))
}

/// How many lines of `log` carry every field in `fields`.
pub fn count_log_fields(log: &str, fields: &[(&str, &str)]) -> usize {
    log.lines()
        .filter(|line| fields.iter().all(|(k, v)| line_has_field(line, k, v)))
        .count()
}

/// Assert that the relay logs, within [`LOG_WAIT`], one line with every field in `fields`
/// (`&[("rule", "hop_limit")]`; see [`log_has_fields`]).
#[track_caller]
pub fn assert_log_fields(relay: &Relay, fields: &[(&str, &str)]) {
    assert!(
        relay.wait_for_fields(fields, LOG_WAIT),
        "no log line with the fields {fields:?}:\n{}",
        relay.log()
    );
}

/// Run `portcullis gen-cert --out DIR --name localhost` and return `(cert.pem, key.pem)`.
pub fn write_certs(dir: &Path) -> (PathBuf, PathBuf) {
    let out = Command::new(BIN)
        .arg("gen-cert")
        .arg("--out")
        .arg(dir)
        .args(["--name", "localhost"])
        .output()
        .expect("spawn portcullis gen-cert");
    assert!(
        out.status.success(),
        "portcullis gen-cert failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    assert!(
        cert.is_file() && key.is_file(),
        "gen-cert wrote no cert.pem/key.pem"
    );
    (cert, key)
}

/// One `[[listeners]]` table: `listener("mx", port, "starttls")`. Append more keys to the
/// returned string (`+ "auth = \"required\"\n"`), since they must follow the table header.
pub fn listener(name: &str, port: u16, tls: &str) -> String {
    format!("[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\ntls = \"{tls}\"\n")
}

/// A minimal valid policy: `[server]` (hostname `relay.test`, spool `{dir}/spool`), the given
/// listener tables (see [`listener`]), `[tls]` with `{dir}/certs/cert.pem` and `key.pem` when a
/// listener uses TLS and `extra` has no `[tls]` of its own, one upstream `up` at
/// `127.0.0.1:upstream_port` without TLS, then `extra` (more tables).
pub fn config(listeners: &[String], upstream_port: u16, extra: &str) -> String {
    let mut toml =
        String::from("[server]\nhostname = \"relay.test\"\nspool_dir = \"{dir}/spool\"\n\n");
    let uses_tls = listeners
        .iter()
        .any(|l| l.contains("\"starttls\"") || l.contains("\"implicit\""));
    if uses_tls && !extra.contains("[tls]") {
        toml.push_str("[tls]\ncert = \"{dir}/certs/cert.pem\"\nkey = \"{dir}/certs/key.pem\"\n\n");
    }
    for l in listeners {
        toml.push_str(l);
        toml.push('\n');
    }
    toml.push_str(&format!(
        "[[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{upstream_port}\"\ntls = \"none\"\n\n"
    ));
    toml.push_str(extra);
    toml
}

/// The ports of every `[[listeners]] bind` in a policy.
pub fn listener_ports(toml_text: &str) -> Vec<u16> {
    let value: toml::Table = toml_text.parse().expect("config is not valid TOML");
    value
        .get("listeners")
        .and_then(|l| l.as_array())
        .map(|listeners| {
            listeners
                .iter()
                .filter_map(|l| l.get("bind")?.as_str())
                .map(|b| {
                    b.parse::<SocketAddr>()
                        .unwrap_or_else(|e| panic!("bind {b:?}: {e}"))
                        .port()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `server.spool_dir` of a policy, resolved against `base` when relative.
pub fn spool_dir(toml_text: &str, base: &Path) -> PathBuf {
    let value: toml::Table = toml_text.parse().expect("config is not valid TOML");
    let dir = value
        .get("server")
        .and_then(|s| s.get("spool_dir"))
        .and_then(|d| d.as_str())
        .unwrap_or("spool");
    base.join(dir)
}

/// Split one spool file (`PORTCULLIS-SPOOL 1\n`, one line of envelope JSON, the raw message)
/// into the envelope and the message bytes. Panics, naming what is wrong, on anything else.
pub fn parse_spool_file(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    const MAGIC: &[u8] = b"PORTCULLIS-SPOOL 1\n";
    assert!(
        bytes.starts_with(MAGIC),
        "spool file does not start with {:?}: {:?}",
        String::from_utf8_lossy(MAGIC),
        String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
    );
    let rest = &bytes[MAGIC.len()..];
    let nl = rest
        .iter()
        .position(|&b| b == b'\n')
        .expect("spool file has no end of the envelope line");
    let envelope = serde_json::from_slice(&rest[..nl]).unwrap_or_else(|e| {
        panic!(
            "spool envelope is not JSON ({e}): {}",
            String::from_utf8_lossy(&rest[..nl])
        )
    });
    (envelope, rest[nl + 1..].to_vec())
}

/// The relay binary running on a policy, with its log captured to a file. Killed on drop (its
/// log is printed if the test is panicking).
///
/// Readiness is checked by connecting to every listener port, so each listener sees exactly one
/// probe connection from 127.0.0.1 (closed without a word) before the test starts; tests of
/// per-IP connection limits should count it or connect from another loopback address
/// ([`SmtpClient::connect_from`]).
pub struct Relay {
    child: Option<Child>,
    dir: TestDir,
    config_path: PathBuf,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    /// Ports of every listener, in config order.
    pub ports: Vec<u16>,
    /// The spool directory (`server.spool_dir`).
    pub spool: PathBuf,
}

impl Relay {
    /// Start the relay on `config_toml` in a fresh temporary directory (see the module doc
    /// for `{dir}`), and wait until every listener accepts connections.
    pub fn start(config_toml: &str) -> Relay {
        Relay::start_in(TestDir::new(), config_toml)
    }

    /// Like [`Relay::start`], in a directory the test has prepared (users file, recipients…).
    pub fn start_in(dir: TestDir, config_toml: &str) -> Relay {
        Relay::start_in_env(dir, config_toml, &[])
    }

    /// Like [`Relay::start_in`], with extra environment variables (`RUST_LOG` is `info`
    /// unless given here).
    pub fn start_in_env(dir: TestDir, config_toml: &str, env: &[(&str, &str)]) -> Relay {
        let text = dir.expand(config_toml);
        if config_toml.contains("{dir}/certs/") && !dir.join("certs/cert.pem").exists() {
            write_certs(&dir.join("certs"));
        }
        let config_path = dir.write("portcullis.toml", &text);
        let mut relay = Relay {
            child: None,
            ports: listener_ports(&text),
            spool: spool_dir(&text, dir.path()),
            log_path: dir.join("relay.log"),
            config_path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
        };
        relay.spawn();
        relay
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "relay already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open relay log");
        let log_start = log.metadata().map_or(0, |m| m.len() as usize);
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn portcullis run"));

        let deadline = Instant::now() + START_TIMEOUT;
        let mut pending = self.ports.clone();
        while !pending.is_empty() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("relay exited during start ({status}); log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                let log = self.log();
                self.kill9();
                panic!("relay not listening on {pending:?} after {START_TIMEOUT:?}; log:\n{log}");
            }
            // Listening by this run's own word (its log since the spawn), then accepting: a
            // port answered by some other process never counts.
            let log = self.log();
            let this_run = log.get(log_start..).unwrap_or_default();
            pending.retain(|&port| {
                let said = this_run.lines().any(|l| says_listening(l, port));
                !said
                    || TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), POLL)
                        .is_err()
            });
            if !pending.is_empty() {
                sleep(POLL);
            }
        }
    }

    /// Start the relay again on the same directory, config and spool (after [`Relay::kill9`]
    /// or a clean exit; it is killed first if still running). The log file is appended to.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn();
    }

    /// [`Relay::restart`] with `env` instead of the environment it was started with (e.g. a
    /// start without the `FAILPOINTS` of the first).
    pub fn restart_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// The relay's temporary directory.
    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    /// The config file the relay runs on (rewrite it and [`Relay::sighup`] to test reload).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The certificate generated under `{dir}/certs/`, to trust in TLS clients.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("certs/cert.pem")
    }

    /// The port of the listener at `index` in config order.
    pub fn port(&self, index: usize) -> u16 {
        self.ports[index]
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the relay wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Wait until the log contains `needle`; false after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// Wait until one log line carries every field in `fields` ([`log_has_fields`]); false
    /// after `timeout`.
    pub fn wait_for_fields(&self, fields: &[(&str, &str)], timeout: Duration) -> bool {
        wait_until(timeout, || log_has_fields(&self.log(), fields))
    }

    /// Whether the log so far has a line with every field in `fields` ([`log_has_fields`]).
    pub fn has_fields(&self, fields: &[(&str, &str)]) -> bool {
        log_has_fields(&self.log(), fields)
    }

    /// Send `signal` (e.g. `libc::SIGHUP`) to the relay.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid().expect("relay not running");
        let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }

    /// Ask the relay to shut down gracefully (SIGTERM); see [`Relay::wait_exit`].
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Stop the relay gracefully (SIGTERM) and wait up to 10 s for it to exit; fails the test
    /// if it does not.
    #[track_caller]
    pub fn stop(&mut self) {
        self.sigterm();
        assert!(
            self.wait_exit(Duration::from_secs(10)).is_some(),
            "the relay did not stop on SIGTERM"
        );
    }

    /// Ask the relay to reload its configuration (SIGHUP).
    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Kill the relay abruptly (SIGKILL, as a crash) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait up to `timeout` for the relay to exit; its status, or `None` if still running
    /// (or never started).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("wait for relay") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            sleep(POLL);
        }
    }

    /// The message files in `spool/queue/` (not the `*.state` files), sorted by name.
    pub fn spool_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.spool.join("queue")) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.expect("read spool dir").path())
            .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "state"))
            .collect();
        files.sort();
        files
    }

    /// Every queued message as `(envelope JSON, raw message)`, in file-name order.
    ///
    /// A running relay may finish a message between the listing and the read: a file gone by
    /// then (`ENOENT`) has left the queue and is not in the answer. Any other error panics.
    pub fn queued_messages(&self) -> Vec<(serde_json::Value, Vec<u8>)> {
        self.spool_files()
            .iter()
            .filter_map(|p| match fs::read(p) {
                Ok(bytes) => Some(parse_spool_file(&bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => panic!("read {}: {e}", p.display()),
            })
            .collect()
    }

    /// Wait until the queue holds `count` messages; false after `timeout`.
    pub fn wait_for_queue_len(&self, count: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.spool_files().len() == count)
    }

    /// Run another `portcullis` command (e.g. `queue list`) against this relay's config;
    /// `--config FILE` is appended.
    pub fn command(&self, args: &[&str]) -> Output {
        self.command_env(args, &[])
    }

    /// [`Relay::command`] with extra environment variables (e.g. `FAILPOINTS` for the
    /// failpoint build). The relay's own `env` is not passed on: each process is armed alone.
    pub fn command_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .envs(env.iter().copied())
            .output()
            .expect("spawn portcullis")
    }
}

/// Whether a log line, text or `[log] format = "json"`, is the relay's `listening` line for
/// `port`.
fn says_listening(line: &str, port: u16) -> bool {
    let bind_end = format!(":{port}");
    if line.starts_with('{') {
        let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
            return false;
        };
        json["message"] == "listening"
            && json["bind"]
                .as_str()
                .is_some_and(|bind| bind.ends_with(&bind_end))
    } else {
        line.contains(" listening ") && line.ends_with(&bind_end)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- relay log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Anything an [`SmtpClient`] can talk over: a plain or TLS stream.
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// A blocking SMTP client for scripting dialogues. Every read times out after
/// [`READ_TIMEOUT`]; every unexpected condition panics with the dialogue so far.
pub struct SmtpClient {
    tcp: TcpStream,
    conn: Box<dyn Conn>,
    /// Received but not yet consumed.
    buf: Vec<u8>,
    /// Transcript (`C: `/`S: ` lines) for panic messages.
    transcript: String,
}

impl SmtpClient {
    /// Connect to 127.0.0.1:`port`.
    pub fn connect(port: u16) -> SmtpClient {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
        SmtpClient::from_tcp(tcp)
    }

    /// Connect, read the `220` greeting and say `EHLO client.test` (expecting `250`): where most
    /// tests start.
    pub fn greeted(port: u16) -> SmtpClient {
        let mut c = SmtpClient::connect(port);
        c.expect_reply(220);
        c.expect("EHLO client.test", 250);
        c
    }

    /// Connect to 127.0.0.1:`port` from the local address `local_ip` (e.g. `127.0.0.2`; every
    /// 127/8 address works on Linux loopback), to test per-IP rules.
    pub fn connect_from(local_ip: &str, port: u16) -> SmtpClient {
        let ip: IpAddr = local_ip.parse().expect("local_ip is an IP address");
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(SocketAddr::new(ip, 0)),
            socket2::Type::STREAM,
            None,
        )
        .expect("create socket");
        socket
            .bind(&SocketAddr::new(ip, 0).into())
            .unwrap_or_else(|e| panic!("bind {local_ip}: {e}"));
        let target = SocketAddr::new(
            if ip.is_ipv4() {
                [127, 0, 0, 1].into()
            } else {
                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
            },
            port,
        );
        socket
            .connect(&target.into())
            .unwrap_or_else(|e| panic!("connect {target} from {local_ip}: {e}"));
        SmtpClient::from_tcp(socket.into())
    }

    /// Connect to 127.0.0.1:`port` and do a TLS handshake at once (implicit TLS listener),
    /// trusting only `cert` (PEM) and expecting it to be valid for `localhost`.
    pub fn connect_tls(port: u16, cert: &Path) -> SmtpClient {
        let mut client = SmtpClient::connect(port);
        client.upgrade_tls(cert, "localhost");
        client
    }

    fn from_tcp(tcp: TcpStream) -> SmtpClient {
        tcp.set_read_timeout(Some(READ_TIMEOUT))
            .expect("set read timeout");
        tcp.set_nodelay(true).expect("set nodelay");
        let conn = Box::new(tcp.try_clone().expect("clone socket"));
        SmtpClient {
            tcp,
            conn,
            buf: Vec::new(),
            transcript: String::new(),
        }
    }

    /// The client's local address (what the relay sees as the peer).
    pub fn local_addr(&self) -> SocketAddr {
        self.tcp.local_addr().expect("local addr")
    }

    /// Send `STARTTLS`, expect 220, and do the TLS handshake trusting only `cert` for
    /// `localhost`. Panics if the server sent anything after its 220 before the handshake.
    pub fn starttls(&mut self, cert: &Path) {
        self.expect("STARTTLS", 220);
        self.upgrade_tls(cert, "localhost");
    }

    /// Replace the plain stream by a TLS stream (handshake completes before returning).
    pub fn upgrade_tls(&mut self, cert: &Path, server_name: &str) {
        assert!(
            self.buf.is_empty(),
            "server sent {:?} before the TLS handshake\n{}",
            String::from_utf8_lossy(&self.buf),
            self.transcript
        );
        let name = ServerName::try_from(server_name.to_owned()).expect("valid server name");
        let conn = ClientConnection::new(tls_client_config(cert), name).expect("TLS client");
        let mut tls = StreamOwned::new(conn, self.tcp.try_clone().expect("clone socket"));
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .unwrap_or_else(|e| panic!("TLS handshake: {e}\n{}", self.transcript));
        }
        self.transcript.push_str("-- TLS --\n");
        self.conn = Box::new(tls);
    }

    /// Write raw bytes, as is.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.transcript.push_str(&format!(
            "C: {}\n",
            String::from_utf8_lossy(bytes).trim_end()
        ));
        self.conn
            .write_all(bytes)
            .and_then(|()| self.conn.flush())
            .unwrap_or_else(|e| panic!("send: {e}\n{}", self.transcript));
    }

    /// Read one complete reply, multi-line replies joined: `(code, text)` where `text` is every
    /// line without its CRLF, joined with `\n` (`"250-a\n250 b"`). Panics on a malformed reply,
    /// a timeout or the connection closing first.
    pub fn read_reply(&mut self) -> (u16, String) {
        match self.try_read_reply() {
            Ok(Some(reply)) => reply,
            Ok(None) => panic!(
                "connection closed while waiting for a reply\n{}",
                self.transcript
            ),
            Err(e) => panic!("reading a reply: {e}\n{}", self.transcript),
        }
    }

    /// Like [`SmtpClient::read_reply`], but `Ok(None)` when the connection closes before a
    /// reply starts, and read errors are returned.
    pub fn try_read_reply(&mut self) -> io::Result<Option<(u16, String)>> {
        let mut lines: Vec<String> = Vec::new();
        let mut code = 0;
        loop {
            let Some(line) = self.read_line()? else {
                if lines.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed mid-reply",
                ));
            };
            self.transcript.push_str(&format!("S: {line}\n"));
            let bytes = line.as_bytes();
            let this_code = line
                .get(..3)
                .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| bad_reply(&line))?;
            if lines.is_empty() {
                code = this_code;
            } else if this_code != code {
                return Err(bad_reply(&line));
            }
            let last = match bytes.get(3) {
                None | Some(b' ') => true,
                Some(b'-') => false,
                Some(_) => return Err(bad_reply(&line)),
            };
            lines.push(line);
            if last {
                return Ok(Some((code, lines.join("\n"))));
            }
        }
    }

    /// One CRLF-terminated line (CRLF stripped); `None` at EOF with nothing buffered.
    fn read_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).take(pos).collect();
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            let mut chunk = [0u8; 4096];
            match self.conn.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "closed after partial line {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Send `line` + CRLF and read one reply.
    pub fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    /// Send `line`, panic (with the dialogue) unless the reply code is `code`; the reply text.
    pub fn expect(&mut self, line: &str, code: u16) -> String {
        let (got, text) = self.cmd(line);
        assert_eq!(
            got, code,
            "{line:?}: expected {code}, got {text:?}\n{}",
            self.transcript
        );
        text
    }

    /// Read the greeting (or any pending reply), panic unless its code is `code`.
    pub fn expect_reply(&mut self, code: u16) -> String {
        let (got, text) = self.read_reply();
        assert_eq!(
            got, code,
            "expected {code}, got {text:?}\n{}",
            self.transcript
        );
        text
    }

    /// MAIL FROM, RCPT TO for each recipient, DATA, then `body` and the final dot. The body's
    /// line ends are normalised to CRLF, lines starting with `.` are dot-stuffed, and a final
    /// CRLF is added if missing. Stops at the first reply that is not 2xx (MAIL, RCPT) or 354
    /// (DATA) and returns it; otherwise returns the reply to the final dot.
    pub fn send_message(&mut self, from: &str, rcpts: &[&str], body: &str) -> (u16, String) {
        let reply = self.cmd(&format!("MAIL FROM:<{from}>"));
        if reply.0 / 100 != 2 {
            return reply;
        }
        for rcpt in rcpts {
            let reply = self.cmd(&format!("RCPT TO:<{rcpt}>"));
            if reply.0 / 100 != 2 {
                return reply;
            }
        }
        let reply = self.cmd("DATA");
        if reply.0 != 354 {
            return reply;
        }
        self.send_raw(&dot_stuff(body));
        self.send_raw(b".\r\n");
        self.read_reply()
    }

    /// Read until the server closes the connection; what was received (a reset counts as a
    /// close). Panics if the server keeps it open past [`READ_TIMEOUT`].
    pub fn read_to_close(&mut self) -> String {
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 4096];
        loop {
            match self.conn.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "server did not close the connection within {READ_TIMEOUT:?}\n{}",
                        self.transcript
                    )
                }
                Err(e) => panic!("read_to_close: {e}\n{}", self.transcript),
            }
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        self.transcript
            .push_str(&format!("S: {}\n", text.trim_end()));
        text
    }

    /// The dialogue so far, `C:`/`S:` lines.
    pub fn transcript(&self) -> &str {
        &self.transcript
    }
}

fn bad_reply(line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed reply line {line:?}"),
    )
}

/// `body` as DATA content: CRLF line ends, leading dots doubled, ending in CRLF (without the
/// terminating `.` line).
pub fn dot_stuff(body: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let body = body.strip_suffix('\n').unwrap_or(body);
    let body = body.strip_suffix('\r').unwrap_or(body);
    if body.is_empty() {
        return out;
    }
    for line in body.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('.') {
            out.push(b'.');
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A relay with an `mx` listener accepting mail for example.com, whose upstream (`up`) port is
/// closed so accepted mail stays queued; `extra` tables follow `[relay]`.
pub fn example_com_relay(extra: &str) -> Relay {
    Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        free_port(),
        &format!("[relay]\naccepted_domains = [\"example.com\"]\n\n{extra}"),
    ))
}

/// Send one message per sender to user@example.com over one session (`Subject: from
/// SENDER`), each asserted `250`; their queue ids, in order.
pub fn send_from(relay: &Relay, senders: &[&str]) -> Vec<String> {
    let mut c = SmtpClient::greeted(relay.port(0));
    let ids = senders
        .iter()
        .map(|from| {
            let (code, reply) = c.send_message(
                from,
                &["user@example.com"],
                &format!("Subject: from {from}\n\nhello\n"),
            );
            assert_eq!(code, 250, "{reply}");
            queue_id(&reply).expect("queue id in reply")
        })
        .collect();
    c.expect("QUIT", 221);
    ids
}

/// A command's exit status, stdout and stderr, for an assertion's message.
pub fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}stderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The queue id in a `250 2.0.0 Ok: queued as ID` reply.
pub fn queue_id(reply_text: &str) -> Option<String> {
    let rest = &reply_text[reply_text.find("queued as ")? + "queued as ".len()..];
    let id: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    (!id.is_empty()).then_some(id)
}

/// A rustls client configuration (aws-lc-rs) trusting only the certificates in the PEM file
/// `cert`.
pub fn tls_client_config(cert: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(cert).unwrap_or_else(|e| panic!("{}: {e}", cert.display()))
    {
        roots
            .add(c.expect("PEM certificate"))
            .expect("add trust anchor");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Run `swaks` with `args`. The swaks tests are part of the suite, not optional: without
/// swaks they fail with this message rather than pass without testing anything.
pub fn swaks(args: &[&str]) -> Output {
    Command::new("swaks")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("swaks is required by the integration tests: apt-get install -y swaks")
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The argon2id hash of `password`, made with `portcullis passwd`.
pub fn passwd(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn portcullis passwd");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "portcullis passwd failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The argon2id hash of `secret`, made once with `portcullis passwd`.
pub fn secret_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| passwd("secret"))
}

/// Every entry of the audit log of the spool at `spool`, as `portcullis audit --json` prints
/// them, oldest first.
#[track_caller]
pub fn audit_entries(spool: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["audit", "--json", "--spool"])
        .arg(spool)
        .output()
        .expect("spawn portcullis");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Each audit entry as (command, args, affected).
pub fn audit_summary(
    entries: &[serde_json::Value],
) -> Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> {
    (entries.iter())
        .map(|e| {
            let field = |name: &str| e[name].clone();
            (field("command"), field("args"), field("affected"))
        })
        .collect()
}

/// `users.toml` in `dir`: `alice` and `bob`, both with the password `secret`, each sending as
/// LOGIN@example.com.
pub fn write_alice_and_bob(dir: &TestDir) {
    let hash = secret_hash();
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\nsenders = [\"alice@example.com\"]\n\n\
             [[users]]\nname = \"bob\"\npassword_hash = \"{hash}\"\nsenders = [\"bob@example.com\"]\n"
        ),
    );
}

/// Connected from `ip`, through STARTTLS and EHLO again: ready for AUTH.
pub fn tls_from(relay: &Relay, ip: &str) -> SmtpClient {
    let mut c = SmtpClient::connect_from(ip, relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c.starttls(&relay.cert_path());
    c.expect("EHLO client.test", 250);
    c
}

/// Send one message as `login` (password `secret`, through STARTTLS from 127.0.0.1, from
/// LOGIN@example.com) to rcpt@dest.example with `Subject: tag`, in its own session; its queue id.
pub fn send_as(relay: &Relay, login: &str, tag: &str) -> String {
    let mut c = tls_from(relay, "127.0.0.1");
    assert_reply(&c.cmd(&auth_plain(login, "secret")), 235, "2.7.0");
    let (code, reply) = c.send_message(
        &format!("{login}@example.com"),
        &["rcpt@dest.example"],
        &format!("From: <{login}@example.com>\nSubject: {tag}\n\nhello\n"),
    );
    assert_eq!(code, 250, "{reply}");
    c.expect("QUIT", 221);
    queue_id(&reply).expect("queue id")
}

/// `AUTH PLAIN` with the initial response for `user` and `pass` (RFC 4616).
pub fn auth_plain(user: &str, pass: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
    format!("AUTH PLAIN {token}")
}

/// `portcullis check-config` on `text` (with `{dir}` expanded), which must pass: its report
/// and warnings, stdout then stderr.
pub fn check_config(dir: &TestDir, text: &str) -> String {
    let path = dir.write("check.toml", dir.expand(text));
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("spawn portcullis");
    assert!(out.status.success(), "{out:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
