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
//!   (a login that succeeded from the same client before) and [`Lane::Other`]. Beyond that
//!   [`Verifier::submit`] says [`Busy`] at once and the AUTH is answered `454 4.7.0` (rule
//!   `auth_busy`), so a flood costs a bounded queue and bounded waiting; a flood of invented
//!   logins fills only the other lane, and a real user logging in from a familiar address
//!   waits behind at most the verifications running and a few known ones.
//! - The known lane is a privilege a password buys, so one stolen password must not buy all
//!   of it: at most [`KNOWN_PER_LOGIN`] verifications of one login wait or run in the known
//!   lane at a time; more of the same login are queued in the other lane, as strangers'.
//! - The threads take known jobs first, but never more than [`KNOWN_BURST`] in a row while an
//!   other job waits: a stream of successful logins cannot starve the other lane.
//! - A job whose session stopped waiting for it (an AUTH gives up after
//!   [`super::effects::AUTH_WAIT`] with `454 4.7.0`) is dropped unverified when a thread
//!   reaches it, so an abandoned queue costs no hashing.
//! - Per client, the lockout tables allow one verification in flight at a time
//!   ([`crate::policy::lockout::MAX_IN_FLIGHT_PER_CLIENT`]), so one address cannot fill the
//!   queue.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::policy::credentials::{CheckError, verify_with_memory};

/// Verifications that may wait for a verifier thread in each lane; more are refused as
/// [`Busy`].
pub const MAX_WAITING_VERIFICATIONS: usize = 32;

/// Verifications of one login that may wait or run in [`Lane::Known`] at a time; more are
/// queued in [`Lane::Other`].
pub const KNOWN_PER_LOGIN: usize = 2;

/// Known jobs a thread takes in a row while an other job waits; the next is an other job.
pub const KNOWN_BURST: u32 = 3;

/// The number of verifier threads the relay starts: the number of cores the process may use
/// (at least 1), so that hashing can take every core but never more.
pub fn hash_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The queue is full: answer `454 4.7.0` and verify nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all password verifiers are busy")]
pub struct Busy;

/// Which queue a verification waits in. Threads take [`Lane::Known`] jobs first, at most
/// [`KNOWN_BURST`] in a row while an other job waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A login that succeeded from this client before
    /// ([`crate::policy::lockout::AuthAttempt::known`]).
    Known,
    /// Everyone else.
    Other,
}

struct Job {
    hash: Arc<str>,
    password: String,
    lane: Lane,
    /// The login's key in [`Lanes::known_by_login`] (known-lane jobs only).
    login: u64,
    reply: oneshot::Sender<Result<bool, CheckError>>,
}

#[derive(Default)]
struct Lanes {
    known: VecDeque<Job>,
    other: VecDeque<Job>,
    /// Jobs of each lane submitted and not finished (waiting or running): [known, other].
    pending: [usize; 2],
    /// Known-lane jobs pending per login (hashed), at most [`KNOWN_PER_LOGIN`] each.
    known_by_login: HashMap<u64, usize>,
    /// Known jobs taken in a row since the last other job.
    known_streak: u32,
    closed: bool,
}

impl Lanes {
    /// The next job to run: known first, but an other job after [`KNOWN_BURST`] known ones
    /// in a row.
    fn next(&mut self) -> Option<Job> {
        let take_other = self.known.is_empty() || self.known_streak >= KNOWN_BURST;
        let job = if take_other {
            self.other.pop_front().or_else(|| self.known.pop_front())
        } else {
            self.known.pop_front()
        }?;
        match job.lane {
            Lane::Known => self.known_streak = self.known_streak.saturating_add(1),
            Lane::Other => self.known_streak = 0,
        }
        Some(job)
    }

    /// A job is finished (run or dropped): it no longer counts.
    fn finish(&mut self, job: &Job) {
        self.pending[index(job.lane)] -= 1;
        if job.lane == Lane::Known
            && let Some(n) = self.known_by_login.get_mut(&job.login)
        {
            *n -= 1;
            if *n == 0 {
                self.known_by_login.remove(&job.login);
            }
        }
    }
}

struct Queue {
    lanes: Mutex<Lanes>,
    ready: Condvar,
    /// Verifications run so far (jobs dropped unverified are not counted).
    verified: AtomicU64,
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
    /// Keys logins for [`KNOWN_PER_LOGIN`] (random per process, so logins chosen to collide
    /// cannot be precomputed).
    hasher: RandomState,
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
            verified: AtomicU64::new(0),
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
            hasher: RandomState::new(),
        })
    }

    /// Queue the verification of `password` against the PHC string `hash` in `lane`; the
    /// receiver yields whether it matched. `login` is the SASL authentication identity: a
    /// [`Lane::Known`] job of a login that already has [`KNOWN_PER_LOGIN`] pending there is
    /// queued in [`Lane::Other`]. Dropping the receiver before a thread reaches the job
    /// cancels it.
    ///
    /// # Errors
    /// [`Busy`] when the lane already has every thread's worth of jobs plus `waiting` more
    /// ([`MAX_WAITING_VERIFICATIONS`] in the relay).
    pub fn submit(
        &self,
        hash: Arc<str>,
        password: String,
        login: &str,
        lane: Lane,
    ) -> Result<oneshot::Receiver<Result<bool, CheckError>>, Busy> {
        let (reply, result) = oneshot::channel();
        let key = self.hasher.hash_one(login);
        let mut lanes = self.queue.lock();
        let lane = match lane {
            Lane::Known
                if lanes.known_by_login.get(&key).copied().unwrap_or(0) >= KNOWN_PER_LOGIN =>
            {
                Lane::Other
            }
            lane => lane,
        };
        if lanes.pending[index(lane)] >= self.capacity {
            return Err(Busy);
        }
        lanes.pending[index(lane)] += 1;
        if lane == Lane::Known {
            *lanes.known_by_login.entry(key).or_insert(0) += 1;
        }
        let job = Job {
            hash,
            password,
            lane,
            login: key,
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

    /// Verifications run since the pool started.
    #[cfg(test)]
    pub fn verified(&self) -> u64 {
        self.queue.verified.load(Ordering::Relaxed)
    }

    /// Jobs of `lane` waiting or running now.
    #[cfg(test)]
    pub fn pending_in(&self, lane: Lane) -> usize {
        self.queue.lock().pending[index(lane)]
    }

    /// True when no login has a known-lane job pending (for tests).
    #[cfg(test)]
    fn known_logins_empty(&self) -> bool {
        self.queue.lock().known_by_login.is_empty()
    }

    /// Jobs waiting or running now, all lanes.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.queue.lock().pending.iter().sum()
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

/// One verifier thread: take jobs ([`Lanes::next`]) until the pool is dropped, in the same
/// argon2 memory.
fn work(queue: &Queue) {
    let mut blocks = Vec::new();
    loop {
        let job = {
            let mut lanes = queue.lock();
            loop {
                if let Some(job) = lanes.next() {
                    if job.reply.is_closed() {
                        // Its AUTH gave up waiting: nobody needs the answer.
                        lanes.finish(&job);
                        continue;
                    }
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
            Err(CheckError::VerifierPanicked)
        });
        queue.verified.fetch_add(1, Ordering::Relaxed);
        queue.lock().finish(&job);
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
            .submit(Arc::clone(&hash), "secret".into(), "user", Lane::Other)
            .unwrap();
        let wrong = v.submit(hash, "guess".into(), "user", Lane::Known).unwrap();
        assert!(right.await.unwrap().unwrap());
        assert!(!wrong.await.unwrap().unwrap());
        assert_eq!(v.pending(), 0);
    }

    #[tokio::test]
    async fn known_logins_have_their_own_lane_and_go_first() {
        // The flood fills the other lane; a known user is still admitted, and verified
        // before the strangers that were waiting.
        let v = Verifier::start(1, 2).unwrap();
        let slow: Arc<str> = SLOW.into();
        let flood = submit_slow(&v, 3, "user", Lane::Other);
        assert_eq!(
            v.submit(Arc::clone(&slow), "x".into(), "user", Lane::Other)
                .unwrap_err(),
            Busy
        );
        let user: Arc<str> = hash_password("secret").unwrap().into();
        let known = v
            .submit(user, "secret".into(), "user", Lane::Known)
            .unwrap();
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
        let slow: Arc<str> = SLOW.into();
        let results: Vec<_> = (0..4)
            .map(|_| v.submit(Arc::clone(&slow), "x".into(), "user", Lane::Other))
            .collect();
        let busy = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(busy, 2);
        assert_eq!(results[2].as_ref().unwrap_err(), &Busy);
        for r in results.into_iter().flatten() {
            assert!(!r.await.unwrap().unwrap());
        }
        // Once they are done, there is room again.
        assert_eq!(v.pending(), 0);
        assert!(v.submit(slow, "x".into(), "user", Lane::Other).is_ok());
    }

    /// `n` wrong passwords against [`SLOW`] for `login` in `lane`, each admitted.
    fn submit_slow(
        v: &Verifier,
        n: usize,
        login: &str,
        lane: Lane,
    ) -> Vec<oneshot::Receiver<Result<bool, CheckError>>> {
        (0..n)
            .map(|_| v.submit(SLOW.into(), "x".into(), login, lane).unwrap())
            .collect()
    }

    /// Slow enough (t = 40 passes of 19 MiB) that a job is still running when the next ones
    /// are submitted.
    const SLOW: &str = "$argon2id$v=19$m=19456,t=40,p=1$3C056/yWongzKuiNtDZD6w$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE";

    #[tokio::test]
    async fn one_login_cannot_fill_the_known_lane() {
        // An attacker with alice's password, known for alice at many addresses: only
        // KNOWN_PER_LOGIN of her verifications are in the known lane, the rest queue with the
        // strangers, and carol (known at her address) still has a place in the known lane.
        let v = Verifier::start(1, 8).unwrap();
        let slow: Arc<str> = SLOW.into();
        let alice = submit_slow(&v, 5, "alice", Lane::Known);
        assert_eq!(v.pending_in(Lane::Known), KNOWN_PER_LOGIN);
        assert_eq!(v.pending_in(Lane::Other), 5 - KNOWN_PER_LOGIN);
        let carol = v
            .submit(Arc::clone(&slow), "x".into(), "carol", Lane::Known)
            .unwrap();
        assert_eq!(v.pending_in(Lane::Known), KNOWN_PER_LOGIN + 1);
        // Abandoned, they are dropped unverified (at most the one running is verified).
        drop((alice, carol));
        let _ = v
            .submit(Arc::clone(&slow), "x".into(), "alice", Lane::Known)
            .unwrap()
            .await;
        assert_eq!(v.pending(), 0);
        assert!(v.verified() <= 2, "{} verified", v.verified());
        assert!(v.known_logins_empty());
    }

    #[tokio::test]
    async fn a_check_that_cannot_be_made_is_an_error_and_the_thread_goes_on() {
        // argon2 refuses m=1: the session answers 454 4.7.0 and counts nothing (RFC 4954 §6).
        const UNUSABLE: &str = "$argon2id$v=19$m=1,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE";
        let v = Verifier::start(1, 4).unwrap();
        let broken = v
            .submit(UNUSABLE.into(), "x".into(), "a", Lane::Other)
            .unwrap();
        assert!(matches!(broken.await.unwrap(), Err(CheckError::Refused(_))));
        let malformed = v
            .submit("nonsense".into(), "x".into(), "a", Lane::Other)
            .unwrap();
        assert!(matches!(
            malformed.await.unwrap(),
            Err(CheckError::Malformed(_))
        ));
        // The same thread still verifies.
        let user: Arc<str> = hash_password("secret").unwrap().into();
        let ok = v.submit(user, "secret".into(), "b", Lane::Other).unwrap();
        assert!(ok.await.unwrap().unwrap());
        assert_eq!(v.pending(), 0);
    }

    #[tokio::test]
    async fn a_job_nobody_waits_for_is_not_verified() {
        // One thread busy with a slow job; the next job's AUTH gives up (drops its receiver):
        // the thread skips it, and only the first and the third are verified.
        let v = Verifier::start(1, 4).unwrap();
        let slow: Arc<str> = SLOW.into();
        let first = v
            .submit(Arc::clone(&slow), "x".into(), "a", Lane::Other)
            .unwrap();
        let abandoned = v
            .submit(Arc::clone(&slow), "x".into(), "b", Lane::Other)
            .unwrap();
        drop(abandoned);
        let user: Arc<str> = hash_password("secret").unwrap().into();
        let third = v.submit(user, "secret".into(), "c", Lane::Other).unwrap();
        assert!(!first.await.unwrap().unwrap());
        assert!(third.await.unwrap().unwrap());
        assert_eq!(v.verified(), 2);
        assert_eq!(v.pending(), 0);
    }

    #[test]
    fn a_stream_of_known_jobs_cannot_starve_the_other_lane() {
        let job = |lane| {
            let (reply, _) = oneshot::channel();
            Job {
                hash: "".into(),
                password: String::new(),
                lane,
                login: 0,
                reply,
            }
        };
        let mut lanes = Lanes::default();
        for _ in 0..10 {
            lanes.known.push_back(job(Lane::Known));
        }
        for _ in 0..2 {
            lanes.other.push_back(job(Lane::Other));
        }
        let order: String = std::iter::from_fn(|| lanes.next())
            .map(|j| if j.lane == Lane::Known { 'K' } else { 'O' })
            .collect();
        assert_eq!(order, "KKKOKKKOKKKK");
    }
}
