//! The alert task: every [`INTERVAL`] it reads the running `[alerts]`, gathers the
//! [`Inputs`] from the telemetry, evaluates them, steps the [`Engine`], and announces each
//! start and end: an error line (`alert=NAME`) or an info line when resolved, the
//! `portcullis_alert_active` gauge, the alert board behind the status, and the webhook. It
//! runs whether or not `[admin]` or `webhook` are set; an evaluation reads a few mutexes and
//! never waits on I/O.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{ActiveAlert, AlertName, Down, Engine, Inputs, Transition, evaluate, state};
use crate::observe::webhook::{Body, State, Webhook};
use crate::observe::{ConfigSource, Telemetry};

/// How often the alerts are evaluated.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A wall clock: Unix milliseconds.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Start the alert task (and the webhook's) for `telemetry`, reading `[alerts]` from `config`
/// at each evaluation so a reload applies at the next one. Both end when `shutdown` is
/// cancelled; the handle completes when both have (and the last alert state is written).
/// Every alert's gauge is set to 0 first, so each series exists from the start. With
/// `state_file` ([`state`]), the alerts firing there are taken up as firing (gauge 1, on the
/// board, not announced again), and the file follows every start and end.
pub fn spawn(
    telemetry: Arc<Telemetry>,
    config: ConfigSource,
    shutdown: CancellationToken,
    state_file: Option<PathBuf>,
) -> JoinHandle<()> {
    spawn_with_clock(
        telemetry,
        config,
        shutdown,
        Arc::new(crate::observe::event::unix_millis),
        state_file,
    )
}

/// [`spawn`] with the wall clock given: the times the alerts compare come from events, the
/// census and the upstream board, all in wall-clock time.
pub fn spawn_with_clock(
    telemetry: Arc<Telemetry>,
    config: ConfigSource,
    shutdown: CancellationToken,
    clock: Clock,
    state_file: Option<PathBuf>,
) -> JoinHandle<()> {
    for name in AlertName::ALL {
        telemetry.metrics.set_alert(name.as_str(), false);
    }
    let mut engine = Engine::default();
    if let Some(path) = &state_file {
        let kept = state::load(path);
        for a in &kept {
            info!(
                alert = a.alert.as_str(),
                since = a.since,
                "alert firing before the restart; carried on"
            );
            telemetry.metrics.set_alert(a.alert.as_str(), true);
        }
        engine.seed(kept);
        telemetry.alerts.set(engine.active());
    }
    let (webhook, sender) = Webhook::spawn(shutdown.clone());
    let (keep, writer) = match state_file {
        Some(path) => {
            let (keep, changes) = tokio::sync::mpsc::unbounded_channel();
            (Some(keep), Some(tokio::spawn(write_state(path, changes))))
        }
        None => (None, None),
    };
    let started = clock();
    tokio::spawn(async move {
        let mut watch = QueueWatch::new(started);
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let now = clock();
            let config = config();
            let inputs = gather(&telemetry, &mut watch, started, now);
            let mut conditions = evaluate(&inputs, &config.alerts, now);
            conditions.extend(telemetry.alerts.external_conditions());
            let transitions = engine.step(&conditions, now);
            // Set at every evaluation: values change while an alert fires.
            telemetry.alerts.set(engine.active());
            if let Some(keep) = keep.as_ref().filter(|_| !transitions.is_empty()) {
                let _ = keep.send(engine.active());
            }
            for t in transitions {
                announce(&t, &telemetry, &webhook, config.alerts.webhook.as_deref());
            }
        }
        // The webhook's task ends on the same cancellation; the handle covers both, and the
        // state writer, which ends once it has written the last state sent.
        drop(keep);
        let _ = sender.await;
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    })
}

/// Write each alert state received to `path` (only the latest when several wait), off the
/// reactor, until the sender is gone. A failure is logged: the alerts go on, only a restart
/// would forget them.
async fn write_state(
    path: PathBuf,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Vec<ActiveAlert>>,
) {
    while let Some(mut alerts) = changes.recv().await {
        while let Ok(newer) = changes.try_recv() {
            alerts = newer;
        }
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || state::save(&target, &alerts)).await;
        if let Ok(Err(e)) = written {
            warn!(file = %path.display(), error = %e, "cannot write the alert state; a restart would forget the firing alerts");
        }
    }
}

/// Since when the queue (held messages not counted) has not been empty, as the census shows
/// it evaluation by evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueWatch {
    /// The last evaluation that saw the queue empty (at first: the relay's start).
    last_empty: u64,
    nonempty_since: Option<u64>,
}

impl QueueWatch {
    /// A watch for a relay started at `started` (Unix milliseconds): messages recovered from
    /// the spool count as queued since the start.
    pub fn new(started: u64) -> QueueWatch {
        QueueWatch {
            last_empty: started,
            nonempty_since: None,
        }
    }

    /// Follow the census at `now`: `queued` messages, the oldest arrived at `oldest_arrival`
    /// (Unix seconds). The moment the queue became non-empty is the oldest message's arrival,
    /// but not before the last evaluation that saw it empty (a released held message arrived
    /// long ago, yet the queue was empty until its release).
    pub fn observe(&mut self, queued: u64, oldest_arrival: Option<u64>, now: u64) -> Option<u64> {
        if queued == 0 {
            self.last_empty = now;
            self.nonempty_since = None;
            return None;
        }
        let last_empty = self.last_empty;
        let since = *self.nonempty_since.get_or_insert_with(|| {
            oldest_arrival
                .map_or(now, |a| a.saturating_mul(1000).max(last_empty))
                .min(now)
        });
        Some(since)
    }
}

/// The inputs of one evaluation, from the telemetry at `now`.
fn gather(telemetry: &Telemetry, watch: &mut QueueWatch, started: u64, now: u64) -> Inputs {
    let (last_accepted, last_delivered) = telemetry.flow.last_times();
    let census = telemetry.queue();
    let queued = census.queued();
    let oldest_arrival = census.oldest.as_ref().map(|(_, arrived)| *arrived);
    let down = telemetry
        .upstreams
        .snapshot(now / 1000)
        .into_iter()
        .filter(|u| !u.up)
        .map(|u| Down {
            name: u.name,
            breaker_open: u.breaker_open,
            since: u.since,
            error: u.last_error,
        })
        .collect();
    Inputs {
        started,
        last_accepted,
        last_delivered,
        queued,
        queue_nonempty_since: watch.observe(queued, oldest_arrival, now),
        oldest_arrival,
        down,
        paused: telemetry.gate.paused(),
    }
}

/// Log, gauge and webhook for one start or end.
fn announce(t: &Transition, telemetry: &Telemetry, webhook: &Webhook, url: Option<&str>) {
    let (state, alert, since) = match t {
        Transition::Started(a) | Transition::Grew(a) => (State::Firing, a, a.since),
        Transition::Ended { alert, at } => (State::Resolved, alert, *at),
    };
    let name = alert.alert.as_str();
    match state {
        State::Firing => error!(
            alert = name,
            value = %alert.value,
            threshold = %alert.threshold,
            "alert firing: {}",
            alert.text
        ),
        State::Resolved => info!(
            alert = name,
            value = %alert.value,
            after_seconds = since.saturating_sub(alert.since),
            "alert resolved: {}",
            alert.text
        ),
    }
    telemetry.metrics.set_alert(name, state == State::Firing);
    if let Some(url) = url {
        webhook.send(url, Body::new(state, alert, since, &telemetry.node));
    }
}
