//! The crash loop (RELIABILITY.md): the real relay under mixed load (plain and STARTTLS
//! sessions, one or three recipients, small and 1 MB messages, an upstream that accepts, defers,
//! drops the connection at DATA, closes after its `250` or answers slowly) is killed again and
//! again, and after every kill the spool and the upstream are checked:
//!
//! - every message acknowledged with `250` was delivered or is queued, with its bytes intact
//!   and its recipients;
//! - nothing is half-visible: every file in `queue/` is a complete message (a message whose
//!   `250` the kill cut off may be queued, whole; never a part of one), `rejected/` stays empty;
//! - no message reaches the upstream twice in one life of the relay, and a later delivery of a
//!   delivered message happens only when it was still queued after the kill that ended the
//!   earlier life: a delivery cut after the final dot, before the relay could record it.
//!
//! Half the rounds end with `SIGKILL` at a random moment. The others end at a named step of the
//! failpoint build (`src/failpoint.rs`), armed with `FAILPOINTS=STEP=return(crash)` so that the
//! process kills itself exactly there: the commit's write, fsync, rename and directory fsync
//! and the moment before its `250`; the replacement of a delivery state; a message's removal;
//! right after the upstream's reply to the final dot; inside a `queue` command, which runs as
//! its own process (`queue retry`, `hold`, `release`, `delete`, `purge`, `purge --quarantine`,
//! `restore`, and `adopt` of a node killed for the purpose); when the relay has taken a
//! `queue hold` and not yet recorded it; during the startup recovery. The first
//! rounds take every step once, so every run of at least that many rounds hits each of them;
//! a step a round did not reach fails the test. The run ends with a life without a crash that
//! delivers everything still queued, and every acknowledged message must then have arrived.
//!
//! `PORTCULLIS_CRASH_ROUNDS` (by default one round per step, `failpoint::STEPS.len()`: what
//! `.ci/run` runs; `bench/crash-loop` runs 1,000) and `PORTCULLIS_CRASH_SEED` (random by default; printed, to replay a run). Each round
//! prints one line; the last line sums the run up.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::process::ExitStatusExt as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use portcullis::failpoint::STEPS;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::sink::{AfterDot, Sink, SinkConfig, Stage};
use common::*;

/// Client threads sending during a round (half of them over STARTTLS).
const CLIENTS: usize = 4;
/// A round that ends at a step kills the relay from outside if the step was not reached by
/// then (and fails the run).
const STEP_DEADLINE: Duration = Duration::from_secs(4);
/// How long the relay may take to listen after its start.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long the last life may take to deliver what is left.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// One line of a message body: 60 octets with its CRLF.
const LINE: usize = 60;
/// Queued messages above which a round that may choose its upstream chooses one that accepts.
const BACKLOG: usize = 500;
/// Pause of a client between two messages (each client sends about 30 a second at most).
const PACE: Duration = Duration::from_millis(30);
/// Lines of a 1 MB message.
const BIG_LINES: usize = 17_000;
/// The envelope sender of every message the clients send.
const SENDER: &str = "load@example.org";
/// An orphan delivery state planted for the `recover.orphan` step (its message never existed).
const ORPHAN_STATE: &str = "0000000000000000.state";

#[test]
fn acknowledged_mail_survives_a_crash_at_any_moment() {
    let rounds: usize = env_or("PORTCULLIS_CRASH_ROUNDS", crash_steps().len());
    let seed: u64 = env_or("PORTCULLIS_CRASH_SEED", rand::random());
    eprintln!("crash loop: {rounds} rounds, PORTCULLIS_CRASH_SEED={seed}");
    quiet_client_panics();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut run = Run::new();
    for round in 0..rounds {
        let plan = Plan::for_round(round, &mut rng, run.queued_now.len());
        let started = Instant::now();
        let outcome = run.round(round, &plan, &mut rng);
        run.check(round);
        let took = started.elapsed();
        run.longest = run.longest.max(took);
        run.total += took;
        eprintln!(
            "round {round:4}: {:<28} {:<14} {:>5} ms, {} acknowledged in all, {} queued",
            plan.describe(),
            outcome,
            took.as_millis(),
            run.acknowledged(),
            run.queued_now.len()
        );
    }
    run.drain(rounds);
    run.report(rounds);
}

/// What ends a round, and how the upstream behaves during it.
struct Plan {
    end: End,
    /// Arm the step after this many hits (`N*off->return(crash)`), to vary the moment.
    skip: usize,
    upstream: Upstream,
}

#[derive(Clone, Copy)]
enum End {
    /// `SIGKILL` from outside, this long after the relay listens.
    Kill(Duration),
    /// The relay, or a `queue` command run beside it, kills itself at this step.
    Step(&'static str),
}

/// The upstream's behaviour for a round.
#[derive(Clone, Copy, Debug)]
enum Upstream {
    Accepts,
    /// `451` to MAIL: everything stays queued, with a delivery state.
    Defers,
    /// Defers for a while, then accepts: messages delivered after a deferral (their state
    /// file is removed with them).
    DefersThenAccepts,
    /// Closes the connection on DATA.
    DropsAtData,
    /// Answers `250` to the final dot, then closes.
    ClosesAfterReply,
    /// Takes 300 ms to answer the final dot.
    Slow,
}

impl Plan {
    /// The first `STEPS.len()` rounds take every step once, in order; then the rounds
    /// alternate between a random kill and the steps again. With more than [`BACKLOG`]
    /// messages queued (`backlog`), a round free to choose its upstream takes one that accepts.
    fn for_round(round: usize, rng: &mut StdRng, backlog: usize) -> Plan {
        let steps = crash_steps();
        let end = if round < steps.len() {
            End::Step(steps[round])
        } else if (round - steps.len()).is_multiple_of(2) {
            End::Kill(Duration::from_millis(rng.random_range(200..2500)))
        } else {
            End::Step(steps[((round - steps.len()) / 2) % steps.len()])
        };
        let upstream = match end {
            End::Step(step) if step.starts_with("spool.state.") => Upstream::Defers,
            // Mail stays queued for the commands to act on.
            End::Step(step) if matches!(where_of(step), Where::Command | Where::Taking) => {
                Upstream::Defers
            }
            End::Step("spool.remove.state") => Upstream::DefersThenAccepts,
            End::Step("deliver.after_dot" | "spool.remove.unlink") => Upstream::Accepts,
            // Half the steps need the upstream deferring: the other rounds let a backlog drain,
            // so that rounds stay short over a long run.
            _ if backlog > BACKLOG => Upstream::Accepts,
            _ => [
                Upstream::Accepts,
                Upstream::Accepts,
                Upstream::Defers,
                Upstream::DefersThenAccepts,
                Upstream::DropsAtData,
                Upstream::ClosesAfterReply,
                Upstream::Slow,
            ][rng.random_range(0..7)],
        };
        let skip = match end {
            End::Step("spool.write") => rng.random_range(0..40),
            // Reached once per start or command.
            End::Step(step) if !matches!(where_of(step), Where::Relay) => 0,
            End::Step(_) => rng.random_range(0..4),
            End::Kill(_) => 0,
        };
        Plan {
            end,
            skip,
            upstream,
        }
    }

    fn describe(&self) -> String {
        match self.end {
            End::Kill(after) => format!("kill after {} ms", after.as_millis()),
            End::Step(step) => format!("{step} #{}", self.skip + 1),
        }
    }

    /// The `FAILPOINTS` value arming this round's step.
    fn failpoints(&self) -> Option<String> {
        let End::Step(step) = self.end else {
            return None;
        };
        Some(match self.skip {
            0 => format!("{step}=return(crash)"),
            n => format!("{step}={n}*off->return(crash)"),
        })
    }
}

/// Every step except the error-only ones: a crash can happen anywhere.
fn crash_steps() -> &'static [&'static str] {
    STEPS
}

/// Where a step runs.
enum Where {
    /// In the relay, during the load.
    Relay,
    /// In the relay's startup recovery (a planted file makes it act).
    Recovery,
    /// In a `queue` command run during the load.
    Command,
    /// In the relay, once it takes the request of a `queue` command run during the load.
    Taking,
}

/// The `queue` command a command round crashes.
#[derive(Clone, Copy)]
enum Cmd {
    Retry,
    Hold,
    Release,
    Delete,
    Purge,
    Quarantine,
    Restore,
    Adopt,
}

impl Cmd {
    const ALL: [Cmd; 8] = [
        Cmd::Retry,
        Cmd::Hold,
        Cmd::Release,
        Cmd::Delete,
        Cmd::Purge,
        Cmd::Quarantine,
        Cmd::Restore,
        Cmd::Adopt,
    ];

    fn name(self) -> &'static str {
        match self {
            Cmd::Retry => "retry",
            Cmd::Hold => "hold",
            Cmd::Release => "release",
            Cmd::Delete => "delete",
            Cmd::Purge => "purge",
            Cmd::Quarantine => "purge --quarantine",
            Cmd::Restore => "restore",
            Cmd::Adopt => "adopt",
        }
    }
}

/// Owned arguments of a `queue` command.
fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn where_of(step: &str) -> Where {
    if step.starts_with("recover.") {
        Where::Recovery
    } else if step == "control.take" {
        Where::Taking
    } else if step.starts_with("control.")
        || matches!(
            step,
            "spool.remove.dir_fsync" | "quarantine.move" | "restore.move" | "adopt.ledger"
        )
    {
        // `queue retry` writes a control file; `queue delete` removes with a directory fsync
        // (the relay's own removals of delivered mail leave that fsync to the next commit).
        Where::Command
    } else {
        Where::Relay
    }
}

/// One message sent by a client: its tag says everything needed to check it (see [`tag`]).
#[derive(Default)]
struct Sent {
    acknowledged: bool,
    /// A `queue delete` was run on it: it may be gone.
    deleted: bool,
    /// Lives (rounds) in which it reached the upstream.
    delivered: Vec<usize>,
}

/// What the clients sent, shared with their threads.
#[derive(Default)]
struct Ledger {
    sent: Mutex<HashMap<String, Sent>>,
    /// Replies other than `250` and `4xx` (there must be none).
    refused: Mutex<Vec<String>>,
}

impl Ledger {
    fn sent(&self) -> MutexGuard<'_, HashMap<String, Sent>> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Run {
    dir: TestDir,
    config: PathBuf,
    ports: Vec<u16>,
    spool: PathBuf,
    cert: PathBuf,
    sink: Sink,
    ledger: Arc<Ledger>,
    /// Tags queued after the latest check.
    queued_now: HashSet<String>,
    /// The files of `queue/` checked at the latest check, with their tags.
    checked: HashMap<PathBuf, String>,
    /// Times each step was reached.
    hits: BTreeMap<&'static str, usize>,
    /// Times each `queue` command was killed at a step.
    commands: BTreeMap<&'static str, usize>,
    /// Rounds killed at a `control.*` step in a command, which takes the six commands that
    /// write a request in turn.
    control_rounds: usize,
    kills: usize,
    duplicates: usize,
    longest: Duration,
    total: Duration,
}

impl Run {
    fn new() -> Run {
        let dir = TestDir::new();
        write_certs(&dir.join("certs"));
        let sink = Sink::start(SinkConfig::default());
        let (mx, submission) = (free_port(), free_port());
        let config = dir.write(
            "portcullis.toml",
            relay_config(&dir, "spool", mx, submission, sink.port()),
        );
        Run {
            spool: dir.join("spool"),
            cert: dir.join("certs/cert.pem"),
            config,
            ports: vec![mx, submission],
            dir,
            sink,
            ledger: Arc::default(),
            queued_now: HashSet::new(),
            checked: HashMap::new(),
            hits: BTreeMap::new(),
            commands: BTreeMap::new(),
            control_rounds: 0,
            kills: 0,
            duplicates: 0,
            longest: Duration::ZERO,
            total: Duration::ZERO,
        }
    }
}

/// The policy of a relay with its spool in `dir/spool`, listening on `mx` (plain) and
/// `submission` (STARTTLS), relaying for loopback to the sink on `upstream`.
fn relay_config(dir: &TestDir, spool: &str, mx: u16, submission: u16, upstream: u16) -> String {
    dir.expand(&format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/{spool}\"\n\n\
             [tls]\ncert = \"{{dir}}/certs/cert.pem\"\nkey = \"{{dir}}/certs/key.pem\"\n\n\
             {}\n{}\n\
             [relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n\
             [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n\
             backoff = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"2s\"\n\n\
             [queue]\nretry = [\"1s\"]\ndelivery_grace = \"0s\"\n",
        listener("mx", mx, "none"),
        listener("submission", submission, "starttls"),
        upstream
    ))
}

impl Run {
    /// One life of the relay, under load until it dies as `plan` says; what ended it.
    fn round(&mut self, round: usize, plan: &Plan, rng: &mut StdRng) -> &'static str {
        self.sink.set_config(sink_config(plan.upstream));
        let step = match plan.end {
            End::Step(step) => Some(step),
            End::Kill(_) => None,
        };
        let relay_failpoints = match step.map(where_of) {
            Some(Where::Recovery) => {
                self.plant(step.unwrap_or_default());
                plan.failpoints()
            }
            Some(Where::Relay | Where::Taking) => plan.failpoints(),
            Some(Where::Command) | None => None,
        };
        let log = self.dir.join(format!("relay-{round}.log"));
        let mut child = match self.start(relay_failpoints.as_deref(), &log) {
            Ok(child) => child,
            Err(status) => {
                // Only a step armed in the relay may stop a start: the recovery's, or one the
                // delivery of what is queued reaches before every listener is up.
                let step = step
                    .filter(|_| relay_failpoints.is_some())
                    .unwrap_or_else(|| {
                        panic!(
                            "the relay exited during its start ({status}):\n{}",
                            read(&log)
                        )
                    });
                self.expect_crash(step, status, &read(&log));
                let _ = fs::remove_file(&log);
                return "crashed at start";
            }
        };
        if let Some(step) = step.filter(|s| matches!(where_of(s), Where::Recovery)) {
            // The recovery of queue/ runs while the relay listens (`queue::recover`).
            let status = self.wait_for_step(&mut child, Instant::now(), false);
            let status = status.unwrap_or_else(|| {
                panic!("{step} was not reached: the relay started\n{}", read(&log))
            });
            self.expect_crash(step, status, &read(&log));
            let _ = fs::remove_file(&log);
            return "crashed recovering";
        }

        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|n| {
                let port = self.ports[n % 2];
                let tls = (n % 2 == 1).then(|| self.cert.clone());
                let (stop, ledger) = (stop.clone(), self.ledger.clone());
                let seed = rng.random();
                thread::Builder::new()
                    .name(format!("load-{n}"))
                    .spawn(move || load(port, tls, round, n, seed, &stop, &ledger))
                    .expect("spawn a client")
            })
            .collect();

        let listening = Instant::now();
        let outcome = match plan.end {
            End::Kill(after) => {
                let status = wait_exit(&mut child, after);
                assert!(
                    status.is_none(),
                    "the relay exited by itself ({status:?}):\n{}",
                    read(&log)
                );
                "killed"
            }
            End::Step(step) => {
                if matches!(where_of(step), Where::Command) {
                    self.run_command(step, plan, round, rng, &log);
                    // The relay goes on; it dies at a random moment after the command.
                    let after = Duration::from_millis(rng.random_range(100..800));
                    assert!(wait_exit(&mut child, after).is_none(), "{}", read(&log));
                    "command crashed"
                } else {
                    let taking = matches!(where_of(step), Where::Taking);
                    if taking {
                        // A hold for the relay to take; it dies before recording it.
                        self.wait_for_queued()
                            .unwrap_or_else(|| panic!("nothing queued to hold:\n{}", read(&log)));
                        let out = self.queue_command(&hold_args("hold"), None);
                        assert!(out.status.success(), "queue hold: {}", show(&out));
                    }
                    let switch = matches!(plan.upstream, Upstream::DefersThenAccepts);
                    let status = self.wait_for_step(&mut child, listening, switch);
                    let status = status.unwrap_or_else(|| {
                        panic!(
                            "{step} was not reached within {STEP_DEADLINE:?}:\n{}",
                            read(&log)
                        )
                    });
                    self.expect_crash(step, status, &read(&log));
                    if taking {
                        // The next life applies the hold it did not record, then this.
                        let out = self.queue_command(&hold_args("release"), None);
                        assert!(out.status.success(), "queue release: {}", show(&out));
                    }
                    "crashed"
                }
            }
        };
        if matches!(plan.end, End::Kill(_)) {
            self.kills += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.join().expect("a client thread");
        }
        let _ = fs::remove_file(&log);
        outcome
    }

    /// Start a life of the relay (appending to `log`): the child once it listens, or how it
    /// exited before.
    fn start(&self, failpoints: Option<&str>, log: &Path) -> Result<Life, ExitStatus> {
        self.start_node(&self.config, &self.ports, failpoints, log)
    }

    /// Start a relay on `config`, listening on `ports`: the child once it listens on all of
    /// them, or how it exited before.
    fn start_node(
        &self,
        config: &Path,
        ports: &[u16],
        failpoints: Option<&str>,
        log: &Path,
    ) -> Result<Life, ExitStatus> {
        let out = fs::File::create(log).expect("create the relay log");
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(config)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log"))
            .stderr(out);
        if let Some(failpoints) = failpoints {
            cmd.env("FAILPOINTS", failpoints);
        }
        let mut child = Life(cmd.spawn().expect("spawn portcullis run"));
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for the relay") {
                return Err(status);
            }
            let text = read(log);
            let listening = ports.iter().all(|port| {
                text.lines()
                    .any(|l| l.contains(" listening ") && l.ends_with(&format!(":{port}")))
            });
            if listening {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the relay did not listen within {START_LIMIT:?}:\n{text}");
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// Put in place what makes a recovery step act: a leftover in `tmp/` (a message whose
    /// sender vanished mid-DATA), or an orphan delivery state.
    fn plant(&self, step: &str) {
        match step {
            "recover.tmp" => fs::write(
                self.spool.join("tmp/crashloop-unfinished"),
                b"PORTCULLIS-SPOOL 1\n",
            ),
            _ => fs::write(self.spool.join("queue").join(ORPHAN_STATE), b"{}"),
        }
        .expect("plant a file for the recovery");
    }

    /// Wait for the relay to die at its armed step; `None` if it did not within
    /// [`STEP_DEADLINE`]. With `switch`, the upstream starts accepting after 1.3 s.
    fn wait_for_step(
        &self,
        child: &mut Life,
        listening: Instant,
        mut switch: bool,
    ) -> Option<ExitStatus> {
        while listening.elapsed() < STEP_DEADLINE {
            if let Some(status) = child.try_wait().expect("wait for the relay") {
                return Some(status);
            }
            if switch && listening.elapsed() > Duration::from_millis(1300) {
                self.sink.set_config(sink_config(Upstream::Accepts));
                switch = false;
            }
            sleep(Duration::from_millis(5));
        }
        None
    }

    /// Run the `queue` command that reaches `step`, armed to crash there, and what an
    /// operator would run after it (a `hold` undone, a quarantine restored, an adopt run
    /// again).
    fn run_command(
        &mut self,
        step: &'static str,
        plan: &Plan,
        round: usize,
        rng: &mut StdRng,
        log: &Path,
    ) {
        // The steps shared by several commands take each in turn.
        let turn = self.hits.get(step).copied().unwrap_or_default();
        let command = match step {
            "quarantine.move" => Cmd::Quarantine,
            "restore.move" => Cmd::Restore,
            "adopt.ledger" => Cmd::Adopt,
            "spool.remove.dir_fsync" => [Cmd::Delete, Cmd::Purge][turn % 2],
            _ => {
                self.control_rounds += 1;
                [
                    Cmd::Retry,
                    Cmd::Hold,
                    Cmd::Release,
                    Cmd::Quarantine,
                    Cmd::Restore,
                    Cmd::Adopt,
                ][(self.control_rounds - 1) % 6]
            }
        };
        // A command with nothing to act on writes nothing: wait for mail in the queue.
        let (id, tag) = self
            .wait_for_queued()
            .unwrap_or_else(|| panic!("nothing queued for the command:\n{}", read(log)));
        *self.commands.entry(command.name()).or_default() += 1;
        let armed = plan.failpoints();
        let crash = |run: &mut Run, args: &[String]| {
            let out = run.queue_command(args, armed.as_deref());
            run.expect_crash(step, out.status, &String::from_utf8_lossy(&out.stderr));
        };
        match command {
            Cmd::Retry => crash(self, &args(&["retry", "--all"])),
            Cmd::Hold => {
                crash(self, &hold_args("hold"));
                // A hold that landed despite the crash (it did when only the directory fsync
                // was cut short) would keep the mail queued for good: undone.
                self.command_ok(&hold_args("release"));
            }
            Cmd::Release => crash(self, &hold_args("release")),
            Cmd::Delete => {
                self.ledger.sent().entry(tag).or_default().deleted = true;
                crash(self, &args(&["delete", &id]));
            }
            Cmd::Purge => {
                // The upstream defers: nothing leaves the queue but by the purge, which dies
                // at the fsync after its first removal.
                let before = self.queued_tags();
                crash(self, &args(&["purge", "--from", SENDER]));
                let after = self.queued_tags();
                let gone: Vec<_> = before.difference(&after).collect();
                assert!(
                    gone.len() <= 1,
                    "purge removed {gone:?} before its first fsync"
                );
                let mut sent = self.ledger.sent();
                for tag in gone {
                    sent.entry(tag.clone()).or_default().deleted = true;
                }
            }
            Cmd::Quarantine => {
                crash(self, &args(&["purge", "--quarantine", "--from", SENDER]));
                self.command_ok(&args(&["restore", "--all"]));
            }
            Cmd::Restore => {
                self.command_ok(&args(&["purge", "--quarantine", "--from", SENDER]));
                crash(self, &args(&["restore", "--all"]));
                self.command_ok(&args(&["restore", "--all"]));
            }
            Cmd::Adopt => {
                let dead = self.dead_node(round, rng);
                let dead = dead.to_string_lossy().into_owned();
                crash(self, &args(&["adopt", &dead]));
                self.command_ok(&args(&["adopt", &dead]));
            }
        }
    }

    /// Run `portcullis queue ARGS` unarmed; it must succeed.
    #[track_caller]
    fn command_ok(&self, args: &[String]) {
        let out = self.queue_command(args, None);
        assert!(
            out.status.success(),
            "queue {}: {}",
            args.join(" "),
            show(&out)
        );
    }

    /// A node that died with mail queued, for `queue adopt`: a second relay on its own spool
    /// (`node-ROUND/spool`), sent mail by one client until it has queued a few messages (the
    /// upstream defers), then killed. Its messages are in the ledger like any other.
    fn dead_node(&self, round: usize, rng: &mut StdRng) -> PathBuf {
        let name = format!("node-{round}");
        let (mx, submission) = (free_port(), free_port());
        let config = self.dir.write(
            format!("{name}.toml"),
            relay_config(
                &self.dir,
                &format!("{name}/spool"),
                mx,
                submission,
                self.sink.port(),
            ),
        );
        let log = self.dir.join(format!("{name}.log"));
        let mut node = self
            .start_node(&config, &[mx, submission], None, &log)
            .unwrap_or_else(|status| panic!("the node exited ({status}):\n{}", read(&log)));
        let spool = self.dir.join(&name).join("spool");
        let stop = Arc::new(AtomicBool::new(false));
        let client = {
            let (stop, ledger, seed) = (stop.clone(), self.ledger.clone(), rng.random());
            thread::Builder::new()
                .name("load-node".into())
                .spawn(move || load(mx, None, round, CLIENTS, seed, &stop, &ledger))
                .expect("spawn the node's client")
        };
        let queued = wait_until(Duration::from_secs(5), || message_files(&spool).len() >= 3);
        let _ = node.kill();
        let _ = node.wait();
        stop.store(true, Ordering::SeqCst);
        client.join().expect("the node's client");
        assert!(queued, "the node queued nothing:\n{}", read(&log));
        spool
    }

    /// The tags of the messages in `queue/` now.
    fn queued_tags(&self) -> HashSet<String> {
        message_files(&self.spool)
            .iter()
            .filter_map(|path| subject(&parse_spool_file(&fs::read(path).ok()?).1))
            .collect()
    }

    /// `portcullis queue ARGS` on the relay's policy, with `failpoints` armed.
    fn queue_command(&self, args: &[String], failpoints: Option<&str>) -> std::process::Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("queue")
            .args(args)
            .arg("--config")
            .arg(&self.config);
        if let Some(failpoints) = failpoints {
            cmd.env("FAILPOINTS", failpoints);
        }
        cmd.output().expect("spawn portcullis queue")
    }

    /// A message in `queue/` (id, tag), waited for up to 3 s.
    fn wait_for_queued(&self) -> Option<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            for path in message_files(&self.spool) {
                let Ok(bytes) = fs::read(&path) else { continue };
                if let Some(tag) = subject(&parse_spool_file(&bytes).1) {
                    let id = path.file_name().unwrap().to_string_lossy().into_owned();
                    return Some((id, tag));
                }
            }
            sleep(Duration::from_millis(20));
        }
        None
    }

    /// The process died of its own `SIGKILL` at `step`, saying so on stderr.
    #[track_caller]
    fn expect_crash(&mut self, step: &'static str, status: ExitStatus, output: &str) {
        assert!(
            status.signal() == Some(libc::SIGKILL)
                && output.contains(&format!("failpoint {step}: crash")),
            "expected a crash at {step}, got {status}:\n{output}"
        );
        *self.hits.entry(step).or_default() += 1;
    }

    /// After a life ended: the upstream's deliveries of that life and the spool, checked.
    fn check(&mut self, life: usize) {
        // The relay's connections to the upstream are closed with it: once their threads in
        // the sink end, everything that life delivered is recorded.
        assert!(
            wait_until(Duration::from_secs(5), || self.sink.active() == 0),
            "the upstream still has connections open after the relay died"
        );
        let delivered = self.sink.take_messages();
        let mut sent = self.ledger.sent();
        for message in &delivered {
            let tag = check_message(&message.data, &message.rcpts, "delivered");
            let entry = sent
                .get_mut(&tag)
                .unwrap_or_else(|| panic!("delivered {tag}, never sent"));
            if let Some(&last) = entry.delivered.last() {
                assert_ne!(last, life, "{tag} reached the upstream twice in one life");
                assert!(
                    self.queued_now.contains(&tag),
                    "{tag} reached the upstream in life {life} after it left the queue in life {last}"
                );
                self.duplicates += 1;
            }
            entry.delivered.push(life);
        }
        let mut queued = HashSet::new();
        let mut checked = HashMap::new();
        for path in message_files(&self.spool) {
            // A file in queue/ never changes once it is there: one checked at an earlier kill
            // is not read again (1 MB messages waiting through many rounds).
            if let Some(tag) = self.checked.remove(&path) {
                assert!(queued.insert(tag.clone()), "{tag} is queued twice");
                checked.insert(path, tag);
                continue;
            }
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let (envelope, data) = parse_spool_file(&bytes);
            let rcpts: Vec<String> = envelope["recipients"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .filter_map(|r| r["address"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let tag = check_message(&data, &rcpts, &format!("queued as {}", path.display()));
            assert!(sent.contains_key(&tag), "queued {tag}, never sent");
            assert!(queued.insert(tag.clone()), "{tag} is queued twice");
            checked.insert(path, tag);
        }
        self.checked = checked;
        for (tag, entry) in sent.iter() {
            assert!(
                !entry.acknowledged
                    || entry.deleted
                    || !entry.delivered.is_empty()
                    || queued.contains(tag),
                "LOST: {tag} was acknowledged with 250, never delivered, and is not queued"
            );
        }
        drop(sent);
        let rejected = self.spool.join("rejected");
        let rejected: Vec<_> = fs::read_dir(&rejected)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            rejected.is_empty(),
            "the recovery rejected files the relay wrote: {rejected:?}"
        );
        self.queued_now = queued;
    }

    /// A last life without a crash: the upstream accepts, the queue empties, and every
    /// acknowledged message has arrived.
    fn drain(&mut self, life: usize) {
        self.sink.set_config(sink_config(Upstream::Accepts));
        let log = self.dir.join("relay-drain.log");
        let mut child = self
            .start(None, &log)
            .unwrap_or_else(|status| panic!("{status}:\n{}", read(&log)));
        let emptied = wait_until(DRAIN_LIMIT, || message_files(&self.spool).is_empty());
        let left = if emptied {
            String::new()
        } else {
            show(&self.queue_command(&["list".into()], None))
        };
        // SAFETY: kill(2) on our own child has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = child.wait();
        assert!(
            emptied,
            "the queue did not empty within {DRAIN_LIMIT:?}:\n{}\nqueue list:\n{left}",
            read(&log)
        );
        self.check(life);
        let sent = self.ledger.sent();
        for (tag, entry) in sent.iter() {
            assert!(
                !entry.acknowledged || entry.deleted || !entry.delivered.is_empty(),
                "LOST: {tag} was acknowledged with 250 and never delivered"
            );
        }
        let refused = self.ledger.refused.lock().unwrap();
        assert!(
            refused.is_empty(),
            "the relay refused mail for good: {refused:?}"
        );
    }

    fn acknowledged(&self) -> usize {
        self.ledger
            .sent()
            .values()
            .filter(|s| s.acknowledged)
            .count()
    }

    /// The summary line, and every step reached in a run long enough to take them all.
    fn report(&self, rounds: usize) {
        let sent = self.ledger.sent();
        let acknowledged = sent.values().filter(|s| s.acknowledged).count();
        let unacknowledged_delivered = sent
            .values()
            .filter(|s| !s.acknowledged && !s.delivered.is_empty())
            .count();
        eprintln!(
            "crash loop: {rounds} rounds ({} random kills, {} at steps), {} messages sent, \
             {acknowledged} acknowledged, 0 lost, {} delivered twice or more (each after a cut \
             after its final dot), {unacknowledged_delivered} delivered without their 250 \
             (cut after the commit); longest round {} ms, mean {} ms",
            self.kills,
            self.hits.values().sum::<usize>(),
            sent.len(),
            self.duplicates,
            self.longest.as_millis(),
            (self.total / rounds.max(1) as u32).as_millis()
        );
        eprintln!("steps reached: {:?}", self.hits);
        eprintln!("queue commands killed: {:?}", self.commands);
        if rounds >= crash_steps().len() {
            for step in crash_steps() {
                assert!(self.hits.contains_key(step), "{step} was never reached");
            }
        }
        // Three control steps in every `2 * STEPS.len()` rounds after the first `STEPS.len()`.
        if rounds >= 5 * crash_steps().len() {
            for command in Cmd::ALL {
                assert!(
                    self.commands.contains_key(command.name()),
                    "queue {} was never killed",
                    command.name()
                );
            }
        }
    }
}

/// `queue hold` or `queue release` (`verb`) of every message the clients send.
fn hold_args(verb: &str) -> Vec<String> {
    vec![verb.into(), "--from".into(), SENDER.into()]
}

/// The sink's configuration for `upstream`.
fn sink_config(upstream: Upstream) -> SinkConfig {
    let base = SinkConfig::default();
    match upstream {
        Upstream::Accepts => base,
        Upstream::Defers | Upstream::DefersThenAccepts => SinkConfig {
            mail_reply: Some("451 4.3.0 try again later".into()),
            ..base
        },
        Upstream::DropsAtData => SinkConfig {
            drop_after: Some(Stage::Data),
            ..base
        },
        Upstream::ClosesAfterReply => SinkConfig {
            after_dot: AfterDot::ReplyThenClose,
            ..base
        },
        Upstream::Slow => SinkConfig {
            dot_delay: Some(Duration::from_millis(300)),
            ..base
        },
    }
}

/// A client thread: sessions of up to five messages each, until `stop`. A session the relay's
/// death cuts off panics inside the harness's client; that ends the session, not the thread.
fn load(
    port: u16,
    tls: Option<PathBuf>,
    round: usize,
    client: usize,
    seed: u64,
    stop: &AtomicBool,
    ledger: &Ledger,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let session = catch_unwind(AssertUnwindSafe(|| {
            let mut c = SmtpClient::connect(port);
            c.expect_reply(220);
            c.expect("EHLO client.test", 250);
            if let Some(cert) = &tls {
                c.starttls(cert);
                c.expect("EHLO client.test", 250);
            }
            for _ in 0..5 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let lines = if rng.random_range(0..40) == 0 {
                    BIG_LINES
                } else {
                    rng.random_range(3..60)
                };
                let rcpts = if rng.random_bool(0.3) { 3 } else { 1 };
                let tag = tag(round, client, n, lines, rcpts);
                n += 1;
                sleep(PACE);
                ledger.sent().insert(tag.clone(), Sent::default());
                let to: Vec<String> = (0..rcpts).map(|i| format!("u{i}@example.com")).collect();
                let to: Vec<&str> = to.iter().map(String::as_str).collect();
                let (code, text) = c.send_message(SENDER, &to, &message(&tag, lines));
                match code {
                    250 => ledger.sent().get_mut(&tag).expect("recorded").acknowledged = true,
                    400..=499 => break,
                    _ => ledger
                        .refused
                        .lock()
                        .unwrap()
                        .push(format!("{tag}: {text}")),
                }
            }
            c.cmd("QUIT");
        }));
        if session.is_err() {
            sleep(Duration::from_millis(20));
        }
    }
}

/// `r{round}c{client}n{n}l{lines}k{rcpts}`: the message and its recipients follow from it.
fn tag(round: usize, client: usize, n: usize, lines: usize, rcpts: usize) -> String {
    format!("r{round}c{client}n{n}l{lines}k{rcpts}")
}

/// The number after `key` in a tag.
fn tag_field(tag: &str, key: char) -> usize {
    let start = tag.find(key).unwrap_or_else(|| panic!("tag {tag}")) + 1;
    let digits: String = tag[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or_else(|_| panic!("tag {tag}"))
}

/// The message a client sends for `tag`: a few header fields and `lines` lines of 60 octets.
fn message(tag: &str, lines: usize) -> String {
    let mut text = format!(
        "From: <load@example.org>\r\nTo: <u0@example.com>\r\nSubject: {tag}\r\n\
         Message-ID: <{tag}@crash.test>\r\n\r\n"
    );
    text.reserve(lines * LINE);
    for i in 0..lines {
        let line = format!("{tag} {i:07} ");
        text.push_str(&line);
        text.push_str(&"x".repeat(LINE - 2 - line.len()));
        text.push_str("\r\n");
    }
    text
}

/// The tag in the `Subject:` of a message, if it has one.
fn subject(data: &[u8]) -> Option<String> {
    let head = &data[..data.len().min(64 << 10)];
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
}

/// Check that `data` ends with the whole message its tag names (the relay adds header fields
/// above it) and went to its recipients; its tag.
#[track_caller]
fn check_message(data: &[u8], rcpts: &[String], what: &str) -> String {
    let tag = subject(data).unwrap_or_else(|| {
        panic!(
            "HALF-VISIBLE: {what} has no Subject: {:?}",
            String::from_utf8_lossy(&data[..data.len().min(300)])
        )
    });
    let expected = message(&tag, tag_field(&tag, 'l'));
    assert!(
        data.ends_with(expected.as_bytes()),
        "HALF-VISIBLE or DAMAGED: {what} {tag}: {} octets, {} expected at its end",
        data.len(),
        expected.len()
    );
    let mut got: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    got.sort_unstable();
    let want: Vec<String> = (0..tag_field(&tag, 'k'))
        .map(|i| format!("u{i}@example.com"))
        .collect();
    assert_eq!(got, want, "{what} {tag}: recipients");
    tag
}

/// The message files in `spool/queue/`.
fn message_files(spool: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(spool.join("queue")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_none())
        .collect();
    files.sort();
    files
}

/// A life of the relay: killed and reaped when dropped, a failing round included (the panic
/// of a check must not leave a relay running).
struct Life(Child);

impl std::ops::Deref for Life {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Life {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Life {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait up to `limit` for `child` to exit; its status, or `None` if it still runs.
fn wait_exit(child: &mut Life, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the relay") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(5));
    }
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

/// The client threads' sessions end in a panic whenever the relay dies under them: expected,
/// and not worth a backtrace each. Every other panic is printed as usual.
fn quiet_client_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !thread::current()
            .name()
            .is_some_and(|n| n.starts_with("load-"))
        {
            default(info);
        }
    }));
}
