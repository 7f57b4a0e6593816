//! One attempt of one queued message, as the queue manager runs it: load the message, ask
//! [`schedule::plan`] what to do, have the [`Courier`] send it, then record the outcome —
//! bounce first, then the state (or the removal).
//!
//! Ordering for durability (DESIGN invariants 1 and 2): a bounce is committed to the spool
//! before the state that marks its recipients failed, and the state is written before the
//! message is removed, so a crash at any point repeats work (a duplicate delivery or bounce)
//! but never loses a message or a bounce. `queue/ID` stays open (its [`SendLock`]) from the
//! load until the outcome is on disk, so a `queue delete` in between knows the message may
//! have been delivered.

use crate::policy::containment::Containment;
use std::future::Future;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::bounce;
use super::census::{self, Facts};
use super::manager::Clock;
use super::schedule::{
    self, AttemptFacts, AttemptReport, BounceDecision, FailedRcpt, Plan, RcptResult, RouteGroup,
    Settled,
};
use super::{Loaded, QueuedMessage, SendLock, Spool, SpoolError};
use crate::config;
use crate::envelope::{Address, QueueId};
use crate::observe::{Event, EventKind, Telemetry};

/// Messages up to this size are read into memory in one go; larger ones are streamed from
/// the spool file.
pub const IN_MEMORY_MAX: u64 = 1024 * 1024;

/// What sends a planned attempt: the outbound side. The queue manager holds one per
/// configuration; a reload swaps it for new attempts while those in flight keep theirs.
pub trait Courier: Send + Sync + 'static {
    /// The `[queue]` policy in force with this courier.
    fn queue(&self) -> &config::Queue;
    /// Our name: the Reporting-MTA of bounces.
    fn hostname(&self) -> &str;
    /// Upstream indexes serving `domain`, in failover order; empty when none does.
    fn route(&self, domain: &str) -> Vec<usize>;
    /// The name of upstream `index` (an index [`Courier::route`] returned).
    fn upstream_name(&self, index: usize) -> Option<&str>;
    /// Every configured upstream's name, in `[[upstreams]]` order.
    fn upstream_names(&self) -> Vec<String>;
    /// Most deliveries at once (at least 1).
    fn max_in_flight(&self) -> usize;
    /// Try every group of `job` on its route and report per-recipient results. Sends only:
    /// writes nothing to the spool and enqueues nothing.
    fn send<'a>(&'a self, job: Consignment<'a>) -> impl Future<Output = AttemptReport> + Send + 'a;
    /// Periodic upkeep (every [`super::manager::CONTROL_INTERVAL`]): close idle connections.
    fn upkeep(&self);
    /// `queue retry --all`: forget every circuit breaker.
    fn reset_all(&self);
    /// `queue retry ID`: forget the circuit breakers of the upstreams on `route`.
    fn reset_route(&self, route: &[usize]);
}

/// The bytes of a message under delivery.
#[derive(Debug, Clone)]
pub enum MessageBytes {
    /// Small enough to hold in memory (at most [`IN_MEMORY_MAX`]).
    Memory(Arc<Vec<u8>>),
    /// Too big for memory: reopened from the spool ([`Spool::open_message`]) for each
    /// transaction.
    Spooled,
}

/// One planned attempt, handed to [`Courier::send`]: the message, its bytes and the
/// recipients to send to, by route.
#[derive(Debug, Clone, Copy)]
pub struct Consignment<'a> {
    pub spool: &'a Spool,
    pub msg: &'a QueuedMessage,
    pub bytes: &'a MessageBytes,
    /// Take [`SendLock::begin_final_dot`] right before each final dot.
    pub lock: &'a SendLock,
    /// The recipients to send to, by route.
    pub groups: &'a [RouteGroup],
}

/// How an attempt ended, for the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Recipients remain: due again at this time (Unix seconds).
    Due(u64),
    /// The message left the queue (finished, expired and bounced, or deleted meanwhile).
    Left,
    /// The message is held: not scheduled until released.
    Held,
    /// The message's login is suspended: not attempted; the manager holds it.
    Suspended,
}

/// What the manager learns from one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub id: QueueId,
    pub end: AttemptEnd,
    /// The message as the census counts it now, when it stays queued and was read.
    pub facts: Option<Facts>,
    /// A bounce queued by this attempt, to be scheduled now, with its census facts.
    pub bounce: Option<(QueueId, Facts)>,
}

/// The upstream mail to `domain` is counted under with `courier`: the first of its route,
/// or [`census::NO_ROUTE`] when none serves it (or there is no domain: no recipient left).
pub fn route_name<C: Courier>(courier: &C, domain: Option<&str>) -> String {
    let first = domain.and_then(|d| courier.route(d).first().copied());
    first
        .and_then(|i| courier.upstream_name(i))
        .map_or_else(|| census::NO_ROUTE.to_owned(), str::to_owned)
}

/// The census facts of `msg` as `courier` routes it.
pub fn facts_of<C: Courier>(courier: &C, msg: &QueuedMessage) -> Facts {
    Facts::of(msg, |domain| route_name(courier, domain))
}

/// Run blocking spool work off the reactor. A panic in it is reported as an I/O error of the
/// spool, so callers have one error type to look at.
pub async fn on_spool<T: Send + 'static>(
    spool: &Spool,
    work: impl FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    let handle = spool.clone();
    tokio::task::spawn_blocking(move || work(&handle))
        .await
        .unwrap_or_else(|join| {
            Err(SpoolError::Io {
                op: "spool task",
                path: spool.root().to_path_buf(),
                source: std::io::Error::other(join.to_string()),
            })
        })
}

/// Whether `msg` is not held and its login is suspended in `containment` (it must not be
/// attempted).
fn suspended(containment: Option<&Containment>, msg: &QueuedMessage) -> bool {
    let login = msg.envelope.auth_user.as_deref();
    msg.state.hold.is_none()
        && containment.is_some_and(|c| login.is_some_and(|u| c.is_suspended(u)))
}

/// The end of an attempt of `msg` that sent nothing (`end`: held, or suspended).
fn not_attempted<C: Courier>(
    courier: &C,
    msg: &QueuedMessage,
    lock: SendLock,
    end: AttemptEnd,
) -> Ended {
    close_off_reactor(lock);
    Ended {
        facts: Some(facts_of(courier, msg)),
        id: msg.envelope.id.clone(),
        end,
        bounce: None,
    }
}

/// Close `queue/ID` off the reactor: if it was unlinked (removed here, or deleted by an
/// operator), the last close frees its blocks, which on a file system mounted with `discard`
/// waits for the disk.
fn close_off_reactor(lock: SendLock) {
    drop(tokio::task::spawn_blocking(move || drop(lock)));
}

/// Run one attempt of `id`, from `loaded` when the message is already in memory; what the
/// queue does with it (expired, bounced, finished) is recorded in `telemetry`.
pub async fn run<C: Courier>(
    spool: Spool,
    courier: Arc<C>,
    clock: Clock,
    (id, loaded): (QueueId, Option<Loaded>),
    telemetry: Arc<Telemetry>,
    containment: Option<Arc<Containment>>,
) -> Ended {
    let soon = soon(courier.queue(), clock.now());
    let loaded = match loaded {
        Some(loaded) => Ok(loaded),
        None => {
            let id = id.clone();
            on_spool(&spool, move |s| s.load_with_body(&id, IN_MEMORY_MAX)).await
        }
    };
    let end = |end| Ended {
        id: id.clone(),
        end,
        facts: None,
        bounce: None,
    };
    match loaded {
        Ok(loaded) => Attempting {
            spool: &spool,
            courier: &*courier,
            clock,
            loaded,
            telemetry: &telemetry,
            containment: containment.as_deref(),
        }
        .run()
        .await
        .unwrap_or_else(|| end(AttemptEnd::Left)),
        Err(SpoolError::NotFound(_)) => end(AttemptEnd::Left),
        Err(e) => {
            error!(queue_id = %id, error = %e, "cannot read queued message; will try again");
            end(AttemptEnd::Due(soon))
        }
    }
}

/// When to try again after a local error: the first retry interval from `now`.
fn soon(queue: &config::Queue, now: u64) -> u64 {
    now + queue.retry.first().map_or(1, |d| d.as_secs().max(1))
}

struct Attempting<'a, C> {
    spool: &'a Spool,
    courier: &'a C,
    clock: Clock,
    loaded: Loaded,
    telemetry: &'a Telemetry,
    /// The suspended logins: their mail is never attempted.
    containment: Option<&'a Containment>,
}

impl<C: Courier> Attempting<'_, C> {
    /// `None` when the message was deleted meanwhile.
    async fn run(self) -> Option<Ended> {
        let Loaded {
            mut msg,
            body,
            lock,
        } = self.loaded;
        let id = msg.envelope.id.clone();
        let queue = self.courier.queue();
        // The attempt's time: expiry is judged and the next attempt counted from its start.
        let now = self.clock.now();
        if suspended(self.containment, &msg) {
            // Restored, released by hand, or its hold not recorded: never sent.
            info!(queue_id = %id, "from a suspended login: not attempted");
            return Some(not_attempted(
                self.courier,
                &msg,
                lock,
                AttemptEnd::Suspended,
            ));
        }
        let plan = schedule::plan(&msg, now, queue, |d| self.courier.route(d));
        let report = match plan {
            Plan::Held => {
                info!(queue_id = %id, "held: not attempted");
                return Some(not_attempted(self.courier, &msg, lock, AttemptEnd::Held));
            }
            Plan::Expired(failed) => {
                record_expiry(self.courier, self.telemetry, self.clock, &msg, &failed);
                expired(&id, failed)
            }
            Plan::Send(groups) => {
                let bytes = body.map_or(MessageBytes::Spooled, |b| MessageBytes::Memory(b.into()));
                let job = Consignment {
                    spool: self.spool,
                    msg: &msg,
                    bytes: &bytes,
                    lock: &lock,
                    groups: &groups,
                };
                self.courier.send(job).await
            }
        };
        if report.deleted {
            close_off_reactor(lock);
            return None;
        }
        let recorder = Recorder {
            spool: self.spool,
            courier: self.courier,
            msg: &mut msg,
            telemetry: self.telemetry,
            clock: self.clock,
        };
        let (end, bounce) = recorder.record(now, report, lock).await?;
        let facts = matches!(end, AttemptEnd::Due(_)).then(|| facts_of(self.courier, &msg));
        Some(Ended {
            id,
            end,
            facts,
            bounce,
        })
    }
}

/// Record that `msg` expired with `failed` still pending: the `expired` event, counted under
/// the upstream of the first of them.
fn record_expiry<C: Courier>(
    courier: &C,
    telemetry: &Telemetry,
    clock: Clock,
    msg: &QueuedMessage,
    failed: &[FailedRcpt],
) {
    let mut event = Event::at(EventKind::Expired, clock.now_millis());
    event.id = Some(msg.id().to_string());
    let domain = failed.first().map(|f| f.address.domain());
    event.upstream = Some(route_name(courier, domain));
    event.rcpts = failed.iter().map(|f| f.address.to_string()).collect();
    event.reply = failed.first().map(|f| f.diagnostic.to_string());
    telemetry.record(&event);
}

/// The report of an attempt that found the message expired: every pending recipient fails.
fn expired(id: &QueueId, failed: Vec<FailedRcpt>) -> AttemptReport {
    for f in &failed {
        warn!(queue_id = %id, rcpt = %f.address, reason = %f.diagnostic, "expired");
    }
    AttemptReport {
        results: failed
            .into_iter()
            .map(|f| (f.index, RcptResult::Failed(f)))
            .collect(),
        ..AttemptReport::default()
    }
}

/// Writes an attempt's outcome: the bounce, then the state or the removal.
struct Recorder<'a, C> {
    spool: &'a Spool,
    courier: &'a C,
    msg: &'a mut QueuedMessage,
    telemetry: &'a Telemetry,
    clock: Clock,
}

/// A bounce was due but could not be queued (the error is logged).
#[derive(Debug, Clone, Copy)]
struct BounceNotQueued;

impl<C: Courier> Recorder<'_, C> {
    /// Record the outcome of the attempt that started at `now` and ended with `report`: the
    /// bounce, then the state or the removal. The attempt's end and the bounce queued, if
    /// any; `None` when the message was deleted meanwhile.
    async fn record(
        self,
        now: u64,
        report: AttemptReport,
        lock: SendLock,
    ) -> Option<(AttemptEnd, Option<(QueueId, Facts)>)> {
        let (not_before, errors) = (report.not_before, report.errors.clone());
        let count = self.msg.envelope.recipients.len();
        let failed = schedule::record(&mut self.msg.state, count, report);
        let bounce = self.bounce(&failed).await;
        let facts = AttemptFacts {
            now,
            failed: &failed,
            bounce_queued: bounce.is_ok(),
            not_before,
            errors: &errors,
        };
        let end = self.settle(&facts, lock).await?;
        Some((end, bounce.ok().flatten()))
    }

    /// An event about this message, now.
    fn event(&self, kind: EventKind) -> Event {
        let mut event = Event::at(kind, self.clock.now_millis());
        event.id = Some(self.msg.id().to_string());
        event
    }

    /// Record the `bounced` event of `failed`: the bounce queued as `bounce_id`, or none.
    fn record_bounce(&self, failed: &[FailedRcpt], bounce_id: Option<&QueueId>) {
        let mut event = self.event(EventKind::Bounced);
        event.from = Some(self.msg.envelope.mail_from.bare());
        event.rcpts = failed.iter().map(|f| f.address.to_string()).collect();
        event.bounce_id = bounce_id.map(ToString::to_string);
        self.telemetry.record(&event);
    }

    /// Report `failed` to the sender as [`schedule::bounce_decision`] says. `Ok(Some(id))`: a
    /// bounce was queued (with its census facts); `Ok(None)`: none was due.
    async fn bounce(
        &self,
        failed: &[FailedRcpt],
    ) -> Result<Option<(QueueId, Facts)>, BounceNotQueued> {
        if failed.is_empty() {
            return Ok(None);
        }
        let id = &self.msg.envelope.id;
        let queue = self.courier.queue();
        let sender = match schedule::bounce_decision(&self.msg.envelope, queue.bounces) {
            BounceDecision::Send(sender) => sender,
            BounceDecision::NullSender { dsn_lost } => {
                log_unreported(id, failed, dsn_lost);
                self.record_bounce(failed, None);
                return Ok(None);
            }
            BounceDecision::Disabled(sender) => {
                warn!(queue_id = %id, from = %sender, failed = failed.len(), "no bounce: [queue] bounces = false");
                self.record_bounce(failed, None);
                return Ok(None);
            }
        };
        let envelope = self.msg.envelope.clone();
        let hostname = self.courier.hostname().to_owned();
        let copy = failed.to_vec();
        let made = on_spool(self.spool, move |s| {
            bounce::enqueue(s, &hostname, &envelope, &copy)
        })
        .await;
        match made {
            Ok(bounce_id) => {
                info!(queue_id = %id, bounce_id = %bounce_id, to = %sender, "bounce queued");
                self.record_bounce(failed, Some(&bounce_id));
                Ok(Some((bounce_id, self.bounce_facts(&sender))))
            }
            Err(e) => {
                error!(queue_id = %id, error = %e, "cannot queue the bounce; will try again");
                Err(BounceNotQueued)
            }
        }
    }

    /// How the census counts a bounce to `sender`.
    fn bounce_facts(&self, sender: &Address) -> Facts {
        Facts {
            upstream: route_name(self.courier, Some(sender.domain())),
            sender: "<>".to_owned(),
            held: false,
        }
    }

    /// Settle the state and write it (recipients remain) or remove the message (none
    /// remain). `None` when the message was deleted meanwhile.
    async fn settle(self, facts: &AttemptFacts<'_>, lock: SendLock) -> Option<AttemptEnd> {
        let queue = self.courier.queue();
        let settled = schedule::settle(&mut self.msg.state, &self.msg.envelope, queue, facts);
        let id = self.msg.envelope.id.clone();
        match settled {
            Settled::Finished { delivered, failed } => {
                let removed = self.remove_finished(&id, lock).await;
                match removed {
                    Ok(()) | Err(SpoolError::NotFound(_)) => {
                        info!(queue_id = %id, delivered, failed, "removed from queue: finished");
                        self.telemetry.record(&self.event(EventKind::Finished));
                        Some(AttemptEnd::Left)
                    }
                    Err(e) => {
                        // Still in queue/ (or its state is), so it is attempted again soon.
                        // That attempt must only remove it: the state on disk may still have
                        // every recipient pending (none written yet, or an older one), and
                        // would have it delivered again while the relay runs. So record it
                        // finished first; counted as an attempt, so that the removal then
                        // takes its state too. If that fails as well (the same disk), a
                        // second delivery is possible (at-least-once, invariant 1).
                        self.msg.state.attempts += 1;
                        let recorded = on_spool(self.spool, {
                            let (id, state) = (id.clone(), self.msg.state.clone());
                            move |s| s.write_state(&id, &state)
                        })
                        .await;
                        match recorded {
                            Ok(()) => {
                                error!(queue_id = %id, error = %e, "cannot remove a finished message; recorded as finished, its removal is tried again")
                            }
                            // The message file went and a later step failed: only its state
                            // is left, an orphan that recovery removes at the next start.
                            Err(SpoolError::NotFound(_)) => {
                                error!(queue_id = %id, error = %e, "cannot remove a finished message's state; left to recovery at the next start")
                            }
                            Err(again) => {
                                error!(queue_id = %id, error = %e, state_error = %again, "cannot remove a finished message nor record it finished; it may be delivered again")
                            }
                        }
                        Some(AttemptEnd::Due(soon(queue, facts.now)))
                    }
                }
            }
            Settled::Due(next) => {
                let end = self.write_state(facts.now).await;
                close_off_reactor(lock);
                end.map(|()| AttemptEnd::Due(next))
            }
        }
    }

    /// Take the finished message out of the queue, then let go of its `lock`. Most messages
    /// leave by one rename into free/, which waits for no disk: done here, it saves two thread
    /// hops per message. Anything else (a state file to unlink, a file to free) runs off the
    /// reactor, as does the last close of a file that lost its name.
    async fn remove_finished(&self, id: &QueueId, lock: SendLock) -> Result<(), SpoolError> {
        let (size, attempts) = (self.msg.size, self.msg.state.attempts);
        match self.spool.recycle_finished(id, size, attempts) {
            Some(Ok(())) => {
                drop(lock);
                Ok(())
            }
            Some(Err(e)) => {
                close_off_reactor(lock);
                Err(e)
            }
            None => {
                let id = id.clone();
                on_spool(self.spool, move |s| {
                    let removed = s.remove_finished(&id, size, attempts);
                    drop(lock);
                    removed
                })
                .await
            }
        }
    }

    /// Write the state of a message that stays queued. `None`: it was deleted meanwhile.
    async fn write_state(&self, now: u64) -> Option<()> {
        let id = self.msg.envelope.id.clone();
        let state = &self.msg.state;
        let written = {
            let (id, state) = (id.clone(), state.clone());
            on_spool(self.spool, move |s| s.write_state(&id, &state)).await
        };
        match written {
            Ok(()) => {}
            // Deleted meanwhile: write_state refuses to create an orphan.
            Err(SpoolError::NotFound(_)) => return None,
            Err(e) => {
                error!(queue_id = %id, error = %e, "cannot record delivery progress; it will be repeated")
            }
        }
        let pending = schedule::pending_indexes(state, &self.msg.envelope).len();
        info!(
            queue_id = %id, pending, attempts = state.attempts,
            retry_in_secs = state.next_attempt.saturating_sub(now), "deferred"
        );
        Some(())
    }
}

/// Log failures that no bounce reports (the reverse-path is `<>`).
fn log_unreported(id: &QueueId, failed: &[FailedRcpt], dsn_lost: bool) {
    let reasons: Vec<String> = failed
        .iter()
        .map(|f| format!("<{}> {} {}", f.address, f.status, f.diagnostic))
        .collect();
    let reasons = reasons.join("; ");
    if dsn_lost {
        error!(
            queue_id = %id, failed = failed.len(), reason = ?reasons, rule = "dsn_lost",
            "DSN lost: a delivery status notification failed for good and, its sender being <>, no bounce can be sent; the original sender is never told"
        );
    } else {
        warn!(
            queue_id = %id, failed = failed.len(), reason = ?reasons,
            "no bounce: the sender is <>; the failure is reported to no one"
        );
    }
}
