//! Wires config, listeners and the spool together; owns shutdown and reload.
//!
//! Start: open and recover the spool (refusing, before touching it, one another node adopted:
//! [`crate::queue::adopt`]), build the TLS configuration, bind every listener (a bind failure
//! stops the start), then serve. SIGTERM/SIGINT: stop accepting, tell idle sessions
//! `421 4.3.0`, give sessions in DATA up to `[limits] shutdown_grace` to finish, exit. SIGHUP: load
//! the policy file again; a valid one applies to new sessions, an invalid one is logged and
//! the running one stays (DESIGN.md invariant 6).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, pause};
use crate::cluster::Cluster;
use crate::config::{Config, ConfigErrors};
use crate::inbound::{self, Runtime, tls};
use crate::observe::{ConfigSource, Telemetry};
use crate::outbound;
use crate::policy::Policy;
use crate::policy::containment::Containment;
use crate::queue::journal::Journal;
use crate::queue::{RecoveryReport, Spool, SpoolError};

/// How long the start waits for the capability probe of every upstream
/// ([`outbound::upstream::Upstreams::probe_all`]) before it opens the listeners anyway.
pub const PROBE_WAIT: Duration = Duration::from_secs(5);

/// Why the relay could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The policy is invalid (exit status 2).
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    /// The TLS certificate or key could not be loaded (exit status 2).
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// The spool could not be opened or recovered, or is unsafe (another user could write
    /// into it: exit status 2).
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    /// A listener could not bind its address, or the password verifier could not start.
    #[error(transparent)]
    Inbound(#[from] inbound::StartError),
    /// The spool recovery task panicked.
    #[error("spool recovery failed: {0}")]
    Recovery(tokio::task::JoinError),
    /// An upstream's TLS client configuration could not be built (exit status 2).
    #[error("{0}")]
    UpstreamTls(#[from] crate::outbound::ClientTlsError),
    /// The resolver of `[dns]` could not be set up (no `[dns] nameservers` and an unreadable
    /// system configuration; exit status 2).
    #[error("dns: {0}")]
    Resolver(#[from] crate::dns::ResolverError),
    /// The admin listener could not bind `[admin] bind`.
    #[error(transparent)]
    Admin(#[from] crate::admin::StartError),
    /// Signal handlers could not be installed.
    #[error("signals: {0}")]
    Signal(std::io::Error),
    /// The spool was adopted by another node (`queue adopt`, the marker `SPOOL/adopted`): its
    /// messages are that node's now, and this one must not deliver them again (exit status 2).
    #[error(
        "spool {} was adopted {marker}: its messages are delivered by that node; wipe this \
         spool (or point server.spool_dir at an empty one) before starting",
        dir.display()
    )]
    Adopted {
        /// The spool directory.
        dir: PathBuf,
        /// What its marker says (node, spool, time), or why it cannot be read.
        marker: String,
    },
    /// Another relay runs on this spool (it holds `SPOOL/relay.lock`; exit status 2).
    #[error(
        "spool {}: another relay is running on it (it holds {}); stop it first",
        dir.display(),
        crate::queue::running::LOCK_FILE
    )]
    Running {
        /// The spool directory.
        dir: PathBuf,
    },
}

impl AppError {
    /// True for errors in the operator's input (exit status 2).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AppError::Config(_)
                | AppError::Tls(_)
                | AppError::UpstreamTls(_)
                | AppError::Resolver(_)
                | AppError::Spool(SpoolError::Unsafe { .. })
                | AppError::Adopted { .. }
                | AppError::Running { .. }
        )
    }
}

/// Build the inbound runtime (policy, TLS and resolver) for a configuration. On reload
/// `previous` is the running runtime: rate-limit and AUTH-failure state is carried over where
/// its settings did not change, and so is the resolver (with its caches) when `[dns]` did not.
pub fn build_runtime(config: Config, previous: Option<&Runtime>) -> Result<Runtime, AppError> {
    let tls = match &config.tls {
        Some(t) => Some(tls::server_config(t, &config.server.hostname)?),
        None => None,
    };
    let resolver = resolver_for(&config, previous)?;
    Ok(Runtime {
        resolver,
        policy: Policy::new(
            &config,
            previous.map(|p| &p.policy),
            std::time::Instant::now(),
        ),
        config: Arc::new(config),
        tls,
    })
}

/// The resolver a configuration's checks use: `None` when no check needs DNS (SPF, DKIM
/// verification, DMARC, DNSBL; signing needs none), the previous snapshot's when `[dns]` is
/// unchanged, else a new one.
///
/// # Errors
/// [`AppError::Resolver`] when it cannot be built: the relay does not start, or the reload is
/// refused.
fn resolver_for(
    config: &Config,
    previous: Option<&Runtime>,
) -> Result<Option<crate::dns::Resolver>, AppError> {
    if !config.needs_resolver() {
        return Ok(None);
    }
    if let Some(previous) = previous
        && previous.config.dns == config.dns
        && let Some(resolver) = &previous.resolver
    {
        return Ok(Some(resolver.clone()));
    }
    let resolver = crate::dns::Resolver::new(&config.dns)?;
    info!(nameservers = ?config.dns.nameservers, timeout = ?config.dns.timeout, "resolver ready");
    Ok(Some(resolver))
}

/// Raise the soft limit on open files to the hard limit (a relay holds one descriptor per
/// client connection, plus upstream connections and spool files), and warn when even that
/// cannot hold `max_connections` clients: beyond it, accepting fails instead of answering
/// `421`. The usual soft limit is 1024; the hard limit is set by the service manager (e.g.
/// systemd's `LimitNOFILE`).
fn raise_fd_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // Headroom for upstream connections, spool files, listeners and the log.
    let needed = max_connections as u64 + 256;
    if limit.rlim_cur < needed {
        warn!(
            open_files = limit.rlim_cur,
            max_connections,
            "the open-file limit is below limits.max_connections plus headroom; \
             raise it (e.g. LimitNOFILE) or lower max_connections"
        );
    } else {
        info!(open_files = limit.rlim_cur, "open-file limit");
    }
}

/// Open the spool, refusing one another user could write into (see [`Spool::check_safe`]):
/// checked before anything is created in it, and again after.
fn open_spool(dir: &std::path::Path) -> Result<Spool, AppError> {
    // Before anything reads or changes it: another node delivers these messages now.
    let adopted =
        crate::queue::adopt::ledger::read_marker(dir).map_err(|source| SpoolError::Io {
            op: "stat",
            path: dir.join(crate::queue::adopt::MARKER),
            source,
        })?;
    if let Some(marker) = adopted {
        return Err(AppError::Adopted {
            dir: dir.to_path_buf(),
            marker: marker.map_or_else(|why| format!("({why})"), |m| m.describe()),
        });
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if dir.exists() {
        Spool::open_existing(dir)?.check_safe(uid)?;
    }
    let spool = Spool::open(dir)?;
    spool.check_safe(uid)?;
    Ok(spool)
}

/// Run the relay until a shutdown signal. `path` is the policy file, for SIGHUP.
pub async fn run(config: Config, path: Option<PathBuf>) -> Result<(), AppError> {
    // Installed first: a SIGHUP (e.g. `systemctl reload`) or SIGTERM during recovery and the
    // capability probe would otherwise kill the process by the signal's default action. Both
    // are taken up once the relay serves.
    let signals = Signals::install()?;
    let (spool, _running, report) = prepare_spool(&config).await?;
    // The rest of the recovery (every file of queue/) runs while the relay starts and
    // accepts mail; delivery waits for it (see `queue::recover`).
    let (recovered_tx, recovered) = tokio::sync::watch::channel(false);
    let recovery = {
        let spool = spool.clone();
        let mut report = report;
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            spool.recover_queue(&mut report)?;
            // Logged here, before the scheduler is told: its lines come after this one.
            info!(spool = %spool.root().display(), %report, secs = started.elapsed().as_secs_f64(),
                "spool recovered; loading the queue for delivery");
            let _ = recovered_tx.send(true);
            Ok(())
        })
    };
    raise_fd_limit(config.limits.max_connections);
    let telemetry = Arc::new(telemetry_for(&config, &spool));
    // Until the queue manager has loaded the queue (`portcullis status`, `/api/status`).
    telemetry.set_queue(
        crate::observe::QueueCensus {
            loading: true,
            ..Default::default()
        },
        crate::observe::event::unix_millis() / 1000,
    );
    // The shared store: nothing is connected until the watch task or a session asks.
    let cluster = Cluster::new(&config.cluster, telemetry.clone());
    // The suspended logins, read before any session or delivery starts (those of the shared
    // store are added at the first poll).
    let containment = {
        let (spool, telemetry, cluster) = (spool.clone(), telemetry.clone(), cluster.clone());
        let opened =
            tokio::task::spawn_blocking(move || Containment::open(spool, telemetry, cluster)).await;
        Arc::new(opened.map_err(AppError::Recovery)??)
    };
    let delivery_stop = CancellationToken::new();
    let delivery = outbound::start(
        &config,
        spool.clone(),
        delivery_stop.clone(),
        telemetry.clone(),
        containment.clone(),
        recovered,
    )?;
    // Learn what each upstream can carry before accepting mail, so the first sessions are
    // checked against what the upstreams say now rather than what they said last time.
    delivery
        .context
        .load()
        .upstreams
        .probe_all(&config.server.hostname, PROBE_WAIT)
        .await;
    let runtime = Arc::new(ArcSwap::from_pointee(build_runtime(config, None)?));
    let deps = inbound::Deps {
        spool: spool.clone(),
        queued: delivery.wake.clone(),
        capabilities: delivery.capabilities.clone(),
        telemetry: telemetry.clone(),
        containment: containment.clone(),
        cluster: cluster.clone(),
    };
    // A relay started while paused starts paused, before its first connection.
    let observe_stop = CancellationToken::new();
    start_pause_watch(&telemetry, &spool, &observe_stop);
    tokio::spawn(containment.clone().watch(observe_stop.clone()));
    if let Some(cluster) = &cluster {
        tokio::spawn(cluster.clone().watch(observe_stop.clone()));
    }
    // The alerts and the admin listener read the configuration running now at each
    // evaluation or request, so a reloaded threshold or token applies at once.
    let config_now: ConfigSource = {
        let runtime = runtime.clone();
        Arc::new(move || runtime.load().config.clone())
    };
    // Alerts log and show even without [admin] or a webhook; they count from here.
    // Their state is kept under the spool, so a restart neither forgets nor repeats them.
    let alerts = crate::observe::alerts::spawn(
        telemetry.clone(),
        config_now.clone(),
        observe_stop.clone(),
        Some(spool.root().join(crate::observe::alerts::state::FILE_NAME)),
    );
    let inbound = inbound::start(runtime.clone(), deps).await?;
    telemetry.gate.set_bound(true);
    // `/api/explain-state` reads the state of the policy and listeners running now.
    let client_state: crate::policy::store::ClientStateSource = {
        let (runtime, telemetry) = (runtime.clone(), telemetry.clone());
        let counter = inbound.connections();
        let cluster = cluster.clone();
        Arc::new(move |ip, login| {
            let paused = telemetry.gate.paused();
            let running = runtime.load_full();
            let mut state =
                inbound::explain::running_state(&running, &counter, paused, ip, login.as_deref());
            let cluster = cluster.clone();
            Box::pin(async move {
                let store = running.policy.store();
                let stores = crate::cluster::store::SharedStore::new(store, cluster.as_ref());
                stores.read_shared(&mut state, ip, login.as_deref()).await;
                state
            })
        })
    };
    // `/api/users` reads the messages each login sent within the hour.
    let users: admin::users::UsersSource = {
        let containment = containment.clone();
        Arc::new(move || containment.messages_last_hour(std::time::Instant::now()))
    };
    let sources = (client_state, users);
    let admin = match start_admin(config_now, sources, &telemetry, &spool, &observe_stop).await {
        Ok(admin) => admin,
        Err(e) => {
            inbound.stop(Duration::ZERO).await;
            return Err(e);
        }
    };
    let snapshot = runtime.load();
    info!(
        hostname = %snapshot.config.server.hostname,
        listeners = snapshot.config.listeners.len(),
        "portcullis started"
    );
    drop(snapshot);
    // systemd `Type=notify`: ready once every listener accepts (a no-op without
    // NOTIFY_SOCKET). A failure to tell is logged; the relay serves regardless.
    notify_service_manager(sd_notify::NotifyState::Ready);

    let stopped = wait_for_shutdown(
        signals,
        &runtime,
        path.as_deref(),
        &delivery,
        &spool,
        recovery,
    )
    .await;
    notify_service_manager(sd_notify::NotifyState::Stopping);
    // Not ready from here on (`/readyz` 503), while the admin listener still answers.
    telemetry.gate.set_bound(false);
    // The grace of the configuration running now (a reload may have changed it).
    inbound
        .stop(runtime.load().config.limits.shutdown_grace)
        .await;
    stop_delivery(delivery, delivery_stop).await;
    // Delivery's last events are in: write them out and seal the open segment.
    telemetry.close_journal();
    observe_stop.cancel();
    if let Some(admin) = admin {
        admin.stopped().await;
    }
    let _ = alerts.await;
    info!("portcullis stopped");
    stopped
}

/// Apply the `SPOOL/paused` marker now, then follow it ([`pause::watch`]) until `stop`.
fn start_pause_watch(telemetry: &Arc<Telemetry>, spool: &Spool, stop: &CancellationToken) {
    let paused = pause::is_paused(spool.root()).unwrap_or_else(|e| {
        warn!(error = %e, "cannot look at the pause marker; starting unpaused");
        false
    });
    pause::apply(telemetry, paused);
    tokio::spawn(pause::watch(
        telemetry.clone(),
        spool.root().to_path_buf(),
        stop.clone(),
    ));
}

/// Start the admin listener when `[admin]` is configured, reading the configuration running
/// now (`source`) at each request; it stops when `stop` is cancelled.
async fn start_admin(
    source: ConfigSource,
    (client_state, users): (
        crate::policy::store::ClientStateSource,
        admin::users::UsersSource,
    ),
    telemetry: &Arc<Telemetry>,
    spool: &Spool,
    stop: &CancellationToken,
) -> Result<Option<admin::AdminServer>, AppError> {
    let Some(settings) = source().admin.clone() else {
        return Ok(None);
    };
    let server = admin::start(
        &settings,
        telemetry.clone(),
        spool.clone(),
        source,
        client_state,
        users,
        stop.clone(),
    )
    .await?;
    Ok(Some(server))
}

/// The relay's telemetry: named after this node, its events journaled under the spool
/// (delivery declares the upstreams, see [`outbound::start`]).
fn telemetry_for(config: &Config, spool: &Spool) -> Telemetry {
    let journal = Journal::open(spool, &config.log, config.limits.min_free_space)
        .with_node(named_node(config).map(str::to_owned));
    Telemetry::new(config.cluster.node.clone()).with_journal(Box::new(journal))
}

/// The node that log lines and journal events name: `[cluster] node` when `[cluster]` is in
/// use (a store, or a node name other than `server.hostname`); `None` otherwise, and they are
/// written as without `[cluster]`.
pub fn named_node(config: &Config) -> Option<&str> {
    let cluster = &config.cluster;
    (cluster.redis.is_some() || cluster.node != config.server.hostname)
        .then_some(cluster.node.as_str())
}

/// A recovery of `queue/` running in the background (it logs its report when done).
type Recovery = tokio::task::JoinHandle<Result<(), SpoolError>>;

/// Open and lock the spool and run the first part of its recovery off the reactor
/// ([`Spool::recover_start`]: `tmp/` and the quarantine's leftovers, not `queue/`), then log
/// the configuration's warnings.
async fn prepare_spool(
    config: &Config,
) -> Result<(Spool, crate::queue::running::RelayLock, RecoveryReport), AppError> {
    let spool = open_spool(&config.server.spool_dir)?;
    // Held until the process ends: no second relay, and no `queue adopt`, on this spool.
    let lock = crate::queue::running::lock(spool.root()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            AppError::Running {
                dir: spool.root().to_path_buf(),
            }
        } else {
            AppError::Spool(SpoolError::Io {
                op: "lock",
                path: spool.root().join(crate::queue::running::LOCK_FILE),
                source: e,
            })
        }
    })?;
    let report = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || spool.recover_start())
            .await
            .map_err(AppError::Recovery)??
    };
    info!(spool = %config.server.spool_dir.display(), temp_files_removed = report.tmp_removed,
        "recovering the queue; accepting mail meanwhile, delivering once it is done");
    for w in config.warnings() {
        warn!("{w}");
    }
    for w in crate::config::perms::secret_file_warnings(config) {
        warn!("{w}");
    }
    Ok((spool, lock, report))
}

/// Tell the service manager `state` (sd_notify(3): `READY=1`, `STOPPING=1`) when it gave us
/// a `NOTIFY_SOCKET`; nothing otherwise.
fn notify_service_manager(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The signals the relay acts on.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Signals, AppError> {
        let on = |kind| signal(kind).map_err(AppError::Signal);
        Ok(Signals {
            term: on(SignalKind::terminate())?,
            int: on(SignalKind::interrupt())?,
            hup: on(SignalKind::hangup())?,
        })
    }
}

/// Serve SIGHUP (reload) until SIGTERM or SIGINT, and watch the background `recovery` of the
/// spool. A recovery that fails (`queue/` cannot be
/// listed: a file it cannot deal with is only logged) stops the relay like a SIGTERM: `Err`
/// with its error, for `main` to print and exit 1; what is queued stays queued.
async fn wait_for_shutdown(
    mut signals: Signals,
    runtime: &ArcSwap<Runtime>,
    path: Option<&std::path::Path>,
    delivery: &outbound::Delivery,
    spool: &Spool,
    recovery: Recovery,
) -> Result<(), AppError> {
    let mut recovery = Some(recovery);
    loop {
        tokio::select! {
            _ = signals.term.recv() => { info!("SIGTERM: shutting down"); return Ok(()); }
            _ = signals.int.recv() => { info!("SIGINT: shutting down"); return Ok(()); }
            _ = signals.hup.recv() => reload(runtime, path, delivery, spool),
            ended = async { recovery.as_mut().expect("guarded").await }, if recovery.is_some() => {
                recovery = None;
                match ended.map_err(AppError::Recovery)? {
                    Ok(()) => {}
                    Err(e) => {
                        error!(error = %e, "spool recovery failed: cannot list the queue, so nothing queued can be delivered; shutting down (nothing queued is lost)");
                        return Err(AppError::Spool(e));
                    }
                }
            }
        }
    }
}

/// Inbound is done: stop starting deliveries, let those in flight finish their transaction
/// (within `[queue] delivery_grace`; an abandoned one is simply tried again after the restart,
/// since its state was never changed), then say QUIT to idle upstreams.
async fn stop_delivery(delivery: outbound::Delivery, stop: CancellationToken) {
    stop.cancel();
    let _ = delivery.manager.await;
    delivery.tracker.close();
    let grace = delivery.context.load().queue.delivery_grace;
    if tokio::time::timeout(grace, delivery.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            "deliveries still running after the shutdown grace period; abandoning them (they will be retried)"
        );
    }
    delivery.context.load_full().upstreams.close_all().await;
}

/// What differs between `old` and `new` among the settings read only at start, one warning
/// each: a reload applies everything else, and must not pass over these in silence.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let binds = |c: &Config| {
        c.listeners
            .iter()
            .map(|l| (l.name.clone(), l.bind))
            .collect::<Vec<_>>()
    };
    // Added, removed or moved: the admin listener is bound once, at start (its token and what
    // it reports follow the reload).
    let admin = |c: &Config| c.admin.as_ref().map(|a| a.bind);
    let journal = |c: &Config| (c.log.journal_keep, c.log.journal_max_size);
    let store = |c: &Config| {
        (
            c.cluster.redis.clone(),
            c.cluster.on_error,
            c.cluster.timeout,
        )
    };
    let checks = [
        (
            binds(old) != binds(new),
            "listener names or binds changed; that takes a restart (new policy applies to the existing listeners)",
        ),
        (
            old.server.spool_dir != new.server.spool_dir,
            "spool_dir changed; that takes a restart",
        ),
        (
            old.log.format != new.log.format,
            "[log] format changed; that takes a restart",
        ),
        (
            journal(old) != journal(new),
            "[log] journal_keep or journal_max_size changed; that takes a restart (the journal keeps the values it started with)",
        ),
        (
            admin(old) != admin(new),
            "[admin] bind changed (or [admin] added or removed); that takes a restart (the admin listener stays as it started)",
        ),
        (
            old.server.hostname != new.server.hostname || old.cluster.node != new.cluster.node,
            "server.hostname or [cluster] node changed; SMTP and delivery use the new host name, but the node keeps its name (logs, the journal, Received:, the alerts, the webhook, the status) until a restart",
        ),
        (
            store(old) != store(new),
            "[cluster] redis, on_error or timeout changed; that takes a restart (the node keeps the [cluster] it started with)",
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(changed, warning)| changed.then_some(warning))
        .collect()
}

/// SIGHUP: load and validate the policy file; swap it in only if it is entirely valid (an
/// upstream TLS client that cannot be built included). Its `[[upstreams]]` and `[queue]` go
/// to `delivery` (new attempts and the RCPT route checks).
fn reload(
    runtime: &ArcSwap<Runtime>,
    path: Option<&std::path::Path>,
    delivery: &outbound::Delivery,
    spool: &Spool,
) {
    let Some(path) = path else {
        warn!("SIGHUP: running on the embedded default; nothing to reload");
        return;
    };
    let old = runtime.load_full();
    let mut warnings = Vec::new();
    let new = match Config::load(path)
        .map_err(AppError::from)
        .and_then(|mut config| {
            warnings = restart_only_changes(&old.config, &config);
            // `[cluster]` is read at start: the node keeps its name and store, and everything
            // that reads the configuration (Received:, warnings, the status) says what runs.
            config.cluster = old.config.cluster.clone();
            build_runtime(config, Some(&old))
        }) {
        Ok(rt) => rt,
        Err(e) => {
            error!(rule = "reload_refused", file = %path.display(), "reload refused, keeping the running configuration: {e}");
            return;
        }
    };
    for warning in warnings {
        warn!("reload: {warning}");
    }
    // When changed, or when an upstream names a `ca` bundle, which may have been replaced
    // under the same path (a SIGHUP reads every file the policy names again, as it does the
    // listeners' certificate); [`outbound::Delivery::reload`] keeps what did not change.
    let (was, is) = (&old.config, &new.config);
    if (&was.upstreams, &was.queue, &was.server.hostname)
        != (&is.upstreams, &is.queue, &is.server.hostname)
        || is.upstreams.iter().any(|u| u.ca.is_some())
    {
        // An upstream whose TLS client cannot be built stops a start (exit status 2), so it
        // makes the whole file invalid here too: nothing of it applies, inbound included.
        if let Err(e) = delivery.reload(&new.config, spool) {
            error!(rule = "reload_refused", file = %path.display(), "reload refused, keeping the running configuration: {e}");
            return;
        }
        info!("reload: [[upstreams]] and [queue] apply to new delivery attempts");
    }
    for w in new.config.warnings() {
        warn!("{w}");
    }
    runtime.store(Arc::new(new));
    info!(rule = "reload", file = %path.display(), "configuration reloaded");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Verify;

    fn config(spf: Verify, timeout: u64) -> Config {
        let text = "[server]\nhostname = \"relay.test\"\n[[listeners]]\nbind = \"127.0.0.1:2525\"\n\
             tls = \"none\"\n[[upstreams]]\naddress = \"127.0.0.1:25\"\n";
        let mut config = Config::from_toml(text, None).expect("valid test policy");
        config.spf.verify = spf;
        config.dns.nameservers = vec!["127.0.0.1:5353".parse().unwrap()];
        config.dns.timeout = Duration::from_secs(timeout);
        config
    }

    #[tokio::test]
    async fn a_reload_keeps_the_resolver_and_its_caches_unless_dns_changed() {
        let none = build_runtime(config(Verify::Off, 5), None).unwrap();
        assert!(none.resolver.is_none(), "no check: no resolver");
        let first = build_runtime(config(Verify::Record, 5), None).unwrap();
        let same = build_runtime(config(Verify::Enforce, 5), Some(&first)).unwrap();
        let caches = |rt: &Runtime| std::ptr::from_ref(rt.resolver.as_ref().unwrap().caches());
        assert_eq!(caches(&first), caches(&same));
        let changed = build_runtime(config(Verify::Record, 2), Some(&first)).unwrap();
        assert_ne!(caches(&first), caches(&changed));
        assert_eq!(changed.resolver.unwrap().timeout(), Duration::from_secs(2));
    }

    /// Every setting read only at start is named when a reload changes it, and nothing is
    /// named when only reloadable settings change.
    #[test]
    fn a_reload_warns_of_every_setting_that_takes_a_restart() {
        let old = config(Verify::Off, 5);
        let mut reloadable = old.clone();
        reloadable.spf.verify = Verify::Record;
        reloadable.dns.timeout = Duration::from_secs(2);
        assert!(restart_only_changes(&old, &reloadable).is_empty());

        let admin = |port: u16| {
            let text = format!(
                "[server]\nhostname = \"relay.test\"\n[[listeners]]\nbind = \"127.0.0.1:2525\"\n\
                 tls = \"none\"\n[[upstreams]]\naddress = \"127.0.0.1:25\"\n\
                 [admin]\nbind = \"127.0.0.1:{port}\"\n"
            );
            Config::from_toml(&text, None).expect("valid test policy")
        };
        let named = |old: &Config, new: &Config, what: &str| {
            let warnings = restart_only_changes(old, new);
            assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
            assert!(warnings[0].starts_with(what), "{what}: {warnings:?}");
        };
        named(&admin(8025), &admin(8026), "[admin] bind changed");
        named(&old, &admin(8025), "[admin] bind changed");
        named(&admin(8025), &old, "[admin] bind changed");
        let mut keep = old.clone();
        keep.log.journal_keep = Duration::from_secs(3600);
        named(
            &old,
            &keep,
            "[log] journal_keep or journal_max_size changed",
        );
        let mut size = old.clone();
        size.log.journal_max_size /= 2;
        named(
            &old,
            &size,
            "[log] journal_keep or journal_max_size changed",
        );
        let mut host = old.clone();
        host.server.hostname = "mx2.test".into();
        named(&old, &host, "server.hostname or [cluster] node changed");
        let mut node = old.clone();
        node.cluster.node = "edge-2".into();
        named(&old, &node, "server.hostname or [cluster] node changed");
        let mut store = old.clone();
        store.cluster.redis =
            Some(crate::config::RedisUrl::parse("redis://127.0.0.1:6379/0").unwrap());
        named(&old, &store, "[cluster] redis, on_error or timeout changed");
        let mut spool = old.clone();
        spool.server.spool_dir = "/elsewhere".into();
        named(&old, &spool, "spool_dir changed");
    }
}
