//! The delivery scheduler: knows when each queued message is due and starts its delivery.
//!
//! It holds the queue in memory as (due time, id) pairs, loaded from the spool at start. New
//! messages arrive on a channel the moment they are committed (the inbound side sends the id,
//! and the message itself when small, after the `250`), so delivery starts without any
//! polling delay or reading the file back. Every half second it picks
//! up operator requests (`queue retry`, through `SPOOL/control/`) and closes idle upstream
//! connections. At most `max_in_flight` deliveries run at once (the sum of the upstreams'
//! `max_connections`), and one message is never delivered twice at the same time.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::deliver::{Context, deliver, on_spool};
use crate::envelope::QueueId;
use crate::queue::{Loaded, Request, RetryTarget};

use super::NewMessage;

/// How often operator requests are read and idle connections reaped.
pub const CONTROL_INTERVAL: Duration = Duration::from_millis(500);

/// The scheduler task.
pub struct Scheduler {
    ctx: Arc<Context>,
    incoming: UnboundedReceiver<NewMessage>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// (due, id), earliest first.
    due: BTreeSet<(u64, QueueId)>,
    /// When each scheduled message is due (the index into `due`).
    when: HashMap<QueueId, u64>,
    /// Messages being delivered now.
    busy: HashSet<QueueId>,
    /// Messages an operator asked to retry while they were being delivered.
    retry_when_done: HashSet<QueueId>,
    /// A message just received, in memory, until the next dispatch: used if it starts at
    /// once, dropped otherwise (it is read from the spool when its turn comes), so this holds
    /// at most one message's bytes and open file.
    fresh: Option<(QueueId, Loaded)>,
    max_in_flight: usize,
}

impl Scheduler {
    /// A scheduler over `ctx`, woken by ids on `incoming`.
    pub fn new(
        ctx: Arc<Context>,
        incoming: UnboundedReceiver<NewMessage>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Scheduler {
        let max_in_flight = ctx
            .upstreams
            .iter()
            .map(|u| u.config.max_connections)
            .sum::<usize>()
            .max(1);
        Scheduler {
            ctx,
            incoming,
            shutdown,
            tracker,
            due: BTreeSet::new(),
            when: HashMap::new(),
            busy: HashSet::new(),
            retry_when_done: HashSet::new(),
            fresh: None,
            max_in_flight,
        }
    }

    /// Run until shutdown: load the spool, then schedule.
    pub async fn run(mut self) {
        match on_spool(&self.ctx.spool, |s| s.list()).await {
            Ok(messages) => {
                let count = messages.len();
                for m in messages {
                    self.schedule(m.envelope.id, m.state.next_attempt);
                }
                info!(messages = count, "delivery scheduler started");
            }
            Err(e) => {
                error!(error = %e, "cannot list the spool; only new messages will be delivered until restart")
            }
        }

        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(QueueId, Option<u64>)>();
        let mut control = tokio::time::interval(CONTROL_INTERVAL);
        control.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wait = self.dispatch(&done_tx);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some((id, next)) = done_rx.recv() => {
                    self.busy.remove(&id);
                    let retry = self.retry_when_done.remove(&id);
                    if let Some(next) = next {
                        self.schedule(id, if retry { 0 } else { next });
                    }
                }
                Some(new) = self.incoming.recv() => {
                    self.schedule(new.id.clone(), 0);
                    self.fresh = new.loaded.map(|loaded| (new.id, loaded));
                }
                _ = control.tick() => self.control().await,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        info!(in_flight = self.busy.len(), "delivery scheduler stopping");
    }

    /// Put `id` in the schedule, due at `at` (Unix seconds; 0 = now). A message being
    /// delivered is left to its delivery, which reschedules it.
    fn schedule(&mut self, id: QueueId, at: u64) {
        if self.busy.contains(&id) {
            return;
        }
        if let Some(old) = self.when.insert(id.clone(), at) {
            self.due.remove(&(old, id.clone()));
        }
        self.due.insert((at, id));
    }

    /// Start every due delivery there is room for; returns how long to sleep until the next
    /// one is due.
    fn dispatch(&mut self, done: &mpsc::UnboundedSender<(QueueId, Option<u64>)>) -> Duration {
        let now_ms = now_millis();
        let now = now_ms / 1000;
        while self.busy.len() < self.max_in_flight {
            let Some((at, _)) = self.due.first() else {
                break;
            };
            if *at > now {
                break;
            }
            let Some((_, id)) = self.due.pop_first() else {
                break;
            };
            self.when.remove(&id);
            self.busy.insert(id.clone());
            let ctx = self.ctx.clone();
            let done = done.clone();
            let loaded = self
                .fresh
                .take_if(|(fresh, _)| *fresh == id)
                .map(|(_, loaded)| loaded);
            self.tracker.spawn(async move {
                let next = deliver(ctx, id.clone(), loaded).await;
                let _ = done.send((id, next));
            });
        }
        self.fresh = None;
        if self.busy.len() >= self.max_in_flight {
            // Woken by a finished delivery.
            return Duration::from_secs(3600);
        }
        match self.due.first() {
            Some((at, _)) => Duration::from_millis((at * 1000).saturating_sub(now_ms).max(1)),
            None => Duration::from_secs(3600),
        }
    }

    /// Operator requests and idle connections.
    async fn control(&mut self) {
        self.ctx.upstreams.reap_idle();
        let requests = match on_spool(&self.ctx.spool, |s| s.take_requests()).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read queue control requests");
                return;
            }
        };
        for request in requests {
            match request {
                Request::Retry(RetryTarget::All) => {
                    info!("queue retry --all: every message is due now; circuit breakers reset");
                    self.ctx.upstreams.reset_all();
                    let ids: Vec<QueueId> = self.when.keys().cloned().collect();
                    for id in ids {
                        self.schedule(id, 0);
                    }
                    self.retry_when_done.extend(self.busy.iter().cloned());
                }
                Request::Retry(RetryTarget::Ids(ids)) => {
                    for id in ids {
                        self.reset_breakers_for(&id).await;
                        info!(queue_id = %id, "queue retry: due now");
                        if self.busy.contains(&id) {
                            self.retry_when_done.insert(id);
                        } else {
                            self.schedule(id, 0);
                        }
                    }
                }
            }
        }
    }

    /// Close the breakers of the upstreams that `id`'s pending recipients route to.
    async fn reset_breakers_for(&self, id: &QueueId) {
        let id = id.clone();
        let Ok(msg) = on_spool(&self.ctx.spool, move |s| s.load(&id)).await else {
            return;
        };
        for rcpt in msg.pending() {
            for &u in self.ctx.upstreams.route(rcpt.domain()) {
                self.ctx.upstreams.get(u).reset_breaker();
            }
        }
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
