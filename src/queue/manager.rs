//! The queue manager: one task that knows when each queued message is due and starts its
//! attempts.
//!
//! It owns the due set ((due time, id) pairs, loaded from the spool at start; held messages
//! are not in it), the operator requests (`queue retry`, hold and release, through
//! `SPOOL/control/`, read every [`CONTROL_INTERVAL`]; a hold is written to the message's state
//! by the manager itself, or once the message's attempt in flight has ended), and the
//! scheduling of the bounces attempts queue. New messages arrive on a channel the moment
//! they are committed (the inbound side sends the id, and the message itself when small,
//! after the `250`), so delivery starts without any polling delay or reading the file back.
//! At most [`Courier::max_in_flight`] attempts run at once, and one message is never
//! attempted twice at the same time. New mail (and whatever an operator makes due at once) is
//! due before everything already queued; and while new mail arrives (the last within
//! [`NEW_MAIL_WINDOW`]), mail queued before takes at most a quarter of those attempts, so that
//! draining a backlog (after `queue retry --all`, say) leaves new mail its share of the
//! upstream connections and of the CPU that accepts it. Each attempt ([`super::attempt`]) runs in its own task
//! under a `delivery` span carrying its `queue_id`.
//!
//! The [`Courier`] is read anew for each attempt, so a reload that swaps it applies to new
//! attempts while those in flight finish with the one they started with.
//!
//! Telemetry: the manager keeps the queue [`Census`] up to date as messages arrive, end an
//! attempt, are held, released or removed by an operator (removal notices from `queue
//! delete|purge`, see [`super::control`]), and publishes it at most every
//! [`CENSUS_INTERVAL`] (again while a message waits, so the age of the oldest moves on). It
//! records the `held`, `released`, `deleted`, `purged`, `quarantined` and `restored` events,
//! and sweeps `quarantine/` ([`Spool::sweep_quarantine`]); each attempt records its
//! own (`expired`, `bounced`, `finished`; the courier the delivery events).
//!
//! Containment ([`Manager::with_containment`]): the queued mail of a suspended login is
//! held, with the reason [`SUSPENDED_REASON`]: at start (a message not held whose login is
//! suspended), when a login is suspended (its messages found by a listing of the spool off
//! this task, then held together), and when one of its messages arrives (committed just as
//! the suspension came). Whatever else brings one due (restored from quarantine, released by
//! hand, a hold that could not be recorded), its attempt sends nothing and asks for the hold
//! ([`AttemptEnd::Suspended`]). Resuming a login releases nothing: an operator does.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use super::attempt::{self, AttemptEnd, Courier, Ended, facts_of, on_spool};
use super::census::Census;
use super::control::{Removal, RemovedHow};
use super::hold::HoldChange;
use super::quarantine;
use super::schedule::{self, AfterAttempt};
use super::{Committed, Loaded, Request, RetryTarget, Spool, SpoolError};
use crate::envelope::QueueId;
use crate::observe::{CENSUS_INTERVAL, Event, EventKind, Telemetry};
use crate::policy::containment::Containment;

/// Messages the load at start reads at a time (`Manager::load`): about 1.6 KB each while
/// read, so a few MB whatever the length of the queue.
const LOAD_CHUNK: usize = 4096;

/// The reason recorded for a hold asked for with `queue hold` (shown by `queue list|show`).
pub const HOLD_REASON: &str = "queue hold";

/// Newly suspended logins' queued messages not held, with each one's login.
type Found = Vec<(String, QueueId)>;

/// How long after a failed record of an operator's hold or release it is asked again (a
/// failing disk is logged once per message and interval, not at every pass).
pub const HOLD_RETRY: Duration = Duration::from_secs(5);

/// How long after a failed hold of a suspended login's message it is looked at again (its
/// attempt then sends nothing and asks for the hold once more).
pub const SUSPENDED_HOLD_RETRY: Duration = Duration::from_secs(30);

/// The reason recorded for the hold of a suspended login's message.
pub const SUSPENDED_REASON: &str = "login suspended";

/// How often operator requests are read and idle connections reaped.
pub const CONTROL_INTERVAL: Duration = Duration::from_millis(500);

/// How long after new mail last arrived mail queued before keeps to a quarter of the attempts
/// in flight (see the module docs). One second: long enough to span the gaps between a client's
/// messages, short enough that a drain gets its full width back at once when they stop.
pub const NEW_MAIL_WINDOW: Duration = Duration::from_secs(1);

/// Where the manager reads the time, in Unix milliseconds.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system clock.
    System,
    /// Tokio's clock, counted from a Unix time: moves with paused time in tests.
    Tokio {
        /// Unix milliseconds at `start`.
        base_ms: u64,
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock on tokio's time that reads `unix_secs` now.
    pub fn tokio_at(unix_secs: u64) -> Clock {
        Clock::Tokio {
            base_ms: unix_secs * 1000,
            start: tokio::time::Instant::now(),
        }
    }

    /// Unix milliseconds.
    pub fn now_millis(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Clock::Tokio { base_ms, start } => {
                base_ms + u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
            }
        }
    }

    /// Unix seconds.
    pub fn now(&self) -> u64 {
        self.now_millis() / 1000
    }
}

/// The queue manager task.
pub struct Manager<C: Courier> {
    spool: Spool,
    /// Swapped by a reload; each attempt takes the one current when it starts.
    courier: Arc<ArcSwap<C>>,
    clock: Clock,
    incoming: UnboundedReceiver<Committed>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// (due, id), earliest first.
    due: BTreeSet<(u64, QueueId)>,
    /// When each scheduled message is due (the index into `due`).
    when: HashMap<QueueId, u64>,
    /// Messages being attempted now.
    busy: HashSet<QueueId>,
    /// Those of them that were queued before: not due at once (new mail, a bounce, or what an
    /// operator made due) but at a time of their own.
    backlog_busy: HashSet<QueueId>,
    /// When new mail last arrived (monotonic: a step of the wall clock neither opens nor
    /// holds the window).
    new_mail_at: Option<tokio::time::Instant>,
    /// Messages an operator asked to retry while they were being attempted.
    retry_when_done: HashSet<QueueId>,
    /// Messages to hold (true) or release (false) once their attempt in flight ends: the
    /// last such request wins.
    hold_when_done: HashMap<QueueId, (bool, &'static str)>,
    /// The `holds.SEQ.NONCE` files this manager took, oldest first, each with the messages
    /// it names: left in `control/` (a crash finds them again at the next start) and not
    /// read again, until [`Manager::finish_hold_files`] unlinks those whose holds are all
    /// recorded.
    hold_files: VecDeque<(PathBuf, Vec<QueueId>)>,
    /// Operator holds (true) and releases that could not be recorded, asked again at
    /// `hold_retry_at` (Unix seconds) unless a later request names the message first.
    hold_retry: HashMap<QueueId, bool>,
    hold_retry_at: u64,
    /// A message just received, in memory, until the next dispatch: used if it starts at
    /// once, dropped otherwise (it is read from the spool when its turn comes), so this holds
    /// at most one message's bytes and open file.
    fresh: Option<(QueueId, Loaded)>,
    /// Where queue events and the census are recorded.
    telemetry: Arc<Telemetry>,
    /// The queue as counted now, kept up to date as messages come and go.
    census: Census,
    /// When the census was last published (Unix milliseconds of `clock`).
    published_at: Option<u64>,
    /// Messages an operator removed while they were being attempted: their attempt's end
    /// is taken as their leaving the queue (it may have settled just before the removal).
    removed_when_done: HashSet<QueueId>,
    /// Messages `queue restore` put back while an attempt of theirs (from before their
    /// quarantine) was in flight: loaded and scheduled once it ends.
    restored_when_done: HashSet<QueueId>,
    /// When to sweep `quarantine/` next (Unix milliseconds of `clock`; 0: at start).
    sweep_at_ms: u64,
    /// The suspended logins, whose queued mail is held (`None`: no containment).
    containment: Option<Arc<Containment>>,
    /// The suspended logins whose mail was looked for.
    suspended_seen: HashSet<String>,
    /// Suspended logins' messages not held, found off this task.
    found: (mpsc::UnboundedSender<Found>, UnboundedReceiver<Found>),
    /// True once the startup recovery of `queue/` is done; the queue is loaded only then
    /// (`None`: recovered before this manager was made).
    recovered: Option<tokio::sync::watch::Receiver<bool>>,
}

impl<C: Courier> Manager<C> {
    /// A manager of `spool`, attempting with the current `courier`, woken by `incoming`.
    pub fn new(
        spool: Spool,
        courier: Arc<ArcSwap<C>>,
        incoming: UnboundedReceiver<Committed>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Manager<C> {
        Manager {
            spool,
            courier,
            clock: Clock::System,
            incoming,
            shutdown,
            tracker,
            due: BTreeSet::new(),
            when: HashMap::new(),
            busy: HashSet::new(),
            backlog_busy: HashSet::new(),
            new_mail_at: None,
            retry_when_done: HashSet::new(),
            hold_when_done: HashMap::new(),
            hold_files: VecDeque::new(),
            hold_retry: HashMap::new(),
            hold_retry_at: 0,
            fresh: None,
            telemetry: Arc::new(Telemetry::new("")),
            census: Census::default(),
            published_at: None,
            removed_when_done: HashSet::new(),
            restored_when_done: HashSet::new(),
            sweep_at_ms: 0,
            containment: None,
            suspended_seen: HashSet::new(),
            found: mpsc::unbounded_channel(),
            recovered: None,
        }
    }

    /// Load the queue only once `recovered` says true: the relay accepts mail while
    /// [`Spool::recover_queue`] runs, and delivers (new mail too) after it. A recovery that
    /// fails drops the sender: this manager then waits for the shutdown that follows.
    #[must_use]
    pub fn after_recovery(mut self, recovered: tokio::sync::watch::Receiver<bool>) -> Manager<C> {
        self.recovered = Some(recovered);
        self
    }

    /// Hold the queued mail of the logins `containment` suspends (see the module doc).
    #[must_use]
    pub fn with_containment(mut self, containment: Arc<Containment>) -> Manager<C> {
        self.containment = Some(containment);
        self
    }

    /// Record queue events and publish the census in `telemetry` (by default, a private one
    /// nothing reads).
    #[must_use]
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Manager<C> {
        self.telemetry = telemetry;
        self
    }

    /// Read the time from `clock` instead of the system clock (tests with paused time).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Manager<C> {
        self.clock = clock;
        self
    }

    /// Run until shutdown: load the spool, then schedule.
    pub async fn run(mut self) {
        // Subscribed before the load, so a suspension made during it is acted on.
        let mut suspensions = self.containment.as_ref().map(|c| c.subscribe());
        if let Some(mut recovered) = self.recovered.take() {
            let done = async { recovered.wait_for(|done| *done).await.is_ok() };
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                done = done => if !done {
                    self.shutdown.cancelled().await;
                    return;
                },
            }
        }
        self.load().await;
        // The census says "loading" until this first publication (also when the load failed).
        self.publish();
        // Arrivals buffered during the recovery and the load, before any request is read: one
        // the load listed is known already and ignored (see `arrived`).
        while let Ok(new) = self.incoming.try_recv() {
            self.arrived(new).await;
        }
        // Requests made while the relay was stopped, before anything is attempted: a message
        // held then must not be sent by the first dispatch.
        self.control().await;
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Ended>();
        let mut control = tokio::time::interval(CONTROL_INTERVAL);
        control.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wait = self.dispatch(&done_tx);
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                Some(ended) = done_rx.recv() => self.ended(ended).await,
                Some(new) = self.incoming.recv() => self.arrived(new).await,
                _ = control.tick() => self.control().await,
                Some(()) = changed(&mut suspensions) => self.suspensions_changed(),
                Some(found) = self.found.1.recv() => self.hold_found(found).await,
                () = tokio::time::sleep(wait) => {}
            }
        }
        info!(in_flight = self.busy.len(), "delivery scheduler stopping");
    }

    /// Schedule every queued message that is not held, at its next attempt time. Read
    /// [`LOAD_CHUNK`] messages at a time, so that a long queue never sits in memory whole.
    async fn load(&mut self) {
        self.suspended_seen = self.suspended_logins();
        let ids = match on_spool(&self.spool, |s| s.queued_ids()).await {
            Ok(ids) => ids,
            Err(e) => {
                error!(error = %e, "cannot list the spool; only new messages will be delivered until restart");
                return;
            }
        };
        let mut count = 0;
        let mut suspended = Vec::new();
        for chunk in ids.chunks(LOAD_CHUNK) {
            let chunk = chunk.to_vec();
            let messages = match on_spool(&self.spool, move |s| Ok(s.load_many(&chunk))).await {
                Ok(messages) => messages,
                Err(e) => {
                    error!(error = %e, "cannot load part of the queue; it is delivered after a restart");
                    continue;
                }
            };
            count += messages.len();
            let courier = self.courier.load_full();
            for m in messages {
                self.census.set(m.id(), &facts_of(&*courier, &m));
                if m.state.hold.is_some() {
                    continue;
                }
                if self.is_suspended(m.envelope.auth_user.as_deref()) {
                    suspended.push((m.envelope.id, true));
                } else {
                    self.schedule(m.envelope.id, m.state.next_attempt);
                }
            }
        }
        info!(messages = count, "delivery scheduler started");
        if !suspended.is_empty() {
            info!(
                messages = suspended.len(),
                "holding the queued mail of suspended logins"
            );
            self.hold_all(suspended, SUSPENDED_REASON).await;
        }
        self.publish();
    }

    /// A message was committed: due now, counted in the census when it came with its
    /// envelope (a large one is counted once its first attempt has read it). One from a
    /// suspended login (committed as the suspension came) is held instead.
    async fn arrived(&mut self, new: Committed) {
        // Committed while the queue was recovered and listed by the load: scheduled (or held)
        // from the spool already. Its copy here may be older than a hold recorded since.
        if self.census.contains(&new.id) {
            return;
        }
        if let Some(loaded) = &new.loaded {
            let facts = facts_of(&*self.courier.load_full(), &loaded.msg);
            self.census.set(&new.id, &facts);
        }
        if self.is_suspended(new.auth_user.as_deref()) {
            info!(queue_id = %new.id, "from a suspended login: held");
            if new.loaded.is_none() {
                // A large message: counted from its envelope, as its first attempt would.
                let id = new.id.clone();
                match on_spool(&self.spool, move |s| s.load(&id)).await {
                    Ok(msg) => {
                        let facts = facts_of(&*self.courier.load_full(), &msg);
                        self.census.set(&new.id, &facts);
                    }
                    Err(e) => warn!(queue_id = %new.id, error = %e,
                        "cannot read a held message's envelope for the census"),
                }
            }
            // A failure is retried by the containment's own schedule (SUSPENDED_HOLD_RETRY).
            self.hold_all(vec![(new.id, true)], SUSPENDED_REASON).await;
            return;
        }
        self.schedule(new.id.clone(), 0);
        self.new_mail_at = Some(tokio::time::Instant::now());
        self.fresh = new.loaded.map(|loaded| (new.id, loaded));
    }

    /// Whether `login` (a message's, if any) is suspended.
    fn is_suspended(&self, login: Option<&str>) -> bool {
        match (&self.containment, login) {
            (Some(c), Some(login)) => c.is_suspended(login),
            _ => false,
        }
    }

    fn suspended_logins(&self) -> HashSet<String> {
        let all = self.containment.as_ref().map(|c| c.suspensions());
        all.into_iter().flatten().map(|s| s.login).collect()
    }

    /// The suspended set changed: look for the queued mail of the newly suspended logins in
    /// one listing of the spool, off this task ([`Manager::hold_found`] holds it).
    fn suspensions_changed(&mut self) {
        let now = self.suspended_logins();
        let new: HashSet<String> = now.difference(&self.suspended_seen).cloned().collect();
        self.suspended_seen = now;
        if new.is_empty() {
            return;
        }
        let (spool, found) = (self.spool.clone(), self.found.0.clone());
        tokio::spawn(async move {
            match on_spool(&spool, |s| s.list()).await {
                Ok(messages) => {
                    let ids = (messages.into_iter())
                        .filter(|m| m.state.hold.is_none())
                        .filter_map(|m| {
                            let login = m.envelope.auth_user.filter(|u| new.contains(u))?;
                            Some((login, m.envelope.id))
                        })
                        .collect();
                    let _ = found.send(ids);
                }
                Err(e) => error!(logins = new.len(), error = %e,
                    "cannot list the spool for suspended logins' mail; it is held when a message of theirs arrives or at the next start"),
            }
        });
    }

    /// Hold `found`, the queued mail of newly suspended logins, of those still suspended.
    async fn hold_found(&mut self, found: Found) {
        let mut asks = Vec::with_capacity(found.len());
        let mut per_login: HashMap<String, usize> = HashMap::new();
        for (login, id) in found {
            if self.is_suspended(Some(&login)) {
                *per_login.entry(login).or_default() += 1;
                asks.push((id, true));
            }
        }
        for (login, messages) in per_login {
            info!(login = %crate::policy::lockout::login_key(&login), messages,
                "holding the queued mail of a suspended login");
        }
        if !asks.is_empty() {
            self.hold_all(asks, SUSPENDED_REASON).await;
        }
    }

    /// Count the outcome of an attempt in the census.
    fn count(&mut self, ended: &Ended) {
        match (&ended.end, &ended.facts) {
            (AttemptEnd::Left, _) => self.census.remove(&ended.id),
            (_, Some(facts)) => self.census.set(&ended.id, facts),
            (AttemptEnd::Held, None) => self.census.set_held(&ended.id, true),
            (AttemptEnd::Due(_) | AttemptEnd::Suspended, None) => {}
        }
        if let Some((bounce, facts)) = &ended.bounce {
            self.census.set(bounce, facts);
        }
    }

    /// An attempt ended: schedule what it left (and its bounce).
    async fn ended(&mut self, mut ended: Ended) {
        self.busy.remove(&ended.id);
        self.backlog_busy.remove(&ended.id);
        if self.removed_when_done.remove(&ended.id) {
            (ended.end, ended.facts) = (AttemptEnd::Left, None);
        }
        self.count(&ended);
        let retry = self.retry_when_done.remove(&ended.id);
        let asked = self.hold_when_done.remove(&ended.id);
        if let Some((bounce, _)) = ended.bounce {
            self.schedule(bounce, 0);
        }
        let restored = self.restored_when_done.remove(&ended.id);
        let reason = match (ended.end, asked) {
            (AttemptEnd::Suspended, _) => SUSPENDED_REASON,
            (_, Some((_, reason))) => reason,
            (_, None) => HOLD_REASON,
        };
        match schedule::after_attempt(ended.end, retry, asked.map(|(hold, _)| hold)) {
            AfterAttempt::Nothing => {}
            AfterAttempt::Due(at) => self.schedule(ended.id.clone(), at),
            AfterAttempt::Hold(hold) => {
                let failed = self.hold_all(vec![(ended.id.clone(), hold)], reason).await;
                if reason == HOLD_REASON {
                    self.retry_holds(failed);
                }
            }
        }
        if restored {
            self.restored(vec![ended.id], &HashMap::new()).await;
        }
    }

    /// Hold (true) or release each message of `asks` (the last ask for a message wins),
    /// recorded in their states together ([`Spool::record_holds`]: one directory fsync for
    /// all). A message being attempted is held or released when its attempt ends (its outcome
    /// is recorded first); a released one is due now; a release of a message not held keeps
    /// its schedule. Returns the asks that could not be recorded (logged).
    async fn hold_all(
        &mut self,
        asks: Vec<(QueueId, bool)>,
        reason: &'static str,
    ) -> Vec<(QueueId, bool)> {
        let mut last: HashMap<QueueId, bool> = HashMap::with_capacity(asks.len());
        let mut order = Vec::with_capacity(asks.len());
        for (id, hold) in asks {
            if last.insert(id.clone(), hold).is_none() {
                order.push(id);
            }
        }
        let mut todo = Vec::with_capacity(order.len());
        let mut was_due = Vec::with_capacity(order.len());
        for id in order {
            let hold = last[&id];
            if self.busy.contains(&id) {
                self.hold_when_done.insert(id, (hold, reason));
                continue;
            }
            let due = self.when.remove(&id);
            if let Some(at) = due {
                self.due.remove(&(at, id.clone()));
            }
            was_due.push(due);
            todo.push((id, hold));
        }
        if todo.is_empty() {
            return Vec::new();
        }
        let now = self.clock.now();
        let asks = todo.clone();
        let results = on_spool(&self.spool, move |s| Ok(s.record_holds(&asks, now, reason))).await;
        let results = match results {
            Ok(results) => results,
            Err(e) => {
                error!(error = %e, messages = todo.len(), "cannot record holds; the messages stay as they were");
                let failed = |_: &(QueueId, bool)| {
                    Err(SpoolError::Io {
                        op: "spool task",
                        path: self.spool.root().to_path_buf(),
                        source: std::io::Error::other(e.to_string()),
                    })
                };
                todo.iter().map(failed).collect()
            }
        };
        let mut failed = Vec::new();
        for (((id, hold), due), result) in todo.into_iter().zip(was_due).zip(results) {
            if !self.settle_hold(id.clone(), due, result, reason) {
                failed.push((id, hold));
            }
        }
        failed
    }

    /// Record the holds and releases of the operator's requests of this pass (`files`: their
    /// files, with the messages each names), after those that could not be recorded before
    /// (when due; a message a new request names is asked for as that request says, the last
    /// ask winning), then unlink the files whose holds are all recorded.
    async fn operator_holds(
        &mut self,
        holds: Vec<(QueueId, bool)>,
        files: Vec<(PathBuf, Vec<QueueId>)>,
    ) {
        self.hold_files.extend(files);
        for (id, _) in &holds {
            self.hold_retry.remove(id);
        }
        let mut asks = Vec::new();
        if !self.hold_retry.is_empty() && self.clock.now() >= self.hold_retry_at {
            asks.extend(self.hold_retry.drain());
        }
        asks.extend(holds);
        if !asks.is_empty() {
            let failed = self.hold_all(asks, HOLD_REASON).await;
            self.retry_holds(failed);
        }
        self.finish_hold_files().await;
    }

    /// Ask again, after [`HOLD_RETRY`], for the operator holds that could not be recorded
    /// (their request files stay meanwhile).
    fn retry_holds(&mut self, failed: Vec<(QueueId, bool)>) {
        if !failed.is_empty() {
            self.hold_retry.extend(failed);
            self.hold_retry_at = self.clock.now() + HOLD_RETRY.as_secs();
        }
    }

    /// Unlink the operator's hold files whose holds are all recorded (none waits for an
    /// attempt to end or to be asked again), oldest first and stopping at the first that
    /// waits, so that what a crash leaves is always the newest ones; on failure they stay, and
    /// this is tried again at the next pass.
    async fn finish_hold_files(&mut self) {
        let waits =
            |id: &QueueId| self.hold_when_done.contains_key(id) || self.hold_retry.contains_key(id);
        let ready = self
            .hold_files
            .iter()
            .take_while(|(_, ids)| !ids.iter().any(waits))
            .count();
        if ready == 0 {
            return;
        }
        let files: Vec<PathBuf> = self
            .hold_files
            .iter()
            .take(ready)
            .map(|(f, _)| f.clone())
            .collect();
        match on_spool(&self.spool, move |s| s.finish_holds(&files)).await {
            Ok(()) => drop(self.hold_files.drain(..ready)),
            Err(e) => {
                warn!(error = %e, "cannot remove hold requests already recorded; tried again")
            }
        }
    }

    /// Follow up one message of [`Manager::hold_all`]: census, journal, schedule. False when
    /// its hold could not be recorded.
    fn settle_hold(
        &mut self,
        id: QueueId,
        was_due: Option<u64>,
        result: Result<HoldChange, SpoolError>,
        reason: &'static str,
    ) -> bool {
        match result {
            Ok(HoldChange {
                was: false,
                held: false,
                next_attempt,
            }) => {
                self.schedule(id, was_due.unwrap_or(next_attempt));
            }
            Ok(HoldChange {
                was, held: true, ..
            }) => {
                info!(queue_id = %id, "held: not delivered, bounced or expired until released");
                self.census.set_held(&id, true);
                if !was {
                    self.record(EventKind::Held, &id, None);
                }
            }
            Ok(HoldChange {
                was, held: false, ..
            }) => {
                info!(queue_id = %id, "released: due now");
                self.census.set_held(&id, false);
                if was {
                    self.record(EventKind::Released, &id, None);
                }
                self.schedule(id, 0);
            }
            Err(SpoolError::NotFound(gone)) if gone == id => {}
            Err(e) if reason == SUSPENDED_REASON => {
                error!(queue_id = %id, error = %e, "cannot record the hold of a suspended login's message; it is not sent, and held at its next attempt");
                // Its attempts find the login suspended and send nothing; not a loop meanwhile.
                let retry = self.clock.now() + SUSPENDED_HOLD_RETRY.as_secs();
                self.schedule(id, was_due.unwrap_or(0).max(retry));
                return false;
            }
            Err(e) => {
                error!(queue_id = %id, error = %e, "cannot record the hold; the message stays as it was, and the request is read again");
                // As it was: due when it was (an attempt finds a held message held).
                self.schedule(id, was_due.unwrap_or(0));
                return false;
            }
        }
        true
    }

    /// Put `id` in the schedule, due at `at` (Unix seconds; 0 = now). A message being
    /// attempted is left to its attempt, which reschedules it.
    fn schedule(&mut self, id: QueueId, at: u64) {
        if self.busy.contains(&id) {
            return;
        }
        if let Some(old) = self.when.insert(id.clone(), at) {
            self.due.remove(&(old, id.clone()));
        }
        self.due.insert((at, id));
    }

    /// Start every due attempt there is room for; returns how long to sleep until the next
    /// one is due.
    fn dispatch(&mut self, done: &mpsc::UnboundedSender<Ended>) -> Duration {
        let now_ms = self.clock.now_millis();
        let now = now_ms / 1000;
        let max_in_flight = self.courier.load().max_in_flight().max(1);
        // New mail within the window: the backlog keeps to a quarter (see the module docs). A
        // half left new mail 40 % of its idle rate in the Backlog benchmark (BENCHMARKS.md).
        let new_mail_until = self
            .new_mail_at
            .map(|at| at + NEW_MAIL_WINDOW)
            .filter(|&until| until > tokio::time::Instant::now());
        let backlog_max = match new_mail_until {
            Some(_) => max_in_flight.div_ceil(4),
            None => max_in_flight,
        };
        let mut capped = false;
        while self.busy.len() < max_in_flight {
            let Some(&(at, _)) = self.due.first() else {
                break;
            };
            if at > now {
                break;
            }
            // Due at 0 comes first, so what follows is all backlog.
            if at != 0 && self.backlog_busy.len() >= backlog_max {
                capped = true;
                break;
            }
            let Some((_, id)) = self.due.pop_first() else {
                break;
            };
            if at != 0 {
                self.backlog_busy.insert(id.clone());
            }
            self.start(id, done);
        }
        self.fresh = None;
        if self.busy.len() >= max_in_flight {
            // Woken by a finished attempt.
            return Duration::from_secs(3600);
        }
        if let (true, Some(until)) = (capped, new_mail_until) {
            // Woken by a finished attempt or new mail, or when the window closes.
            return until.saturating_duration_since(tokio::time::Instant::now());
        }
        match self.due.first() {
            Some((at, _)) => Duration::from_millis((at * 1000).saturating_sub(now_ms).max(1)),
            None => Duration::from_secs(3600),
        }
    }

    /// Start the attempt of `id` in its own task.
    fn start(&mut self, id: QueueId, done: &mpsc::UnboundedSender<Ended>) {
        self.when.remove(&id);
        self.busy.insert(id.clone());
        let loaded = self
            .fresh
            .take_if(|(fresh, _)| *fresh == id)
            .map(|(_, loaded)| loaded);
        let span = info_span!("delivery", queue_id = %id);
        let work = attempt::run(
            self.spool.clone(),
            self.courier.load_full(),
            self.clock,
            (id, loaded),
            self.telemetry.clone(),
            self.containment.clone(),
        );
        let done = done.clone();
        self.tracker.spawn(
            async move {
                let _ = done.send(work.await);
            }
            .instrument(span),
        );
    }

    /// Record an event about message `id`, at `at_ms` (Unix milliseconds; `None`: now).
    fn record(&self, kind: EventKind, id: &QueueId, at_ms: Option<u64>) {
        let mut event = Event::at(kind, at_ms.unwrap_or_else(|| self.clock.now_millis()));
        event.id = Some(id.to_string());
        self.telemetry.record(&event);
    }

    /// Publish the census when it changed, at most every [`CENSUS_INTERVAL`]; otherwise
    /// publish it again while a message waits, so the age of the oldest one moves on.
    fn publish(&mut self) {
        let now_ms = self.clock.now_millis();
        let interval = u64::try_from(CENSUS_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if self
            .published_at
            .is_some_and(|at| now_ms.saturating_sub(at) < interval)
        {
            return;
        }
        let configured = self.courier.load().upstream_names();
        if self.census.changed(&configured) || self.published_at.is_none() {
            let census = self.census.report(&configured);
            self.telemetry.set_queue(census, now_ms / 1000);
        } else if !self.census.is_empty() {
            // Unchanged: the same census, for the age of the oldest message.
            self.telemetry
                .set_queue(self.telemetry.queue(), now_ms / 1000);
        } else {
            return;
        }
        self.published_at = Some(now_ms);
    }

    /// `queue delete` or `queue purge` removed these messages (in another process): record
    /// each removal, and forget the messages here. A quarantined message that is queued
    /// again (restored before this notice was read) stays.
    async fn removed(&mut self, removals: Vec<Removal>) {
        let quarantined: Vec<QueueId> = removals
            .iter()
            .filter(|r| r.how == RemovedHow::Quarantine)
            .map(|r| r.id.clone())
            .collect();
        let back: HashSet<QueueId> = if quarantined.is_empty() {
            HashSet::new()
        } else {
            on_spool(&self.spool, move |s| {
                Ok(quarantined
                    .into_iter()
                    .filter(|id| s.contains(id))
                    .collect())
            })
            .await
            .unwrap_or_default()
        };
        let keep_ms = u64::try_from(self.courier.load().queue().quarantine_keep.as_millis())
            .unwrap_or(u64::MAX);
        for r in removals {
            let kind = match r.how {
                RemovedHow::Delete => EventKind::Deleted,
                RemovedHow::Purge => EventKind::Purged,
                RemovedHow::Quarantine => {
                    self.sweep_at_ms = self.sweep_at_ms.min(r.at_ms.saturating_add(keep_ms));
                    EventKind::Quarantined
                }
            };
            info!(queue_id = %r.id, how = r.how.as_str(), "removed by an operator");
            self.record(kind, &r.id, Some(r.at_ms));
            if back.contains(&r.id) {
                continue;
            }
            self.census.remove(&r.id);
            if self.busy.contains(&r.id) {
                self.removed_when_done.insert(r.id);
            } else if let Some(at) = self.when.remove(&r.id) {
                self.due.remove(&(at, r.id));
            }
        }
    }

    /// Operator requests and upkeep.
    async fn control(&mut self) {
        self.courier.load().upkeep();
        self.publish();
        let applied: HashSet<PathBuf> = self.hold_files.iter().map(|(f, _)| f.clone()).collect();
        let requests = match on_spool(&self.spool, move |s| s.take_requests(&applied)).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read queue control requests");
                return;
            }
        };
        if !requests.is_empty() {
            // A crash point only: taken, none acted on.
            let _ = crate::failpoint::step("control.take");
        }
        let (mut holds, mut hold_files) = (Vec::new(), Vec::new());
        for request in requests {
            match request {
                Request::Retry(RetryTarget::All) => {
                    info!("queue retry --all: every message is due now; circuit breakers reset");
                    self.courier.load().reset_all();
                    // Due now, not at 0 as new mail is: mail arriving during the drain of a
                    // backlog goes ahead of it (the backlog in order of age after it).
                    let now = self.clock.now();
                    let due: Vec<(QueueId, u64)> = self
                        .when
                        .iter()
                        .map(|(id, &at)| (id.clone(), at.min(now)))
                        .collect();
                    for (id, at) in due {
                        self.schedule(id, at);
                    }
                    self.retry_when_done.extend(self.busy.iter().cloned());
                }
                Request::Retry(RetryTarget::Ids(ids)) => {
                    for id in ids {
                        self.retry(id).await;
                    }
                }
                Request::Holds { asks, files } => {
                    // Each file's asks are the last ones, in order.
                    let mut at = asks.len() - files.iter().map(|(_, n)| n).sum::<usize>();
                    for (file, n) in files {
                        let ids = asks[at..at + n].iter().map(|(id, _)| id.clone()).collect();
                        hold_files.push((file, ids));
                        at += n;
                    }
                    holds.extend(asks);
                }
                Request::Removed(removals) => self.removed(removals).await,
                Request::Restore(ids) => self.restored(ids, &HashMap::new()).await,
                Request::Adopted(pairs) => {
                    let ids = pairs.iter().map(|(id, _)| id.clone()).collect();
                    let from: HashMap<QueueId, QueueId> = pairs.into_iter().collect();
                    self.restored(ids, &from).await;
                }
            }
        }
        self.operator_holds(holds, hold_files).await;
        if self.clock.now_millis() >= self.sweep_at_ms {
            self.sweep_quarantine().await;
        }
    }

    /// `queue restore` put these messages back into `queue/` (or `queue adopt` brought them
    /// in: those in `adopted`, with the id each had where it came from): count them and make
    /// them due now (unless held). One whose earlier attempt is still in flight is taken up
    /// when that attempt ends; one no longer queued (quarantined again) is left alone.
    async fn restored(&mut self, ids: Vec<QueueId>, adopted: &HashMap<QueueId, QueueId>) {
        let mut load = Vec::with_capacity(ids.len());
        for id in ids {
            self.removed_when_done.remove(&id);
            if self.busy.contains(&id) {
                self.restored_when_done.insert(id);
            } else {
                load.push(id);
            }
        }
        if load.is_empty() {
            return;
        }
        let ids = load.clone();
        let loaded = on_spool(&self.spool, move |s| {
            Ok(load
                .into_iter()
                .map(|id| {
                    let msg = s.load(&id);
                    (id, msg)
                })
                .collect::<Vec<_>>())
        })
        .await;
        // A failed spool task (the blocking pool gone) must not forget them: they are back in
        // queue/, and their attempts read them again.
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                warn!(error = %e, "cannot read restored messages; their attempts will try again");
                for id in ids {
                    self.schedule(id, 0);
                }
                return;
            }
        };
        let courier = self.courier.load_full();
        for (id, msg) in loaded {
            match msg {
                Ok(msg) => {
                    self.census.set(&id, &facts_of(&*courier, &msg));
                    self.record_brought_in(&id, adopted.get(&id));
                    if msg.state.hold.is_none() {
                        self.schedule(id, 0);
                    }
                }
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => {
                    warn!(queue_id = %id, error = %e, "cannot read a restored message; its attempt will try again");
                    self.schedule(id, 0);
                }
            }
        }
    }

    /// Log and journal a message restored from quarantine (`from`: `None`), or adopted from
    /// another spool where its id was `from`.
    fn record_brought_in(&self, id: &QueueId, from: Option<&QueueId>) {
        let Some(from) = from else {
            info!(queue_id = %id, "restored from quarantine: due now");
            self.record(EventKind::Restored, id, None);
            return;
        };
        info!(queue_id = %id, adopted_from = %from, "adopted from another node's spool: due now unless held");
        let mut event = Event::at(EventKind::Adopted, self.clock.now_millis());
        event.id = Some(id.to_string());
        event.adopted_from = (from != id).then(|| from.to_string());
        self.telemetry.record(&event);
    }

    /// Delete the quarantined messages older than `[queue] quarantine_keep`; sweep again
    /// when the next one is due, and at least every [`quarantine::SWEEP_INTERVAL`].
    async fn sweep_quarantine(&mut self) {
        let now_ms = self.clock.now_millis();
        let keep = self.courier.load().queue().quarantine_keep;
        let interval = u64::try_from(quarantine::SWEEP_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        let mut next = now_ms.saturating_add(interval);
        match on_spool(&self.spool, move |s| s.sweep_quarantine(keep, now_ms)).await {
            Ok(sweep) => {
                if !sweep.expired.is_empty() || sweep.leftovers > 0 {
                    info!(
                        deleted = sweep.expired.len(),
                        leftovers = sweep.leftovers,
                        "quarantine swept"
                    );
                }
                next = next.min(sweep.next_ms.unwrap_or(u64::MAX));
            }
            Err(e) => warn!(error = %e, "cannot sweep the quarantine; trying again later"),
        }
        self.sweep_at_ms = next;
    }

    /// `queue retry ID`: reset the breakers of its routes, make it due now.
    async fn retry(&mut self, id: QueueId) {
        self.reset_breakers_for(&id).await;
        info!(queue_id = %id, "queue retry: due now");
        if self.busy.contains(&id) {
            self.retry_when_done.insert(id);
        } else {
            self.schedule(id, 0);
        }
    }

    /// Close the breakers of the upstreams that `id`'s pending recipients route to.
    async fn reset_breakers_for(&self, id: &QueueId) {
        let id = id.clone();
        let Ok(msg) = on_spool(&self.spool, move |s| s.load(&id)).await else {
            return;
        };
        let courier = self.courier.load();
        for rcpt in msg.pending() {
            courier.reset_route(&courier.route(rcpt.domain()));
        }
    }
}

/// The next change of the suspended set (never, without containment).
async fn changed(suspensions: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match suspensions {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}
