//! Named steps where the failpoint build can fail an operation or kill the process, for the
//! reliability tests (`tests/failpoints.rs`, `tests/crash_loop.rs`, RELIABILITY.md).
//!
//! A step is a call to [`step`] just before the operation it names: `spool.commit.fsync` runs
//! before the data fsync of a commit, so failing it is a failing fsync, and crashing there is a
//! crash after the data was written and before it was made durable. [`STEPS`] lists every one.
//!
//! Built without the `failpoints` feature (every release and every ordinary test run), [`step`]
//! is an inlined `Ok(())`: no `fail` crate, no environment read, no branch. Built with it
//! (`cargo test --features failpoints`), the `fail` crate (DESIGN.md: the one exception to
//! STYLE.md 12) reads the steps to arm from the `FAILPOINTS` environment variable at startup
//! (`main` calls [`setup`]), in its syntax: `NAME=ACTION;NAME=ACTION`, where an action such as
//! `return(enospc)`, `1*return(crash)` or `2*off->return(eio)` says when the step fires and
//! the argument says what it does:
//!
//! - `crash`: the process kills itself with `SIGKILL` (after one line on stderr naming the
//!   step, `failpoint NAME: crash`), as a power cut or `kill -9` would stop it there;
//! - `enospc`: the operation fails with `ENOSPC` (a full disk);
//! - `eio`, or no argument: it fails with `EIO` (a failing disk).

use std::io;

/// Every named step, in the order a message meets them. Tests iterate over it, so a step added
/// in the code and not here is never exercised: add it here too.
pub const STEPS: &[&str] = &[
    // A message being received (queue::writer): a write into the spool file during DATA, then
    // the commit, op by op.
    "spool.write",
    "spool.commit.write",
    "spool.commit.fsync",
    "spool.commit.rename",
    "spool.commit.dir_fsync",
    // Committed and durable, the 250 not yet sent (an error there is handled as a failed
    // directory fsync).
    "spool.commit.reply",
    // A delivery state replaced (queue::Spool::write_state and its batched form).
    "spool.state.write",
    "spool.state.fsync",
    "spool.state.rename",
    "spool.state.dir_fsync",
    // A message leaving the queue (delivered, deleted, expired, quarantined).
    "spool.remove.unlink",
    "spool.remove.state",
    "spool.remove.dir_fsync",
    // Delivery: the upstream answered the final dot, nothing recorded yet (a crash point
    // only: an error armed there is ignored).
    "deliver.after_dot",
    // A request or removal notice of a `queue` command (queue::control; the removals of
    // `queue delete` and `purge` themselves are the spool.remove steps, in the command's
    // process).
    "control.write",
    "control.rename",
    "control.dir_fsync",
    // The relay took requests from control/ (there were some) and has acted on none yet.
    "control.take",
    // Inside the moves of `queue purge --quarantine` and `queue restore`
    // (queue::quarantine): between the message's rename and its state's. Crash points only.
    "quarantine.move",
    "restore.move",
    // `queue adopt` (queue::adopt): a batch's copies renamed into queue/ and fsynced, the
    // ledger lines not yet written. A crash point only.
    "adopt.ledger",
    // Startup recovery (queue::recover): before each file it changes.
    "recover.tmp",
    "recover.orphan",
];

/// The steps where only `crash` does anything: an error armed there is ignored (their
/// operations have no error of their own to stand for).
pub const CRASH_ONLY: &[&str] = &[
    "deliver.after_dot",
    "control.take",
    "quarantine.move",
    "restore.move",
    "adopt.ledger",
];

/// Run the named step: `Ok(())` unless the failpoint build armed it (see the module docs).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn step(_name: &'static str) -> io::Result<()> {
    Ok(())
}

/// Run the named step: `Ok(())` unless `FAILPOINTS` armed it (see the module docs).
#[cfg(feature = "failpoints")]
pub fn step(name: &'static str) -> io::Result<()> {
    debug_assert!(STEPS.contains(&name), "failpoint {name} is not in STEPS");
    fail::fail_point!(name, |arg: Option<String>| fire(name, arg.as_deref()));
    Ok(())
}

#[cfg(feature = "failpoints")]
fn fire(name: &str, arg: Option<&str>) -> io::Result<()> {
    match arg {
        Some("crash") => {
            eprintln!("failpoint {name}: crash");
            // SAFETY: kill and getpid have no preconditions; SIGKILL cannot be caught.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            // SIGKILL is delivered before kill returns to a single-threaded caller, and to a
            // multi-threaded process promptly; never go on meanwhile.
            loop {
                std::thread::park();
            }
        }
        Some("enospc") => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        _ => Err(io::Error::from_raw_os_error(libc::EIO)),
    }
}

/// Arm the steps named in `FAILPOINTS`, for the life of the process. Does nothing without the
/// `failpoints` feature.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}
