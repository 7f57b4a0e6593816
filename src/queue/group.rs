//! Group commit of the `queue/` directory fsync.
//!
//! Every commit renames a file into `queue/` and must then fsync the directory before its
//! `250`. One fsync makes every rename done before it started durable, so concurrent commits
//! share them: a committer waits for an fsync that *starts* after its rename (one running
//! already may have started before it), and starts one itself when none is running. Under load
//! one fsync covers all the sessions that committed while the previous one ran, instead of
//! one each; a lone commit costs exactly what it did (DESIGN invariant 1, "group commit").
//!
//! The directory stays open between fsyncs (a `stat` of its path per fsync instead of an
//! `open` and a `close`). A descriptor opened before a write-back error is also the one that
//! reports it (`errseq` semantics); after a failed fsync, or when the path no longer names the
//! directory held open (`queue/` replaced by another, a file system mounted again), the
//! directory is opened afresh.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

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
    /// The directory, open since the first fsync (or since the last failed one).
    open: Option<Arc<OpenDir>>,
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

/// The directory held open, and which one it is.
#[derive(Debug)]
struct OpenDir {
    file: File,
    dev: u64,
    ino: u64,
}

impl OpenDir {
    fn open(path: &std::path::Path) -> io::Result<OpenDir> {
        use std::os::unix::fs::MetadataExt;
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(OpenDir {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Whether `path` still names this directory.
    fn is_at(&self, path: &std::path::Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
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
                open: None,
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
            let open = state.open.clone();
            drop(state);
            let dir = match open.filter(|d| d.is_at(&self.dir)) {
                Some(dir) => Ok(dir),
                None => OpenDir::open(&self.dir).map(Arc::new),
            };
            let result = dir.and_then(|d| d.file.sync_all().map(|()| d));
            state = self.lock();
            state.running = false;
            state.finished = number;
            (state.open, state.last) = match result {
                Ok(dir) => (Some(dir), Ok(())),
                Err(e) => (None, Err(FsyncFailed::from(e))),
            };
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
    use std::fs;
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
    fn the_directory_stays_open_between_fsyncs_and_is_reopened_after_a_failure_or_a_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let sync = DirSync::new(dir.path().to_path_buf());
        sync.sync().unwrap();
        let first = sync.lock().open.clone().expect("kept open");
        sync.sync().unwrap();
        let second = sync.lock().open.clone().expect("still open");
        assert!(
            Arc::ptr_eq(&first, &second),
            "the same descriptor, not a new open"
        );
        assert_eq!(sync.lock().finished, 2);

        // A failed fsync drops the descriptor; the next one opens the directory again.
        let gone = DirSync::new(dir.path().join("not-yet"));
        assert!(gone.sync().is_err());
        assert!(gone.lock().open.is_none());
        fs::create_dir(dir.path().join("not-yet")).unwrap();
        gone.sync().unwrap();
        assert!(gone.lock().open.is_some());

        // queue/ replaced by another directory while open: the next fsync is of the new one.
        let path = dir.path().join("not-yet");
        let old = gone.lock().open.clone().unwrap();
        fs::rename(&path, dir.path().join("old")).unwrap();
        fs::create_dir(&path).unwrap();
        gone.sync().unwrap();
        let new = gone.lock().open.clone().unwrap();
        assert!(!Arc::ptr_eq(&old, &new));
        assert!(new.is_at(&path) && !old.is_at(&path));
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
