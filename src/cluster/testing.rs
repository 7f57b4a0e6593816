//! A throwaway `redis-server` on loopback for tests (in-process and integration): its own
//! directory, no persistence, `noeviction`, stopped with SIGTERM when dropped. Not used by
//! the relay itself.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` bound to 127.0.0.1.
pub struct TestRedis {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its working directory, removed when dropped.
    dir: PathBuf,
}

impl TestRedis {
    /// Whether `redis-server` is installed.
    pub fn available() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Start one with `maxmemory-policy` `policy` (`noeviction` for a store portcullis
    /// accepts) on a free port; `None` when `redis-server` is not installed (the caller
    /// skips, unless `PORTCULLIS_REQUIRE_REDIS=1`, set by `.ci/run`, when this panics).
    ///
    /// # Panics
    /// When it is required and missing, or does not answer `PING` within 10 s.
    pub fn start_with(policy: &str) -> Option<TestRedis> {
        if !Self::available() {
            assert!(
                std::env::var("PORTCULLIS_REQUIRE_REDIS").as_deref() != Ok("1"),
                "redis-server is required (PORTCULLIS_REQUIRE_REDIS=1) but not installed"
            );
            eprintln!("redis-server not installed: skipped");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = TestRedis {
            child: None,
            port,
            dir: std::env::temp_dir()
                .join(format!("portcullis-redis-{}-{port}", std::process::id())),
        };
        std::fs::create_dir_all(&redis.dir).expect("redis directory");
        redis.launch(policy);
        Some(redis)
    }

    /// [`TestRedis::start_with`] `noeviction`.
    pub fn start() -> Option<TestRedis> {
        Self::start_with("noeviction")
    }

    /// The URL portcullis is configured with.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn launch(&mut self, policy: &str) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--maxmemory", "64mb"])
            .args(["--maxmemory-policy", policy, "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.command(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `redis-cli` against it; its trimmed output, `None` when it failed.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stop it (SIGTERM, then wait): its data is gone (no persistence).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Start it again on the same port, empty, with `noeviction`.
    pub fn restart(&mut self) {
        self.stop();
        self.launch("noeviction");
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
