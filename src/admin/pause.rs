//! `portcullis listeners pause|resume`: how a node is drained. The command writes (or
//! removes) the marker file `SPOOL/paused`; the running relay looks for it every
//! [`POLL_INTERVAL`] ([`watch`]) and, while it is there, its listeners accept each connection
//! only to answer `421 4.3.2` and close it, `/readyz` answers `503`, and delivery of the queue
//! goes on.
//!
//! The marker is state on disk, so it survives restarts: a relay started while the marker is
//! there starts paused (before its first connection), and stays so until
//! `portcullis listeners resume`. Spool recovery and the `queue` commands only look inside
//! `tmp/`, `queue/`, `free/`, `control/` and `rejected/`, so they never touch it.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::observe::Telemetry;

/// The marker's name in the spool directory.
pub const MARKER: &str = "paused";

/// How often the running relay looks for the marker: a pause or resume acts within this
/// (plus one `stat`).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Why the marker could not be written or removed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct MarkerError {
    /// The system call that failed (`create`, `write`, `fsync`, `rename`, `unlink`, `stat`).
    pub op: &'static str,
    /// The file or directory it failed on.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MarkerError {
    let path = path.to_path_buf();
    move |source| MarkerError { op, path, source }
}

/// `SPOOL/paused`.
pub fn marker_path(spool_root: &Path) -> PathBuf {
    spool_root.join(MARKER)
}

/// Whether the marker is there (a file of any kind under that name counts).
///
/// # Errors
/// Any `lstat(2)` error but "not found".
pub fn is_paused(spool_root: &Path) -> Result<bool, MarkerError> {
    let path = marker_path(spool_root);
    match fs::symlink_metadata(&path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("stat", &path)(e)),
    }
}

/// Write the marker atomically and durably: a new file in `SPOOL/tmp/` (written, fsynced),
/// renamed to `SPOOL/paused`, then the spool directory fsynced. Returns false (and changes
/// nothing) when it was there already. `now_unix` is written into it, for whoever looks.
///
/// # Errors
/// The step that failed; a leftover in `tmp/` is removed by the next spool recovery.
pub fn pause(spool_root: &Path, now_unix: u64) -> Result<bool, MarkerError> {
    if is_paused(spool_root)? {
        return Ok(false);
    }
    let tmp = spool_root
        .join("tmp")
        .join(format!("{MARKER}.{}.tmp", std::process::id()));
    // The marker belongs to the spool's owner, like every spool file, also when root writes it.
    let owner = fs::metadata(spool_root)
        .map(|m| (m.uid(), m.gid()))
        .map_err(io_err("stat", spool_root))?;
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != owner.0 {
            std::os::unix::fs::fchown(&file, Some(owner.0), Some(owner.1))
                .map_err(io_err("chown", &tmp))?;
        }
        writeln!(
            file,
            "paused at {now_unix} (unix seconds) by portcullis listeners pause"
        )
        .map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let marker = marker_path(spool_root);
    if let Err(e) = fs::rename(&tmp, &marker) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("rename", &marker)(e));
    }
    sync_dir(spool_root)?;
    Ok(true)
}

/// Remove the marker and fsync the spool directory. Returns false when it was not there.
///
/// # Errors
/// `unlink(2)` or the directory's `fsync` failed.
pub fn resume(spool_root: &Path) -> Result<bool, MarkerError> {
    let marker = marker_path(spool_root);
    match fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("unlink", &marker)(e)),
    }
    sync_dir(spool_root)?;
    Ok(true)
}

fn sync_dir(dir: &Path) -> Result<(), MarkerError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Set the listeners' gate to `paused`, logging a change once (`listeners paused` /
/// `listeners resumed`, with the field `paused=true|false` for whoever matches the log).
pub fn apply(telemetry: &Telemetry, paused: bool) {
    let was = telemetry.gate.set_paused(paused);
    if was != paused {
        if paused {
            info!(paused, marker = MARKER, "listeners paused");
        } else {
            info!(paused, marker = MARKER, "listeners resumed");
        }
    }
}

/// Look for the marker under `spool_root` every [`POLL_INTERVAL`] until `stop`, and apply
/// what is found to the gate. A marker that cannot be looked at (an I/O error other than
/// "not found") leaves the gate as it is.
pub async fn watch(
    telemetry: std::sync::Arc<Telemetry>,
    spool_root: PathBuf,
    stop: CancellationToken,
) {
    let marker = marker_path(&spool_root);
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
        match tokio::fs::symlink_metadata(&marker).await {
            Ok(_) => apply(&telemetry, true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => apply(&telemetry, false),
            Err(e) => {
                debug!(error = %e, marker = %marker.display(), "cannot look at the pause marker")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("tmp")).expect("mkdir tmp");
        dir
    }

    #[test]
    fn pause_writes_the_marker_once_and_resume_removes_it() {
        let dir = spool();
        let root = dir.path();
        assert!(!is_paused(root).unwrap());
        assert!(pause(root, 1_700_000_000).unwrap(), "newly paused");
        assert!(is_paused(root).unwrap());
        let text = fs::read_to_string(marker_path(root)).unwrap();
        assert_eq!(
            text,
            "paused at 1700000000 (unix seconds) by portcullis listeners pause\n"
        );
        assert!(!pause(root, 1).unwrap(), "already paused: unchanged");
        assert_eq!(fs::read_to_string(marker_path(root)).unwrap(), text);
        assert_eq!(
            fs::read_dir(root.join("tmp")).unwrap().count(),
            0,
            "no leftover"
        );
        assert!(resume(root).unwrap());
        assert!(!is_paused(root).unwrap());
        assert!(!resume(root).unwrap(), "not paused: nothing to do");
    }

    #[test]
    fn pause_without_a_tmp_directory_fails_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = pause(dir.path(), 0).unwrap_err();
        assert_eq!(e.op, "create");
        assert!(e.path.starts_with(dir.path().join("tmp")), "{e}");
        assert!(!is_paused(dir.path()).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_pauses_and_resumes_the_gate_with_the_marker() {
        let dir = spool();
        let telemetry = std::sync::Arc::new(Telemetry::new("test"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(
            telemetry.clone(),
            dir.path().to_path_buf(),
            stop.clone(),
        ));
        pause(dir.path(), 0).unwrap();
        // One poll interval later (paused time advances when every task waits).
        tokio::time::sleep(POLL_INTERVAL + Duration::from_millis(10)).await;
        let waited = wait_for(&telemetry, true).await;
        assert!(waited, "paused after a poll");
        resume(dir.path()).unwrap();
        tokio::time::sleep(POLL_INTERVAL + Duration::from_millis(10)).await;
        assert!(wait_for(&telemetry, false).await, "resumed after a poll");
        stop.cancel();
        task.await.unwrap();
    }

    /// The watcher's `stat` runs on the blocking pool, outside paused time: give it a few
    /// real moments to land.
    async fn wait_for(telemetry: &Telemetry, paused: bool) -> bool {
        for _ in 0..200 {
            if telemetry.gate.paused() == paused {
                return true;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}
