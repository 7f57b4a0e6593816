//! `queue adopt DIR`: import every message of another node's spool (a dead node's, mounted
//! read-only or copied) into this spool, once, with its state and id, and mark `DIR` so that
//! its node never delivers them again.
//!
//! # What is taken
//!
//! Each `DIR/queue/ID` is checked as startup recovery checks a message (`queue::recover`):
//! a regular file (a symlink is never followed, a FIFO never waited on) no one but its owner
//! may write, with the spool header, an envelope line under [`super::MAX_ENVELOPE_LINE`] and
//! the id of its name. Unlike recovery, any owner is accepted: the operator vouched for
//! `DIR`, which is another machine's, or a copy. A file that fails is refused and reported,
//! left where it is (nothing in `DIR` is moved or changed), and never stops the others.
//! `ID.state` goes with its message unchanged (held, attempts, recipients delivered, next
//! attempt, history); one that fails the checks is left behind and the message is imported
//! fresh (it may reach a recipient twice, never none: as recovery does).
//!
//! Not taken, and reported as left: `DIR/tmp/` (messages never acknowledged: their clients
//! still have them), `DIR/quarantine/`, `DIR/rejected/`, and the requests in `DIR/control/`.
//!
//! # Ids
//!
//! A message keeps its id unless this spool has one by that id (in `queue/` or
//! `quarantine/`). When that one is the same message (same envelope, same bytes) it is
//! "already here" and skipped; otherwise the message gets a new id with the same time part
//! (so it sorts by age as before), derived from the old id: an adopt run again derives the
//! same one and finds its own copy. The ledger, the output and the audit log name both ids.
//!
//! # Order on disk, and a crash at any point
//!
//! Per message: its state (when it has one) and the message are copied into `tmp/`, not
//! fsynced one by one. Per batch of up to `BATCH` (256) messages: the file system is flushed
//! once (`syncfs(2)`: every copy's data is on disk), then each copy is renamed into `queue/`
//! (the state first, then the message, without replacing anything), `queue/` is fsynced, a
//! line `{from, hash, id}` per message is appended to the ledger `SPOOL/adoptions.jsonl` and
//! fsynced (`hash`: FNV-1a of the whole source file, so that a message of another spool that
//! happens to bear the same id is not taken for this one), and only then is the running relay
//! asked to load and schedule them (`control/adopted.ID.FROM`, read within a second: see
//! [`super::control`]; a stopped relay reads them when it starts), which it journals as
//! `adopted` (with `adopted_from` when the id changed) and logs with both ids. So:
//!
//! - a crash before a copy's rename leaves at most temp files and an orphan state (removed by
//!   recovery): a rerun imports the message;
//! - a crash after the rename, before its batch's ledger lines, may leave the copy, which the
//!   rerun finds (same envelope and bytes under the same id, or the same derived id) and
//!   records; the relay has not been told of it yet, so it has not been sent (unless the relay
//!   restarted in between: then it may be sent twice, never lost);
//! - a message in the ledger is never imported again, even once delivered and gone from here;
//!   a rerun asks the relay again for those still queued here, in case the crash came before
//!   it was told;
//! - a crash between the import and the marker: the rerun imports nothing and writes it.
//!
//! The ledger is locked for the whole run: a second `queue adopt` on this spool is refused.
//!
//! # The marker: `DIR/adopted`
//!
//! Written after everything was imported (temp file in `DIR`, fsync, rename, fsync of `DIR`),
//! naming this node, this spool and the time ([`ledger::Marker`]). A relay refuses to start
//! on a spool that has one (`crate::app`), before recovery touches anything. When `DIR` is
//! read-only no marker can be written: the report says so, and that the source must be wiped
//! before its node returns. A `DIR` marked by another node (or for another spool) is refused:
//! adopting it twice would deliver its messages twice.

pub mod ledger;
pub mod report;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::{
    DeliveryState, MAGIC, MAX_STATE_FILE, STATE_SUFFIX, Spool, SpoolError, create_new, exact_id,
    give_to, read_header, rename_noreplace, sync_dir,
};
use crate::envelope::{Envelope, QueueId};
pub use ledger::{LEDGER, Ledger, LedgerError, MARKER, Marker};

/// Messages copied before `queue/` is fsynced, their ledger lines written (one fsync) and
/// the relay asked to load them: a batch.
const BATCH: usize = 256;
/// How many derived ids are tried for a message whose id is taken here.
const MAX_NEW_IDS: u32 = 16;

/// Why `queue adopt` did not run, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// `DIR` has no `queue/` directory (exit status 2).
    #[error("{}: not a spool (no queue/ directory in it)", .0.display())]
    NotASpool(PathBuf),
    /// A relay is running on `DIR` (it holds `DIR/relay.lock`): it would deliver the same
    /// messages, and go on accepting mail into a spool marked adopted (exit status 2).
    #[error("{}: a relay is running on it; stop that relay (or its node) first", .0.display())]
    Running(PathBuf),
    /// `DIR` is this relay's own spool (exit status 2).
    #[error("{}: that is this relay's own spool", .0.display())]
    OwnSpool(PathBuf),
    /// `DIR` was adopted already by another node or into another spool (exit status 2).
    #[error("{} was adopted already {marker}: adopting it again would deliver its messages twice", dir.display())]
    AdoptedElsewhere {
        /// The spool given.
        dir: PathBuf,
        /// What its marker says.
        marker: String,
    },
    /// `DIR` cannot be listed.
    #[error("cannot read {}: {source}", path.display())]
    Source {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The free space of this spool would fall below `limits.min_free_space`: stopped; what
    /// was imported stays imported, and a rerun goes on from there.
    #[error("stopped before {id}: {source}")]
    Space {
        /// The message that did not fit.
        id: QueueId,
        /// The numbers.
        #[source]
        source: super::reserve::Insufficient,
    },
    /// The ledger is locked by another adopt, or cannot be used.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// This spool cannot be written (stopped; a rerun goes on from there).
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl AdoptError {
    /// True for errors in the operator's input (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            AdoptError::NotASpool(_)
                | AdoptError::OwnSpool(_)
                | AdoptError::Running(_)
                | AdoptError::AdoptedElsewhere { .. }
        )
    }
}

/// What one message of `DIR` came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Copied here (into `queue/`, durably), with its state.
    Imported {
        /// Its id in `DIR`.
        from: QueueId,
        /// Its id here: `from` unless that id was taken here.
        id: QueueId,
        /// Its state holds it.
        held: bool,
        /// Why its state file was refused, when it was: it starts again with no attempts.
        fresh: Option<String>,
    },
    /// A dry run: it would be imported.
    WouldImport {
        /// Its id in `DIR`.
        from: QueueId,
        /// The id it would have here.
        id: QueueId,
        /// Its state holds it.
        held: bool,
    },
    /// Imported before (the ledger says so), or the same message is here already.
    AlreadyHere {
        /// Its id in `DIR`.
        from: QueueId,
        /// Its id here.
        id: QueueId,
    },
    /// A file of `DIR/queue/` that is not taken (left where it is).
    Refused {
        /// Its name in `DIR/queue/`.
        name: String,
        /// Why.
        reason: String,
    },
}

/// What is left in `DIR`, not imported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Left {
    /// Entries of `DIR/tmp/`: messages never acknowledged.
    pub unfinished: usize,
    /// Messages in `DIR/quarantine/`.
    pub quarantined: usize,
    /// Entries of `DIR/rejected/`.
    pub rejected: usize,
    /// Operator requests in `DIR/control/`, not carried over.
    pub requests: usize,
}

/// What became of the marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerOutcome {
    /// Written at this path.
    Written(PathBuf),
    /// There already, from an earlier run of this node into this spool.
    Already(Marker),
    /// Could not be written (a read-only `DIR`): why.
    NotWritten(String),
    /// A dry run writes nothing.
    DryRun,
    /// Not written: the run stopped before the end.
    Stopped,
    /// Not written: this many files of `DIR/queue/` were refused and are still there (a
    /// marker would tell the operator to wipe them).
    Refused(usize),
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `DIR` as given.
    pub dir: PathBuf,
    /// Per message (and per refused file), in id order.
    pub outcomes: Vec<Outcome>,
    /// What stays in `DIR`.
    pub left: Left,
    /// The marker.
    pub marker: MarkerOutcome,
    /// Why the run stopped before the end (this spool's side: I/O, free space); what
    /// `outcomes` lists was done, and a rerun goes on from there.
    pub stopped: Option<String>,
}

/// What the operator asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// The spool to adopt.
    pub dir: PathBuf,
    /// This node's name, for the marker.
    pub node: String,
    /// `limits.min_free_space` of this spool, in bytes (0: no check).
    pub min_free: u64,
    /// Only say what would be done.
    pub dry_run: bool,
}

/// Adopt `opts.dir` into `spool` (see the module docs). Blocking.
///
/// The first error of this spool's side (I/O, free space) stops the run: the report then
/// says why ([`Report::stopped`]), after the relay was told about what was imported before.
///
/// # Errors
/// As [`Adoption::start`]; the control request cannot be written.
pub fn adopt(spool: &Spool, opts: &Options) -> Result<Report, AdoptError> {
    let mut run = Adoption::start(spool, opts)?;
    for name in run.names() {
        if let Err(e) = run.import(&name) {
            return run.stop(&e);
        }
    }
    run.finish()
}

/// One run of `queue adopt`, message by message.
pub struct Adoption<'a> {
    spool: &'a Spool,
    opts: &'a Options,
    source_queue: PathBuf,
    ledger: Ledger,
    /// Marker already there from an earlier run of ours.
    marker: Option<Marker>,
    names: Vec<String>,
    outcomes: Vec<Outcome>,
    /// Copied into `tmp/` since the last batch, not yet flushed or renamed into `queue/`.
    staged: Vec<Staged>,
    /// In `queue/` (renamed there, or found there) since the last batch: (id there, its
    /// hash, id here); `queue/` not yet fsynced, not in the ledger, not told to the relay.
    batch: Vec<(QueueId, u64, QueueId)>,
    /// Imported by an earlier run and still queued here: (id here, id there), to ask the
    /// relay about again (that run may have stopped before it asked).
    retell: Vec<(QueueId, QueueId)>,
}

impl<'a> Adoption<'a> {
    /// Check `DIR` (a spool, not this one, not adopted by someone else), take the ledger's
    /// lock (not in a dry run) and list `DIR/queue/`.
    ///
    /// # Errors
    /// The usage errors of [`AdoptError`], [`AdoptError::Source`] when `DIR` cannot be read,
    /// [`AdoptError::Ledger`].
    pub fn start(spool: &'a Spool, opts: &'a Options) -> Result<Adoption<'a>, AdoptError> {
        let source_queue = opts.dir.join("queue");
        if !fs::metadata(&source_queue).is_ok_and(|m| m.is_dir()) {
            return Err(AdoptError::NotASpool(opts.dir.clone()));
        }
        // The same directory by device and inode, whatever the path (a symlink, a bind mount).
        let same = |a: &Path, b: &Path| {
            use std::os::unix::fs::MetadataExt as _;
            let (a, b) = (fs::metadata(a), fs::metadata(b));
            matches!((a, b), (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()))
        };
        if same(&opts.dir, spool.root()) {
            return Err(AdoptError::OwnSpool(opts.dir.clone()));
        }
        match super::running::is_running(&opts.dir) {
            Ok(false) => {}
            Ok(true) => return Err(AdoptError::Running(opts.dir.clone())),
            Err(source) => {
                return Err(AdoptError::Source {
                    path: opts.dir.join(super::running::LOCK_FILE),
                    source,
                });
            }
        }
        let marker = existing_marker(spool, opts)?;
        let ledger = Ledger::open(spool, !opts.dry_run)?;
        let names = list_names(&source_queue)?;
        Ok(Adoption {
            spool,
            opts,
            source_queue,
            ledger,
            marker,
            names,
            outcomes: Vec::new(),
            staged: Vec::new(),
            batch: Vec::new(),
            retell: Vec::new(),
        })
    }

    /// The names in `DIR/queue/` to go through, in order (state files go with their message).
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Import the file `name` of `DIR/queue/`; a file that is not taken is an
    /// [`Outcome::Refused`], not an error.
    ///
    /// # Errors
    /// This spool's side failed (I/O, free space): stop there.
    pub fn import(&mut self, name: &str) -> Result<(), AdoptError> {
        let outcome = match exact_id(name) {
            Some(from) => self.import_message(from)?,
            None => Some(Outcome::Refused {
                name: name.to_owned(),
                reason: "not a spool file name".to_owned(),
            }),
        };
        // A copy is reported once its batch put it into queue/.
        self.outcomes.extend(outcome);
        if self.staged.len() + self.batch.len() + self.retell.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// End the batch: flush the file system, rename the copies into `queue/`, fsync it, write
    /// the batch's ledger lines (one fsync), then ask the running relay to load them (see the
    /// module docs).
    fn flush(&mut self) -> Result<(), SpoolError> {
        if !self.staged.is_empty() {
            // One flush of the file system for the whole batch, before any rename: the data
            // of every copy is on disk before its name is in queue/.
            syncfs(&self.spool.inner.tmp)?;
            let mut staged = std::mem::take(&mut self.staged).into_iter();
            while let Some(copy) = staged.next() {
                if let Err(e) = self.commit(copy) {
                    staged.for_each(Staged::discard);
                    return Err(e);
                }
            }
        }
        let mut tell = std::mem::take(&mut self.retell);
        if !self.batch.is_empty() {
            sync_dir(&self.spool.inner.queue)?;
            let _ = crate::failpoint::step("adopt.ledger");
            self.ledger.record_all(&self.batch, &self.opts.dir)?;
            tell.extend(self.batch.drain(..).map(|(from, _, id)| (id, from)));
        }
        if tell.is_empty() {
            return Ok(());
        }
        self.spool.request_adopted(&tell)
    }

    /// The run stops on `why`: tell the relay about what was imported, write no marker.
    ///
    /// # Errors
    /// The control request cannot be written.
    pub fn stop(mut self, why: &AdoptError) -> Result<Report, AdoptError> {
        let flushed = self.flush();
        sort_outcomes(&mut self.outcomes);
        flushed?;
        Ok(Report {
            dir: self.opts.dir.clone(),
            outcomes: self.outcomes,
            left: left_in(&self.opts.dir),
            marker: MarkerOutcome::Stopped,
            stopped: Some(why.to_string()),
        })
    }

    /// Tell the relay about the rest, write the marker, count what is left.
    ///
    /// # Errors
    /// The control request cannot be written.
    pub fn finish(mut self) -> Result<Report, AdoptError> {
        self.flush()?;
        sort_outcomes(&mut self.outcomes);
        let marker = if self.opts.dry_run {
            MarkerOutcome::DryRun
        } else if let Some(marker) = self.marker.take() {
            MarkerOutcome::Already(marker)
        } else if let refused @ 1.. = (self.outcomes.iter())
            .filter(|o| matches!(o, Outcome::Refused { .. }))
            .count()
        {
            MarkerOutcome::Refused(refused)
        } else {
            let imported = self
                .outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Imported { .. }))
                .count();
            let marker = Marker {
                node: self.opts.node.clone(),
                spool: spool_name(self.spool),
                at_ms: crate::observe::event::unix_millis(),
                imported,
            };
            match ledger::write_marker(&self.opts.dir, &marker) {
                Ok(path) => MarkerOutcome::Written(path),
                Err(e) => MarkerOutcome::NotWritten(e.to_string()),
            }
        };
        Ok(Report {
            dir: self.opts.dir.clone(),
            outcomes: self.outcomes,
            left: left_in(&self.opts.dir),
            marker,
            stopped: None,
        })
    }

    /// One message of `DIR/queue/`.
    fn import_message(&mut self, from: QueueId) -> Result<Option<Outcome>, AdoptError> {
        let path = self.source_queue.join(from.as_str());
        let mut source = match Source::open(&path, &from) {
            Ok(source) => source,
            Err(reason) => {
                return Ok(Some(Outcome::Refused {
                    name: from.to_string(),
                    reason,
                }));
            }
        };
        if let Some(id) = self.ledger.get(&from, source.hash).cloned() {
            if !self.opts.dry_run && self.spool.contains(&id) {
                // Told again: the crash that interrupted the last run may have come before.
                self.retell.push((id.clone(), from.clone()));
            }
            return Ok(Some(Outcome::AlreadyHere { from, id }));
        }
        let state_path = self.source_queue.join(format!("{from}{STATE_SUFFIX}"));
        let state = read_source_state(&state_path, &source.envelope);
        let id = match self.place(&from, &mut source)? {
            Place::Here(id) => return Ok(Some(self.already_here(from, source.hash, id))),
            Place::Free(id) => id,
        };
        let held = matches!(&state, Ok(Some(s)) if s.hold.is_some());
        if self.opts.dry_run {
            return Ok(Some(Outcome::WouldImport { from, id, held }));
        }
        // The state file is small; a page covers it.
        match self.spool.reserve(source.len + 4096, self.opts.min_free) {
            Ok(Ok(_reservation)) => {}
            Ok(Err(source)) => return Err(AdoptError::Space { id: from, source }),
            Err(e) => return Err(SpoolError::io("statvfs", self.spool.root())(e).into()),
        }
        let fresh = state.as_ref().err().cloned();
        let state = state.ok().flatten();
        let (state, message) = self.stage(&id, &mut source, state.as_ref())?;
        self.staged.push(Staged {
            outcome: Outcome::Imported {
                from: from.clone(),
                id: id.clone(),
                held,
                fresh,
            },
            hash: source.hash,
            state,
            message,
        });
        Ok(None)
    }

    /// The same message is here already as `id`: record it (and tell the relay when queued).
    fn already_here(&mut self, from: QueueId, hash: u64, id: QueueId) -> Outcome {
        if !self.opts.dry_run {
            // Found, not made, by this run: it may not be durable yet (a crash came right
            // after its copy); the batch makes it so before the ledger names it.
            self.batch.push((from.clone(), hash, id.clone()));
        }
        Outcome::AlreadyHere { from, id }
    }

    /// The id message `from` takes here: its own, else the first derived one that is free,
    /// or the one under which the same message is here already.
    fn place(&self, from: &QueueId, source: &mut Source) -> Result<Place, AdoptError> {
        let candidates =
            std::iter::once(from.clone()).chain((1..=MAX_NEW_IDS).map(|k| derived_id(from, k)));
        for (k, id) in candidates.enumerate() {
            if k > 0 && id == *from {
                continue;
            }
            let places = [
                self.spool.message_path(&id),
                self.spool.quarantined_path(&id, ""),
            ];
            let mut taken = false;
            for local in places.iter().filter(|p| fs::symlink_metadata(p).is_ok()) {
                if source.same_as(local, &id, self.spool.inner.owner.0)? {
                    return Ok(Place::Here(id));
                }
                taken = true;
            }
            if !taken {
                return Ok(Place::Free(id));
            }
        }
        Err(SpoolError::AlreadyExists(from.clone()).into())
    }

    /// Copy the state (when there is one) and the message, as `id`, into `tmp/`: their
    /// paths there. Not flushed: see [`Adoption::flush`].
    fn stage(
        &self,
        id: &QueueId,
        source: &mut Source,
        state: Option<&DeliveryState>,
    ) -> Result<(Option<PathBuf>, PathBuf), SpoolError> {
        let spool = self.spool;
        let state_tmp = match state {
            Some(state) => {
                let json = serde_json::to_vec(state).map_err(|source| SpoolError::Encode {
                    what: "state",
                    source,
                })?;
                let tmp = spool.temp_path(&format!("{id}{STATE_SUFFIX}"));
                write_private(spool, &tmp, |f| f.write_all(&json)).inspect_err(|_| {
                    let _ = fs::remove_file(&tmp);
                })?;
                Some(tmp)
            }
            None => None,
        };
        let tmp = spool.temp_path(id.as_str());
        if let Err(e) = write_private(spool, &tmp, |f| source.copy_as(id, f)) {
            let _ = fs::remove_file(&tmp);
            state_tmp.map(fs::remove_file);
            return Err(e);
        }
        Ok((state_tmp, tmp))
    }

    /// Put a flushed copy into `queue/`: its state, then the message (without replacing);
    /// then it is reported and joins the batch.
    fn commit(&mut self, copy: Staged) -> Result<(), SpoolError> {
        let Outcome::Imported { from, id, .. } = &copy.outcome else {
            unreachable!("only imports are staged");
        };
        let (from, id) = (from.clone(), id.clone());
        let state_dest = self.spool.state_path(&id);
        if let Some(tmp) = &copy.state
            && let Err(e) = fs::rename(tmp, &state_dest)
        {
            copy.discard();
            return Err(SpoolError::io("rename", &state_dest)(e));
        }
        let dest = self.spool.message_path(&id);
        if let Err(e) = rename_noreplace(&copy.message, &dest) {
            if copy.state.is_some() {
                let _ = fs::remove_file(&state_dest);
            }
            copy.discard();
            return Err(match e.kind() {
                io::ErrorKind::AlreadyExists => SpoolError::AlreadyExists(id),
                _ => SpoolError::io("rename", &dest)(e),
            });
        }
        self.batch.push((from, copy.hash, id));
        self.outcomes.push(copy.outcome);
        Ok(())
    }
}

/// A message copied into `tmp/`, with its state, waiting for its batch.
struct Staged {
    /// The [`Outcome::Imported`] reported once it is in `queue/`.
    outcome: Outcome,
    /// The hash of its source file.
    hash: u64,
    /// Its state's copy, if it has one.
    state: Option<PathBuf>,
    /// Its copy.
    message: PathBuf,
}

impl Staged {
    /// Remove the copies (a batch that failed; what is left is removed by recovery anyway).
    fn discard(self) {
        let _ = fs::remove_file(&self.message);
        if let Some(state) = &self.state {
            let _ = fs::remove_file(state);
        }
    }
}

/// Flush the file system holding `dir` (`syncfs(2)`): every file written there is on disk.
fn syncfs(dir: &Path) -> Result<(), SpoolError> {
    use std::os::fd::AsRawFd as _;
    let d = File::open(dir).map_err(SpoolError::io("open", dir))?;
    // SAFETY: a valid descriptor, owned by `d` for the whole call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(SpoolError::io("syncfs", dir)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Put the outcomes in the order of the names in `DIR/queue/` (copies are reported when their
/// batch ends, after the others of the batch).
fn sort_outcomes(outcomes: &mut [Outcome]) {
    outcomes.sort_by(|a, b| outcome_name(a).cmp(outcome_name(b)));
}

fn outcome_name(o: &Outcome) -> &str {
    match o {
        Outcome::Imported { from, .. }
        | Outcome::WouldImport { from, .. }
        | Outcome::AlreadyHere { from, .. } => from.as_str(),
        Outcome::Refused { name, .. } => name,
    }
}

/// Where a message goes.
enum Place {
    /// This id is free here.
    Free(QueueId),
    /// The same message is here under this id.
    Here(QueueId),
}

/// An open message file of `DIR/queue/`, its header read.
struct Source {
    file: File,
    envelope: Envelope,
    header_len: u64,
    /// The file's length.
    len: u64,
    /// FNV-1a of the whole file: with the id, what the ledger knows it by.
    hash: u64,
}

impl Source {
    /// Open and check `path` (module docs); `Err` says why it is refused.
    fn open(path: &Path, from: &QueueId) -> Result<Source, String> {
        let file = open_source(path)?;
        let len = file
            .metadata()
            .map_err(|e| format!("cannot stat: {e}"))?
            .len();
        let mut reader = BufReader::new(&file);
        let (envelope, header_len) = read_header(&mut reader, path).map_err(|e| match e {
            SpoolError::Corrupt { reason, .. } => reason,
            e => e.to_string(),
        })?;
        if envelope.id != *from {
            return Err(format!(
                "envelope id {} does not match the file name",
                envelope.id
            ));
        }
        let hash = fnv(&file).map_err(|e| format!("cannot read: {e}"))?;
        Ok(Source {
            file,
            envelope,
            header_len,
            len,
            hash,
        })
    }

    /// Write the message as `id` into `out`: the very file when `id` is its own, else the
    /// same envelope with `id` and the same message bytes.
    fn copy_as(&mut self, id: &QueueId, out: &mut File) -> io::Result<()> {
        if *id == self.envelope.id {
            self.file.seek(SeekFrom::Start(0))?;
        } else {
            let mut envelope = self.envelope.clone();
            envelope.id = id.clone();
            out.write_all(MAGIC)?;
            out.write_all(&serde_json::to_vec(&envelope).map_err(io::Error::other)?)?;
            out.write_all(b"\n")?;
            self.file.seek(SeekFrom::Start(self.header_len))?;
        }
        io::copy(&mut self.file, out)?;
        Ok(())
    }

    /// True when the message file `local` (of this spool) holds this message as `id`: the
    /// same envelope but for the id, and the same message bytes. A file this spool does not
    /// trust, or cannot parse, is not it.
    fn same_as(&mut self, local: &Path, id: &QueueId, owner: u32) -> Result<bool, SpoolError> {
        let Ok(file) = super::open_trusted(local, owner, false) else {
            return Ok(false);
        };
        let len = file
            .metadata()
            .map_err(SpoolError::io("stat", local))?
            .len();
        let mut reader = BufReader::new(file);
        let Ok((envelope, header_len)) = read_header(&mut reader, local) else {
            return Ok(false);
        };
        let mut expected = self.envelope.clone();
        expected.id = id.clone();
        if envelope != expected || len - header_len != self.len - self.header_len {
            return Ok(false);
        }
        self.file
            .seek(SeekFrom::Start(self.header_len))
            .map_err(SpoolError::io("seek", local))?;
        same_bytes(reader, BufReader::new(&self.file)).map_err(SpoolError::io("read", local))
    }
}

/// Open a file of `DIR` for reading: no symlink followed, no FIFO waited on, a regular file
/// no one but its owner (whoever that is) may write. `Err` says why not.
fn open_source(path: &Path) -> Result<File, String> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => "a symlink (never followed)".to_owned(),
            _ => format!("cannot open: {e}"),
        })?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    super::trust(&meta, meta.uid()).map_err(|d| d.to_string())?;
    Ok(file)
}

/// The state of the message at `path` (`Ok(None)`: none, a fresh message), or why the file
/// there is refused.
fn read_source_state(path: &Path, envelope: &Envelope) -> Result<Option<DeliveryState>, String> {
    let file = match open_source(path) {
        Ok(file) => file,
        Err(_) if fs::symlink_metadata(path).is_err() => return Ok(None),
        Err(why) => return Err(why),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err("state file too large".to_owned());
    }
    let state: DeliveryState =
        serde_json::from_slice(&bytes).map_err(|e| format!("state JSON: {e}"))?;
    state.check_against(envelope).map_err(|e| e.to_string())?;
    Ok(Some(state))
}

/// Create `path` (private), fill it with `fill`, give it to the spool's owner. Not fsynced:
/// its batch flushes the file system.
fn write_private(
    spool: &Spool,
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), SpoolError> {
    let mut file = create_new(path)?;
    fill(&mut file).map_err(SpoolError::io("write", path))?;
    give_to(path, spool.inner.owner)
}

/// Whether two streams hold the same bytes.
fn same_bytes(mut a: impl BufRead, mut b: impl BufRead) -> io::Result<bool> {
    loop {
        let (x, y) = (a.fill_buf()?, b.fill_buf()?);
        if x.is_empty() || y.is_empty() {
            return Ok(x.is_empty() && y.is_empty());
        }
        let n = x.len().min(y.len());
        if x[..n] != y[..n] {
            return Ok(false);
        }
        a.consume(n);
        b.consume(n);
    }
}

/// FNV-1a (64 bits) of `bytes`, continuing from `hash`.
fn fnv_step(mut hash: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The FNV-1a offset basis.
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of the whole of `file`, read from its start.
fn fnv(mut file: &File) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut hash = FNV_START;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(hash);
        }
        hash = fnv_step(hash, chunk.iter().copied());
        let n = chunk.len();
        reader.consume(n);
    }
}

/// The `k`-th id tried for `from` when its own is taken: its time part, and a tail derived
/// from it and `k` (FNV-1a), so every run derives the same ones.
fn derived_id(from: &QueueId, k: u32) -> QueueId {
    const TAIL: u128 = (1 << 30) - 1;
    let hash = fnv_step(FNV_START, from.as_str().bytes().chain(k.to_le_bytes()));
    QueueId::from_bits((from.to_bits() & !TAIL) | (u128::from(hash) & TAIL))
}

/// The names in `queue_dir` to go through, sorted: every name but the state files.
fn list_names(queue_dir: &Path) -> Result<Vec<String>, AdoptError> {
    let err = |source| AdoptError::Source {
        path: queue_dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(queue_dir).map_err(err)? {
        let name = entry.map_err(err)?.file_name();
        let name = name.to_string_lossy().into_owned();
        let state = name.strip_suffix(STATE_SUFFIX).and_then(exact_id).is_some();
        if !state {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The marker already in `DIR`, when it is this node's for this spool (a rerun); one of
/// anyone else refuses the adoption.
fn existing_marker(spool: &Spool, opts: &Options) -> Result<Option<Marker>, AdoptError> {
    let found = ledger::read_marker(&opts.dir).map_err(|source| AdoptError::Source {
        path: opts.dir.join(MARKER),
        source,
    })?;
    match found {
        None => Ok(None),
        Some(Ok(m)) if m.node == opts.node && m.spool == spool_name(spool) => Ok(Some(m)),
        Some(Ok(m)) => Err(AdoptError::AdoptedElsewhere {
            dir: opts.dir.clone(),
            marker: m.describe(),
        }),
        Some(Err(why)) => Err(AdoptError::AdoptedElsewhere {
            dir: opts.dir.clone(),
            marker: format!("({why})"),
        }),
    }
}

/// This spool's path as the marker names it (canonical when it can be).
fn spool_name(spool: &Spool) -> String {
    fs::canonicalize(spool.root())
        .unwrap_or_else(|_| spool.root().to_path_buf())
        .display()
        .to_string()
}

/// Count what stays in `DIR` (directories that are missing or unreadable count nothing).
fn left_in(dir: &Path) -> Left {
    let count = |sub: &str, only_ids: bool| {
        fs::read_dir(dir.join(sub)).map_or(0, |entries| {
            entries
                .flatten()
                .filter(|e| !only_ids || e.file_name().to_str().and_then(exact_id).is_some())
                .count()
        })
    };
    Left {
        unfinished: count("tmp", false),
        quarantined: count(super::quarantine::DIR, true),
        rejected: count("rejected", false),
        requests: count("control", false),
    }
}
