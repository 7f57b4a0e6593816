//! One delivery attempt of one queued message.
//!
//! Load the message; expire it when it is older than `queue.max_age`; group the pending
//! recipients by route; for each group try the route's upstreams in order (skipping those
//! whose breaker is open) until one completes a transaction; record each recipient's
//! outcome; send a bounce for the recipients that failed for good; then either remove the
//! message (nothing pending) or write its new state with the next attempt time.
//!
//! Ordering for durability: a bounce is committed to the spool before the state that marks
//! its recipients failed, and the state is written before the message is removed, so a crash
//! at any point repeats work (a duplicate delivery or bounce) but never loses a message or a
//! bounce (DESIGN invariants 1 and 2).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info, warn};

use super::client::{DotGate, MessageSource, RcptOutcome, Sent, Transaction};
use super::upstream::{UpstreamRt, Upstreams};
use crate::config;
use crate::envelope::{Address, QueueId, RcptStatus, ReversePath, unix_now};
use crate::queue::{Attempt, Loaded, QueuedMessage, SendLock, Spool, SpoolError};

/// Messages up to this size are read into memory in one go; larger ones are streamed from
/// the spool file.
const IN_MEMORY_MAX: u64 = 1024 * 1024;

/// Everything a delivery needs.
pub struct Context {
    pub spool: Spool,
    pub upstreams: Upstreams,
    /// Our name: EHLO to upstreams, Reporting-MTA of bounces.
    pub hostname: String,
    pub queue: config::Queue,
    /// Tells the scheduler about messages created here (bounces).
    pub wake: UnboundedSender<super::NewMessage>,
}

/// A recipient that failed for good in this attempt, for the bounce.
#[derive(Debug, Clone)]
pub struct FailedRcpt {
    /// Its position in the envelope's recipients.
    pub index: usize,
    pub address: Address,
    /// Enhanced status code, e.g. `5.1.1`.
    pub status: String,
    /// The upstream's reply or our reason.
    pub text: String,
    /// Host name of the upstream that refused it (the DSN's `Remote-MTA`, RFC 3464 §2.3.5):
    /// only when an upstream actually answered, and only when it is configured by host name
    /// (an `address` that is an IP has no name to report).
    pub upstream: Option<String>,
}

/// Run one attempt for `id`, from `loaded` when the message is already in memory, otherwise
/// from the spool. Returns when it is due again (Unix seconds), or `None` when it left the
/// queue (delivered, failed, expired, or deleted meanwhile).
pub async fn deliver(ctx: Arc<Context>, id: QueueId, loaded: Option<Loaded>) -> Option<u64> {
    let loaded = match loaded {
        Some(loaded) => Ok(loaded),
        None => {
            let id = id.clone();
            on_spool(&ctx.spool, move |spool| {
                spool.load_with_body(&id, IN_MEMORY_MAX)
            })
            .await
        }
    };
    let Loaded { msg, body, lock } = match loaded {
        Ok(loaded) => loaded,
        Err(SpoolError::NotFound(_)) => return None,
        Err(e) => {
            error!(queue_id = %id, error = %e, "cannot read queued message; will try again");
            return Some(ctx.soon());
        }
    };
    let outcome = Attempting {
        ctx: ctx.clone(),
        msg,
        body: body.map_or(Bytes::Spooled, |b| Bytes::Memory(Arc::new(b))),
        lock: &lock,
        not_before: 0,
    }
    .run()
    .await;
    // The message file is closed off the reactor in every case: if it was unlinked (removed
    // here, or deleted by an operator), the last close frees its blocks, which on a file
    // system mounted with `discard` waits for the disk.
    match outcome {
        Outcome::Due(next) => {
            drop(tokio::task::spawn_blocking(move || drop(lock)));
            Some(next)
        }
        Outcome::Gone => {
            drop(tokio::task::spawn_blocking(move || drop(lock)));
            None
        }
        Outcome::Finished {
            delivered,
            failed,
            size,
            attempts,
        } => {
            let removed = on_spool(&ctx.spool, {
                let id = id.clone();
                move |s| {
                    let removed = s.remove_finished(&id, size, attempts);
                    drop(lock);
                    removed
                }
            })
            .await;
            match removed {
                Ok(()) | Err(SpoolError::NotFound(_)) => {
                    info!(queue_id = %id, delivered, failed, "removed from queue: finished");
                    None
                }
                Err(e) => {
                    error!(queue_id = %id, error = %e, "cannot remove a finished message; it may be delivered again");
                    Some(ctx.soon())
                }
            }
        }
    }
}

/// How an attempt ended.
enum Outcome {
    /// Recipients remain: due again at this time (Unix seconds).
    Due(u64),
    /// The message was deleted meanwhile.
    Gone,
    /// Nothing is pending any more: the message is to leave the queue.
    Finished {
        delivered: usize,
        failed: usize,
        /// For [`Spool::remove_finished`].
        size: u64,
        attempts: u32,
    },
}

/// The message bytes of a loaded message.
enum Bytes {
    Memory(Arc<Vec<u8>>),
    /// Too big for memory: reopened from the spool for each transaction.
    Spooled,
}

/// Run blocking spool work off the reactor. A panic in it is reported as an I/O error of the
/// spool, so callers have one error type to look at.
pub(super) async fn on_spool<T: Send + 'static>(
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

impl Context {
    /// When to try again after a local error: the first retry interval from now.
    fn soon(&self) -> u64 {
        unix_now() + self.queue.retry[0].as_secs().max(1)
    }
}

struct Attempting<'a> {
    ctx: Arc<Context>,
    msg: QueuedMessage,
    body: Bytes,
    /// `queue/ID`, open for the whole attempt: its lock, taken before a final dot and held
    /// until the outcome is on disk, tells a `queue delete` in between that the message may
    /// have been delivered.
    lock: &'a SendLock,
    /// Unix time before which no upstream of some route will be tried (every upstream of it
    /// had its circuit breaker open): retrying sooner would only find them down again.
    not_before: u64,
}

/// Asks the spool, right before the final dot, whether the message still exists (an operator
/// may have deleted it), taking the lock that tells a later deletion it may have been sent.
struct Gate<'a> {
    lock: &'a SendLock,
}

impl DotGate for Gate<'_> {
    fn allow(&mut self) -> bool {
        match self.lock.begin_final_dot() {
            Ok(go) => go,
            Err(e) => {
                // Cannot tell: sending is the at-least-once choice.
                warn!(queue_id = %self.lock.id(), error = %e, "cannot lock for the final dot; sending anyway");
                true
            }
        }
    }
}

impl Attempting<'_> {
    fn id(&self) -> &QueueId {
        &self.msg.envelope.id
    }

    async fn run(mut self) -> Outcome {
        let now = unix_now();
        let expires = self.msg.envelope.received_at + self.ctx.queue.max_age.as_secs();
        let pending: Vec<usize> = (0..self.msg.envelope.recipients.len())
            .filter(|&i| self.msg.state.status_of(i) == RcptStatus::Pending)
            .collect();
        if self.msg.state.recipients.is_empty() {
            self.msg.state.recipients =
                vec![RcptStatus::Pending; self.msg.envelope.recipients.len()];
        }
        let mut failed = Vec::new();
        let mut errors = Vec::new();

        if now >= expires {
            let reason = format!(
                "delivery time expired: not delivered within {}{}",
                crate::queue::report::human_age(self.ctx.queue.max_age.as_secs()),
                match &self.msg.state.last_error {
                    Some(e) => format!("; last error: {e}"),
                    None => String::new(),
                }
            );
            for &i in &pending {
                let address = self.msg.envelope.recipients[i].address.clone();
                warn!(queue_id = %self.id(), rcpt = %address, reason = %reason, "expired");
                self.msg.state.recipients[i] = RcptStatus::Failed;
                failed.push(FailedRcpt {
                    index: i,
                    address,
                    status: "4.4.7".into(),
                    text: reason.clone(),
                    upstream: None,
                });
            }
        } else {
            // Group the pending recipients by route (usually one group).
            let mut groups: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
            for &i in &pending {
                let domain = self.msg.envelope.recipients[i].address.domain().to_owned();
                let route = self.ctx.upstreams.route(&domain).to_vec();
                groups.entry(route).or_default().push(i);
            }
            for (route, rcpts) in groups {
                if self
                    .try_route(&route, &rcpts, &mut failed, &mut errors)
                    .await
                {
                    // Deleted by the operator while we were sending it.
                    return Outcome::Gone;
                }
            }
        }

        self.finish(now, expires, failed, errors).await
    }

    /// Deliver `rcpts` (indexes into the envelope) over `route`. Returns true when the message
    /// turned out to be deleted by an operator.
    async fn try_route(
        &mut self,
        route: &[usize],
        rcpts: &[usize],
        failed: &mut Vec<FailedRcpt>,
        errors: &mut Vec<String>,
    ) -> bool {
        let id = self.id().clone();
        if route.is_empty() {
            let domain = self.msg.envelope.recipients[rcpts[0]]
                .address
                .domain()
                .to_owned();
            error!(queue_id = %id, %domain, "no upstream route for this domain (no [[upstreams]] lists it and none has empty domains)");
            errors.push(format!("no upstream route for {domain}"));
            return false;
        }
        let upstreams: Vec<Arc<UpstreamRt>> = route
            .iter()
            .map(|&u| self.ctx.upstreams.get(u).clone())
            .collect();
        let mut reopens = Vec::new();
        let mut tried = false;
        for up in upstreams {
            let Some(pass) = up.available(Instant::now()) else {
                if let Some((until, why)) = up.down() {
                    let secs = until.saturating_duration_since(Instant::now()).as_secs() + 1;
                    reopens.push(unix_now() + secs);
                    errors.push(format!(
                        "upstream {} is down for {secs}s more (circuit breaker) after: {why}",
                        up.name()
                    ));
                }
                continue;
            };
            tried = true;
            let started = unix_now();
            match self.attempt(&up, rcpts).await {
                Ok(sent) if sent.aborted => {
                    info!(
                        queue_id = %id, upstream = %up.name(),
                        "deleted by an operator during delivery; transaction aborted before the final dot"
                    );
                    return true;
                }
                Ok(sent) => {
                    up.succeeded();
                    self.record(&up, started, rcpts, sent, failed, errors);
                    return false;
                }
                Err(f) => {
                    up.failed(Instant::now(), &f, pass);
                    let text = format!("upstream {}: {f}", up.name());
                    info!(queue_id = %id, upstream = %up.name(), error = %f, "delivery attempt failed");
                    self.msg.state.history.push(Attempt {
                        at: started,
                        upstream: Some(up.name().to_owned()),
                        outcome: f.to_string(),
                    });
                    errors.push(text);
                }
            }
        }
        if !tried && let Some(first) = reopens.into_iter().min() {
            self.not_before = self.not_before.max(first);
        }
        false
    }

    /// One transaction with one upstream, on a pooled connection (a second, fresh one when the
    /// pooled connection turns out to have been closed while idle).
    async fn attempt(
        &mut self,
        up: &UpstreamRt,
        rcpts: &[usize],
    ) -> Result<Sent, super::client::Failure> {
        let env = &self.msg.envelope;
        let addresses: Vec<&Address> = rcpts.iter().map(|&i| &env.recipients[i].address).collect();
        let tx = Transaction {
            from: &env.mail_from,
            params: &env.mail_params,
            rcpts: &addresses,
            size: self.msg.size,
        };
        for fresh_try in [false, true] {
            let mut lease = up.lease(&self.ctx.hostname).await?;
            let mut source = self.source().await.map_err(|e| super::client::Failure {
                stage: "DATA",
                detail: format!("reading the spool file: {e}"),
                stale: false,
            })?;
            let mut gate = Gate { lock: self.lock };
            let result = lease.conn.send(&tx, &mut source, &mut gate).await;
            up.release(lease);
            match result {
                Err(f) if f.stale && !fresh_try => {
                    // The retry must get a new connection, not the next stale one.
                    up.discard_idle();
                    continue;
                }
                other => return other,
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    async fn source(&self) -> Result<MessageSource, SpoolError> {
        match &self.body {
            Bytes::Memory(bytes) => Ok(MessageSource::Memory(bytes.clone())),
            Bytes::Spooled => {
                let id = self.id().clone();
                let (file, start) = on_spool(&self.ctx.spool, move |s| s.open_message(&id)).await?;
                Ok(MessageSource::File {
                    file: tokio::fs::File::from_std(file),
                    start,
                    sent: false,
                })
            }
        }
    }

    /// Apply a completed transaction's outcomes to the state, and log each.
    fn record(
        &mut self,
        up: &UpstreamRt,
        started: u64,
        rcpts: &[usize],
        sent: Sent,
        failed: &mut Vec<FailedRcpt>,
        errors: &mut Vec<String>,
    ) {
        let id = self.id().clone();
        let mut summary = Vec::new();
        for (&i, outcome) in rcpts.iter().zip(sent.rcpts) {
            let address = self.msg.envelope.recipients[i].address.clone();
            match outcome {
                RcptOutcome::Delivered(reply) => {
                    info!(queue_id = %id, upstream = %up.name(), rcpt = %address, reply = %reply, "delivered");
                    self.msg.state.recipients[i] = RcptStatus::Delivered;
                    summary.push(format!("{address}: {reply}"));
                }
                RcptOutcome::Deferred(text) => {
                    info!(queue_id = %id, upstream = %up.name(), rcpt = %address, reply = %text, "deferred");
                    errors.push(format!("upstream {}: {text}", up.name()));
                    summary.push(format!("{address}: {text}"));
                }
                RcptOutcome::Failed {
                    status,
                    text,
                    remote,
                } => {
                    warn!(queue_id = %id, upstream = %up.name(), rcpt = %address, reply = %text, "failed permanently");
                    self.msg.state.recipients[i] = RcptStatus::Failed;
                    summary.push(format!("{address}: {text}"));
                    failed.push(FailedRcpt {
                        index: i,
                        address,
                        status,
                        text,
                        upstream: remote.then(|| remote_mta(&up.config.address)).flatten(),
                    });
                }
            }
        }
        self.msg.state.history.push(Attempt {
            at: started,
            upstream: Some(up.name().to_owned()),
            outcome: summary.join("; "),
        });
    }

    async fn finish(
        mut self,
        now: u64,
        expires: u64,
        failed: Vec<FailedRcpt>,
        errors: Vec<String>,
    ) -> Outcome {
        let id = self.id().clone();
        if !failed.is_empty() && !self.bounce(&failed).await {
            // No bounce could be queued: keep those recipients pending so the failure is
            // reported at the next attempt rather than lost.
            for f in &failed {
                self.msg.state.recipients[f.index] = RcptStatus::Pending;
            }
        }
        let pending = self
            .msg
            .state
            .recipients
            .iter()
            .filter(|s| **s == RcptStatus::Pending)
            .count();
        if pending == 0 {
            let failed = self
                .msg
                .state
                .recipients
                .iter()
                .filter(|s| **s == RcptStatus::Failed)
                .count();
            Outcome::Finished {
                delivered: self.msg.state.recipients.len() - failed,
                failed,
                size: self.msg.size,
                attempts: self.msg.state.attempts,
            }
        } else {
            let state = &mut self.msg.state;
            state.attempts += 1;
            let schedule = &self.ctx.queue.retry;
            let wait = schedule[(state.attempts as usize - 1).min(schedule.len() - 1)];
            state.next_attempt = (now + wait.as_secs().max(1))
                .max(self.not_before)
                .min(expires.max(now + 1));
            if let Some(e) = errors.first() {
                state.last_error = Some(e.clone());
            }
            let next = state.next_attempt;
            let state = state.clone();
            let written = {
                let id = id.clone();
                on_spool(&self.ctx.spool, move |s| s.write_state(&id, &state)).await
            };
            match written {
                Ok(()) => {}
                // Deleted meanwhile: write_state refuses to create an orphan.
                Err(SpoolError::NotFound(_)) => return Outcome::Gone,
                Err(e) => {
                    error!(queue_id = %id, error = %e, "cannot record delivery progress; it will be repeated")
                }
            }
            info!(
                queue_id = %id, pending, attempts = self.msg.state.attempts,
                retry_in_secs = next.saturating_sub(now), "deferred"
            );
            Outcome::Due(next)
        }
    }

    /// Send a delivery status notification for `failed` to the envelope sender, unless the
    /// sender is `<>` (never bounce a bounce) or bounces are off. False when a bounce was due
    /// but could not be queued.
    async fn bounce(&self, failed: &[FailedRcpt]) -> bool {
        let id = self.id().clone();
        let sender = match &self.msg.envelope.mail_from {
            ReversePath::Null => {
                // Nothing can be told of this failure (RFC 5321 §4.5.5: no notification to
                // the null reverse-path); when the message is one of our own DSNs, a sender
                // is never told that their mail failed, which an operator must hear of.
                let reasons: Vec<String> = failed
                    .iter()
                    .map(|f| format!("<{}> {} {}", f.address, f.status, f.text))
                    .collect();
                let reasons = reasons.join("; ");
                if self.msg.envelope.listener == crate::queue::bounce::BOUNCE_LISTENER {
                    error!(
                        rule = "dsn_lost", queue_id = %id, failed = failed.len(), reason = ?reasons,
                        "DSN lost: a delivery status notification failed for good and, its sender being <>, no bounce can be sent; the original sender is never told"
                    );
                } else {
                    warn!(
                        queue_id = %id, failed = failed.len(), reason = ?reasons,
                        "no bounce: the sender is <>; the failure is reported to no one"
                    );
                }
                return true;
            }
            ReversePath::Address(a) => a.clone(),
        };
        if !self.ctx.queue.bounces {
            warn!(queue_id = %id, from = %sender, failed = failed.len(), "no bounce: [queue] bounces = false");
            return true;
        }
        let envelope = self.msg.envelope.clone();
        let hostname = self.ctx.hostname.clone();
        let failed = failed.to_vec();
        let made = on_spool(&self.ctx.spool, move |s| {
            super::bounce::enqueue(s, &hostname, &envelope, &failed)
        })
        .await;
        match made {
            Ok(bounce_id) => {
                info!(queue_id = %id, bounce_id = %bounce_id, to = %sender, "bounce queued");
                let _ = self.ctx.wake.send(super::NewMessage {
                    id: bounce_id,
                    loaded: None,
                });
                true
            }
            Err(e) => {
                error!(queue_id = %id, error = %e, "cannot queue the bounce; will try again");
                false
            }
        }
    }
}

/// The `Remote-MTA` name of an upstream at `address` (`host:port`): its configured host name,
/// or `None` when it is configured by IP address (RFC 3464 §2.3.5 wants a `dns` name there).
fn remote_mta(address: &str) -> Option<String> {
    let host = super::tls::host_of(address);
    let host = host.strip_suffix('.').unwrap_or(host);
    // A DNS name's last label is never all digits (RFC 3696 §2); anything else the resolver
    // accepts (`10.0.0.5`, inet_aton shorthand such as `127.1` or `2130706433`, a bracketed
    // literal) is an address, and RFC 3464 §2.3.5 wants no address in a `dns;` Remote-MTA.
    let last = host.rsplit('.').next().unwrap_or("");
    let is_name = !last.is_empty()
        && !last.bytes().all(|b| b.is_ascii_digit())
        && host.parse::<std::net::IpAddr>().is_err()
        && !host.starts_with('[');
    is_name.then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    use super::remote_mta;

    #[test]
    fn remote_mta_is_the_configured_host_name_never_an_ip() {
        assert_eq!(
            remote_mta("exchange.example.internal:25").as_deref(),
            Some("exchange.example.internal")
        );
        assert_eq!(remote_mta("localhost:2525").as_deref(), Some("localhost"));
        assert_eq!(remote_mta("10.0.0.5:25"), None);
        assert_eq!(remote_mta("[2001:db8::5]:25"), None);
        assert_eq!(remote_mta("[::1]:25"), None);
        // inet_aton shorthands connect to an address too.
        assert_eq!(remote_mta("127.1:26006"), None);
        assert_eq!(remote_mta("2130706433:25"), None);
        assert_eq!(remote_mta("10.0.5.:25"), None);
        assert_eq!(
            remote_mta("mx1.example.net.:25").as_deref(),
            Some("mx1.example.net")
        );
    }
}
