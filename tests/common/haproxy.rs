//! A real HAProxy (Debian `haproxy`, TCP mode) on loopback in front of relays: started in the
//! foreground on a configuration the test writes, ready once its monitor frontend answers, and
//! stopped on drop. Tests that need it skip when it is missing ([`skip_without_haproxy`]),
//! unless `PORTCULLIS_REQUIRE_HAPROXY=1` (set by `.ci/run`), when they fail instead.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{TestDir, http, line_has_field, show, wait_until};

/// How long HAProxy gets to answer its readiness probe.
pub const HAPROXY_READY: Duration = Duration::from_secs(10);

/// The head of every test configuration: logs to stderr, TCP mode, short timeouts, and the
/// monitor frontend on `ready` that [`Haproxy::start`] probes (it touches no backend: probing a
/// TCP frontend would open a backend connection and send a PROXY header).
pub fn preamble(ready: u16) -> String {
    format!(
        "global\n    log stderr format raw local0 info\n\
         defaults\n    mode tcp\n    log global\n    timeout connect 2s\n    \
         timeout client 30s\n    timeout server 30s\n    timeout check 2s\n\
         frontend ready\n    mode http\n    bind 127.0.0.1:{ready}\n    monitor-uri /ready\n"
    )
}

/// A running `haproxy -db`, stopped (SIGTERM, then waited for) on drop.
pub struct Haproxy {
    child: Child,
    log: PathBuf,
}

impl Haproxy {
    /// Start HAProxy on `cfg` (checked with `haproxy -c`, written to `dir`) and wait up to
    /// [`HAPROXY_READY`] until its monitor frontend on `ready_port` answers `/ready`.
    pub fn start(dir: &TestDir, cfg: &str, ready_port: u16) -> Haproxy {
        let path = dir.write("haproxy.cfg", cfg);
        let log = dir.join("haproxy.log");
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("run haproxy -c");
        assert!(check.status.success(), "haproxy.cfg: {}", show(&check));
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("haproxy.out")).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn haproxy");
        let haproxy = Haproxy { child, log };
        let ready = wait_until(HAPROXY_READY, || {
            http::wait_accepting(ready_port, Duration::from_millis(100))
                && http::get(ready_port, "/ready", &[]).status == 200
        });
        assert!(ready, "haproxy not ready:\n{}", haproxy.log());
        haproxy
    }

    /// What HAProxy logged so far (its stderr: one line per session, server state changes).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SIGTERM is HAProxy's hard stop (it exits by the signal, status 143).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

/// Why HAProxy cannot be used here, if it cannot.
pub fn haproxy_available() -> Result<(), String> {
    match Command::new("haproxy").arg("-v").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("haproxy -v failed: {}", show(&out))),
        Err(e) => Err(format!(
            "haproxy is missing ({e}): apt-get install -y haproxy"
        )),
    }
}

/// True (after saying so on stderr) when `test` must be skipped because HAProxy is missing;
/// panics instead when `PORTCULLIS_REQUIRE_HAPROXY=1`.
#[track_caller]
pub fn skip_without_haproxy(test: &str) -> bool {
    let Err(why) = haproxy_available() else {
        return false;
    };
    assert!(
        std::env::var("PORTCULLIS_REQUIRE_HAPROXY").as_deref() != Ok("1"),
        "PORTCULLIS_REQUIRE_HAPROXY=1 but {why}"
    );
    eprintln!("SKIPPED {test}: {why}");
    true
}

/// The relay's log lines at warning or error level about the load balancer's own connections
/// (HAProxy connects from 127.0.0.1, so that is their peer: its health checks), or about a
/// PROXY header.
pub fn proxy_warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| line_has_field(l, "peer", "127.0.0.1") || l.contains("proxy_header"))
        .collect()
}
