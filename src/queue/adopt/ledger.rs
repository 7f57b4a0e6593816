//! The two records of an adoption: the ledger in this spool (`SPOOL/adoptions.jsonl`: which
//! message of another spool became which message here) and the marker in the adopted spool
//! (`DIR/adopted`: this spool was adopted, by which node, when).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::{Spool, SpoolError, audit, sync_dir};
use crate::envelope::QueueId;

/// Name of the ledger under the spool root.
pub const LEDGER: &str = "adoptions.jsonl";
/// Name of the marker `queue adopt` writes into the spool it adopted.
pub const MARKER: &str = "adopted";
/// Largest marker read, in octets (a larger file is shown as unreadable).
const MAX_MARKER: u64 = 64 * 1024;

/// One line of the ledger: message `from` of the spool `source` is message `id` here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLine {
    /// Its id in the adopted spool.
    pub from: QueueId,
    /// The FNV-1a hash of its whole file there, in hex: another message by the same id (in
    /// another spool) is not this one.
    pub hash: String,
    /// Its id here (the same unless that id was taken).
    pub id: QueueId,
    /// When it was imported, in Unix milliseconds.
    pub at_ms: u64,
    /// The adopted spool, as given.
    pub source: String,
}

/// The ledger, read, and (unless opened for a dry run) open for appending under an exclusive
/// lock that keeps a second `queue adopt` off this spool until this one ends.
pub struct Ledger {
    path: PathBuf,
    file: Option<File>,
    /// (Source id, hash of its file) → id here.
    done: HashMap<(QueueId, String), QueueId>,
    /// The last line was torn by a crash: the next append starts a new line first.
    torn: bool,
}

/// Why the ledger cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Another `queue adopt` holds the ledger's lock.
    #[error("another queue adopt is running on this spool ({} is locked)", .0.display())]
    Busy(PathBuf),
    /// It cannot be opened, locked, read or written.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl Ledger {
    /// Read the ledger of `spool`; with `write`, open it (created when missing, the spool
    /// owner's) and take its lock, or fail with [`LedgerError::Busy`].
    pub fn open(spool: &Spool, write: bool) -> Result<Ledger, LedgerError> {
        let path = spool.root().join(LEDGER);
        let mut file = if write {
            let file = audit::open_checked(&path, spool.inner.owner)?;
            // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Err(LedgerError::Busy(path));
                }
                return Err(SpoolError::io("flock", &path)(e).into());
            }
            // The name of a new ledger must outlive a crash as its lines do.
            sync_dir(spool.root())?;
            Some(file)
        } else {
            match fs::File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
            {
                Ok(file) => Some(file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(SpoolError::io("open", &path)(e).into()),
            }
        };
        let mut text = Vec::new();
        if let Some(file) = file.as_mut() {
            file.read_to_end(&mut text)
                .map_err(SpoolError::io("read", &path))?;
        }
        let done = parse(&text);
        Ok(Ledger {
            torn: text.last().is_some_and(|b| *b != b'\n'),
            file: if write { file } else { None },
            path,
            done,
        })
    }

    /// The id here of message `from` of an adopted spool whose file hashes to `hash`, when
    /// it was imported.
    pub fn get(&self, from: &QueueId, hash: u64) -> Option<&QueueId> {
        self.done.get(&(from.clone(), format!("{hash:016x}")))
    }

    /// Record each (`from`, its file's `hash`, `id` here) of `lines` (messages of `source`):
    /// appended in one write and fsynced before this returns. Fails on a ledger opened
    /// without `write`.
    pub fn record_all(
        &mut self,
        lines: &[(QueueId, u64, QueueId)],
        source: &Path,
    ) -> Result<(), SpoolError> {
        let at_ms = crate::observe::event::unix_millis();
        let mut bytes = Vec::with_capacity(lines.len() * 160 + 1);
        if self.torn {
            bytes.push(b'\n');
        }
        let mut parsed = Vec::with_capacity(lines.len());
        for (from, hash, id) in lines {
            let line = LedgerLine {
                from: from.clone(),
                hash: format!("{hash:016x}"),
                id: id.clone(),
                at_ms,
                source: source.display().to_string(),
            };
            serde_json::to_writer(&mut bytes, &line).map_err(|source| SpoolError::Encode {
                what: "adoption",
                source,
            })?;
            bytes.push(b'\n');
            parsed.push(line);
        }
        let path = &self.path;
        let Some(file) = self.file.as_mut() else {
            return Err(SpoolError::io("write", path)(io::Error::other(
                "the ledger was opened read-only",
            )));
        };
        file.write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(SpoolError::io("write", path))?;
        self.torn = false;
        self.done
            .extend(parsed.into_iter().map(|l| ((l.from, l.hash), l.id)));
        Ok(())
    }
}

/// The ledger's lines, (source id, hash) → id here; lines that are not one (torn by a crash)
/// are skipped.
fn parse(text: &[u8]) -> HashMap<(QueueId, String), QueueId> {
    text.split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<LedgerLine>(line).ok())
        .map(|l| ((l.from, l.hash), l.id))
        .collect()
}

/// What `DIR/adopted` says: which node adopted the spool, into which spool, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The node that adopted it (`[server] hostname` of its policy, else the host name).
    pub node: String,
    /// The spool it was imported into.
    pub spool: String,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
    /// Messages imported by the run that wrote it.
    pub imported: usize,
}

impl Marker {
    /// One line for an operator: `by NODE into SPOOL at TIME`.
    pub fn describe(&self) -> String {
        format!(
            "by {} into {} at {}",
            super::super::report::clean(&self.node),
            super::super::report::clean(&self.spool),
            crate::queue::journal::show::rfc3339_ms(self.at_ms)
        )
    }
}

/// What is at `DIR/adopted`: `Ok(None)` when nothing; `Ok(Some(Err(why)))` when something
/// that is not a marker this version can read (still an adopted spool).
pub fn read_marker(dir: &Path) -> io::Result<Option<Result<Marker, String>>> {
    let path = dir.join(MARKER);
    match fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let file = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path);
    let mut bytes = Vec::new();
    let read = file.and_then(|f| f.take(MAX_MARKER).read_to_end(&mut bytes));
    Ok(Some(match read {
        Ok(_) => serde_json::from_slice(&bytes).map_err(|e| format!("unreadable marker: {e}")),
        Err(e) => Err(format!("unreadable marker: {e}")),
    }))
}

/// Write `DIR/adopted` durably: a temp file in `DIR`, fsynced, renamed over the name, `DIR`
/// fsynced. An error says why it could not (a read-only `DIR`: `EROFS`, `EACCES`).
pub fn write_marker(dir: &Path, marker: &Marker) -> io::Result<PathBuf> {
    let json = serde_json::to_vec(marker).map_err(io::Error::other)?;
    let tmp = dir.join(format!(".{MARKER}.{}.tmp", std::process::id()));
    let dest = dir.join(MARKER);
    let written = (|| {
        let mut file = fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(&json)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&tmp, &dest)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map(|()| dest)
}
