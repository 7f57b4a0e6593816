//! [`SpoolWriter`]: one message being received, in `tmp/ID` until committed.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Dirs, Loaded, MAGIC, QueuedMessage, SendLock, SpoolError, rename_noreplace};
use crate::envelope::{Envelope, MailParams, QueueId};
use crate::failpoint;
use crate::queue::DeliveryState;

/// Size of the write buffer: DATA arrives in small chunks, the disk prefers large ones.
const BUFFER_SIZE: usize = 64 * 1024;

/// Messages up to this size are also kept in memory while written, so that
/// [`SpoolWriter::commit_and_keep`] can hand them to delivery without reading them back.
pub const KEEP_MAX: usize = 64 * 1024;

/// A message just made durable, handed from the receiving side to delivery (through the
/// channel `app` connects them with), so delivery starts at once.
#[derive(Debug)]
pub struct Committed {
    /// The message's queue id (`queue/ID`).
    pub id: QueueId,
    /// The message as a first delivery attempt needs it, when the committer kept it in memory
    /// ([`SpoolWriter::commit_and_keep`], at most `KEEP_MAX` octets); `None`: read it from
    /// the spool.
    pub loaded: Option<Loaded>,
    /// The login that submitted it, if its client authenticated (its mail is held while
    /// the login is suspended).
    pub auth_user: Option<String>,
}

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
    /// All bytes written, header included: the file's length at commit.
    length: u64,
    /// The file was reused from `free/` (and is written there): its length when taken, which
    /// may be more than what is written into it (cut at commit unless it is exactly that).
    reused: Option<u64>,
    /// The file being written (see [`SpoolWriter::tmp_path`]).
    path: PathBuf,
    /// The temp file no longer exists in `tmp/` (renamed or removed).
    gone: bool,
    /// The envelope in the header and a copy of the message bytes, while they fit in
    /// [`KEEP_MAX`] (`None` once they do not). Shared with the [`WrittenMessage`] that
    /// [`SpoolWriter::message`] hands out, so reading the message whole copies nothing; none
    /// is alive while the writer writes or commits, so those change it in place.
    kept: Option<(Envelope, Arc<Vec<u8>>)>,
    /// Octets of the envelope line (JSON and the blank room after it, without the newline),
    /// which [`SpoolWriter::rewrite_mail_params`] may rewrite in place.
    header_line: usize,
}

impl SpoolWriter {
    pub(super) fn new(
        envelope: &Envelope,
        file: File,
        path: PathBuf,
        reused: Option<u64>,
        dirs: Arc<Dirs>,
    ) -> Self {
        SpoolWriter {
            path,
            id: envelope.id.clone(),
            file: Some(BufWriter::with_capacity(BUFFER_SIZE, file)),
            dirs,
            written: 0,
            length: 0,
            reused,
            gone: false,
            kept: Some((envelope.clone(), Arc::default())),
            header_line: 0,
        }
    }

    /// Where the message is being written: `tmp/ID`, or the reused file in `free/`.
    fn tmp_path(&self) -> &std::path::Path {
        &self.path
    }

    /// Write the magic line and the envelope JSON line (`envelope_json` holds no newline:
    /// serde_json's compact form escapes them inside strings).
    /// `room` blanks follow the JSON (JSON allows trailing whitespace), so that a longer
    /// envelope can replace it in place.
    pub(super) fn write_header(
        &mut self,
        envelope_json: &[u8],
        room: usize,
    ) -> Result<(), SpoolError> {
        self.put(MAGIC)?;
        self.put(envelope_json)?;
        self.put(&vec![b' '; room])?;
        self.header_line = envelope_json.len() + room;
        self.put(b"\n")
    }

    /// Record the MAIL parameters the message turned out to need in its envelope, so delivery
    /// declares exactly these upstream: `BODY=8BITMIME` for 8-bit octets MAIL FROM did not
    /// declare (RFC 6152), no `SMTPUTF8` for a message that is all ASCII (RFC 6531 §3.4).
    /// `envelope` is the one given to [`super::Spool::create`]. Rewrites the envelope line in
    /// place, in the room `create` left for adding `BODY=8BITMIME` (dropping SMTPUTF8 only
    /// shortens it); nothing is read back. Not yet durable: the commit's fsync covers it.
    pub fn rewrite_mail_params(
        &mut self,
        envelope: &Envelope,
        params: MailParams,
    ) -> Result<(), SpoolError> {
        let mut upgraded = envelope.clone();
        upgraded.mail_params = params;
        let mut line = serde_json::to_vec(&upgraded).map_err(|source| SpoolError::Encode {
            what: "envelope",
            source,
        })?;
        if line.len() > self.header_line {
            // Unreachable: `create` leaves room for exactly this change.
            return Err(self.io_error("rewrite envelope", std::io::ErrorKind::InvalidData.into()));
        }
        line.resize(self.header_line, b' ');
        let Some(buffered) = self.file.as_mut() else {
            return Err(self.io_error("write", std::io::ErrorKind::Other.into()));
        };
        // Flush first: a header still in the buffer would otherwise be written over the new
        // one later.
        let result = buffered
            .flush()
            .and_then(|()| buffered.get_ref().write_all_at(&line, MAGIC.len() as u64));
        result.map_err(|e| self.io_error("write", e))?;
        if let Some((kept, _)) = &mut self.kept {
            *kept = upgraded;
        }
        Ok(())
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
        if let Some((_, kept)) = &mut self.kept {
            if kept.len() + data.len() <= KEEP_MAX {
                Arc::make_mut(kept).extend_from_slice(data);
            } else {
                self.kept = None;
            }
        }
        Ok(())
    }

    /// Message bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Write out what is buffered (into the page cache; no fsync), so that the file holds
    /// the whole message for [`SpoolWriter::message`].
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        let result = match self.file.as_mut() {
            Some(file) => failpoint::step("spool.write").and_then(|()| file.flush()),
            None => Err(std::io::ErrorKind::Other.into()),
        };
        result.map_err(|e| self.io_error("write", e))
    }

    /// The message bytes written so far (the spool header not included), after
    /// [`SpoolWriter::flush`]: the copy kept in memory when the message is at most
    /// [`KEEP_MAX`] octets, else the file mapped read-only, exactly the written range (a
    /// reused file may be longer). Nothing else writes the file while the writer lives, and
    /// the mapping is dropped before the writer is committed or dropped.
    pub fn message(&self) -> Result<WrittenMessage, SpoolError> {
        if let Some((_, kept)) = &self.kept {
            return Ok(WrittenMessage::Kept(Arc::clone(kept)));
        }
        // The writer's descriptor is write-only: read through one of our own.
        let file = File::open(self.tmp_path()).map_err(|e| self.io_error("open", e))?;
        let len = usize::try_from(self.written)
            .map_err(|_| self.io_error("mmap", std::io::ErrorKind::FileTooLarge.into()))?;
        if len == 0 {
            return Ok(WrittenMessage::Kept(Arc::default()));
        }
        // SAFETY: the mapping covers only bytes already written (flushed) by this writer,
        // which owns the file until commit and never truncates or rewrites that range
        // while a `WrittenMessage` of it is alive (the assembly drops it before committing);
        // another process changing a spool file under the relay is outside the spool's
        // contract (mode 0600, owned by the relay's user).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(self.length - self.written)
                .len(len)
                .map(&file)
        };
        map.map(WrittenMessage::Mapped)
            .map_err(|e| self.io_error("mmap", e))
    }

    /// Put `fields` (whole header fields, each ending in CRLF) in front of the message:
    /// a new temp file gets the spool header, `fields` and a copy of the message
    /// (`copy_file_range` through [`std::io::copy`]: no copy through user space), and
    /// replaces the old one, which is removed. The spool format is unchanged (magic,
    /// envelope line, message). Blocking: call from `spawn_blocking`. Nothing is visible in
    /// `queue/` until [`SpoolWriter::commit`]; a crash leaves only temp files, which
    /// recovery removes. The caller holds free space for both copies while this runs.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the new file cannot be created or written; the writer then
    /// still holds the old file, unchanged, and the new one is removed.
    pub fn prepend(&mut self, fields: &[u8]) -> Result<(), SpoolError> {
        if fields.is_empty() {
            return Ok(());
        }
        self.flush()?;
        let prefix = self.length - self.written;
        let tmp = self.dirs.tmp.join(self.id.as_str());
        // The message may be in `tmp/ID` itself (a new file) or in a reused one in `free/`.
        let new_path = if self.path == tmp {
            self.dirs.tmp.join(format!("{}.prepend", self.id.as_str()))
        } else {
            tmp
        };
        let mut new = super::create_new(&new_path)?;
        if let Err(e) = self.copy_into(&mut new, prefix, fields) {
            drop(new);
            let _ = fs::remove_file(&new_path);
            return Err(e);
        }
        let old = std::mem::replace(&mut self.path, new_path);
        self.file = Some(BufWriter::with_capacity(BUFFER_SIZE, new));
        if let Err(e) = fs::remove_file(&old) {
            // Recovery removes a leftover temp file; one in `free/` is written over later.
            tracing::debug!(queue_id = %self.id, error = %e, "could not remove the replaced spool file");
        }
        self.reused = None;
        self.written += fields.len() as u64;
        self.length += fields.len() as u64;
        if let Some((_, kept)) = &mut self.kept {
            if kept.len() + fields.len() <= KEEP_MAX {
                Arc::make_mut(kept).splice(0..0, fields.iter().copied());
            } else {
                self.kept = None;
            }
        }
        Ok(())
    }

    /// Write the spool header (`prefix` octets) of the current file, `fields`, then the
    /// message into `new`.
    fn copy_into(&self, new: &mut File, prefix: u64, fields: &[u8]) -> Result<(), SpoolError> {
        // The writer's descriptor is write-only: read through one of our own.
        let mut old = File::open(self.tmp_path()).map_err(|e| self.io_error("open", e))?;
        let mut head = vec![0u8; usize::try_from(prefix).unwrap_or(0)];
        let copied = old
            .read_exact_at(&mut head, 0)
            .and_then(|()| new.write_all(&head))
            .and_then(|()| new.write_all(fields))
            .and_then(|()| old.seek(SeekFrom::Start(prefix)))
            .and_then(|_| std::io::copy(&mut (&mut old).take(self.written), new));
        match copied {
            Ok(n) if n == self.written => Ok(()),
            Ok(_) => Err(self.io_error("copy", std::io::ErrorKind::UnexpectedEof.into())),
            Err(e) => Err(self.io_error("copy", e)),
        }
    }

    /// Make the message durable and visible: flush, fsync the data, rename `tmp/ID` to
    /// `queue/ID`, fsync `queue/` (shared with concurrent commits: the `group` module).
    /// Blocking: call from `spawn_blocking`. Only after this returns `Ok` may the client be
    /// told `250`. On an error the file is in neither `tmp/` nor `queue/` (a failed directory
    /// fsync unlinks the renamed file again; a crash before that leaves it to recovery).
    pub fn commit(mut self) -> Result<QueueId, SpoolError> {
        self.commit_file()?;
        Ok(self.id.clone())
    }

    /// [`SpoolWriter::commit`], and when the message was small enough to keep in memory
    /// (`KEEP_MAX`) also the message as a delivery attempt would load it, with the still
    /// open file as its [`SendLock`]: delivery starts without reading the file back.
    pub fn commit_and_keep(mut self) -> Result<(QueueId, Option<Loaded>), SpoolError> {
        let (file, path) = self.commit_file()?;
        let id = self.id.clone();
        let Some((envelope, body)) = self.kept.take() else {
            return Ok((id, None));
        };
        let loaded = Loaded {
            msg: QueuedMessage {
                state: DeliveryState::fresh(envelope.received_at),
                envelope,
                size: self.written,
                path: path.clone(),
            },
            body: Some(Arc::unwrap_or_clone(body)),
            lock: SendLock::new(id.clone(), file, path),
        };
        Ok((id, Some(loaded)))
    }

    /// The commit itself; returns the file, now `queue/ID`, and that path.
    fn commit_file(&mut self) -> Result<(File, PathBuf), SpoolError> {
        let Some(buffered) = self.file.take() else {
            // Unreachable: only a commit takes the file, and it consumes the writer.
            return Err(self.io_error("flush", std::io::ErrorKind::Other.into()));
        };
        failpoint::step("spool.commit.write").map_err(|e| self.io_error("write", e))?;
        let file = buffered
            .into_inner()
            .map_err(|e| self.io_error("write", e.into_error()))?;
        if self.reused.is_some_and(|old| old != self.length) {
            // Cut what is left of the file's previous message (or the blocks it would need),
            // unless the new one has exactly its length; the fsync below covers it.
            file.set_len(self.length)
                .map_err(|e| self.io_error("truncate", e))?;
        }
        failpoint::step("spool.commit.fsync")
            .and_then(|()| file.sync_data())
            .map_err(|e| self.io_error("fsync", e))?;
        let queue_path = self.dirs.queue.join(self.id.as_str());
        failpoint::step("spool.commit.rename")
            .and_then(|()| rename_noreplace(self.tmp_path(), &queue_path))
            .map_err(|source| {
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
        let synced = failpoint::step("spool.commit.dir_fsync")
            .map_err(SpoolError::io("fsync", &self.dirs.queue))
            .and_then(|()| self.dirs.queue_sync.sync())
            .and_then(|()| {
                failpoint::step("spool.commit.reply").map_err(SpoolError::io("commit", &queue_path))
            });
        if let Err(e) = synced {
            // Visible in queue/ but maybe not durable, and the client is answered 4xx: take it
            // back out, or it would wait unscheduled (nothing else knows of it) until the next
            // start, and then go out beside the copy the client sends again. A crash before
            // this unlink leaves it there: recovered, delivered, possibly twice (allowed).
            let removed = fs::remove_file(&queue_path);
            tracing::warn!(queue_id = %self.id, error = %e, removed = removed.is_ok(),
                "queue directory fsync failed after the rename: the message is refused");
            return Err(e);
        }
        Ok((file, queue_path))
    }

    /// Give up on this message: remove the temp file.
    pub fn abort(self) {
        // Drop does the work.
    }

    fn put(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let result = match self.file.as_mut() {
            Some(file) => failpoint::step("spool.write").and_then(|()| file.write_all(data)),
            None => Err(std::io::ErrorKind::Other.into()),
        };
        self.length += data.len() as u64;
        result.map_err(|e| self.io_error("write", e))
    }

    fn io_error(&self, op: &'static str, source: std::io::Error) -> SpoolError {
        SpoolError::Io {
            op,
            path: self.tmp_path().to_path_buf(),
            source,
        }
    }
}

/// A message's bytes for reading it whole (DKIM verification and signing): the writer's
/// in-memory copy, or the spool file mapped read-only.
#[derive(Debug)]
pub enum WrittenMessage {
    /// The writer's in-memory copy of the bytes (at most [`KEEP_MAX`] octets), shared.
    Kept(Arc<Vec<u8>>),
    /// The written range of the spool file, mapped.
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for WrittenMessage {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            WrittenMessage::Kept(bytes) => bytes,
            WrittenMessage::Mapped(map) => map,
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

#[cfg(test)]
mod tests {
    use super::super::Spool;
    use crate::envelope::sample_envelope;

    fn files(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// A message of `len` octets: short header lines and a body of lines.
    fn message(len: usize) -> Vec<u8> {
        let mut m = b"Received: from client.test\r\nSubject: hi\r\n\r\n".to_vec();
        while m.len() < len {
            m.extend_from_slice(b"0123456789abcdef0123456789abcdef0123456789\r\n");
        }
        m
    }

    const FIELDS: &[u8] =
        b"Authentication-Results: relay.test; spf=pass smtp.mailfrom=a@b.test\r\n";

    /// Prepend `FIELDS` to a message of `len` octets: before the commit nothing is in
    /// `queue/` and one file is in `tmp/`; the committed message is exactly the fields and
    /// the message.
    fn prepend_and_commit(spool: &Spool, root: &std::path::Path, len: usize) {
        let envelope = sample_envelope(&["u@example.com"]);
        let body = message(len);
        let queued = files(&root.join("queue"));
        let mut writer = spool.create(&envelope).unwrap();
        for chunk in body.chunks(7000) {
            writer.write(chunk).unwrap();
        }
        writer.flush().unwrap();
        assert_eq!(
            &*writer.message().unwrap(),
            &body[..],
            "read back as written"
        );
        writer.prepend(FIELDS).unwrap();
        assert_eq!(
            files(&root.join("queue")),
            queued,
            "nothing visible before commit"
        );
        assert_eq!(files(&root.join("tmp")).len(), 1, "the old file is gone");
        assert_eq!(writer.written(), (FIELDS.len() + body.len()) as u64);
        let (id, kept) = writer.commit_and_keep().unwrap();
        let mut expected = FIELDS.to_vec();
        expected.extend_from_slice(&body);
        assert_eq!(spool.read_message(&id).unwrap(), expected);
        if let Some(loaded) = kept {
            assert_eq!(loaded.body.as_deref(), Some(&expected[..]));
        }
        assert!(files(&root.join("tmp")).is_empty());
    }

    #[test]
    fn prepended_fields_are_committed_above_the_message_small_and_large() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        let spool = Spool::open(&root).unwrap();
        prepend_and_commit(&spool, &root, 1000);
        // Over KEEP_MAX: read back through the mapping, copied file to file.
        prepend_and_commit(&spool, &root, super::KEEP_MAX + 50_000);
    }

    #[test]
    fn fields_prepended_in_a_reused_longer_file_leave_nothing_of_its_old_message() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        let spool = Spool::open(&root).unwrap();
        let old = sample_envelope(&["u@example.com"]);
        let mut writer = spool.create(&old).unwrap();
        writer.write(&message(60_000)).unwrap();
        let id = writer.commit().unwrap();
        spool.remove_finished(&id, 60_000, 0).unwrap();
        assert_eq!(spool.free_files(), 1);
        // The next message is written over that file, and is much shorter.
        prepend_and_commit(&spool, &root, 500);
        assert!(
            files(&root.join("free")).is_empty(),
            "the replaced free file is removed"
        );
    }

    #[test]
    fn a_small_message_is_read_from_the_kept_copy_which_never_changes_under_its_reader() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let mut writer = spool.create(&sample_envelope(&["u@example.com"])).unwrap();
        writer.write(b"Subject: x\r\n\r\n").unwrap();
        writer.flush().unwrap();
        let read = writer.message().unwrap();
        assert!(
            matches!(read, super::WrittenMessage::Kept(_)),
            "no mapping, no copy"
        );
        // Written on while read (not what the relay does): the reader keeps what it read.
        writer.write(b"body\r\n").unwrap();
        writer.prepend(b"X-A: 1\r\n").unwrap();
        assert_eq!(&*read, b"Subject: x\r\n\r\n");
        drop(read);
        let id = writer.commit().unwrap();
        assert_eq!(
            spool.read_message(&id).unwrap(),
            b"X-A: 1\r\nSubject: x\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn prepending_nothing_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        let spool = Spool::open(&root).unwrap();
        let envelope = sample_envelope(&["u@example.com"]);
        let mut writer = spool.create(&envelope).unwrap();
        writer.write(b"Subject: x\r\n\r\nbody\r\n").unwrap();
        let before = files(&root.join("tmp"));
        writer.prepend(b"").unwrap();
        assert_eq!(files(&root.join("tmp")), before);
        let id = writer.commit().unwrap();
        assert_eq!(
            spool.read_message(&id).unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
    }
}
