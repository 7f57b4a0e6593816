//! The effect runner: carries out what a stage evaluator ([`crate::policy::stage`]) asks for
//! and hands the answer back, until the stage accepts or refuses.
//!
//! The session driver calls [`Effects::decide`] for every stage; it never orders checks
//! itself. Each [`Effect`] is carried out here once, whichever stage asks for it: rate
//! budgets and the AUTH lockout gate by the policy's [`crate::policy::store::Store`],
//! passwords by the [`super::verifier::Verifier`] pool, free space by the spool. State an
//! effect leaves for a later stage (the transaction's space reservation, lookups started at
//! one stage and read at a later one) is kept in [`Effects`], one per session; the AUTH
//! attempt between the gate and the verification lives only as long as its stage.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Runtime;
use super::connection::Shared;
use super::verifier::Lane;
use crate::policy::Refusal;
use crate::policy::credentials::CheckError;
use crate::policy::lockout::{AuthAttempt, FailureReport, GateDecision, login_key};
use crate::policy::stage::{
    Answer, Effect, Evaluation, Input, Lookup, LookupResult, StageFacts, Verdict,
};
use crate::queue::reserve::Reservation;

/// How long an AUTH waits for its client's verifications in flight before `454 4.7.0`, and
/// again how long it waits for its own verification to be run (rule `auth_busy` either way,
/// the failure budget given back): at most twice this in all.
pub const AUTH_WAIT: Duration = Duration::from_secs(10);

/// What one step of an evaluation works with.
#[derive(Clone, Copy)]
struct Step<'a> {
    runtime: &'a Runtime,
    shared: &'a Shared,
    facts: &'a StageFacts<'a>,
}

/// What one session keeps between effects.
#[derive(Debug, Default)]
pub struct Effects {
    /// Free space held for the current transaction from MAIL to its end (see
    /// [`crate::queue::reserve`]).
    pub reservation: Option<Reservation>,
    /// Lookups started and not read yet.
    lookups: Lookups,
}

impl Effects {
    /// Evaluate the stage `facts` are about ([`Input::stage`]) to its verdict, carrying out
    /// every effect it asks for.
    ///
    /// # Errors
    /// The [`Refusal`] of the check that refused.
    pub async fn decide(
        &mut self,
        runtime: &Runtime,
        shared: &Shared,
        facts: &StageFacts<'_>,
    ) -> Result<(), Refusal> {
        let evaluation = Evaluation::new(facts.input.stage());
        self.decide_with(evaluation, runtime, shared, facts).await
    }

    /// [`Effects::decide`] with an evaluation of the caller's (a list of checks of its own).
    pub(super) async fn decide_with(
        &mut self,
        mut evaluation: Evaluation,
        runtime: &Runtime,
        shared: &Shared,
        facts: &StageFacts<'_>,
    ) -> Result<(), Refusal> {
        let mut answer = None;
        // The AUTH attempt the gate let through, until its password is verified: it lives
        // only as long as the stage (dropped unsettled, it counts as a failure).
        let mut attempt = None;
        let step = Step {
            runtime,
            shared,
            facts,
        };
        loop {
            match runtime
                .policy
                .evaluate(&mut evaluation, facts, answer.take())
            {
                Verdict::Accept => return Ok(()),
                Verdict::Refuse(refusal) => return Err(refusal),
                Verdict::Effect(effect) => {
                    answer = Some(self.carry_out(effect, step, &mut attempt).await);
                }
            }
        }
    }

    async fn carry_out(
        &mut self,
        effect: Effect,
        step: Step<'_>,
        attempt: &mut Option<AuthAttempt>,
    ) -> Answer {
        let Step {
            runtime,
            shared,
            facts,
        } = step;
        let store = runtime.policy.store();
        let now = Instant::now().into_std();
        match effect {
            Effect::Rate(limit, key) => match store.take(limit, &key, now) {
                Ok(()) => Answer::Allowed,
                Err(limited) => Answer::Limited(limited),
            },
            Effect::AuthGate { login } => auth_gate(runtime, facts, &login, attempt).await,
            Effect::VerifyPassword { hash, known } => {
                let Input::Auth { login, password } = facts.input else {
                    return Answer::Busy;
                };
                let attempt = attempt.take().unwrap_or_else(AuthAttempt::unguarded);
                let password = password.to_string();
                verify(shared, attempt, (hash, known), login, password).await
            }
            Effect::ReserveSpace { bytes } => self.reserve(runtime, shared, bytes),
            Effect::Start(lookup) => {
                self.lookups.start(lookup);
                Answer::Allowed
            }
            Effect::Await(lookup) => Answer::Looked(self.lookups.finish(lookup).await),
        }
    }

    /// The transaction is over (RSET, refused, or its message done or refused): its space
    /// reservation, if the assembly did not take it, is given back.
    pub fn transaction_ended(&mut self) {
        self.reservation = None;
    }

    /// Lookups started and not read yet.
    #[cfg(test)]
    pub(super) fn pending_lookups(&self) -> usize {
        self.lookups.0.len()
    }

    /// Hold `bytes` of spool space for the transaction (replacing any earlier reservation).
    fn reserve(&mut self, runtime: &Runtime, shared: &Shared, bytes: u64) -> Answer {
        self.reservation = None;
        let min_free = runtime.config.limits.min_free_space;
        match shared.spool.reserve(bytes, min_free) {
            Ok(Ok(reservation)) => {
                self.reservation = Some(reservation);
                Answer::Allowed
            }
            Ok(Err(short)) => Answer::NoSpace(short),
            Err(e) => Answer::SpaceUnknown(e),
        }
    }
}

/// The AUTH gate: a locked-out client is answered at once; while the client's failure
/// budget is held by verifications in flight, wait until one ends (every attempt that
/// ends wakes the waiters, see [`crate::policy::lockout::AuthGuard::settled`]), for at
/// most [`AUTH_WAIT`], then [`Answer::Busy`].
async fn auth_gate(
    runtime: &Runtime,
    facts: &StageFacts<'_>,
    login: &str,
    attempt: &mut Option<AuthAttempt>,
) -> Answer {
    let store = runtime.policy.store();
    let deadline = Instant::now() + AUTH_WAIT;
    loop {
        // Registered before the check, so an attempt ending in between is not missed.
        let settled = store.auth_settled();
        tokio::pin!(settled);
        if let Some(settled) = settled.as_mut().as_pin_mut() {
            settled.enable();
        }
        match store.auth_gate(facts.session.client_ip, login, Instant::now().into_std()) {
            GateDecision::LockedOut { .. } => return Answer::LockedOut,
            GateDecision::Proceed(proceed) => {
                *attempt = Some(proceed);
                return Answer::Allowed;
            }
            GateDecision::Busy => {}
        }
        let Some(settled) = settled.as_pin_mut() else {
            return Answer::Busy;
        };
        if tokio::time::timeout_at(deadline, settled).await.is_err() {
            return Answer::Busy;
        }
    }
}

/// Verify on the verifier pool, settle the attempt with the result, and answer no
/// sooner than the attempt's delay (a sprayed login).
async fn verify(
    shared: &Shared,
    attempt: AuthAttempt,
    (hash, known): (Arc<str>, bool),
    login: &str,
    password: String,
) -> Answer {
    let lane = if attempt.known {
        Lane::Known
    } else {
        Lane::Other
    };
    let delay = attempt.delay;
    let answer_at = Instant::now() + delay;
    let Ok(mut result) = shared.verifier.submit(hash, password, login, lane) else {
        // Nothing was verified: the reservation is given back, not counted.
        attempt.release();
        return Answer::Busy;
    };
    // The wait for a verifier thread is bounded too: under a flood that outlasts
    // AUTH_WAIT, `454 4.7.0` now. The verification may already be running, so its
    // reservation is not given back here: it is kept until the result is known and then
    // recorded like any other (a failure counts), so a client cannot have more checks in
    // flight than the lockout allows by letting earlier ones time out.
    let Ok(result) = tokio::time::timeout(AUTH_WAIT, &mut result).await else {
        tokio::spawn(async move {
            match result.await {
                Ok(Ok(matched)) => {
                    attempt.settle(matched && known, Instant::now().into_std());
                }
                // Not verified (a local failure): nothing to count.
                _ => attempt.release(),
            }
        });
        return Answer::Busy;
    };
    // `Err`: the verifier thread is gone and dropped the sender: not the client's fault.
    let matched = match result.unwrap_or(Err(CheckError::VerifierGone)) {
        Ok(matched) => matched,
        Err(error) => {
            // Given back, not recorded: a broken verifier cannot lock users out.
            attempt.release();
            return Answer::VerifierFailed(error);
        }
    };
    let report = attempt.settle(matched && known, Instant::now().into_std());
    // A sprayed login is answered no sooner than `delay`, right password or wrong.
    tokio::time::sleep_until(answer_at).await;
    log_auth_report(login, &report, delay);
    Answer::Password { matched }
}

/// Log what an AUTH outcome led to: a lockout, a spraying alert, a delayed answer. The login
/// is shown cut to a bounded length (a SASL response may be 12 KiB).
fn log_auth_report(login: &str, report: &FailureReport, delay: Duration) {
    let login = login_key(login);
    if let Some(failures) = report.locked_out {
        warn!(
            login,
            failures,
            rule = "auth_lockout",
            "client locked out after repeated AUTH failures"
        );
    }
    if let Some((failures, clients)) = report.spraying {
        warn!(
            login,
            failures,
            distinct_ips = clients,
            rule = "auth_spraying",
            "password spraying against one login from several clients"
        );
    }
    if !delay.is_zero() {
        info!(
            login,
            delay_ms = delay.as_millis() as u64,
            rule = "auth_spraying",
            "AUTH answer delayed"
        );
    }
}

/// Lookups a session started ([`Effect::Start`]) and has not read yet ([`Effect::Await`]).
/// Dropping the table (the session ended) abandons them.
#[derive(Debug, Default)]
struct Lookups(Vec<(Lookup, JoinHandle<LookupResult>)>);

impl Lookups {
    fn start(&mut self, lookup: Lookup) {
        // A lookup started twice is read once: keep the first.
        if self.0.iter().all(|(l, _)| *l != lookup) {
            self.0.push((lookup, tokio::spawn(resolve(lookup))));
        }
    }

    async fn finish(&mut self, lookup: Lookup) -> LookupResult {
        let Some(i) = self.0.iter().position(|(l, _)| *l == lookup) else {
            return LookupResult::NotStarted;
        };
        let (_, task) = self.0.swap_remove(i);
        task.await.unwrap_or(LookupResult::NotStarted)
    }
}

impl Drop for Lookups {
    fn drop(&mut self) {
        for (_, task) in &self.0 {
            task.abort();
        }
    }
}

/// Carry out one lookup (a DNS query, once there are any).
async fn resolve(lookup: Lookup) -> LookupResult {
    match lookup {
        #[cfg(test)]
        Lookup::Echo(n) => {
            tokio::task::yield_now().await;
            LookupResult::Echo(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_started_lookup_is_read_once_and_one_never_started_reads_as_such() {
        let mut lookups = Lookups::default();
        lookups.start(Lookup::Echo(7));
        // Started twice, run once.
        lookups.start(Lookup::Echo(7));
        lookups.start(Lookup::Echo(8));
        assert_eq!(lookups.0.len(), 2);
        assert_eq!(lookups.finish(Lookup::Echo(7)).await, LookupResult::Echo(7));
        assert_eq!(
            lookups.finish(Lookup::Echo(7)).await,
            LookupResult::NotStarted
        );
        assert_eq!(
            lookups.finish(Lookup::Echo(9)).await,
            LookupResult::NotStarted
        );
        assert_eq!(lookups.finish(Lookup::Echo(8)).await, LookupResult::Echo(8));
    }
}
