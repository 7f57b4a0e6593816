//! The password verifier: a fixed pool of threads that run argon2, each reusing its own
//! working memory, behind a bounded queue.
//!
//! argon2 is meant to be expensive: one verification with the default parameters takes
//! 19 MiB and tens of milliseconds of a core. Run on tokio's blocking pool (up to 512 threads,
//! each freeing its 19 MiB into its own glibc arena), a flood of AUTH attempts took every
//! core and left hundreds of MiB resident after it ended. Here:
//!
//! - [`Verifier::start`] spawns `slots` threads ([`hash_slots`]: one per core). Each keeps one
//!   buffer of argon2 blocks, grown to the largest `m` it has met and never freed, so the
//!   argon2 memory of the whole process is at most `slots × m` (with the default m = 19 MiB
//!   on two cores: 38 MiB), whatever the load, and it is not returned to the allocator to be
//!   fragmented between verifications.
//! - At most [`MAX_WAITING_VERIFICATIONS`] verifications wait for a thread; beyond that
//!   [`Verifier::submit`] says [`Busy`] at once and the AUTH is answered `454 4.7.0` (rule
//!   `auth_busy`), so a flood costs a bounded queue and bounded waiting, and a real user's
//!   verification waits behind at most that many others (about 16 × 50 ms on two cores).
//! - Per client, the lockout tables allow one verification in flight at a time
//!   ([`crate::policy::lockout::MAX_IN_FLIGHT_PER_CLIENT`]), so one address cannot fill the
//!   queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use crate::policy::credentials::verify_with_memory;

/// Verifications that may wait for a verifier thread; more are refused as [`Busy`].
pub const MAX_WAITING_VERIFICATIONS: usize = 32;

/// The number of verifier threads the relay starts: the number of cores the process may use
/// (at least 1), so that hashing can take every core but never more.
pub fn hash_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The queue is full: answer `454 4.7.0` and verify nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all password verifiers are busy")]
pub struct Busy;

struct Job {
    hash: Arc<str>,
    password: String,
    reply: oneshot::Sender<bool>,
}

/// The pool. Dropping it lets the threads end once the queue is empty.
#[derive(Debug)]
pub struct Verifier {
    jobs: SyncSender<Job>,
    /// Jobs submitted and not finished (waiting or running).
    pending: Arc<AtomicUsize>,
    /// `slots + waiting`: the most jobs `pending` may reach.
    capacity: usize,
    /// Told each time an AUTH result has been recorded (see [`Verifier::settled`]).
    settled: Notify,
}

impl Verifier {
    /// Spawn `slots` verifier threads (≥ 1) with room for `waiting` more jobs in the queue.
    ///
    /// # Errors
    /// The OS refused to create a thread.
    pub fn start(slots: usize, waiting: usize) -> std::io::Result<Verifier> {
        let slots = slots.max(1);
        let capacity = slots + waiting;
        let (jobs, queue) = sync_channel::<Job>(capacity);
        let queue = Arc::new(Mutex::new(queue));
        let pending = Arc::new(AtomicUsize::new(0));
        for i in 0..slots {
            let queue = Arc::clone(&queue);
            let pending = Arc::clone(&pending);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || work(&queue, &pending))?;
        }
        Ok(Verifier {
            jobs,
            pending,
            capacity,
            settled: Notify::new(),
        })
    }

    /// Queue the verification of `password` against the PHC string `hash`; the receiver
    /// yields whether it matched.
    ///
    /// # Errors
    /// [`Busy`] when every thread is busy and [`MAX_WAITING_VERIFICATIONS`] (as configured)
    /// jobs already wait.
    pub fn submit(
        &self,
        hash: Arc<str>,
        password: String,
    ) -> Result<oneshot::Receiver<bool>, Busy> {
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            });
        if admitted.is_err() {
            return Err(Busy);
        }
        let (reply, result) = oneshot::channel();
        if self
            .jobs
            .try_send(Job {
                hash,
                password,
                reply,
            })
            .is_err()
        {
            // Cannot be full (pending bounds it) and the threads never hang up first.
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        Ok(result)
    }

    /// Jobs waiting or running now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Resolves at the next [`Verifier::notify_settled`]: an AUTH held back because its
    /// client's budget was in flight waits on this before asking again.
    pub fn settled(&self) -> tokio::sync::futures::Notified<'_> {
        self.settled.notified()
    }

    /// An AUTH result has been recorded: wake the AUTHs waiting for one.
    pub fn notify_settled(&self) {
        self.settled.notify_waiters();
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// One verifier thread: take jobs until the pool is dropped, in the same argon2 memory.
fn work(queue: &Mutex<Receiver<Job>>, pending: &AtomicUsize) {
    let mut blocks = Vec::new();
    loop {
        let job = match queue.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let ok = verify_with_memory(&job.hash, &job.password, &mut blocks);
        pending.fetch_sub(1, Ordering::AcqRel);
        // The session may be gone; nobody is left to tell.
        let _ = job.reply.send(ok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::credentials::hash_password;

    #[tokio::test]
    async fn verifies_right_and_wrong_passwords() {
        let v = Verifier::start(2, 4).unwrap();
        let hash: Arc<str> = hash_password("secret").unwrap().into();
        let right = v.submit(Arc::clone(&hash), "secret".into()).unwrap();
        let wrong = v.submit(hash, "guess".into()).unwrap();
        assert!(right.await.unwrap());
        assert!(!wrong.await.unwrap());
        assert_eq!(v.pending(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once_not_waited_for() {
        // One thread, one waiting place: of four jobs submitted at once, two are taken.
        let v = Verifier::start(1, 1).unwrap();
        // Slow enough (t = 40 passes of 19 MiB) that the first is still running.
        let slow: Arc<str> = "$argon2id$v=19$m=19456,t=40,p=1$3C056/yWongzKuiNtDZD6w$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE".into();
        let results: Vec<_> = (0..4)
            .map(|_| v.submit(Arc::clone(&slow), "x".into()))
            .collect();
        let busy = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(busy, 2);
        assert_eq!(results[2].as_ref().unwrap_err(), &Busy);
        for r in results.into_iter().flatten() {
            assert!(!r.await.unwrap());
        }
        // Once they are done, there is room again.
        assert_eq!(v.pending(), 0);
        assert!(v.submit(slow, "x".into()).is_ok());
    }
}
