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
//! - Jobs wait in two lanes of at most [`MAX_WAITING_VERIFICATIONS`] each: [`Lane::Known`]
//!   (a login that succeeded from the same client before), which the threads always serve
//!   first, and [`Lane::Other`]. Beyond that [`Verifier::submit`] says [`Busy`] at once and the
//!   AUTH is answered `454 4.7.0` (rule `auth_busy`), so a flood costs a bounded queue and
//!   bounded waiting; a flood of invented logins fills only the other lane, and a real user
//!   logging in from a familiar address waits behind at most the verifications running.
//! - Per client, the lockout tables allow one verification in flight at a time
//!   ([`crate::policy::lockout::MAX_IN_FLIGHT_PER_CLIENT`]), so one address cannot fill the
//!   queue.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::{Notify, oneshot};

use crate::policy::credentials::{CheckError, verify_with_memory};

/// Verifications that may wait for a verifier thread in each lane; more are refused as
/// [`Busy`].
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

/// Which queue a verification waits in. Threads always take [`Lane::Known`] jobs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A login that succeeded from this client before
    /// ([`crate::policy::lockout::Attempt::known`]).
    Known,
    /// Everyone else.
    Other,
}

struct Job {
    hash: Arc<str>,
    password: String,
    lane: Lane,
    reply: oneshot::Sender<Result<bool, CheckError>>,
}

#[derive(Default)]
struct Lanes {
    known: VecDeque<Job>,
    other: VecDeque<Job>,
    /// Jobs of each lane submitted and not finished (waiting or running): [known, other].
    pending: [usize; 2],
    closed: bool,
}

struct Queue {
    lanes: Mutex<Lanes>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The pool. Dropping it lets the threads end once the queue is empty.
pub struct Verifier {
    queue: Arc<Queue>,
    /// `slots + waiting`: the most jobs one lane may have pending.
    capacity: usize,
    /// Told each time an AUTH result has been recorded (see [`Verifier::settled`]).
    settled: Notify,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn index(lane: Lane) -> usize {
    match lane {
        Lane::Known => 0,
        Lane::Other => 1,
    }
}

impl Verifier {
    /// Spawn `slots` verifier threads (≥ 1) with room for `waiting` more jobs in each lane.
    ///
    /// # Errors
    /// The OS refused to create a thread.
    pub fn start(slots: usize, waiting: usize) -> std::io::Result<Verifier> {
        let slots = slots.max(1);
        let queue = Arc::new(Queue {
            lanes: Mutex::new(Lanes::default()),
            ready: Condvar::new(),
        });
        for i in 0..slots {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || work(&queue))?;
        }
        Ok(Verifier {
            queue,
            capacity: slots + waiting,
            settled: Notify::new(),
        })
    }

    /// Queue the verification of `password` against the PHC string `hash` in `lane`; the
    /// receiver yields whether it matched.
    ///
    /// # Errors
    /// [`Busy`] when the lane already has every thread's worth of jobs plus `waiting` more
    /// ([`MAX_WAITING_VERIFICATIONS`] in the relay).
    pub fn submit(
        &self,
        hash: Arc<str>,
        password: String,
        lane: Lane,
    ) -> Result<oneshot::Receiver<Result<bool, CheckError>>, Busy> {
        let (reply, result) = oneshot::channel();
        let mut lanes = self.queue.lock();
        if lanes.pending[index(lane)] >= self.capacity {
            return Err(Busy);
        }
        lanes.pending[index(lane)] += 1;
        let job = Job {
            hash,
            password,
            lane,
            reply,
        };
        match lane {
            Lane::Known => lanes.known.push_back(job),
            Lane::Other => lanes.other.push_back(job),
        }
        drop(lanes);
        self.queue.ready.notify_one();
        Ok(result)
    }

    /// Jobs waiting or running now, all lanes.
    pub fn pending(&self) -> usize {
        self.queue.lock().pending.iter().sum()
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

impl Drop for Verifier {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

/// One verifier thread: take jobs (known lane first) until the pool is dropped, in the same
/// argon2 memory.
fn work(queue: &Queue) {
    let mut blocks = Vec::new();
    loop {
        let job = {
            let mut lanes = queue.lock();
            loop {
                if let Some(job) = lanes.known.pop_front().or_else(|| lanes.other.pop_front()) {
                    break job;
                }
                if lanes.closed {
                    return;
                }
                lanes = queue.ready.wait(lanes).unwrap_or_else(|e| e.into_inner());
            }
        };
        // A panic inside argon2 must neither kill this thread (the pool would shrink) nor
        // count against the client: it is a local failure.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            verify_with_memory(&job.hash, &job.password, &mut blocks)
        }))
        .unwrap_or_else(|_| {
            blocks = Vec::new();
            Err(CheckError::Verifier("panicked".into()))
        });
        queue.lock().pending[index(job.lane)] -= 1;
        // The session may be gone; nobody is left to tell.
        let _ = job.reply.send(checked);
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
        let right = v
            .submit(Arc::clone(&hash), "secret".into(), Lane::Other)
            .unwrap();
        let wrong = v.submit(hash, "guess".into(), Lane::Known).unwrap();
        assert!(right.await.unwrap().unwrap());
        assert!(!wrong.await.unwrap().unwrap());
        assert_eq!(v.pending(), 0);
    }

    #[tokio::test]
    async fn known_logins_have_their_own_lane_and_go_first() {
        // The flood fills the other lane; a known user is still admitted, and verified
        // before the strangers that were waiting.
        let v = Verifier::start(1, 2).unwrap();
        let slow: Arc<str> = "$argon2id$v=19$m=19456,t=40,p=1$3C056/yWongzKuiNtDZD6w$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE".into();
        let flood: Vec<_> = (0..3)
            .map(|_| {
                v.submit(Arc::clone(&slow), "x".into(), Lane::Other)
                    .unwrap()
            })
            .collect();
        assert_eq!(
            v.submit(Arc::clone(&slow), "x".into(), Lane::Other)
                .unwrap_err(),
            Busy
        );
        let user: Arc<str> = hash_password("secret").unwrap().into();
        let known = v.submit(user, "secret".into(), Lane::Known).unwrap();
        assert!(known.await.unwrap().unwrap());
        // The one thread took the known job before the second and third strangers (it may
        // have been busy with the first): those are still waiting or running.
        let mut flood = flood.into_iter().skip(1);
        let mut second = flood.next().unwrap();
        assert_eq!(
            second.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        );
        assert!(!second.await.unwrap().unwrap());
        assert!(!flood.next().unwrap().await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once_not_waited_for() {
        // One thread, one waiting place: of four jobs submitted at once, two are taken.
        let v = Verifier::start(1, 1).unwrap();
        // Slow enough (t = 40 passes of 19 MiB) that the first is still running.
        let slow: Arc<str> = "$argon2id$v=19$m=19456,t=40,p=1$3C056/yWongzKuiNtDZD6w$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE".into();
        let results: Vec<_> = (0..4)
            .map(|_| v.submit(Arc::clone(&slow), "x".into(), Lane::Other))
            .collect();
        let busy = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(busy, 2);
        assert_eq!(results[2].as_ref().unwrap_err(), &Busy);
        for r in results.into_iter().flatten() {
            assert!(!r.await.unwrap().unwrap());
        }
        // Once they are done, there is room again.
        assert_eq!(v.pending(), 0);
        assert!(v.submit(slow, "x".into(), Lane::Other).is_ok());
    }
}
