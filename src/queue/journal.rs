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

impl EventSink for Journal {
    fn append(&self, event: &Event) {
        let _ = event;
    }
}
