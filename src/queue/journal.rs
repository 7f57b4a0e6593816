//! The message journal behind `portcullis trace`: every [`Event`] of every message, appended
//! under `SPOOL/journal/`, bounded by `[log] journal_keep` and `journal_max_size`, never
//! fsynced event by event, and never the cause of a refusal (DESIGN.md, `[log]`).
//!
//! SKELETON: the journal part of the observability issue replaces this with the real writer,
//! reader and index.

use crate::config::Log;
use crate::observe::{Event, EventSink};

use super::Spool;

/// The journal writer of one spool.
#[derive(Debug)]
pub struct Journal {}

impl Journal {
    /// The journal of `spool`, bounded as `log` says. Never fails: a journal that cannot be
    /// written is logged and drops its events (mail goes on).
    pub fn open(spool: &Spool, log: &Log) -> Journal {
        let _ = (spool, log);
        Journal {}
    }
}

/// Why the journal could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A journal file could not be listed or read.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Call `visit` with every journaled event of `spool` at or after `since_ms` (Unix
/// milliseconds), in time order. For `portcullis status` without a running relay (the flow of
/// the last hour) and for `trace`.
///
/// # Errors
/// [`JournalError::Io`] when the journal directory or a file cannot be read (a missing
/// journal is no error: nothing is visited).
pub fn scan(
    spool: &Spool,
    since_ms: u64,
    visit: &mut dyn FnMut(&Event),
) -> Result<(), JournalError> {
    let _ = (spool, since_ms, visit);
    Ok(())
}

impl EventSink for Journal {
    fn append(&self, event: &Event) {
        let _ = event;
    }
}
