//! [`SpoolWriter`]: one message being received, in `tmp/ID` until committed.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use super::{Dirs, MAGIC, SpoolError, rename_noreplace, sync_dir};
use crate::envelope::QueueId;

/// Size of the write buffer: DATA arrives in small chunks, the disk prefers large ones.
const BUFFER_SIZE: usize = 64 * 1024;

/// A message being written into `tmp/ID`, made visible in `queue/` only by [`commit`].
///
/// Dropping a writer without committing removes the temp file (best effort; recovery removes
/// whatever is left), so a session that ends mid-DATA leaves nothing behind.
///
/// [`commit`]: SpoolWriter::commit
#[derive(Debug)]
pub struct SpoolWriter {
    id: QueueId,
    /// `None` once [`SpoolWriter::commit`] took it.
    file: Option<BufWriter<File>>,
    dirs: Arc<Dirs>,
    /// Message bytes written (the header not included).
    written: u64,
    /// The temp file no longer exists in `tmp/` (renamed or removed).
    gone: bool,
}

impl SpoolWriter {
    pub(super) fn new(id: QueueId, file: File, dirs: Arc<Dirs>) -> Self {
        SpoolWriter {
            id,
            file: Some(BufWriter::with_capacity(BUFFER_SIZE, file)),
            dirs,
            written: 0,
            gone: false,
        }
    }

    /// `tmp/ID`.
    fn tmp_path(&self) -> PathBuf {
        self.dirs.tmp.join(self.id.as_str())
    }

    /// Write the magic line and the envelope JSON line (`envelope_json` holds no newline:
    /// serde_json's compact form escapes them inside strings).
    pub(super) fn write_header(&mut self, envelope_json: &[u8]) -> Result<(), SpoolError> {
        self.put(MAGIC)?;
        self.put(envelope_json)?;
        self.put(b"\n")
    }

    /// The queue id this message will have.
    pub fn id(&self) -> &QueueId {
        &self.id
    }

    /// Append message bytes. Buffered (page cache only, no fsync), so cheap enough to call
    /// inline from async code. After an error the writer should be aborted.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.put(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Message bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Make the message durable and visible: flush, fsync the data, rename `tmp/ID` to
    /// `queue/ID`, fsync `queue/`. Blocking: call from `spawn_blocking`. Only after this
    /// returns `Ok` may the client be told `250`.
    pub fn commit(mut self) -> Result<QueueId, SpoolError> {
        let Some(buffered) = self.file.take() else {
            // Unreachable: only commit takes the file, and it consumes the writer.
            return Err(self.io_error("flush", std::io::ErrorKind::Other.into()));
        };
        let file = buffered
            .into_inner()
            .map_err(|e| self.io_error("write", e.into_error()))?;
        file.sync_data().map_err(|e| self.io_error("fsync", e))?;
        drop(file);
        let queue_path = self.dirs.queue.join(self.id.as_str());
        rename_noreplace(&self.tmp_path(), &queue_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                SpoolError::AlreadyExists(self.id.clone())
            } else {
                SpoolError::Io {
                    op: "rename",
                    path: queue_path.clone(),
                    source,
                }
            }
        })?;
        self.gone = true;
        if let Err(e) = sync_dir(&self.dirs.queue) {
            // The file is visible in queue/ but maybe not durable: the caller answers 4xx and
            // the message may be delivered twice (allowed); removing it could race a worker.
            tracing::warn!(queue_id = %self.id, error = %e, "queue directory fsync failed after commit");
            return Err(e);
        }
        Ok(self.id.clone())
    }

    /// Give up on this message: remove the temp file.
    pub fn abort(self) {
        // Drop does the work.
    }

    fn put(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let result = match self.file.as_mut() {
            Some(file) => file.write_all(data),
            None => Err(std::io::ErrorKind::Other.into()),
        };
        result.map_err(|e| self.io_error("write", e))
    }

    fn io_error(&self, op: &'static str, source: std::io::Error) -> SpoolError {
        SpoolError::Io {
            op,
            path: self.tmp_path(),
            source,
        }
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.gone {
            return;
        }
        // Close without flushing the buffer (`into_parts` discards it), then unlink. Errors
        // are only logged: recovery removes leftovers in tmp/.
        if let Some(buffered) = self.file.take() {
            drop(buffered.into_parts());
        }
        if let Err(e) = fs::remove_file(self.tmp_path()) {
            tracing::debug!(queue_id = %self.id, error = %e, "could not remove temp spool file");
        }
    }
}
