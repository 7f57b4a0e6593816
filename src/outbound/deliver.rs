//! One delivery attempt's sending: the outbound side of the queue manager's [`Courier`].
//!
//! Given a plan (the message and its pending recipients grouped by route), try each route's
//! upstreams in order (skipping those whose breaker is open) until one completes a
//! transaction, and report each recipient's result. Nothing here writes the spool or queues
//! a bounce: the queue manager ([`crate::queue::manager`]) records the report.

use std::sync::Arc;
use std::time::Instant;

use tracing::{error, info, warn};

use super::client::{DotGate, MailTransaction, MessageSource, RcptOutcome, Sent};
use super::error::ClientError;
use super::events::{Facts, Transaction};
use super::upstream::{UpstreamRt, Upstreams};
use crate::config;
use crate::envelope::{Address, QueueId, unix_now};
use crate::observe::event::unix_millis;
use crate::queue::attempt::{Consignment, Courier, MessageBytes, on_spool};
use crate::queue::census::NO_ROUTE;
use crate::queue::schedule::{AttemptReport, FailedRcpt, RcptResult};
use crate::queue::{Attempt, SendLock, SpoolError};

/// Everything a delivery needs.
pub struct Context {
    /// Shared with the next context when a reload leaves `[[upstreams]]` as they are.
    pub upstreams: Arc<Upstreams>,
    /// Our name: EHLO to upstreams, Reporting-MTA of bounces.
    pub hostname: String,
    pub queue: config::Queue,
    /// Where delivery events are recorded (metrics, flow, journal).
    pub telemetry: Arc<crate::observe::Telemetry>,
}

impl Courier for Context {
    fn queue(&self) -> &config::Queue {
        &self.queue
    }

    fn hostname(&self) -> &str {
        &self.hostname
    }

    fn route(&self, domain: &str) -> Vec<usize> {
        self.upstreams.route(domain).to_vec()
    }

    fn upstream_name(&self, index: usize) -> Option<&str> {
        self.upstreams.iter().nth(index).map(|u| u.name())
    }

    fn upstream_names(&self) -> Vec<String> {
        self.upstreams.iter().map(|u| u.name().to_owned()).collect()
    }

    fn max_in_flight(&self) -> usize {
        self.upstreams
            .iter()
            .map(|u| u.config.max_connections)
            .sum::<usize>()
            .max(1)
    }

    async fn send<'a>(&'a self, job: Consignment<'a>) -> AttemptReport {
        let mut sending = Sending {
            ctx: self,
            job,
            report: AttemptReport::default(),
        };
        for group in job.groups {
            sending.try_route(&group.route, &group.rcpts).await;
            if sending.report.deleted {
                break;
            }
        }
        sending.report
    }

    fn upkeep(&self) {
        self.upstreams.reap_idle();
    }

    fn reset_all(&self) {
        self.upstreams.reset_all();
    }

    fn reset_route(&self, route: &[usize]) {
        for &u in route {
            self.upstreams.get(u).reset_breaker();
        }
    }
}

/// The sending half of one attempt: the job, and the report it fills in.
struct Sending<'a> {
    ctx: &'a Context,
    job: Consignment<'a>,
    report: AttemptReport,
}

/// Asks the spool, right before the final dot, whether the message still exists (an operator
/// may have deleted it), taking the lock that tells a later deletion it may have been sent.
struct FinalDotLock<'a> {
    lock: &'a SendLock,
}

impl DotGate for FinalDotLock<'_> {
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

impl Sending<'_> {
    fn address(&self, rcpt: usize) -> &Address {
        &self.job.msg.envelope.recipients[rcpt].address
    }

    /// Deliver `rcpts` (indexes into the envelope) over `route`; sets `report.deleted` when
    /// the message turned out to be deleted by an operator. Each upstream tried, and a route
    /// that could not be tried, is recorded as events in the telemetry.
    async fn try_route(&mut self, route: &[usize], rcpts: &[usize]) {
        let id = self.job.msg.id().clone();
        if route.is_empty() {
            let domain = self.address(rcpts[0]).domain().to_owned();
            error!(queue_id = %id, %domain, "no upstream route for this domain (no [[upstreams]] lists it and none has empty domains)");
            let why = format!("no upstream route for {domain}");
            self.untried(NO_ROUTE, rcpts, why.clone());
            self.report.errors.push(why);
            return;
        }
        let mut reopens = Vec::new();
        let mut tried = false;
        for &u in route {
            let up = self.ctx.upstreams.get(u).clone();
            let Some(pass) = up.available(Instant::now()) else {
                reopens.extend(self.breaker_open(&up));
                continue;
            };
            tried = true;
            let started = unix_now();
            let clock = Instant::now();
            match self.attempt(&up, rcpts).await {
                Ok(sent) if sent.aborted => {
                    info!(
                        queue_id = %id, upstream = %up.name(),
                        "deleted by an operator during delivery; transaction aborted before the final dot"
                    );
                    self.report.deleted = true;
                    return;
                }
                Ok(sent) => {
                    // A crash point only (the upstream has the message; an error is no error).
                    let _ = crate::failpoint::step("deliver.after_dot");
                    up.succeeded();
                    let seconds = clock.elapsed().as_secs_f64();
                    self.record(&up, started, seconds, rcpts, sent);
                    return;
                }
                Err(f) => {
                    up.failed(Instant::now(), &f, pass);
                    info!(queue_id = %id, upstream = %up.name(), error = %f, "delivery attempt failed");
                    self.untried(up.name(), rcpts, f.to_string());
                    self.report.history.push(Attempt {
                        at: started,
                        upstream: Some(up.name().to_owned()),
                        outcome: f.to_string(),
                    });
                    self.report
                        .errors
                        .push(format!("upstream {}: {f}", up.name()));
                }
            }
        }
        if !tried {
            self.all_down(route, rcpts, reopens);
        }
    }

    /// Every upstream of `route` is down (their breakers reopen at `reopens`, Unix seconds):
    /// `rcpts` wait for the first to reopen, recorded under the first upstream of the route.
    fn all_down(&mut self, route: &[usize], rcpts: &[usize], reopens: Vec<u64>) {
        let first = self.ctx.upstreams.get(route[0]).clone();
        let why = first.down().map_or_else(String::new, |(_, why)| why);
        let why = format!("circuit breaker open after: {why}");
        self.untried(first.name(), rcpts, why);
        if let Some(first) = reopens.into_iter().min() {
            self.report.not_before = self.report.not_before.max(first);
        }
    }

    /// Record that `rcpts` stay for later at `upstream` without a transaction, because of
    /// `why`.
    fn untried(&self, upstream: &str, rcpts: &[usize], why: String) {
        let addresses = rcpts.iter().map(|&i| self.address(i).to_string()).collect();
        let event = self.facts(upstream, None).deferred(addresses, why);
        self.ctx.telemetry.record(&event);
    }

    /// What the events of this message at `upstream` share, now (`seconds`: how long its
    /// transaction took, if one took place).
    fn facts<'a>(&'a self, upstream: &'a str, seconds: Option<f64>) -> Facts<'a> {
        Facts {
            at: unix_millis(),
            id: self.job.msg.id().as_str(),
            upstream,
            seconds,
            size: self.job.msg.size,
        }
    }

    /// An upstream skipped because its breaker is open: when it reopens (Unix seconds).
    fn breaker_open(&mut self, up: &UpstreamRt) -> Option<u64> {
        let (until, why) = up.down()?;
        let secs = until.saturating_duration_since(Instant::now()).as_secs() + 1;
        self.report.errors.push(format!(
            "upstream {} is down for {secs}s more (circuit breaker) after: {why}",
            up.name()
        ));
        Some(unix_now() + secs)
    }

    /// One transaction with one upstream, on a pooled connection (a second, fresh one when the
    /// pooled connection turns out to have been closed while idle).
    async fn attempt(&mut self, up: &UpstreamRt, rcpts: &[usize]) -> Result<Sent, ClientError> {
        let msg = self.job.msg;
        let env = &msg.envelope;
        let addresses: Vec<&Address> = rcpts.iter().map(|&i| &env.recipients[i].address).collect();
        let tx = MailTransaction {
            from: &env.mail_from,
            params: &env.mail_params,
            rcpts: &addresses,
            size: msg.size,
        };
        for fresh_try in [false, true] {
            // The message first: a spool that cannot be read leaves the pool as it was.
            let mut source = self.source().await.map_err(ClientError::Spool)?;
            let mut lease = up.lease(&self.ctx.hostname).await?;
            let mut gate = FinalDotLock {
                lock: self.job.lock,
            };
            let result = lease.conn.send(&tx, &mut source, &mut gate).await;
            up.release(lease);
            match result {
                Err(ClientError::Stale(_)) if !fresh_try => {
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
        match self.job.bytes {
            MessageBytes::Memory(bytes) => Ok(MessageSource::Memory(bytes.clone())),
            MessageBytes::Spooled => {
                let id = self.job.msg.id().clone();
                let (file, start) = on_spool(self.job.spool, move |s| s.open_message(&id)).await?;
                Ok(MessageSource::File {
                    file: tokio::fs::File::from_std(file),
                    start,
                    sent: false,
                })
            }
        }
    }

    /// Report a completed transaction's per-recipient outcomes, log each, and record them in
    /// the telemetry (`seconds`: how long the transaction took).
    fn record(&mut self, up: &UpstreamRt, started: u64, seconds: f64, rcpts: &[usize], sent: Sent) {
        let mut summary = Vec::new();
        let mut tx = Transaction::default();
        for (&i, outcome) in rcpts.iter().zip(sent.rcpts) {
            let address = self.address(i).clone();
            let (result, text) = rcpt_result(self.job.msg.id(), up, i, &address, outcome);
            let line = (address.to_string(), text.clone());
            match &result {
                RcptResult::Delivered => tx.delivered.push(line),
                RcptResult::Deferred => {
                    self.report
                        .errors
                        .push(format!("upstream {}: {text}", up.name()));
                    tx.deferred.push(line);
                }
                RcptResult::Failed(_) => tx.failed.push(line),
            }
            summary.push(format!("{address}: {text}"));
            self.report.results.push((i, result));
        }
        self.report.history.push(Attempt {
            at: started,
            upstream: Some(up.name().to_owned()),
            outcome: summary.join("; "),
        });
        for event in self.facts(up.name(), Some(seconds)).transaction(tx) {
            self.ctx.telemetry.record(&event);
        }
    }
}

/// The one place a transaction's outcome for recipient `index` becomes the queue's
/// per-recipient result (and the text of it for the history), logged.
fn rcpt_result(
    id: &QueueId,
    up: &UpstreamRt,
    index: usize,
    address: &Address,
    outcome: RcptOutcome,
) -> (RcptResult, String) {
    match outcome {
        RcptOutcome::Delivered(reply) => {
            info!(queue_id = %id, upstream = %up.name(), rcpt = %address, reply = %reply, "delivered");
            (RcptResult::Delivered, reply.to_string())
        }
        RcptOutcome::Deferred(deferral) => {
            let text = deferral.to_string();
            info!(queue_id = %id, upstream = %up.name(), rcpt = %address, reply = %text, "deferred");
            (RcptResult::Deferred, text)
        }
        RcptOutcome::Failed(rejection) => {
            let text = rejection.to_string();
            warn!(queue_id = %id, upstream = %up.name(), rcpt = %address, reply = %text, "failed permanently");
            let failed = FailedRcpt {
                index,
                address: address.clone(),
                status: rejection.status(),
                diagnostic: rejection.diagnostic(),
                // Its name: `tls_name` (the name its certificate holds) when set, else the
                // host of its address when that is a name.
                upstream: rejection
                    .is_remote()
                    .then(|| {
                        (up.config.tls_name.clone()).or_else(|| remote_mta(&up.config.address))
                    })
                    .flatten(),
            };
            (RcptResult::Failed(failed), text)
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
    use std::sync::Arc;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::remote_mta;
    use super::*;
    use crate::config::{Config, UpstreamTls};
    use crate::envelope::sample_envelope;
    use crate::observe::EventKind;
    use crate::observe::kept::KeptEvents;
    use crate::observe::metrics::UpstreamLabel;
    use crate::queue::Spool;
    use crate::queue::schedule::RouteGroup;
    use crate::routes::CapabilityBook;

    /// A loopback upstream for one connection: accepts `@example.com` recipients except
    /// `nobody@`, which it refuses with `550 5.1.1`. Returns the message bytes it received.
    async fn upstream(listener: TcpListener) -> Vec<u8> {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 up.example ESMTP\r\n").await.unwrap();
        let (mut data, mut in_data, mut line) = (Vec::new(), false, Vec::new());
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line).await.unwrap() == 0 {
                return data;
            }
            if in_data {
                if line == b".\r\n" {
                    in_data = false;
                    w.write_all(b"250 2.0.0 queued as UP1\r\n").await.unwrap();
                } else {
                    data.extend_from_slice(&line);
                }
                continue;
            }
            let reply: &[u8] = match line.get(..4).map(<[u8]>::to_ascii_uppercase).as_deref() {
                Some(b"EHLO") => b"250-up.example\r\n250 PIPELINING\r\n",
                Some(b"RCPT") if line.windows(7).any(|w| w == b"nobody@") => {
                    b"550 5.1.1 <nobody@example.com>: no such user\r\n"
                }
                Some(b"MAIL" | b"RCPT" | b"RSET") => b"250 2.1.0 ok\r\n",
                Some(b"DATA") => {
                    in_data = true;
                    b"354 go on\r\n"
                }
                Some(b"QUIT") => {
                    w.write_all(b"221 bye\r\n").await.unwrap();
                    return data;
                }
                _ => b"500 5.5.1 what\r\n",
            };
            w.write_all(reply).await.unwrap();
        }
    }

    fn context(port: u16) -> Context {
        context_with(port, KeptEvents::default())
    }

    fn context_with(port: u16, journal: KeptEvents) -> Context {
        let mut config = Config::embedded_default();
        config.upstreams.truncate(1);
        config.upstreams[0].address = format!("localhost:{port}");
        config.upstreams[0].tls = UpstreamTls::None;
        let book = Arc::new(CapabilityBook::load(&config.upstreams, None));
        let telemetry = Arc::new(
            crate::observe::Telemetry::new("relay.example").with_journal(Box::new(journal)),
        );
        let upstreams = Upstreams::new(&config, book, telemetry.clone()).unwrap();
        upstreams.publish_states(&telemetry);
        Context {
            upstreams: Arc::new(upstreams),
            hostname: "relay.example".into(),
            queue: config.queue.clone(),
            telemetry,
        }
    }

    // Real time: with paused time the runtime, idle while the loopback socket is on its way,
    // would jump to the client's reply timeouts and fire them.
    #[tokio::test]
    async fn an_attempt_reports_each_recipient_and_writes_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ctx = context(listener.local_addr().unwrap().port());
        let received = tokio::spawn(upstream(listener));
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let env = sample_envelope(&["a@example.com", "nobody@example.com"]);
        let body = b"Subject: t\r\n\r\n.dot-stuffed on the wire\r\n";
        let id = spool.enqueue(&env, body).unwrap();
        let loaded = spool.load_with_body(&id, 1 << 20).unwrap();
        let bytes = MessageBytes::Memory(Arc::new(loaded.body.clone().unwrap()));
        let groups = [RouteGroup {
            route: vec![0],
            rcpts: vec![0, 1],
        }];
        let job = Consignment {
            spool: &spool,
            msg: &loaded.msg,
            bytes: &bytes,
            lock: &loaded.lock,
            groups: &groups,
        };
        let report = ctx.send(job).await;

        let refused = FailedRcpt {
            index: 1,
            address: env.recipients[1].address.clone(),
            status: "5.1.1".into(),
            diagnostic: crate::queue::bounce::smtp("550 5.1.1 <nobody@example.com>: no such user"),
            upstream: Some("localhost".into()),
        };
        assert_eq!(
            report.results,
            [(0, RcptResult::Delivered), (1, RcptResult::Failed(refused))]
        );
        assert_eq!(report.history.len(), 1);
        assert_eq!(report.history[0].upstream.as_deref(), Some("default"));
        assert!(report.errors.is_empty() && !report.deleted && report.not_before == 0);
        // Sending only: the spool still holds the message, with no state and no bounce.
        assert_eq!(spool.list().unwrap().len(), 1);
        assert_eq!(
            spool.load(&id).unwrap().state,
            crate::queue::DeliveryState::fresh(env.received_at)
        );
        ctx.upstreams.close_all().await;
        assert_eq!(
            received.await.unwrap(),
            b"Subject: t\r\n\r\n..dot-stuffed on the wire\r\n"
        );
    }

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

    /// A queued message to `rcpts`, loaded as an attempt has it, and its one route group.
    fn queued(
        spool: &Spool,
        rcpts: &[&str],
    ) -> (crate::queue::Loaded, MessageBytes, [RouteGroup; 1]) {
        let env = sample_envelope(rcpts);
        let id = spool.enqueue(&env, b"Subject: t\r\n\r\nhi\r\n").unwrap();
        let loaded = spool.load_with_body(&id, 1 << 20).unwrap();
        let bytes = MessageBytes::Memory(Arc::new(loaded.body.clone().unwrap()));
        let groups = [RouteGroup {
            route: vec![0],
            rcpts: (0..rcpts.len()).collect(),
        }];
        (loaded, bytes, groups)
    }

    async fn send(ctx: &Context, spool: &Spool, rcpts: &[&str]) -> (QueueId, AttemptReport) {
        let (loaded, bytes, groups) = queued(spool, rcpts);
        let job = Consignment {
            spool,
            msg: &loaded.msg,
            bytes: &bytes,
            lock: &loaded.lock,
            groups: &groups,
        };
        (loaded.msg.id().clone(), ctx.send(job).await)
    }

    fn counter(
        family: &prometheus_client::metrics::family::Family<
            UpstreamLabel,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> u64 {
        family
            .get_or_create(&UpstreamLabel {
                upstream: "default".into(),
            })
            .get()
    }

    fn gauge(
        family: &prometheus_client::metrics::family::Family<
            UpstreamLabel,
            prometheus_client::metrics::gauge::Gauge,
        >,
    ) -> i64 {
        family
            .get_or_create(&UpstreamLabel {
                upstream: "default".into(),
            })
            .get()
    }

    /// `portcullis_delivery_seconds_count`, as a scrape shows it.
    fn delivery_count(m: &crate::observe::metrics::Metrics) -> u64 {
        let text = m.encode();
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("portcullis_delivery_seconds_count "))
            .expect("the histogram is exposed");
        line.parse().unwrap()
    }

    // Real time, as above.
    #[tokio::test]
    async fn a_transaction_is_recorded_as_delivered_and_failed_events_with_the_upstreams_id() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let journal = KeptEvents::default();
        let ctx = context_with(listener.local_addr().unwrap().port(), journal.clone());
        tokio::spawn(upstream(listener));
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let (id, _) = send(&ctx, &spool, &["a@example.com", "nobody@example.com"]).await;

        let events = journal.take();
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Delivered, EventKind::Failed]);
        let delivered = &events[0];
        assert_eq!(delivered.id.as_deref(), Some(id.as_str()));
        assert_eq!(delivered.upstream.as_deref(), Some("default"));
        assert_eq!(delivered.rcpts, ["a@example.com"]);
        assert_eq!(delivered.reply.as_deref(), Some("250 2.0.0 queued as UP1"));
        assert_eq!(delivered.upstream_id.as_deref(), Some("UP1"));
        assert!(delivered.seconds.is_some_and(|s| s > 0.0 && s < 10.0));
        assert_eq!(events[1].rcpts, ["nobody@example.com"]);
        assert_eq!(
            events[1].reply.as_deref(),
            Some("550 5.1.1 <nobody@example.com>: no such user")
        );
        let m = &ctx.telemetry.metrics;
        assert_eq!((counter(&m.delivered), counter(&m.deferred)), (1, 0));
        assert_eq!(delivery_count(m), 1);
        let board = ctx.telemetry.upstreams.snapshot(unix_now());
        assert!(board[0].last_success.is_some());
        ctx.upstreams.close_all().await;
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_deferred_marked_down_and_up_again_after_a_retry() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let journal = KeptEvents::default();
        let ctx = context_with(port, journal.clone());
        let m = &ctx.telemetry.metrics;
        assert_eq!(
            (gauge(&m.upstream_up), gauge(&m.upstream_breaker_open)),
            (1, 0)
        );
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();

        let (id, report) = send(&ctx, &spool, &["a@example.com"]).await;
        assert!(report.results.is_empty());
        let events = journal.take();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Deferred);
        assert_eq!(events[0].id.as_deref(), Some(id.as_str()));
        assert_eq!(events[0].rcpts, ["a@example.com"]);
        assert_eq!(events[0].seconds, None, "no transaction took place");
        let error = events[0].reply.clone().unwrap();
        assert!(error.starts_with("connect"), "{error}");
        assert_eq!(counter(&m.deferred), 1);
        assert_eq!(
            (gauge(&m.upstream_up), gauge(&m.upstream_breaker_open)),
            (0, 1)
        );
        let board = ctx.telemetry.upstreams.snapshot(unix_now());
        assert!(!board[0].up);
        assert_eq!(board[0].last_error.as_deref(), Some(error.as_str()));

        // Breaker open: deferred at once, saying why.
        send(&ctx, &spool, &["b@example.com"]).await;
        let events = journal.take();
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].reply.as_deref(),
            Some(format!("circuit breaker open after: {error}").as_str())
        );
        assert_eq!(counter(&m.deferred), 2);
        assert_eq!(delivery_count(m), 0);

        // `queue retry`: the breaker closes, the upstream is up.
        ctx.reset_route(&[0]);
        assert_eq!(
            (gauge(&m.upstream_up), gauge(&m.upstream_breaker_open)),
            (1, 0)
        );
        assert!(ctx.telemetry.upstreams.snapshot(unix_now())[0].up);
    }
}
