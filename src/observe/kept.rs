//! Test support: an [`EventSink`] that keeps every event in memory, for tests to read.

use std::sync::{Arc, Mutex};

use super::{Event, EventSink};

/// Every event appended, in order; clones share them (one goes to the telemetry, the test
/// keeps the other).
#[derive(Debug, Clone, Default)]
pub struct KeptEvents(Arc<Mutex<Vec<Event>>>);

impl EventSink for KeptEvents {
    fn append(&self, event: &Event) {
        self.0.lock().unwrap().push(event.clone());
    }
}

impl KeptEvents {
    /// The events so far.
    pub fn all(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    /// The events so far, forgotten here.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}
