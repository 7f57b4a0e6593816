//! The one place the shared store and this node's tables are composed, for the effects of
//! the stage evaluators (rate budgets, the AUTH gate and the settling of an attempt).
//!
//! The local tables ([`Store`]) always keep counting: they are the fallback, and the local
//! AUTH gate still bounds the verifications in flight per client on this node. With
//! `[cluster] redis`, the shared store is asked next and decides while it answers (a
//! lockout this node knows of holds too). When it does not answer (down, slow, a script
//! error, an `OOM` refusal: never "unlimited"), `on_error = "local"` uses the local answer
//! (the link has logged the fall-back and raised `cluster_fallback`), and `"tempfail"`
//! answers [`Taken::Unavailable`] / [`Gate::Unavailable`]: a temporary refusal, rule
//! `cluster_unavailable`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{self, Begun, Keys};
use super::{Cluster, Unavailable, limits};
use crate::config::OnError;
use crate::policy::limits::{Limited, RateLimit};
use crate::policy::lockout::{AuthAttempt, FailureReport, GateDecision, Settings, spray_delay};
use crate::policy::store::{ClientState, RateKey, Store, budgets_of};

/// The result of taking one event from a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The budget had room; one event is taken.
    Allowed,
    /// The budget is spent (nothing taken).
    Limited(Limited),
    /// The shared store did not answer and `on_error = "tempfail"`.
    Unavailable,
}

/// What to do with an AUTH before verifying its password.
#[derive(Debug)]
pub enum Gate {
    /// The client is locked out (here or on any node): `454 4.7.0`, nothing verified.
    LockedOut,
    /// The client's failure budget is held by verifications in flight. `shared`: held on
    /// the shared store (possibly by another node, which cannot wake this one: ask again
    /// after [`SHARED_BUSY_POLL`]); else by this node (wait for an attempt to settle).
    Busy { shared: bool },
    /// Verify, then [`Attempt::settle`] (or [`Attempt::release`]).
    Proceed(Attempt),
    /// The shared store did not answer and `on_error = "tempfail"`.
    Unavailable,
}

/// How often an AUTH held back by verifications in flight on the shared store asks again
/// (bounded in all by the driver's AUTH wait).
pub const SHARED_BUSY_POLL: Duration = Duration::from_millis(100);

/// The local tables and, with `[cluster] redis`, the shared store.
#[derive(Debug, Clone, Copy)]
pub struct SharedStore<'a> {
    local: &'a Store,
    cluster: Option<&'a Arc<Cluster>>,
}

impl<'a> SharedStore<'a> {
    /// The store of the running policy (`local`) with the node's link (`cluster`, `None`
    /// without `[cluster]`: the local tables alone, exactly as before).
    pub fn new(local: &'a Store, cluster: Option<&'a Arc<Cluster>>) -> SharedStore<'a> {
        SharedStore { local, cluster }
    }

    /// Take one event from `limit`'s budget of `key` at `now`. A limit that is not
    /// configured has room, without asking the store; but under `"tempfail"` a new
    /// connection is refused while the store is known to be down, so no session starts that
    /// could not be limited.
    pub async fn take(&self, limit: RateLimit, key: &RateKey, now: Instant) -> Taken {
        let local = match self.local.take(limit, key, now) {
            Ok(()) => Taken::Allowed,
            Err(limited) => Taken::Limited(limited),
        };
        let Some(cluster) = self.cluster else {
            return local;
        };
        let Some(rate) = self.local.rate(limit) else {
            let refuse = limit == RateLimit::ConnectionsPerIp
                && cluster.on_error() == OnError::Tempfail
                && !cluster.is_up();
            return if refuse {
                Taken::Unavailable
            } else {
                Taken::Allowed
            };
        };
        let Some(budget) = limits::budget_key(limit, key) else {
            return local;
        };
        let spent = Taken::Limited(Limited {
            rule: limit.rule(),
            limit: rate,
        });
        match limits::take(cluster, &budget, rate).await {
            Ok(true) => Taken::Allowed,
            Ok(false) => spent,
            // A full store (OOM) refuses only the write of a budget with room: the script
            // reads first, so a spent budget is answered as such; see `Unavailable::Full`.
            Err(_) => fallback(cluster, local),
        }
    }

    /// Before verifying an AUTH for `login` from `ip` at `now`: the local gate first (its
    /// lockout and its bound on verifications in flight), then the shared records.
    pub async fn auth_gate(&self, ip: IpAddr, login: &str, now: Instant) -> Gate {
        let proceed = match self.local.auth_gate(ip, login, now) {
            GateDecision::LockedOut { .. } => return Gate::LockedOut,
            GateDecision::Busy => return Gate::Busy { shared: false },
            GateDecision::Proceed(attempt) => attempt,
        };
        let (Some(cluster), Some(settings)) = (self.cluster, self.local.auth_settings()) else {
            return Gate::Proceed(Attempt::local(proceed));
        };
        let keys = Keys::new(ip, login);
        match auth::begin(cluster, &keys, settings, auth::RESERVATION_HOLD).await {
            Ok(Begun::LockedOut) => {
                proceed.release();
                Gate::LockedOut
            }
            Ok(Begun::Busy) => {
                proceed.release();
                Gate::Busy { shared: true }
            }
            Ok(Begun::Reserved { login_failures, id }) => Gate::Proceed(Attempt {
                delay: (proceed.delay).max(spray_delay(login_failures, settings.max_failures)),
                known: proceed.known,
                local: Some(proceed),
                shared: Some(Box::new(Reservation {
                    cluster: Arc::clone(cluster),
                    keys,
                    id,
                    settings,
                })),
            }),
            // BEGIN reads the lock before it writes anything, so a full store still answers
            // a locked-out client (see `Unavailable::Full`).
            Err(_) => match cluster.on_error() {
                OnError::Local => Gate::Proceed(Attempt::local(proceed)),
                OnError::Tempfail => {
                    proceed.release();
                    Gate::Unavailable
                }
            },
        }
    }
}

impl SharedStore<'_> {
    /// With `[cluster]`: replace what `state` (this node's [`Store::client_state`]) says of
    /// the client's budgets and lockout with the shared store's records, read without taking
    /// anything, and say so in `state.store` (`shared`, or `local (why)` when the store did
    /// not answer: the local view is kept). Without `[cluster]`, `state` is left as it is.
    pub async fn read_shared(&self, state: &mut ClientState, ip: IpAddr, login: Option<&str>) {
        let Some(cluster) = self.cluster else {
            return;
        };
        state.store = Some(match self.shared_state(cluster, state, ip, login).await {
            Ok(()) => "shared".to_string(),
            Err(e) => format!("local ({e})"),
        });
    }

    async fn shared_state(
        &self,
        cluster: &Cluster,
        state: &mut ClientState,
        ip: IpAddr,
        login: Option<&str>,
    ) -> Result<(), Unavailable> {
        let mut budgets = state.budgets.clone();
        for (limit, key) in budgets_of(ip, login) {
            let Some(budget) = budgets.iter_mut().find(|b| b.rule == limit.rule()) else {
                continue;
            };
            let (Some(rate), Some(name)) = (
                self.local.rate(limit),
                key.and_then(|key| limits::budget_key(limit, &key)),
            ) else {
                continue;
            };
            budget.available = limits::available(cluster, &name, rate).await?;
        }
        if self.local.auth_settings().is_some() {
            // A lockout this node knows of holds too (see `auth_gate`): the longer one.
            let shared = auth::locked_out(cluster, ip)
                .await?
                .map(|ms| ms.div_ceil(1000));
            state.locked_out_secs = state.locked_out_secs.max(shared);
        }
        state.budgets = budgets;
        Ok(())
    }
}

/// The local answer under `on_error = "local"`, else [`Taken::Unavailable`].
fn fallback(cluster: &Cluster, local: Taken) -> Taken {
    match cluster.on_error() {
        OnError::Local => local,
        OnError::Tempfail => Taken::Unavailable,
    }
}

/// An AUTH allowed to verify: its reservations, locally and (when the store answered) on the
/// shared store, each counting as a failure until settled. Dropped unsettled, both stay
/// failures (the shared one is recorded by a task; if that fails too, the reservation lapses
/// after [`auth::RESERVATION_HOLD`]).
#[derive(Debug)]
pub struct Attempt {
    /// Answer no sooner than this (a sprayed login, by the larger of the local and the
    /// shared count).
    pub delay: Duration,
    /// The pair is known to this node ([`AuthAttempt::known`]).
    pub known: bool,
    local: Option<AuthAttempt>,
    /// Boxed, so that a [`Gate`] stays small.
    shared: Option<Box<Reservation>>,
}

/// A failure reserved on the shared store.
#[derive(Debug)]
struct Reservation {
    cluster: Arc<Cluster>,
    keys: Keys,
    /// Its id in the client's set of verifications in flight.
    id: String,
    settings: Settings,
}

impl Attempt {
    /// An attempt counted by this node only.
    pub fn local(attempt: AuthAttempt) -> Attempt {
        Attempt {
            delay: attempt.delay,
            known: attempt.known,
            local: Some(attempt),
            shared: None,
        }
    }

    /// An attempt nothing counts (a policy without `[auth]`).
    pub fn unguarded() -> Attempt {
        Attempt::local(AuthAttempt::unguarded())
    }

    /// Record the verification's result at `now`, locally and on the shared store. The
    /// report (lockout, spraying) is the shared store's when it answered, else the local one.
    pub async fn settle(mut self, success: bool, now: Instant) -> FailureReport {
        let local = self
            .local
            .take()
            .map(|a| a.settle(success, now))
            .unwrap_or_default();
        let Some(r) = self.shared.take() else {
            return local;
        };
        auth::settle(&r.cluster, &r.keys, &r.id, r.settings, success)
            .await
            .unwrap_or(local)
    }

    /// Nothing was verified: give both reservations back uncounted.
    pub async fn release(mut self) {
        if let Some(a) = self.local.take() {
            a.release();
        }
        if let Some(r) = self.shared.take() {
            // Unanswered, it lapses after its hold.
            let _ = auth::release(&r.cluster, &r.keys, &r.id).await;
        }
    }
}

impl Drop for Attempt {
    /// A verification whose result never arrived stays a failure on the shared store too.
    fn drop(&mut self) {
        let Some(r) = self.shared.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = auth::settle(&r.cluster, &r.keys, &r.id, r.settings, false).await;
            });
        }
    }
}
