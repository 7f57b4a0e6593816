//! A private Postfix instance as an upstream, for the interoperability tests.
//!
//! [`Postfix::start`] writes a `main.cf` and `master.cf` of its own under the given directory
//! (with its own queue and data directories there), so several instances can run side by side
//! and none touches the system's Postfix. The instance listens on `127.0.0.1:port`, offers
//! STARTTLS with the given certificate, accepts mail from 127.0.0.0/8 for any domain and relays
//! all of it to `[127.0.0.1]:relay_to_port` (a [`super::sink::Sink`]): no DNS, no local
//! delivery. The settings that are easy to get wrong carry a comment saying why.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The Postfix control program; its absence means Postfix is not installed.
pub const POSTFIX: &str = "/usr/sbin/postfix";

/// Environment variable that turns a missing Postfix into a test failure (set by `.ci/run`).
pub const REQUIRE_ENV: &str = "PORTCULLIS_REQUIRE_POSTFIX";

/// How long [`Postfix::start`] waits for the SMTP listener.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Drop`] waits for the master to exit after SIGTERM before killing its group.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval of the polling waits.
const POLL: Duration = Duration::from_millis(20);

/// A running private Postfix. Stopped on drop (its log is printed if the test is panicking).
pub struct Postfix {
    config_dir: PathBuf,
    queue_dir: PathBuf,
    /// stdout and stderr of `postfix start-fg`.
    output_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// The master's PID, read once it listens: stopping must not depend on the directory
    /// still existing (a test may delete it before dropping this).
    master: Option<libc::pid_t>,
    /// The SMTP port it listens on (127.0.0.1).
    pub port: u16,
}

impl Postfix {
    /// Start an instance in `dir` listening on 127.0.0.1:`port`, offering STARTTLS with the PEM
    /// `cert` and `key`, relaying everything to 127.0.0.1:`relay_to_port`. `None` (after
    /// printing why) when Postfix is not installed, unless [`REQUIRE_ENV`] is `1`: then it
    /// panics. Panics if the instance does not come up.
    pub fn start(
        dir: &Path,
        port: u16,
        relay_to_port: u16,
        cert: &Path,
        key: &Path,
    ) -> Option<Postfix> {
        if !Path::new(POSTFIX).exists() {
            assert!(
                std::env::var(REQUIRE_ENV).as_deref() != Ok("1"),
                "{REQUIRE_ENV}=1 but {POSTFIX} is missing: apt-get install -y postfix"
            );
            println!("postfix not installed: skipping");
            return None;
        }
        // Postfix wants absolute paths, and the master's working directory is compared with
        // the queue directory on stop.
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let absolute = |p: &Path| {
            fs::canonicalize(p).unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
        };
        let (dir, cert, key) = (&absolute(dir), &absolute(cert), &absolute(key));
        let config_dir = dir.join("etc");
        let log_path = dir.join("maillog");
        // Only the config and queue directories (root's): `postfix start` creates the queue
        // subdirectories and the data directory with the owners its daemons expect, as
        // `set-permissions` would, in a fraction of the time (that also walks every installed
        // Postfix file).
        for sub in [&config_dir, &dir.join("queue")] {
            fs::create_dir_all(sub).unwrap_or_else(|e| panic!("create {}: {e}", sub.display()));
        }
        write(
            &config_dir.join("main.cf"),
            &main_cf(dir, port, relay_to_port, cert, key),
        );
        write(&config_dir.join("master.cf"), &master_cf(port));
        let mut postfix = Postfix {
            config_dir,
            queue_dir: dir.join("queue"),
            output_path: dir.join("postfix.out"),
            log_path,
            child: None,
            master: None,
            port,
        };
        // postfix-script reports configuration errors on stderr, not in the maillog.
        let output = fs::File::create(&postfix.output_path).expect("create postfix output file");
        let child = Command::new(POSTFIX)
            .arg("-c")
            .arg(&postfix.config_dir)
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("clone output file"))
            .stderr(output)
            .spawn()
            .expect("spawn postfix start-fg");
        postfix.child = Some(child);
        postfix.wait_listening();
        postfix.master = postfix.master_pid();
        Some(postfix)
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        while TcpStream::connect_timeout(&addr, POLL).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "postfix exited during start ({status}); log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "postfix not listening on {addr} after {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            sleep(POLL);
        }
    }

    /// Run `postfix -c DIR args…`.
    fn control(&self, args: &[&str]) -> std::process::Output {
        Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.config_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run postfix")
    }

    /// Its configuration directory (`main.cf`, `master.cf`).
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Its maillog so far, after anything `postfix start-fg` printed.
    pub fn log(&self) -> String {
        let read =
            |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
        format!("{}{}", read(&self.output_path), read(&self.log_path))
    }

    /// Wait until the maillog contains `needle`; false after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.log().contains(needle))
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // `start-fg` runs postfix-script, whose child is the master, leader of a process group
        // of its own. SIGTERM to the master is what `postfix stop` does, without its one-second
        // polling; SIGKILL to the group is its fallback.
        let deadline = Instant::now() + STOP_TIMEOUT;
        let master = self.master.or_else(|| self.master_pid());
        match master.filter(|&pid| self.is_our_master(pid)) {
            Some(pid) => {
                // SAFETY: kill(2) has no memory-safety preconditions; the PID was checked to
                // be this instance's master just above.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                while self.is_our_master(pid) && Instant::now() < deadline {
                    sleep(POLL);
                }
                // The master's children (smtpd, qmgr, …) share its process group and hold
                // the listening socket too; end any that outlive the master, and wait until
                // the group is gone so the port refuses connections when drop returns.
                // SAFETY: as above; a negative PID names the master's process group, which
                // was this instance's a moment ago.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                // SAFETY: signal 0 only checks whether the group still has members.
                while unsafe { libc::kill(-pid, 0) } == 0 && Instant::now() < deadline {
                    sleep(POLL);
                }
            }
            None => {
                let _ = self.control(&["stop"]);
            }
        }
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => sleep(POLL),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- postfix log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

impl Postfix {
    /// The master's PID from `queue/pid/master.pid` (written before it opens its listeners;
    /// polled briefly all the same).
    fn master_pid(&self) -> Option<libc::pid_t> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let pid = fs::read_to_string(self.queue_dir.join("pid/master.pid"))
                .ok()
                .and_then(|text| text.trim().parse().ok());
            if pid.is_some() || Instant::now() > deadline {
                return pid;
            }
            sleep(POLL);
        }
    }

    /// Whether `pid` is alive and is this instance's master (its working directory is the
    /// queue directory), so a recycled PID is never killed.
    fn is_our_master(&self, pid: libc::pid_t) -> bool {
        fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| {
            let cwd = cwd.to_string_lossy();
            let cwd = cwd.strip_suffix(" (deleted)").unwrap_or(&cwd);
            Path::new(cwd) == self.queue_dir
        })
    }
}

/// Write a config file dated a minute ago: Postfix waits, in 300 ms naps, until a config file
/// it reads is at least a second or two old (so as not to read one being edited), which made
/// every start take over two seconds.
fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let a_minute_ago = std::time::SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(a_minute_ago))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

fn main_cf(dir: &Path, port: u16, relay_to_port: u16, cert: &Path, key: &Path) -> String {
    let dir = dir.display();
    let (cert, key) = (cert.display(), key.display());
    format!(
        "\
# Private test instance; written by tests/common/postfix.rs.
compatibility_level = 3.6
# Unique per instance: its own host name, queue, data directory and log.
myhostname = postfix-{port}.test
mydomain = test
myorigin = $myhostname
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
# Without maillog_file_prefixes, a maillog_file outside /var postfix exits 1 silently.
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
# Network: loopback only, relay everything from 127/8 to the sink, never deliver locally.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
local_transport = error:local delivery is disabled
relay_domains =
relayhost = [127.0.0.1]:{relay_to_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject
# No DNS anywhere.
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
# TLS: offered to clients; used to the sink when it offers it, never required.
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtp_tls_security_level = may
smtpd_tls_received_header = yes
message_size_limit = 52428800
biff = no
append_dot_mydomain = no
readme_directory = no
"
    )
}

/// Debian's master.cf services, chroot off (the instance has no chroot jail), smtpd on the
/// private port only.
fn master_cf(port: u16) -> String {
    format!(
        "\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"
    )
}
