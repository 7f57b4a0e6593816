//! The `portcullis` command line: run the relay, check a policy file, manage the queue, hash
//! passwords, make test certificates. `anyhow` lives here only.
//!
//! Exit status: 0 success, 2 bad input or configuration, 1 any other failure.
//!
//! `doctor DOMAIN` exits 0 whenever its checks ran, whatever they found; 2 without
//! `--config` or for a DOMAIN that is not a domain name; 1 when the policy cannot be loaded.
//!
//! `trace QUERY` exits 0 when events match, 1 when none does (said on stderr), 2 for a QUERY
//! that is neither a queue id, a Message-ID, an address nor an IP, a bad `--since`, or no
//! spool (a spool without a journal yet: 1). A journal that is or was stopped is noted on
//! stderr, with the time of its oldest event.
//!
//! `queue retry|delete|hold|release ID…` check every id's syntax first (one malformed id: exit
//! 2, nothing done); an id that is well formed but not queued is reported on stderr, the other
//! ids are still acted on, and the exit status is 1. `queue purge|hold|release` that matches
//! nothing exits 0. `queue retry` skips held messages (saying so for ids given).
//!
//! `queue purge … --quarantine` moves what purge selects into `SPOOL/quarantine/`, with the
//! same exit codes as purge. `queue restore ID…` checks every id's syntax first (exit 2); an
//! id that is not quarantined, or is queued already, is reported on stderr, the others are
//! still restored, and the exit status is 1.
//!
//! `queue adopt DIR` exits 0 when every message of DIR was imported (or was already here),
//! whether or not DIR could be marked (the output says which); 1 when a file of DIR was
//! refused (the others still imported) or this spool stopped the run (free space, I/O: run
//! it again); 2 for a DIR that is not a spool, this spool itself, or one another node adopted.
//!
//! `policy explain` exits 0 whatever the verdict, 2 for an unknown listener, a malformed IP or
//! address, no `--config` or an invalid policy, 1 when the resolver cannot be built.
//!
//! `listeners pause|resume` exit 0 whether or not the marker changed (the output says which),
//! 2 when there is no spool, 1 when the marker cannot be written or removed.
//!
//! `user suspend|resume` exit 0 whether or not the login's state changed (the output says
//! which), 2 without `--config`, for a login neither in the users file nor suspended under the
//! spool, a bad `--reason` or no spool, 1 when the record cannot be written or removed, and
//! (`[cluster] redis`) `resume` 1 when the shared store cannot be reached (nothing changed;
//! `suspend` then records the login on this node alone, exit 0, said on stderr). `user list`
//! exits 0 when the running relay cannot be asked for the counts (they show as `-`, the reason
//! on stderr), or the shared store for its suspensions (this node's shown, said on stderr).
//!
//! Every command that changes something (not with `--dry-run`) records itself in the audit log
//! after acting (`queue::audit`); when that record cannot be written, the command says so and
//! exits 1, its action done. `audit` exits 0 (an empty log: said on stderr), 2 for a bad
//! `--since` or no spool, 1 when the log cannot be read.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod manual;

/// `print!` for the commands' output: a reader that went away (`portcullis … | head`) ends
/// the output, never the command, so what it was doing (and its audit record) is finished.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        output_written(write!(std::io::stdout(), $($arg)*));
    }};
}

/// `println!` as [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        output_written(writeln!(std::io::stdout(), $($arg)*));
    }};
}

/// What [`out!`] does with a failed write: a closed pipe is the reader's choice (silent);
/// anything else (a full disk under `> file`) is said on stderr once, and the command exits 1
/// once it has finished.
fn output_written(result: std::io::Result<()>) {
    if let Err(e) = result
        && e.kind() != std::io::ErrorKind::BrokenPipe
        && !OUTPUT_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        eprintln!("portcullis: cannot write to stdout: {e}");
    }
}

/// The process's allocator: mimalloc 2 without transparent huge pages (Cargo.toml) instead of
/// glibc's malloc. Measured by hand on scenario A (1 KB messages, a new connection per message;
/// BENCHMARKS.md "Second step: the allocator"): glibc's malloc and free were a quarter of the
/// relay's user time; this spends 7 % less CPU per message, 2.3 KB per idle session against
/// 3.6, and peaks at 34.5 MB for 10 MiB messages against 37. (mimalloc 3 with its defaults
/// was faster but took three times the memory.) The library's own tests keep the system
/// allocator; every integration test runs this binary, so runs on this one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Set by [`output_written`] when the output was lost for another reason than a reader that
/// went away: the command still finishes (and records), then exits 1.
static OUTPUT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

use portcullis::config::Config;
use portcullis::envelope::{QueueId, unix_now};
use portcullis::queue::select::{self, Age, HoldAction, Selection};
use portcullis::queue::{
    DeleteOutcome, PurgeFilter, QueuedMessage, RemovedHow, RetryTarget, Spool, SpoolError, audit,
    report,
};

/// `portcullis --version`: the crate's version and the commit it was built from (`unknown`
/// when built outside its git checkout; see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PORTCULLIS_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version = VERSION,
    about = "A hardened SMTP edge relay",
    long_about = "portcullis is an SMTP relay for the edge of a mail system: it receives mail from \
the internet (port 25) and from users' mail programs (submission, ports 587 and 465), enforces \
TLS, authentication, access lists and rate limits, writes every accepted message to its own \
durable queue before answering 250, and forwards it to an upstream such as Microsoft Exchange. \
Its policy is one TOML file; run `portcullis check-config` after every edit."
)]
struct Cli {
    /// Policy file (TOML). Without it, `run` uses the embedded default.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Spool directory for `queue` commands (default: the policy's spool_dir, else ./spool).
    #[arg(long, global = true, value_name = "DIR")]
    spool: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay.
    Run,
    /// Validate the policy file: print every error with its key (exit 2), or a summary.
    CheckConfig,
    /// Inspect and manage the spool.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Pause or resume accepting on every listener of the running relay (and of later
    /// starts, until resumed): the marker file SPOOL/paused.
    Listeners {
        #[command(subcommand)]
        action: ListenersAction,
    },
    /// Upstreams, queue, flow over the last hour and active alerts: from the running relay's
    /// admin API, else (no [admin], or no answer) from the spool and journal, saying so.
    Status {
        /// Print the status as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Read one password line from stdin and print its argon2id hash.
    Passwd,
    /// Write DIR/cert.pem and DIR/key.pem: a self-signed ECDSA P-256 certificate for HOST.
    GenCert {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, value_name = "HOST")]
        name: String,
    },
    /// Every journaled event of the messages matching QUERY (a queue id, a Message-ID, an
    /// address or a client IP), per message in time order. Exit 1 when nothing matches.
    Trace {
        /// A queue id, a Message-ID (with or without <>), an address, or a client IP.
        #[arg(value_name = "QUERY")]
        query: String,
        /// Only events this recent (e.g. 30m, 2h, 7d); default: the whole journal.
        #[arg(long, value_name = "DUR")]
        since: Option<String>,
        /// One JSON object per event.
        #[arg(long)]
        json: bool,
    },
    /// The operator commands that changed something (SPOOL/audit.jsonl), oldest first: time
    /// (UTC), who (user, and the login user when sudo was used), command, arguments, what it
    /// affected.
    Audit {
        /// Only entries this recent (e.g. 30m, 2h, 7d); default: the whole log.
        #[arg(long, value_name = "DUR")]
        since: Option<String>,
        /// One JSON object per entry.
        #[arg(long)]
        json: bool,
    },
    /// The logins of the users file and the suspended ones: list them, suspend or resume one
    /// (the running relay acts within a second).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Policy tools: `policy explain` shows the verdict a client would get, stage by stage.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Print a shell completion script for bash, zsh or fish on stdout (e.g.
    /// `portcullis completions bash > /etc/bash_completion.d/portcullis`).
    Completions {
        #[arg(value_name = "SHELL")]
        shell: CompletionShell,
    },
    /// Write the manual pages, portcullis(8) and one per subcommand, into DIR (packaging).
    #[command(hide = true)]
    ManPages {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Pre-flight our own outbound mail for DOMAIN: SPF, DKIM keys, DMARC, FCrDNS of the
    /// [doctor] egress addresses, each finding with its fix. Exit 0 whatever it finds.
    Doctor {
        /// The domain we send mail for.
        #[arg(value_name = "DOMAIN")]
        domain: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// The shells `portcullis completions` writes a script for.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand, Debug)]
enum QueueAction {
    /// One row per queued message (or one JSON object per line with --json).
    List {
        #[arg(long)]
        json: bool,
        /// List the messages `queue purge --quarantine` put aside instead, with when and by
        /// which command.
        #[arg(long)]
        quarantined: bool,
    },
    /// Envelope, delivery history and headers of one message.
    Show { id: String },
    /// Make messages due now, overriding back-off and resetting their upstream's circuit
    /// breaker. The running relay acts within a second (a stopped relay, when it starts).
    Retry {
        /// Queue ids.
        #[arg(
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<String>,
        /// Every queued message.
        #[arg(long)]
        all: bool,
    },
    /// Remove messages from the queue. A worker sending one aborts unless its final dot was
    /// already sent (then this says so).
    Delete {
        /// Queue ids.
        #[arg(value_name = "ID", required = true)]
        ids: Vec<String>,
    },
    /// Remove the messages every given filter selects (--from, --user, --since or
    /// --older-than, --to), or all of them; no confirmation.
    Purge {
        /// Envelope sender: ADDR (an ASCII local part in any case, a non-ASCII one exactly;
        /// the domain in any case, U-label or A-label), @DOMAIN (that domain, not its
        /// subdomains), or '<>' (bounces).
        #[arg(long, value_name = "ADDR", conflicts_with = "all")]
        from: Option<String>,
        /// Submitted by this authenticated login (exactly, case included).
        #[arg(long, value_name = "LOGIN", conflicts_with = "all")]
        user: Option<String>,
        /// Received within the last DUR (e.g. 30m, 2h, 1d).
        #[arg(
            long,
            value_name = "DUR",
            conflicts_with_all = ["all", "older_than"]
        )]
        since: Option<String>,
        /// Received more than DUR ago.
        #[arg(long, value_name = "DUR", conflicts_with = "all")]
        older_than: Option<String>,
        /// At least one recipient still pending (not yet delivered or failed) in this
        /// domain (@DOMAIN; not its subdomains).
        #[arg(long, value_name = "@DOMAIN", conflicts_with = "all")]
        to: Option<String>,
        /// Every queued message.
        #[arg(long)]
        all: bool,
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Move the messages into SPOOL/quarantine/ instead of deleting them: kept for
        /// [queue] quarantine_keep, listed by `queue list --quarantined`, put back by `queue
        /// restore`.
        #[arg(long)]
        quarantine: bool,
    },
    /// Put quarantined messages back into the queue exactly as they were (same id, state and
    /// bytes); the running relay delivers them within a second. An id queued already is
    /// refused. Files startup recovery refused (SPOOL/rejected/) are never restored.
    Restore {
        /// Queue ids of quarantined messages.
        #[arg(
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<String>,
        /// Every quarantined message.
        #[arg(long)]
        all: bool,
        /// Only list what would be restored.
        #[arg(long)]
        dry_run: bool,
    },
    /// Import every message of another node's spool (a dead node's, mounted read-only or
    /// copied) into this one, once, keeping ids and states; the running relay delivers them
    /// within a second. DIR is marked adopted (DIR/adopted) when it can be written: its node
    /// then refuses to start on it. A read-only DIR must be wiped before its node returns.
    Adopt {
        /// The other node's spool directory (the one holding queue/).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Only say what would be imported.
        #[arg(long)]
        dry_run: bool,
    },
    /// Hold messages: never attempted, bounced or expired until released (the time held
    /// does not count towards queue.max_age). The running relay records it within a second
    /// (a stopped relay when it next starts). --user and --from together select messages
    /// matching both.
    Hold {
        /// Queue ids.
        #[arg(
            value_name = "ID",
            required_unless_present_any = ["user", "from"],
            conflicts_with_all = ["user", "from"]
        )]
        ids: Vec<String>,
        /// Every message submitted by this authenticated login (exactly, case included).
        #[arg(long, value_name = "LOGIN")]
        user: Option<String>,
        /// Every message from this envelope sender (ADDR, @DOMAIN or '<>', as purge --from).
        #[arg(long, value_name = "ADDR")]
        from: Option<String>,
        /// Only list what would be held.
        #[arg(long)]
        dry_run: bool,
    },
    /// Release held messages: due at once. The running relay acts within a second (a
    /// stopped relay when it next starts).
    Release {
        /// Queue ids.
        #[arg(
            value_name = "ID",
            required_unless_present_any = ["user", "from", "all"],
            conflicts_with_all = ["user", "from", "all"]
        )]
        ids: Vec<String>,
        /// Held messages submitted by this authenticated login.
        #[arg(long, value_name = "LOGIN", conflicts_with = "all")]
        user: Option<String>,
        /// Held messages from this envelope sender (ADDR, @DOMAIN or '<>').
        #[arg(long, value_name = "ADDR", conflicts_with = "all")]
        from: Option<String>,
        /// Every held message.
        #[arg(long)]
        all: bool,
        /// Only list what would be released.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyAction {
    /// Play a client's session (connect, EHLO, STARTTLS, AUTH, MAIL, each RCPT) through the
    /// same checks the relay runs, and print each stage, the rule that decided and the reply;
    /// the last line is the reply a client would get. Takes no rate budget and records no
    /// failure: the pause, connection caps, rate limits and AUTH lockouts are read from the
    /// running relay ([admin]), else evaluated on empty state (said so). Exit 0 whatever the
    /// verdict.
    Explain(ExplainArgs),
}

/// The arguments of `portcullis policy explain`.
#[derive(clap::Args, Debug)]
struct ExplainArgs {
    /// The [[listeners]] name the client connects to.
    #[arg(long, value_name = "NAME")]
    listener: String,
    /// The client's address.
    #[arg(long, value_name = "IP")]
    ip: String,
    /// The EHLO name (default: client.invalid).
    #[arg(long, value_name = "NAME")]
    helo: Option<String>,
    /// The client starts TLS (STARTTLS on a starttls listener).
    #[arg(long)]
    tls: bool,
    /// The login the client authenticates as (assumed authenticated: no password is checked).
    #[arg(long, value_name = "LOGIN")]
    user: Option<String>,
    /// The envelope sender ('<>' for the null sender).
    #[arg(long, value_name = "ADDR")]
    from: String,
    /// A recipient (repeat for several).
    #[arg(long = "rcpt", value_name = "ADDR", required = true)]
    rcpts: Vec<String>,
    /// Skip the DNS checks (DNSBL, SPF), saying so.
    #[arg(long)]
    no_dns: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum UserAction {
    /// One row per login (the users file's and every suspended one), sorted: login, state
    /// (active or suspended), since when, rule, messages in the last hour (from the running
    /// relay's admin API; `-` when it cannot be asked, said on stderr), reason.
    List {
        /// Print one JSON array of objects.
        #[arg(long)]
        json: bool,
    },
    /// Suspend a login: within a second the running relay refuses its AUTH (535 5.7.8, as a
    /// wrong password), closes its sessions and holds its queued mail. Survives restarts.
    Suspend {
        /// A login of the users file.
        #[arg(value_name = "LOGIN")]
        login: String,
        /// Why, for the operators (one line; default: "suspended by an operator").
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Only say what would be done.
        #[arg(long)]
        dry_run: bool,
    },
    /// Lift a login's suspension: its AUTH is accepted again within a second. Its held mail
    /// stays held (`portcullis queue release --user LOGIN`).
    Resume {
        /// A login of the users file, or one suspended under the spool.
        #[arg(value_name = "LOGIN")]
        login: String,
        /// Only say what would be done.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ListenersAction {
    /// Within a second, every listener answers new connections `421 4.3.2` and closes them,
    /// and /readyz answers 503; delivery of the queue goes on. Survives restarts.
    Pause,
    /// Accept again (within a second).
    Resume,
}

/// An error in the operator's input: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    limit_malloc_arenas();
    portcullis::failpoint::setup();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) if OUTPUT_FAILED.load(std::sync::atomic::Ordering::Relaxed) => ExitCode::FAILURE,
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(app) = e.downcast_ref::<portcullis::app::AppError>() {
                eprintln!("portcullis: {app}");
                return ExitCode::from(if app.is_config() { 2 } else { 1 });
            }
            eprintln!("portcullis: {}", error_text(&e));
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// At most [`MALLOC_ARENAS`] glibc malloc arenas, before any thread starts. By default glibc
/// gives up to eight per core to the threads that allocate (the runtime's workers and the
/// blocking pool that fsyncs and reads the spool), and memory freed in one is kept there: in
/// the soak (RELIABILITY.md) a backlog of 5,000 messages, once delivered, left the relay 32 %
/// above its warm-up size for good, against 6 % with two arenas. `MALLOC_ARENA_MAX` in the
/// environment, when set, is left to decide.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any other thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// See [`limit_malloc_arenas`].
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 2;

/// `error` and its causes, as `{:#}` prints them (`context: error: cause`), but without a
/// cause its parent already ends with: the spool's I/O errors name their `io::Error` in their
/// own text and as their source, which `{:#}` printed twice (`…: Input/output error (os
/// error 5): Input/output error (os error 5)`).
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut parent = String::new();
    for cause in error.chain() {
        let this = cause.to_string();
        if !parent.ends_with(&this) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&this);
        }
        parent = this;
    }
    text
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run => run(cli.config),
        Command::CheckConfig => check_config(cli.config.as_deref()),
        Command::Queue { action } => queue(action, cli.config.as_deref(), cli.spool),
        Command::Listeners { action } => listeners(&action, cli.config.as_deref(), cli.spool),
        Command::Status { json } => status(cli.config.as_deref(), cli.spool, json),
        Command::Passwd => passwd(),
        Command::Doctor { domain, json } => doctor(cli.config.as_deref(), &domain, json),
        Command::Policy {
            action: PolicyAction::Explain(args),
        } => policy_explain(cli.config.as_deref(), args),
        Command::User { action } => user(action, cli.config.as_deref(), cli.spool),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            // Into memory, then out! like every other output (a closed pipe ends it quietly).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "portcullis", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
        Command::ManPages { out } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            for page in manual::write_all(Cli::command(), &out)
                .with_context(|| format!("cannot write the manual pages into {}", out.display()))?
            {
                outln!("{}", page.display());
            }
            Ok(())
        }
        Command::Trace { query, since, json } => trace(
            cli.config.as_deref(),
            cli.spool,
            &query,
            since.as_deref(),
            json,
        ),
        Command::Audit { since, json } => {
            audit_log(cli.config.as_deref(), cli.spool, since.as_deref(), json)
        }
        Command::GenCert { out, name } => {
            let (cert, key) = portcullis::inbound::tls::write_cert_files(&out, &name)
                .map_err(|e| UsageError(e.to_string()))?;
            outln!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
    }
}

/// Load the policy file, or report every error in it as a usage error.
fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|errors| {
        UsageError(format!(
            "{} is invalid ({} error{}):\n{errors}",
            path.display(),
            errors.0.len(),
            if errors.0.len() == 1 { "" } else { "s" }
        ))
        .into()
    })
}

fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    // The log format is the policy's: logging starts once it is loaded (an invalid policy is
    // reported on stderr by `main`). A reload does not change it: the format is the one the
    // relay started with.
    let config = match &path {
        Some(p) => load_config(p)?,
        None => Config::embedded_default(),
    };
    init_logging(config.log.format, log_node(&config));
    if path.is_none() {
        tracing::warn!("no --config given: running on the embedded default policy");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let ran = runtime.block_on(portcullis::app::run(config, path));
    // A recovery of queue/ still running (a stop during the start) is abandoned, as a crash
    // would abandon it: the next start does it again. Anything else has ended by now.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ran?;
    Ok(())
}

fn check_config(path: Option<&Path>) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Err(UsageError("check-config needs --config FILE".into()).into());
    };
    let config = load_config(path)?;
    // Certificates are part of the policy: a key that does not load must fail here too.
    if let Some(tls) = &config.tls {
        portcullis::inbound::tls::server_config(tls, &config.server.hostname)
            .map_err(|e| UsageError(format!("{} is invalid:\ntls: {e}", path.display())))?;
    }
    // A spool the relay would refuse to start on (others may write into it) fails here too.
    // Its owner is taken as the relay's user, since check-config may run as root.
    let spool = &config.server.spool_dir;
    if let Ok(meta) = std::fs::metadata(spool) {
        use std::os::unix::fs::MetadataExt;
        portcullis::queue::Spool::open_existing(spool)
            .and_then(|s| s.check_safe(meta.uid()))
            .map_err(|e| {
                UsageError(format!(
                    "{} is invalid:\nserver.spool_dir: {e}",
                    path.display()
                ))
            })?;
    }
    // A spool another node adopted (`queue adopt`): the relay would refuse to start on it.
    if let Ok(Some(marker)) = portcullis::queue::adopt::ledger::read_marker(spool) {
        let said = marker.map_or_else(|why| format!("({why})"), |m| m.describe());
        return Err(UsageError(format!(
            "{} is invalid:\nserver.spool_dir: spool {} was adopted {said}: its messages are \
             delivered by that node; wipe it (or use an empty one) before starting",
            path.display(),
            spool.display()
        ))
        .into());
    }
    out!("{}", config.summary());
    let mut warnings = config.warnings();
    warnings.extend(portcullis::config::perms::secret_file_warnings(&config));
    warnings.extend(portcullis::queue::journal::writer::space_warning(
        spool,
        config.limits.min_free_space,
    ));
    if !warnings.is_empty() {
        outln!();
        for w in warnings {
            outln!("warning: {w}");
        }
    }
    outln!("\n{}: OK", path.display());
    Ok(())
}

/// `portcullis trace`: the query and `--since` are checked first (exit 2), then the journal
/// under the spool is searched; nothing found is exit 1.
fn trace(
    config: Option<&Path>,
    spool: Option<PathBuf>,
    query: &str,
    since: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    use portcullis::queue::journal;
    let parsed: journal::Query = query.parse().map_err(|e| UsageError(format!("{e}")))?;
    let since_ms = since_millis(since)?;
    let dir = spool_dir(config, spool)?;
    // Like `queue` and `listeners`: a wrong --config/--spool is a usage error.
    require_spool(&dir)?;
    let journal_dir = journal::dir(&dir);
    if !journal_dir.is_dir() {
        bail!(
            "no journaled event matches {parsed}: the spool {} has no journal yet (the relay \
             starts one when it runs)",
            dir.display()
        );
    }
    // Said before the answer: "no match" may only mean the journal was not writing.
    let (_, disk) = journal::state_on_disk(&journal_dir)
        .with_context(|| format!("cannot read {}", journal_dir.display()))?;
    let notes = journal_notes(&disk, since_ms);
    for note in &notes {
        eprintln!("portcullis: note: {note}");
    }
    let found = journal::trace(&dir, &parsed, since_ms)?;
    if found.is_empty() {
        let oldest = match disk.oldest_ms {
            _ if !notes.is_empty() => String::new(),
            Some(ms) => format!(
                "; its oldest event is from {}",
                journal::show::rfc3339_ms(ms)
            ),
            None => "; it holds no event".to_owned(),
        };
        bail!(
            "no journaled event matches {parsed}{} (journal: {}{oldest})",
            since
                .map(|s| format!(" in the last {s}"))
                .unwrap_or_default(),
            journal_dir.display()
        );
    }
    if json {
        out!("{}", journal::show::json_lines(&found));
        // The text report ends with this notice itself; JSON lines have no place for it.
        if found.truncated > 0 {
            eprintln!(
                "portcullis: {} older matching messages left out; narrow the query with --since",
                found.truncated
            );
        }
    } else {
        out!("{}", journal::show::text(&found));
    }
    Ok(())
}

/// What `trace` says on stderr about the journal itself: stopped now, or stopped for a while
/// since `since_ms` (events of those times are not in it), with the time of its oldest event.
fn journal_notes(disk: &portcullis::queue::journal::state::OnDisk, since_ms: u64) -> Vec<String> {
    use portcullis::queue::journal::show::rfc3339_ms;
    let mut notes: Vec<String> = disk
        .gaps
        .iter()
        .filter(|g| g.until_ms.is_some_and(|until| until >= since_ms))
        .map(|g| {
            format!(
                "the journal did not write from {} to {}: {}; events of that time are not in it",
                rfc3339_ms(g.since_ms),
                rfc3339_ms(g.until_ms.unwrap_or(g.since_ms)),
                g.reason.text()
            )
        })
        .collect();
    if let Some(stop) = disk.stopped {
        notes.push(format!(
            "the journal is STOPPED: it has not written since {}: {}; later events are not in it",
            rfc3339_ms(stop.since_ms),
            stop.reason.text()
        ));
    }
    if !notes.is_empty() {
        notes.push(disk.oldest_ms.map_or_else(
            || "the journal holds no event".to_owned(),
            |ms| format!("the journal's oldest event is from {}", rfc3339_ms(ms)),
        ));
    }
    notes
}

/// `portcullis doctor DOMAIN`: the checks are in `dns::doctor`; this loads the policy and
/// prints the report.
fn doctor(path: Option<&Path>, domain: &str, json: bool) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Err(UsageError("doctor needs --config FILE".into()).into());
    };
    let domain = portcullis::envelope::canonical_domain(domain).map_err(|e| {
        let shown = portcullis::queue::report::clean(domain);
        UsageError(format!("{shown}: not a domain name ({e})"))
    })?;
    // A policy that cannot be loaded is not a usage error here: exit 1.
    let config = load_config(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let resolver =
        portcullis::dns::Resolver::new(&config.dns).context("cannot set up the resolver")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(portcullis::dns::doctor::run(&resolver, &config, &domain));
    if json {
        let value = serde_json::to_value(&report)?;
        outln!("{}", portcullis::queue::report::json_line(&value));
    } else {
        out!("{}", report.text());
    }
    Ok(())
}

/// `portcullis status [--json]`: gathered by `admin::client`; a 401 or any answer that is
/// not a status exits 1, a relay that does not answer is no error (the status then comes from
/// the spool and journal, and the first line says so: on stderr with `--json`).
fn status(path: Option<&Path>, spool: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Err(UsageError("status needs --config FILE".into()).into());
    };
    let config = load_config(path)?;
    let dir = spool.unwrap_or_else(|| config.server.spool_dir.clone());
    let spool = open_spool(&dir, false)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let gathered = runtime.block_on(portcullis::admin::client::gather(
        &config,
        &spool,
        unix_now(),
    ))?;
    if json {
        if let Some(notice) = &gathered.notice {
            eprintln!("{notice}");
        }
        let value = serde_json::to_value(&gathered.status)?;
        outln!("{}", report::json_line(&value));
    } else {
        if let Some(notice) = &gathered.notice {
            outln!("{notice}");
        }
        out!("{}", portcullis::admin::summary::text(&gathered.status));
    }
    Ok(())
}

/// `portcullis policy explain`: the request is checked (exit 2), the running relay's state for
/// the client read through the admin API when `[admin]` is set, then the session is played
/// (`inbound::explain`).
fn policy_explain(path: Option<&Path>, args: ExplainArgs) -> anyhow::Result<()> {
    use portcullis::inbound::explain;
    let Some(path) = path else {
        return Err(UsageError("policy explain needs --config FILE".into()).into());
    };
    let config = load_config(path)?;
    let ip: std::net::IpAddr = args
        .ip
        .trim()
        .parse()
        .map_err(|_| UsageError(format!("--ip {:?}: not an IP address", args.ip)))?;
    let request = explain::Request {
        listener: args.listener,
        ip,
        helo: args
            .helo
            .unwrap_or_else(|| explain::DEFAULT_HELO.to_string()),
        tls: args.tls,
        user: args.user,
        from: args.from,
        rcpts: args.rcpts,
        dns: !args.no_dns,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(async {
        let state = running_state(&config, ip, request.user.as_deref()).await;
        let resolver = match request.dns && config.needs_resolver() {
            true => Some(portcullis::dns::Resolver::new(&config.dns)?),
            false => None,
        };
        explain::explain(&config, &request, state, resolver)
            .await
            .map_err(|e| anyhow::Error::from(UsageError(e.to_string())))
    })?;
    if args.json {
        let value = serde_json::to_value(&report)?;
        outln!("{}", report::json_line(&value));
    } else {
        out!("{}", explain::text(&report));
    }
    Ok(())
}

/// `portcullis user list|suspend|resume` (`admin::users`): the policy is needed for its users
/// file (an invalid policy, an unknown login or a bad `--reason`: exit 2). In an emergency,
/// with a policy that does not load, `--spool DIR` alone works: the login is then not checked
/// against the users file (said on stderr). A change is recorded in the audit log after it is
/// made; a dry run records nothing.
fn user(action: UserAction, path: Option<&Path>, spool: Option<PathBuf>) -> anyhow::Result<()> {
    use portcullis::admin::users;
    let config = match (path, &spool) {
        (Some(path), _) => Some(load_config(path)?),
        (None, Some(_)) => {
            eprintln!(
                "portcullis: no --config: logins are not checked against a users file, and the relay's counts are not read"
            );
            None
        }
        (None, None) => {
            return Err(
                UsageError("user commands need --config FILE (or --spool DIR)".into()).into(),
            );
        }
    };
    let given = (path, spool.clone());
    let Some(dir) = spool.or_else(|| config.as_ref().map(|c| c.server.spool_dir.clone())) else {
        unreachable!("a policy or a spool directory was given");
    };
    let config = config.as_ref();
    let usage = |e: users::UserError| -> anyhow::Error {
        if e.is_usage() {
            UsageError(e.to_string()).into()
        } else {
            e.into()
        }
    };
    // `[cluster] redis`: the suspensions are shared through the store (its own link).
    let store = config.map(users::Store::open).transpose()?.flatten();
    let store = store.as_ref();
    match action {
        UserAction::List { json } => user_list(config, store, &dir, json),
        UserAction::Suspend {
            login,
            reason,
            dry_run,
        } => {
            let reason = users::reason(reason.as_deref()).map_err(usage)?;
            let spool = open_spool(&dir, !dry_run)?;
            let now = portcullis::observe::event::unix_millis();
            let (outcome, sharing) =
                users::suspend(config, &spool, store, &login, reason, now, dry_run)
                    .map_err(usage)?;
            let url = store.map(users::Store::shown_url).unwrap_or_default();
            match sharing {
                users::Sharing::Local => {}
                users::Sharing::Shared => {
                    outln!("shared through the store {url}: every node holds it within a second");
                }
                users::Sharing::Pending(e) => eprintln!(
                    "portcullis: the shared store {url} cannot be reached ({e}): suspended on this \
                     node only for now; its relay puts the suspension in the store when it answers, \
                     and every node holds the login from then"
                ),
            }
            let given = (given.0, given.1.as_deref());
            user_changed(
                &spool,
                &["user", "suspend"],
                login,
                &outcome,
                dry_run,
                given,
            )
        }
        UserAction::Resume { login, dry_run } => {
            let spool = open_spool(&dir, false)?;
            let outcome = users::resume(config, &spool, store, &login, dry_run).map_err(usage)?;
            let given = (given.0, given.1.as_deref());
            user_changed(&spool, &["user", "resume"], login, &outcome, dry_run, given)
        }
    }
}

/// Print what `user suspend|resume` did (`outcome`) and, unless `dry_run`, record it in the
/// audit log, `login` affected when its state changed.
fn user_changed(
    spool: &Spool,
    words: &[&str],
    login: String,
    outcome: &portcullis::admin::users::Outcome,
    dry_run: bool,
    given: (Option<&Path>, Option<&Path>),
) -> anyhow::Result<()> {
    let text =
        portcullis::admin::users::outcome_text(&login, outcome, dry_run, spool.root(), given);
    out!("{text}");
    if dry_run {
        return Ok(());
    }
    let affected = if outcome.changes() {
        vec![login]
    } else {
        Vec::new()
    };
    record(spool, words, affected)
}

/// `portcullis user list [--json]`: the counts from the running relay, else `-`/`null` and
/// the reason on stderr.
fn user_list(
    config: Option<&Config>,
    store: Option<&portcullis::admin::users::Store>,
    dir: &Path,
    json: bool,
) -> anyhow::Result<()> {
    use portcullis::admin::users;
    let spool = open_spool(dir, false)?;
    let listing = spool.list_suspended()?;
    for stray in &listing.strays {
        eprintln!(
            "portcullis: not a sound suspension record: {}",
            report::clean(stray)
        );
    }
    let mut suspensions = listing.suspensions;
    if let Some(store) = store {
        // The union, the store's view first (a login resumed elsewhere and not yet followed
        // here is shown as the store has it: still suspended here until the relay polls).
        match store.read() {
            Ok(remote) => {
                if !remote.complete() {
                    eprintln!(
                        "portcullis: the shared store holds {} suspended logins; {} shown",
                        remote.total, remote.read
                    );
                }
                suspensions.retain(|s| !remote.suspensions.contains_key(&s.login));
                suspensions.extend(remote.suspensions.into_values());
            }
            Err(e) => eprintln!(
                "portcullis: the shared store {} cannot be reached ({e}): this node's suspensions only",
                store.shown_url()
            ),
        }
    }
    let counts = match config {
        Some(config) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(users::messages_last_hour(config)),
        None => Err("no --config".to_owned()),
    };
    if let Err(why) = &counts {
        eprintln!("portcullis: messages in the last hour unknown (shown as -): {why}");
    }
    let rows = users::rows(config, suspensions, counts.as_ref().ok());
    if json {
        outln!("{}", report::json_line(&users::json(&rows)));
    } else {
        out!("{}", users::table(&rows));
    }
    Ok(())
}

/// What the running relay's stateful rules (pause, connection caps, rate limits, AUTH
/// lockout) say of `ip` (and `user`), with where it came from; `Err(why)` when it cannot be
/// had (no `[admin]`, no answer, a refused token).
async fn running_state(
    config: &Config,
    ip: std::net::IpAddr,
    user: Option<&str>,
) -> Result<(portcullis::policy::store::ClientState, String), String> {
    use portcullis::admin::client;
    let fetch = |addr, token: Option<std::sync::Arc<str>>| async move {
        client::fetch_client_state(addr, token.as_deref(), ip, user).await
    };
    let (state, addr) = client::ask_running(config, fetch).await?;
    // A refusal at accept this version cannot name is never read as "accepted".
    if let Some(rule) = state.at_accept.as_deref()
        && portcullis::inbound::listener::AtAccept::from_rule(rule).is_none()
    {
        return Err(format!(
            "the relay at {addr} refuses at accept by a rule this version does not know ({rule})"
        ));
    }
    let origin = match state.store.as_deref() {
        // `[cluster]`: whether its budgets and lockout came from the shared store.
        Some(store) => {
            format!("from the running relay at {addr} (rate budgets and lockout: {store})")
        }
        None => format!("from the running relay at {addr}"),
    };
    Ok((state, origin))
}

fn spool_dir(config: Option<&Path>, spool: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match (spool, config) {
        (Some(dir), _) => dir,
        (None, Some(path)) => load_config(path)?.server.spool_dir,
        (None, None) => PathBuf::from("./spool"),
    })
}

/// Open the spool for a command. Only `retry` opens it for writing (which may create missing
/// subdirectories, given to the spool's owner); the others make no directory. What they
/// still write is small and named: `delete` and `purge` a notice of the ids they removed in
/// `control/` (`Spool::notify_removed`), `listeners pause` the `paused` marker, and every
/// command that changes something its entry in `audit.jsonl` (`Spool::audit`).
fn open_spool(dir: &Path, writes: bool) -> anyhow::Result<Spool> {
    require_spool(dir)?;
    let spool = if writes {
        Spool::open_for_command(dir)
    } else {
        Spool::open_existing(dir)
    };
    spool.with_context(|| format!("cannot open spool {}", dir.display()))
}

fn queue(action: QueueAction, config: Option<&Path>, spool: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = spool_dir(config, spool)?;
    // A dry run changes nothing, not even a missing directory.
    let writes = matches!(
        action,
        QueueAction::Retry { .. }
            | QueueAction::Adopt { dry_run: false, .. }
            | QueueAction::Hold { dry_run: false, .. }
            | QueueAction::Release { dry_run: false, .. }
    );
    let spool = open_spool(&dir, writes)?;
    match action {
        QueueAction::List {
            json,
            quarantined: true,
        } => list_quarantined(&spool, json)?,
        QueueAction::Restore { ids, all, dry_run } => restore(&spool, &dir, &ids, all, dry_run)?,
        QueueAction::Adopt { dir: from, dry_run } => adopt(&spool, config, from, dry_run)?,
        QueueAction::List { json, .. } => {
            // Each row is made on the thread that read its message, which keeps no envelope.
            let now = unix_now();
            if json {
                let lines = spool.report_map(|m| report::json_row(&m, now))?;
                // Through one buffer, line by line: no second copy of the whole output.
                let mut w = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
                output_written(
                    lines
                        .iter()
                        .try_for_each(|line| std::io::Write::write_all(&mut w, line.as_bytes()))
                        .and_then(|()| std::io::Write::flush(&mut w)),
                );
            } else {
                let rows = spool.report_map(|m| report::table_row(&m, now))?;
                out!("{}", report::table(&rows));
            }
        }
        QueueAction::Show { id } => {
            let id: QueueId = id.parse().map_err(|e| UsageError(format!("{e}")))?;
            let msg = match spool.load(&id) {
                Ok(m) => m,
                Err(SpoolError::NotFound(_)) => bail!("no message {id} in {}", dir.display()),
                Err(e) => return Err(e.into()),
            };
            let head = spool.read_message_head(&id, report::SHOW_HEADER_LIMIT as u64)?;
            out!("{}", report::show(&msg, &head));
        }
        QueueAction::Retry { ids, all } => retry(&spool, &dir, &ids, all)?,
        QueueAction::Delete { ids } => delete(&spool, &dir, &ids)?,
        QueueAction::Purge {
            from,
            user,
            since,
            older_than,
            to,
            all,
            dry_run,
            quarantine,
        } => {
            let filters = Filters {
                from,
                user,
                since,
                older_than,
                to,
            };
            let selection = filters.selection()?;
            if selection.is_empty() && !all {
                bail!(UsageError(
                    "purge needs a filter (--from, --user, --since, --older-than, --to) or --all"
                        .into()
                ));
            }
            let now = unix_now();
            if quarantine {
                return purge_quarantine(&spool, |m| selection.matches(m, now), dry_run);
            }
            let purged = spool.purge_where(|m| selection.matches(m, now), dry_run)?;
            let mut tally = report::Tally::new(dry_run);
            for p in &purged {
                outln!(
                    "{}",
                    report::deletion_line(&p.id, Some(&p.sender), p.outcome)
                );
                tally.add(p.outcome);
            }
            outln!("{}", tally.summary());
            let removed: Vec<QueueId> = purged
                .into_iter()
                .filter(|p| p.outcome.is_some_and(|o| o != DeleteOutcome::NotFound))
                .map(|p| p.id)
                .collect();
            if !dry_run {
                let recorded = record(&spool, &["queue", "purge"], to_strings(&removed));
                let notified = spool.notify_removed(RemovedHow::Purge, &removed);
                return all_ok([recorded, notified.map_err(Into::into)]);
            }
        }
        QueueAction::Hold {
            ids,
            user,
            from,
            dry_run,
        } => {
            let target = HoldTarget::new(ids, user, from, false)?;
            hold_release(&spool, &dir, HoldAction::Hold, &target, dry_run)?;
        }
        QueueAction::Release {
            ids,
            user,
            from,
            all,
            dry_run,
        } => {
            let target = HoldTarget::new(ids, user, from, all)?;
            hold_release(&spool, &dir, HoldAction::Release, &target, dry_run)?;
        }
    }
    Ok(())
}

/// The filters of `queue purge` (and `--user`/`--from` of `queue hold|release`), as given.
#[derive(Default)]
struct Filters {
    from: Option<String>,
    user: Option<String>,
    since: Option<String>,
    older_than: Option<String>,
    to: Option<String>,
}

impl Filters {
    /// Check every filter (a bad one is a usage error: exit 2).
    fn selection(&self) -> anyhow::Result<Selection> {
        let usage = |e: &dyn std::fmt::Display| UsageError(e.to_string());
        let duration = |opt: &str, text: &str| {
            portcullis::config::units::parse_duration(text)
                .map_err(|e| UsageError(format!("{opt}: {e}")))
        };
        Ok(Selection {
            from: (self.from.as_deref())
                .map(PurgeFilter::parse_from)
                .transpose()
                .map_err(|e| usage(&e))?,
            user: (self.user.as_deref())
                .map(Selection::parse_user)
                .transpose()
                .map_err(|e| usage(&e))?,
            age: match (&self.since, &self.older_than) {
                (Some(t), _) => Some(Age::since(duration("--since", t)?)),
                (None, Some(t)) => Some(Age::older_than(duration("--older-than", t)?)),
                (None, None) => None,
            },
            to: (self.to.as_deref())
                .map(Selection::parse_to)
                .transpose()
                .map_err(|e| usage(&e))?,
        })
    }
}

/// Which messages `queue hold|release` is about.
enum HoldTarget {
    /// These ids, as given.
    Ids(Vec<String>),
    /// Those the filters select (none: `release --all`).
    Select(Selection),
}

impl HoldTarget {
    fn new(
        ids: Vec<String>,
        user: Option<String>,
        from: Option<String>,
        all: bool,
    ) -> anyhow::Result<HoldTarget> {
        if !ids.is_empty() {
            return Ok(HoldTarget::Ids(ids));
        }
        let filters = Filters {
            from,
            user,
            ..Filters::default()
        };
        let selection = filters.selection()?;
        if selection.is_empty() && !all {
            bail!(UsageError("give queue ids, --user or --from".into()));
        }
        Ok(HoldTarget::Select(selection))
    }
}

/// `queue hold|release`: select, print one line per message acted on and a count, write the
/// requests (one directory fsync for all), record them in the audit log. Unknown ids: stderr,
/// the others still acted on, exit 1.
fn hold_release(
    spool: &Spool,
    dir: &Path,
    action: HoldAction,
    target: &HoldTarget,
    dry_run: bool,
) -> anyhow::Result<()> {
    let pending = spool.pending_holds()?;
    let mut unknown = 0;
    let mut skipped = Vec::new();
    let selected: Vec<QueuedMessage> = match target {
        HoldTarget::Ids(ids) => {
            let mut found = Vec::new();
            for id in parse_ids(ids)? {
                match spool.load(&id) {
                    Ok(m) => found.push(m),
                    Err(SpoolError::NotFound(_)) => {
                        eprintln!("portcullis: no message {id} in {}", dir.display());
                        unknown += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            found
        }
        HoldTarget::Select(select) => {
            let selection = select;
            let now = unix_now();
            (spool.list()?.into_iter())
                .filter(|m| selection.matches(m, now))
                .collect()
        }
    };
    let mut acted = Vec::new();
    for m in selected {
        if action.already(select::held_now(&m, &pending)) {
            skipped.push(m.envelope.id);
        } else {
            acted.push((m.envelope.id, m.envelope.mail_from));
        }
    }
    if let HoldTarget::Ids(_) = target {
        for id in &skipped {
            outln!("{}", select::skipped_line(action, id));
        }
    }
    let ids: Vec<QueueId> = acted.iter().map(|(id, _)| id.clone()).collect();
    // A release is asked for the messages not held too: one being sent now may have a hold
    // the relay records only when that attempt ends, and the release must win over it (for a
    // message not held, the relay changes nothing).
    let asked: Vec<QueueId> = match action {
        HoldAction::Release => ids.iter().chain(&skipped).cloned().collect(),
        HoldAction::Hold => ids.clone(),
    };
    if !dry_run && let Err(e) = spool.request_holds(&asked, action.holds()) {
        // Requests written before the failure are acted on: the log names every id asked for.
        let recorded = record(spool, &["queue", action.verb()], to_strings(&ids));
        return all_ok([Err(e.into()), recorded]);
    }
    for (id, from) in &acted {
        outln!("{}", select::hold_line(action, id, from, dry_run));
    }
    outln!(
        "{}",
        select::hold_summary(action, acted.len(), skipped.len(), dry_run)
    );
    let recorded = if dry_run {
        Ok(())
    } else {
        outln!("{}", action.note());
        record(spool, &["queue", action.verb()], to_strings(&ids))
    };
    let found = if unknown > 0 {
        Err(anyhow::anyhow!(
            "{unknown} of {} messages not found",
            unknown + acted.len() + skipped.len()
        ))
    } else {
        Ok(())
    };
    all_ok([recorded, found])
}

/// `queue list --quarantined [--json]`.
fn list_quarantined(spool: &Spool, json: bool) -> anyhow::Result<()> {
    use portcullis::queue::quarantine::report as q;
    let msgs = spool.quarantined()?;
    if json {
        out!("{}", q::list_json(&msgs));
    } else {
        out!("{}", q::list_table(&msgs, unix_now()));
    }
    Ok(())
}

/// `queue purge … --quarantine`: move what `filter` selects into `quarantine/`, print a line
/// each and the summary, tell the relay, record it in the audit log.
fn purge_quarantine(
    spool: &Spool,
    select: impl Fn(&portcullis::queue::QueuedMessage) -> bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    use portcullis::queue::quarantine::{Record, report as q};
    let words = ["queue", "purge"];
    let why = Record::now(
        &words.join(" "),
        &own_args(std::env::args_os().skip(1), &words),
        Vec::new(),
    );
    let purged = spool.purge_quarantine(select, &why, dry_run)?;
    for p in &purged {
        outln!("{}", q::quarantine_line(&p.id, &p.sender, p.outcome));
    }
    let outcomes: Vec<Option<DeleteOutcome>> = purged.iter().map(|p| p.outcome).collect();
    outln!("{}", q::quarantine_summary(&outcomes, dry_run));
    if dry_run {
        return Ok(());
    }
    let moved: Vec<QueueId> = purged
        .into_iter()
        .filter(|p| p.outcome.is_some_and(|o| o != DeleteOutcome::NotFound))
        .map(|p| p.id)
        .collect();
    let recorded = record(spool, &words, to_strings(&moved));
    let notified = spool.notify_removed(RemovedHow::Quarantine, &moved);
    all_ok([recorded, notified.map_err(Into::into)])
}

/// `queue restore ID…|--all [--dry-run]`: every id is tried even when some are not
/// quarantined or queued already (stderr, exit 1 at the end); an I/O error stops, after
/// making what was restored durable and telling the relay.
fn restore(
    spool: &Spool,
    dir: &Path,
    ids: &[String],
    all: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    use portcullis::queue::quarantine::{RestoreOutcome, report as q};
    let targets: Vec<QueueId> = if all {
        spool.quarantined_ids()?
    } else {
        parse_ids(ids)?
    };
    let mut outcomes = Vec::with_capacity(targets.len());
    let mut restored = Vec::new();
    let mut failure = None;
    for id in &targets {
        match spool.restore(id, dry_run) {
            Ok(outcome) => {
                match q::restore_line(id, outcome) {
                    Ok(line) => outln!("{line}"),
                    Err(line) => eprintln!("portcullis: {line} in {}", dir.display()),
                }
                if outcome == RestoreOutcome::Restored {
                    restored.push(id.clone());
                }
                outcomes.push(outcome);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if !dry_run {
        spool.finish_restore()?;
        spool.request_restore(&restored)?;
        record(spool, &["queue", "restore"], to_strings(&restored))?;
    }
    if let Some(e) = failure {
        return Err(e.into());
    }
    outln!("{}", q::restore_summary(&outcomes, dry_run));
    if !dry_run && !restored.is_empty() {
        outln!("{}", report::RETRY_NOTE);
    }
    let refused = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                RestoreOutcome::NotQuarantined | RestoreOutcome::AlreadyQueued
            )
        })
        .count();
    if refused > 0 {
        bail!("{refused} of {} messages not restored", outcomes.len());
    }
    Ok(())
}

/// `queue adopt DIR [--dry-run]` (`queue::adopt`): a line per message, the summary, what is
/// left in DIR and whether it was marked; recorded in the audit log (the ids here, `ID<-FROM`
/// for one whose id was taken). Exit 2 for a DIR that is no spool, this spool, or adopted
/// elsewhere; 1 when a file of DIR was refused or this spool failed (a rerun goes on).
fn adopt(spool: &Spool, config: Option<&Path>, dir: PathBuf, dry_run: bool) -> anyhow::Result<()> {
    use portcullis::queue::adopt::{self, Outcome, report as r};
    // The node is named as its policy names it (`[cluster] node`, else `[server] hostname`);
    // with --spool alone, by the host name (and the free-space floor is the default policy's).
    let (config, node) = match config {
        Some(path) => {
            let config = load_config(path)?;
            let node = config.cluster.node.clone();
            (config, node)
        }
        None => (Config::embedded_default(), host_name()),
    };
    let opts = adopt::Options {
        dir,
        node,
        min_free: config.limits.min_free_space,
        dry_run,
    };
    let report = adopt::adopt(spool, &opts).map_err(|e| -> anyhow::Error {
        if e.is_usage() {
            UsageError(e.to_string()).into()
        } else {
            e.into()
        }
    })?;
    let mut refused = 0;
    let mut affected = Vec::new();
    for outcome in &report.outcomes {
        match r::line(outcome, &report.dir) {
            Ok(line) => outln!("{line}"),
            Err(line) => {
                refused += 1;
                eprintln!("portcullis: {line}");
            }
        }
        if let Outcome::Imported { from, id, .. } = outcome {
            affected.push(if from == id {
                id.to_string()
            } else {
                format!("{id}<-{from}")
            });
        }
    }
    outln!("{}", r::summary(&report, dry_run));
    let notes = [
        r::left(&report.left, &report.dir),
        r::marker(&report.marker, &report.dir),
    ];
    for note in notes.into_iter().flatten() {
        outln!("{note}");
    }
    if !dry_run {
        if !affected.is_empty() {
            outln!("{}", report::RETRY_NOTE);
        }
        record(spool, &["queue", "adopt"], affected)?;
    }
    if let Some(why) = &report.stopped {
        bail!(
            "stopped: {why}; what was imported stays imported: run the same command again to go on"
        );
    }
    if refused > 0 {
        bail!(
            "{refused} files of {} refused",
            report.dir.join("queue").display()
        );
    }
    Ok(())
}

/// This machine's host name (`gethostname`), for a policy without `[server] hostname`.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and the last byte is never written past.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `listeners pause|resume`: write or remove `SPOOL/paused` (exit 2 without a spool, 1 when
/// the marker cannot be written or removed).
fn listeners(
    action: &ListenersAction,
    config: Option<&Path>,
    spool: Option<PathBuf>,
) -> anyhow::Result<()> {
    use portcullis::admin::pause;
    let dir = spool_dir(config, spool)?;
    let spool = open_spool(&dir, false)?;
    let marker = pause::marker_path(spool.root());
    let changed = match action {
        ListenersAction::Pause => {
            let paused = pause::pause(spool.root(), unix_now())?;
            if paused {
                outln!(
                    "listeners paused ({} written): the running relay answers new connections \
                     421 4.3.2 within a second; delivery goes on",
                    marker.display()
                );
            } else {
                outln!("listeners already paused ({} exists)", marker.display());
            }
            paused
        }
        ListenersAction::Resume => {
            let resumed = pause::resume(spool.root())?;
            if resumed {
                outln!(
                    "listeners resumed ({} removed): the running relay accepts again within a second",
                    marker.display()
                );
            } else {
                outln!("listeners not paused (no {})", marker.display());
            }
            resumed
        }
    };
    let words = match action {
        ListenersAction::Pause => ["listeners", "pause"],
        ListenersAction::Resume => ["listeners", "resume"],
    };
    let affected = if changed {
        vec!["listeners".to_owned()]
    } else {
        Vec::new()
    };
    record(&spool, &words, affected)
}

/// `--since DUR` as Unix milliseconds (0 without it); a bad duration is a usage error.
fn since_millis(since: Option<&str>) -> anyhow::Result<u64> {
    let Some(text) = since else { return Ok(0) };
    let age = portcullis::config::units::parse_duration(text)
        .map_err(|e| UsageError(format!("--since: {e}")))?;
    let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    Ok(portcullis::observe::event::unix_millis().saturating_sub(age))
}

/// A usage error unless `dir` is a spool (has `queue/`): a wrong --config/--spool.
fn require_spool(dir: &Path) -> anyhow::Result<()> {
    if dir.join("queue").is_dir() {
        return Ok(());
    }
    bail!(UsageError(format!(
        "no spool at {} (no queue/ directory); pass --spool DIR or --config FILE",
        dir.display()
    )))
}

/// Parse every id first, so a typo changes nothing (exit 2).
fn parse_ids(ids: &[String]) -> anyhow::Result<Vec<QueueId>> {
    ids.iter()
        .map(|s| s.parse().map_err(|e| UsageError(format!("{e}")).into()))
        .collect()
}

/// `queue retry`: one request file per known id (unknown ids: stderr, exit 1 at the end).
fn retry(spool: &Spool, dir: &Path, ids: &[String], all: bool) -> anyhow::Result<()> {
    let (affected, found) = if all {
        spool.request_retry(&RetryTarget::All)?;
        let pending = spool.pending_holds()?;
        let (held, queued): (Vec<_>, Vec<_>) = spool
            .list_map(|m| (select::held_now(&m, &pending), m.envelope.id))?
            .into_iter()
            .partition(|(held, _)| *held);
        let n = queued.len();
        if held.is_empty() {
            outln!("retry requested for all queued messages ({n} now)");
        } else {
            outln!(
                "retry requested for all queued messages ({n} now; {} held, skipped)",
                held.len()
            );
        }
        (
            queued.iter().map(|(_, id)| id.to_string()).collect(),
            Ok(()),
        )
    } else {
        let ids = parse_ids(ids)?;
        let (known, unknown): (Vec<QueueId>, Vec<QueueId>) =
            ids.into_iter().partition(|id| spool.contains(id));
        for id in &unknown {
            eprintln!("portcullis: no message {id} in {}", dir.display());
        }
        // A held message is not retried: it waits for `queue release`.
        let pending = spool.pending_holds()?;
        let (held, known): (Vec<QueueId>, Vec<QueueId>) = known
            .into_iter()
            .partition(|id| spool.load(id).is_ok_and(|m| select::held_now(&m, &pending)));
        for id in &held {
            outln!("{id} held, skipped (queue release {id} delivers it)");
        }
        if !known.is_empty() {
            spool.request_retry(&RetryTarget::Ids(known.clone()))?;
        }
        for id in &known {
            outln!("retry requested for {id}");
        }
        let found = if unknown.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "{} of {} messages not found",
                unknown.len(),
                unknown.len() + known.len() + held.len()
            ))
        };
        (to_strings(&known), found)
    };
    outln!("{}", report::RETRY_NOTE);
    all_ok([record(spool, &["queue", "retry"], affected), found])
}

/// `queue delete`: every known id is deleted even when some are unknown (stderr, exit 1).
fn delete(spool: &Spool, dir: &Path, ids: &[String]) -> anyhow::Result<()> {
    let ids = parse_ids(ids)?;
    let mut tally = report::Tally::new(false);
    let mut removed = Vec::new();
    for id in &ids {
        let outcome = match spool.delete(id) {
            Ok(outcome) => outcome,
            Err(e) => {
                // Unlinking queue/ID is the deletion: when a later step failed (its state's
                // unlink, the directory fsync), the message has left the queue all the same,
                // so it is recorded and announced with those removed before (invariant 2).
                let e = if spool.contains(id) {
                    anyhow::Error::new(e)
                } else {
                    removed.push(id.clone());
                    anyhow::Error::new(e).context(format!("{id} was deleted, but not cleanly"))
                };
                // Record and tell the relay about those removed so far; the error is the one
                // to report.
                let recorded = record(spool, &["queue", "delete"], to_strings(&removed));
                let notified = spool.notify_removed(RemovedHow::Delete, &removed);
                return all_ok([recorded, notified.map_err(Into::into), Err(e)]);
            }
        };
        if outcome == DeleteOutcome::NotFound {
            eprintln!("portcullis: no message {id} in {}", dir.display());
        } else {
            outln!("{}", report::deletion_line(id, None, Some(outcome)));
            removed.push(id.clone());
        }
        tally.add(Some(outcome));
    }
    outln!("{}", tally.summary());
    let recorded = record(spool, &["queue", "delete"], to_strings(&removed));
    let notified = spool.notify_removed(RemovedHow::Delete, &removed);
    let found = if tally.not_found > 0 {
        Err(anyhow::anyhow!(
            "{} of {} messages not found",
            tally.not_found,
            ids.len()
        ))
    } else {
        Ok(())
    };
    all_ok([recorded, notified.map_err(Into::into), found])
}

/// Record in the audit log the command named by `words` (e.g. `["queue", "purge"]`), which
/// has acted: with its arguments as typed, and `affected`, what it changed (queue ids,
/// `listeners`). An error says that the action was taken all the same (exit 1).
fn record(spool: &Spool, words: &[&str], affected: Vec<String>) -> anyhow::Result<()> {
    let args = own_args(std::env::args_os().skip(1), words);
    let entry = audit::Entry::now(&words.join(" "), &args, affected);
    spool.audit(&entry).with_context(|| {
        format!(
            "the {} was done, but it could not be recorded in the audit log",
            words.join(" ")
        )
    })
}

/// The arguments of the command named by `words`, as typed: the command line without the
/// program name, the global options (`--config`, `--spool` and their values) and the words.
fn own_args(argv: impl Iterator<Item = std::ffi::OsString>, words: &[&str]) -> Vec<String> {
    let mut argv = argv.map(|a| a.to_string_lossy().into_owned());
    let mut words = words.iter().peekable();
    let mut own = Vec::new();
    while let Some(arg) = argv.next() {
        let global = arg.starts_with("--config=") || arg.starts_with("--spool=");
        if arg == "--config" || arg == "--spool" {
            argv.next();
        } else if !global && words.next_if(|w| **w == arg).is_none() {
            own.push(arg);
        }
    }
    own
}

fn to_strings(ids: &[QueueId]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

/// Ok when every one of `results` is, else the last error, each earlier one said on stderr
/// (a command that failed in several ways reports them all, and exits 1 once).
fn all_ok(results: impl IntoIterator<Item = anyhow::Result<()>>) -> anyhow::Result<()> {
    let mut last = Ok(());
    for result in results {
        if let Err(e) = result
            && let Err(earlier) = std::mem::replace(&mut last, Err(e))
        {
            eprintln!("portcullis: {}", error_text(&earlier));
        }
    }
    last
}

/// `portcullis audit [--since DUR] [--json]`: the audit log, oldest first; lines it skipped
/// (a write torn by a crash) are noted on stderr.
fn audit_log(
    config: Option<&Path>,
    spool: Option<PathBuf>,
    since: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let since_ms = since_millis(since)?;
    let dir = spool_dir(config, spool)?;
    require_spool(&dir)?;
    let log = audit::read(&dir, since_ms)?;
    for skipped in &log.skipped {
        eprintln!("portcullis: note: {skipped}");
    }
    if log.entries.is_empty() {
        eprintln!(
            "portcullis: no audit entry{} in {}",
            since
                .map(|s| format!(" in the last {s}"))
                .unwrap_or_default(),
            audit::path(&dir).display()
        );
        return Ok(());
    }
    let names: std::collections::HashMap<u32, Option<String>> = log
        .entries
        .iter()
        .flat_map(|e| std::iter::once(e.uid).chain(e.login_uid))
        .map(|uid| (uid, portcullis::config::perms::user_name(uid)))
        .collect();
    let name = |uid: u32| names.get(&uid).cloned().flatten();
    let mut out = String::new();
    for entry in &log.entries {
        if json {
            out.push_str(&report::json_line(&audit::json_value(entry, &name)));
        } else {
            out.push_str(&audit::text_line(entry, &name));
        }
        out.push('\n');
    }
    // Read through `head`: a closed pipe ends the output, it is no failure.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

fn passwd() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut input)
        .context("cannot read the password from stdin")?;
    let password = input.lines().next().unwrap_or("");
    if password.is_empty() {
        bail!(UsageError("empty password on stdin".into()));
    }
    let hash = portcullis::policy::credentials::hash_password(password)
        .map_err(|e| anyhow::anyhow!("cannot hash password: {e}"))?;
    outln!("{hash}");
    Ok(())
}

/// The node every log line names ([`portcullis::app::named_node`]); `None`: lines unchanged.
fn log_node(config: &Config) -> Option<std::sync::Arc<str>> {
    portcullis::app::named_node(config).map(Into::into)
}

/// Log to stderr in `format` (`[log] format`), at the level `RUST_LOG` sets (`info`), each
/// line naming `node` when given (JSON: a top-level `"node"` field, first; text: `node=NAME`
/// after the level), added by the writer so that it reaches the lines of every task.
///
/// `json`: one JSON object per line (tracing-subscriber's JSON formatter): `timestamp`,
/// `level`, `message` and the event's fields at the top level, and `spans`, the list of
/// spans the line was written in with their fields, outermost first: `session` (`listener`,
/// `client_port`, `peer`) for every line of an SMTP session, `message` or `delivery`
/// (`queue_id`) for every line about one message.
fn init_logging(format: portcullis::config::LogFormat, node: Option<std::sync::Arc<str>>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        portcullis::config::LogFormat::Text => builder
            .with_writer(move || EscapingWriter::new(Escape::Text, node.clone()))
            // Colour codes only on a terminal: a log file or journal gets plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        portcullis::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(move || EscapingWriter::new(Escape::Json, node.clone()))
            .with_ansi(false)
            .init(),
    }
}

/// How [`EscapingWriter`] writes an invisible character.
#[derive(Clone, Copy)]
enum Escape {
    /// `\u{202e}`: Rust's notation, for people reading text lines.
    Text,
    /// `\u202e` (a surrogate pair above U+FFFF): a JSON string escape, so the line stays
    /// valid JSON and a reader decodes the very character that was received. Invisible
    /// characters only ever stand inside JSON strings (field names are the code's own).
    Json,
}

/// The log's writer: stderr, with every invisible character (bidirectional overrides,
/// zero-width characters: `portcullis::text::is_invisible`) escaped as [`Escape`] says.
/// Log lines quote addresses, HELO names and headers from the network; raw, a U+202E would make
/// `<\u{202e}gro.elpmaxe@knab-ecivres>` read as a trusted address in a terminal or pager. The
/// formatter hands over one whole line per event, so a character is never split across writes
/// and the node's name (a `[cluster] node`: letters, digits, `.`, `-`, `_` only, nothing to
/// escape) can be added to the line.
struct EscapingWriter(std::io::Stderr, Escape, Option<std::sync::Arc<str>>);

impl EscapingWriter {
    fn new(escape: Escape, node: Option<std::sync::Arc<str>>) -> EscapingWriter {
        EscapingWriter(std::io::stderr(), escape, node)
    }
}

/// Where the level of a text log line ends: after its first word (the timestamp), the blanks,
/// and its second (the level, perhaps in colour codes).
fn after_level(line: &str) -> Option<usize> {
    let stamp = line.find(' ')?;
    let level = stamp + line[stamp..].find(|c| c != ' ')?;
    Some(level + line[level..].find(' ')?)
}

/// `line` (one whole log line) naming `node`: JSON `{"node":"NAME",…`, text
/// `TIMESTAMP LEVEL node=NAME …`. A buffer that is not one line is left as it is.
fn with_node<'a>(line: &'a str, node: &str, escape: Escape) -> std::borrow::Cow<'a, str> {
    match escape {
        Escape::Json => match line.strip_prefix('{') {
            Some(rest) if rest.starts_with('}') => format!("{{\"node\":\"{node}\"{rest}").into(),
            Some(rest) => format!("{{\"node\":\"{node}\",{rest}").into(),
            None => line.into(),
        },
        // After the timestamp and the level (`2026-…Z  INFO node=NAME …`), where a reader
        // of a merged log looks first; a line of another shape gets it at its end.
        Escape::Text => match line.strip_suffix('\n') {
            Some(body) => match after_level(body) {
                Some(at) => format!("{} node={node}{}\n", &body[..at], &body[at..]).into(),
                None => format!("{body} node={node}\n").into(),
            },
            None => line.into(),
        },
    }
}

impl Escape {
    /// `text` with every invisible character escaped this way (borrowed when there is none).
    fn apply(self, text: &str) -> std::borrow::Cow<'_, str> {
        portcullis::text::escape_invisible(text, |c, out| match self {
            Escape::Text => out.extend(c.escape_unicode()),
            Escape::Json => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        })
    }
}

impl std::io::Write for EscapingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Ok(text) = std::str::from_utf8(buf) else {
            return self.0.write(buf);
        };
        let named = match &self.2 {
            Some(node) => with_node(text, node, self.1),
            None => std::borrow::Cow::Borrowed(text),
        };
        let escaped = self.1.apply(&named);
        if matches!(named, std::borrow::Cow::Borrowed(_))
            && matches!(escaped, std::borrow::Cow::Borrowed(_))
        {
            return self.0.write(buf);
        }
        self.0.write_all(escaped.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::Escape;

    /// A JSON line keeps parsing, and decodes to the very characters received, while no
    /// invisible character reaches the terminal raw (one in the BMP, one above it).
    #[test]
    fn json_lines_escape_invisible_characters_as_json_escapes() {
        let from = "<\u{202e}gro.elpmaxe@knab\u{e0001}>";
        let line = serde_json::json!({ "message": "rejected", "from": from }).to_string();
        let escaped = Escape::Json.apply(&line);
        assert!(!escaped.contains('\u{202e}') && !escaped.contains('\u{e0001}'));
        assert!(
            escaped.contains("\\u202e") && escaped.contains("\\udb40\\udc01"),
            "{escaped}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&escaped).unwrap();
        assert_eq!(parsed["from"], from);
    }

    /// The audit log records a command's own arguments as typed, without the global options
    /// (which may stand anywhere) and the words naming the command.
    #[test]
    fn own_args_leave_out_global_options_and_the_command_words() {
        let argv = |line: &str| {
            line.split(' ')
                .map(std::ffi::OsString::from)
                .collect::<Vec<_>>()
        };
        let own = |line: &str, words: &[&str]| super::own_args(argv(line).into_iter(), words);
        assert_eq!(
            own(
                "--spool queue queue --config=/etc/p.toml purge --from queue@x --config c.toml --all",
                &["queue", "purge"]
            ),
            ["--from", "queue@x", "--all"]
        );
        assert_eq!(
            own("queue delete --spool s A B", &["queue", "delete"]),
            ["A", "B"]
        );
        assert!(own("listeners pause", &["listeners", "pause"]).is_empty());
    }

    /// With `[cluster]`, every line names the node: JSON as its first field (still one valid
    /// object), text as `node=NAME` at the end.
    #[test]
    fn lines_name_the_node_in_json_and_in_text() {
        let line = "{\"timestamp\":\"t\",\"level\":\"INFO\",\"message\":\"m\"}\n";
        let named = super::with_node(line, "edge-1", Escape::Json);
        assert_eq!(
            named,
            "{\"node\":\"edge-1\",\"timestamp\":\"t\",\"level\":\"INFO\",\"message\":\"m\"}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&named).unwrap();
        assert_eq!(parsed["node"], "edge-1");
        assert_eq!(
            super::with_node("{}\n", "n", Escape::Json),
            "{\"node\":\"n\"}\n"
        );
        assert_eq!(
            super::with_node(
                "2026-12-01T14:00:00Z  INFO listening bind=127.0.0.1:25\n",
                "edge-1",
                Escape::Text
            ),
            "2026-12-01T14:00:00Z  INFO node=edge-1 listening bind=127.0.0.1:25\n"
        );
        assert_eq!(
            super::with_node("oddline\n", "n", Escape::Text),
            "oddline node=n\n"
        );
        // Not a whole line: left alone.
        assert_eq!(super::with_node("partial", "n", Escape::Text), "partial");
        assert_eq!(super::with_node("partial", "n", Escape::Json), "partial");
    }

    #[test]
    fn text_lines_escape_invisible_characters_in_rust_notation() {
        let escaped = Escape::Text.apply("from=<\u{202e}x@y>");
        assert_eq!(escaped, "from=<\\u{202e}x@y>");
    }
}
