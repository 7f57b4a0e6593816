//! The audit log: every operator command that changes something (delete, purge, hold, release,
//! restore, retry, suspend, resume, pause, resume of the listeners) appends one line to
//! `SPOOL/audit.jsonl`: when, which command with which arguments, who ran it, what it affected.
//! `portcullis audit [--since DUR]` prints it.
//!
//! One JSON object per line ([`Entry`]), appended with `O_APPEND` (one `write` per line, so
//! lines of concurrent commands never interleave) and fsynced before the command reports
//! success: an action the operator was told about is in the log. The file is private (0600) and
//! belongs to the spool's owner, like every spool file. A command run with `--dry-run` changes
//! nothing and is not logged.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{FILE_MODE, Spool, SpoolError, give_to};

/// Name of the audit log under the spool root.
pub const FILE_NAME: &str = "audit.jsonl";

/// One operator action, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When the command acted, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The command, as typed after `portcullis` (e.g. `queue purge`, `user suspend`).
    pub command: String,
    /// Its arguments and options, as given (e.g. `["--from", "@spam.example"]`).
    pub args: Vec<String>,
    /// The real user id of the process that ran it.
    pub uid: u32,
    /// The login uid of its session (`/proc/self/loginuid`), so that `sudo` still names the
    /// person; absent when the kernel does not know one (no login session, or no audit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_uid: Option<u32>,
    /// What it affected: queue ids, logins, or `listeners`.
    pub affected: Vec<String>,
}

impl Entry {
    /// An entry for `command` with `args` and `affected`, stamped now with this process's
    /// user ids.
    pub fn now(command: &str, args: &[String], affected: Vec<String>) -> Entry {
        Entry {
            at_ms: now_ms(),
            command: command.to_owned(),
            args: args.to_vec(),
            // SAFETY: getuid has no preconditions.
            uid: unsafe { libc::getuid() },
            login_uid: login_uid(),
            affected,
        }
    }
}

/// The audit log's path under `root`.
pub fn path(root: &Path) -> PathBuf {
    root.join(FILE_NAME)
}

impl Spool {
    /// Append `entry` to the audit log and fsync it.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the log cannot be opened, written or synced; the caller reports
    /// it (the action itself has already been taken).
    pub fn audit(&self, entry: &Entry) -> Result<(), SpoolError> {
        let path = path(self.root());
        let mut line = serde_json::to_vec(entry).map_err(|e| SpoolError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(SpoolError::io("open", &path))?;
        give_to(&path, self.inner.owner)?;
        file.write_all(&line)
            .map_err(SpoolError::io("write", &path))?;
        file.sync_data().map_err(SpoolError::io("fsync", &path))
    }
}

/// `/proc/self/loginuid`, unless unset (4294967295) or unreadable.
fn login_uid() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/self/loginuid").ok()?;
    text.trim().parse().ok().filter(|&uid| uid != u32::MAX)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
