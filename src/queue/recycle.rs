//! `SPOOL/free/`: files of finished messages, kept to be written over by new ones.
//!
//! Creating a file allocates an inode and removing one frees it and its blocks. On ext4
//! without a journal (the spool's file system on the benchmark machines), allocating an inode
//! skips every inode of the group deleted in the last minute (up to five: `recently_deleted`
//! in `fs/ext4/ialloc.c`), so at a few thousand messages a second each new file scans
//! hundreds of thousands of inodes under the directory's lock; and on a file system mounted
//! with `discard`, freeing blocks waits for the disk. Both grow with the message rate, so a
//! relay that creates and deletes one file per message slows down exactly when it is busiest.
//!
//! So a finished message is not unlinked: [`FreePool::give`] renames `queue/ID` to `free/ID`
//! (the rename is its exit from the queue), and [`FreePool::take`] hands a free file to the
//! next message, which is written over it from the start, in place, cut to its length at
//! commit ([`super::SpoolWriter::commit`]) before the data fsync, and renamed into `queue/`.
//! No inode is allocated or freed and, for small messages, no block either.
//!
//! Bounds: at most [`FREE_MAX`] files, each of a message of at most [`RECYCLE_MAX`] bytes;
//! anything else is unlinked as before. What a free file still holds (a delivered message) is
//! overwritten by the next message written into it. The files may be removed at any time, by
//! hand too: the pool then creates new files. Only the relay process recycles; the `queue`
//! commands unlink.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Most files kept in `free/`: about the number of messages in flight at once, with room.
pub const FREE_MAX: usize = 256;

/// Largest message (its bytes, without the spool header) whose file is recycled rather than
/// unlinked, so `free/` holds at most about `FREE_MAX * RECYCLE_MAX` bytes (16 MiB).
pub const RECYCLE_MAX: u64 = 64 * 1024;

/// The free files of one spool (names in `free/`).
#[derive(Debug)]
pub struct FreePool {
    dir: PathBuf,
    /// The spool's owner: a free file owned by anyone else is never written into (its owner
    /// could read or change the message written there).
    owner: u32,
    names: Mutex<Vec<String>>,
}

impl FreePool {
    /// The pool over `dir` (created by the caller), with the files already there: up to
    /// [`FREE_MAX`] regular files owned by `owner` (the spool's owner) that no one else may
    /// write are kept, anything else is removed.
    pub fn load(dir: &Path, owner: u32) -> io::Result<FreePool> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().into_string().ok();
            let regular = entry
                .metadata()
                .is_ok_and(|m| super::trust(&m, owner).is_ok());
            let removed = match name {
                Some(name) if regular && names.len() < FREE_MAX => {
                    names.push(name);
                    Ok(())
                }
                _ if entry.file_type().is_ok_and(|t| t.is_dir()) => {
                    fs::remove_dir_all(entry.path())
                }
                _ => fs::remove_file(entry.path()),
            };
            match removed {
                // Gone since the listing: nothing to remove.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        Ok(FreePool {
            dir: dir.to_path_buf(),
            owner,
            names: Mutex::new(names),
        })
    }

    /// A pool that holds nothing and looks at nothing on disk (for the `queue` commands, which
    /// never recycle). Files given to it are unlinked.
    pub fn empty(dir: &Path) -> FreePool {
        FreePool {
            dir: dir.to_path_buf(),
            owner: 0,
            names: Mutex::new(Vec::new()),
        }
    }

    /// A free file, opened for writing (not truncated: the writer cuts it to length at
    /// commit), and its path. It stays in `free/` while the new message is written into it,
    /// and leaves by the commit's rename into `queue/`: a crash meanwhile leaves a free file
    /// with junk in it, which is what free files hold anyway. `None` when the pool is empty or
    /// no file could be opened (then the caller creates a new one in `tmp/`). The third
    /// element is the file's length in octets (from the `fstat` that checked it).
    pub fn take(&self) -> Option<(File, PathBuf, u64)> {
        loop {
            let name = self.names().pop()?;
            let path = self.dir.join(&name);
            match super::open_trusted_with_meta(&path, self.owner, true) {
                // A free file must have no other name. Only a crash in the middle of a rename,
                // repaired by fsck on a file system without a journal, could leave one also
                // linked in `queue/`: writing over it would destroy a queued message.
                Ok((file, meta)) if meta.nlink() == 1 => {
                    return Some((file, path, meta.len()));
                }
                Ok(_) | Err(super::Opened::Untrusted(_)) => {
                    tracing::warn!(path = %path.display(), "a free spool file has another name or was not written by the relay; not reusing it");
                    let _ = fs::remove_file(&path);
                    continue;
                }
                // Removed by hand meanwhile: try the next one.
                Err(super::Opened::Io(e)) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(super::Opened::Io(e)) => {
                    tracing::debug!(error = %e, "cannot reuse a free spool file");
                    return None;
                }
            }
        }
    }

    /// Take `path` (a finished message of `len` message bytes, named `name`) out of the queue: renamed
    /// into the pool when it is small and there is room, unlinked otherwise. `Ok(false)` when
    /// `path` did not exist.
    pub fn give(&self, path: &Path, name: &str, len: u64) -> io::Result<bool> {
        if let Some(Ok(renamed)) = self.recycle(path, name, len) {
            return Ok(renamed);
        }
        // Too big, no room, or e.g. free/ removed by hand: unlink instead.
        match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The first half of [`FreePool::give`]: rename `path` into the pool when `len` is at most
    /// [`RECYCLE_MAX`] and the pool holds fewer than [`FREE_MAX`] files. `None` when it is too
    /// big or the pool is full (nothing done); `Ok(true)` renamed, `Ok(false)` when `path` did
    /// not exist; an error when the rename failed otherwise (`free/` itself missing, say), with
    /// `path` left where it was. A rename frees no block and allocates no inode, so this never
    /// waits for the disk on a warm directory.
    pub fn recycle(&self, path: &Path, name: &str, len: u64) -> Option<io::Result<bool>> {
        let mut names = self.names();
        if len > RECYCLE_MAX || names.len() >= FREE_MAX {
            return None;
        }
        Some(match fs::rename(path, self.dir.join(name)) {
            Ok(()) => {
                names.push(name.to_string());
                Ok(true)
            }
            // The message deleted meanwhile; not free/ gone, which is an error.
            Err(e) if super::rename_source_gone(&e, path) => Ok(false),
            Err(e) => Err(e),
        })
    }

    /// How many files the pool holds.
    pub fn len(&self) -> usize {
        self.names().len()
    }

    fn names(&self) -> MutexGuard<'_, Vec<String>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}
