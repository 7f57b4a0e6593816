//! Group commit of the `queue/` directory fsync.
//!
//! Every commit renames a file into `queue/` and must then fsync the directory before its
//! `250`. One fsync makes every rename done before it started durable, so concurrent commits
//! share them: a committer waits for an fsync that *starts* after its rename (one running
//! already may have started before it), and starts one itself when none is running. Under load
//! one fsync covers all the sessions that committed while the previous one ran, instead of
//! one each; a lone commit costs exactly what it did (DESIGN invariant 1, "group commit").

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::SpoolError;

/// Shared fsyncs of one directory.
#[derive(Debug)]
pub struct DirSync {
    dir: PathBuf,
    state: Mutex<Rounds>,
    finished: Condvar,
}

/// The fsyncs of the directory so far.
#[derive(Debug)]
struct Rounds {
    /// fsyncs started so far; the one running, if any, is number `started`.
    started: u64,
    /// The number of the last fsync that finished.
    finished: u64,
    running: bool,
    /// The outcome of fsync number `finished`.
    last: Result<(), FsyncFailed>,
}

/// A failed fsync, kept to be reported to every caller it covered.
#[derive(Debug, Clone)]
struct FsyncFailed {
    kind: io::ErrorKind,
    text: String,
}

impl From<io::Error> for FsyncFailed {
    fn from(e: io::Error) -> FsyncFailed {
        FsyncFailed {
            kind: e.kind(),
            text: e.to_string(),
        }
    }
}

impl DirSync {
    pub fn new(dir: PathBuf) -> DirSync {
        DirSync {
            dir,
            state: Mutex::new(Rounds {
                started: 0,
                finished: 0,
                running: false,
                last: Ok(()),
            }),
            finished: Condvar::new(),
        }
    }

    /// Return once an fsync of the directory that started after this call has succeeded.
    /// Blocking. An error means the fsync that would have covered the caller failed.
    pub fn sync(&self) -> Result<(), SpoolError> {
        let mut state = self.lock();
        let needed = state.started + 1;
        loop {
            if state.finished >= needed {
                // The last fsync to finish started after our call: its outcome is ours.
                return state.last.clone().map_err(|e| self.error(e));
            }
            if state.running {
                state = self.finished.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.running = true;
            state.started += 1;
            let number = state.started;
            drop(state);
            let result = File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(FsyncFailed::from);
            state = self.lock();
            state.running = false;
            state.finished = number;
            state.last = result;
            self.finished.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Rounds> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, failed: FsyncFailed) -> SpoolError {
        SpoolError::Io {
            op: "fsync",
            path: self.dir.clone(),
            source: io::Error::new(failed.kind, failed.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn concurrent_callers_share_fsyncs_and_each_waits_for_one_started_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let sync = Arc::new(DirSync::new(dir.path().to_path_buf()));
        sync.sync().unwrap();
        assert_eq!(sync.lock().finished, 1, "a lone caller runs its own fsync");
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let sync = sync.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let before = sync.lock().started;
                        sync.sync().unwrap();
                        // Covered by an fsync numbered after every one started before the call.
                        assert!(sync.lock().finished > before);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let state = sync.lock();
        assert!(!state.running);
        assert_eq!(
            state.finished, state.started,
            "every fsync started also finished"
        );
    }

    #[test]
    fn a_failed_fsync_fails_the_callers_it_covered() {
        let sync = DirSync::new(PathBuf::from("/nonexistent/portcullis-spool/queue"));
        assert!(matches!(
            sync.sync(),
            Err(SpoolError::Io { op: "fsync", .. })
        ));
    }
}
