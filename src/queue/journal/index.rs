//! The sidecar index of a sealed journal segment: a blocked Bloom filter of the segment's
//! keys (queue ids, Message-IDs, addresses, client IPs), with the time span of its events.
//!
//! A query hashes its key once, then reads one 64-octet block per segment (a single `pread`),
//! so a cold query over hundreds of segments costs one random read each. A hit may be false
//! (about 0.2 % at [`BITS_PER_KEY`]): the segment is then scanned for nothing; a miss is
//! always true. Keys come from the network (addresses, Message-IDs), so someone could craft
//! keys that collide; that only costs extra scans, never a wrong answer, since every event a
//! scan finds is matched exactly.
//!
//! # File format (`NAME.idx`, beside `NAME.jsonl`)
//!
//! ```text
//! 0   8  magic "PCJIDX1\n"
//! 8   8  first event time (Unix ms, little endian)
//! 16  8  last event time (Unix ms)
//! 24  8  events in the segment
//! 32  8  blocks (each 64 octets)
//! 40  8  length of the segment when sealed (octets)
//! 48  16 reserved (zero)
//! 64  ..  blocks
//! ```
//!
//! The file is written to a temporary name, fsynced and renamed, so it is whole or absent; one
//! whose length disagrees with its header is ignored (the segment is then scanned in full).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: &[u8; 8] = b"PCJIDX1\n";
/// Octets before the first block.
pub const HEADER_LEN: u64 = 64;
/// Octets per block: one cache line, one read.
const BLOCK: usize = 64;
/// Bits set per key, all in one block.
const PROBES: u32 = 8;
/// Filter size per distinct key, in bits: with 8 probes in 512-bit blocks, about 0.2 %
/// false hits.
pub const BITS_PER_KEY: u64 = 16;

/// What kind of value a key is; part of the hashed key, so an address never matches a
/// Message-ID that happens to read the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A queue id (upper case).
    Id,
    /// A Message-ID without its angle brackets, ASCII lower case.
    MessageId,
    /// A mail address, ASCII lower case.
    Address,
    /// A client IP address in its standard text form.
    Client,
}

impl KeyKind {
    fn tag(self) -> u8 {
        match self {
            KeyKind::Id => b'i',
            KeyKind::MessageId => b'm',
            KeyKind::Address => b'a',
            KeyKind::Client => b'c',
        }
    }
}

/// The 64-bit hash of a key (FNV-1a, then a SplitMix64 finalizer so that every bit depends on
/// every input octet). Stable across versions and platforms: it is stored on disk.
pub fn key_hash(kind: KeyKind, value: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(kind.tag()).chain(value.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The block a hash falls in, out of `blocks` (at least 1).
fn block_of(hash: u64, blocks: u64) -> u64 {
    // Multiply-shift: uniform over `blocks` without a division.
    ((u128::from(hash) * u128::from(blocks)) >> 64) as u64
}

/// The bit positions (0..512) a hash sets inside its block.
fn bits_of(hash: u64) -> impl Iterator<Item = usize> {
    let mut x = mix(hash ^ 0x5851_f42d_4c95_7f2d);
    (0..PROBES).map(move |_| {
        x = x
            .wrapping_mul(0x5851_f42d_4c95_7f2d)
            .wrapping_add(0x1405_7b7e_f767_814f);
        (x >> 55) as usize
    })
}

/// Whether every bit of `hash` is set in `block`.
fn block_has(block: &[u8], hash: u64) -> bool {
    bits_of(hash).all(|bit| block[bit / 8] & (1 << (bit % 8)) != 0)
}

/// The header of a sidecar: the span of its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Time of the earliest event, Unix ms (0 for a segment with no valid event).
    pub first_at: u64,
    /// Time of the latest event, Unix ms.
    pub last_at: u64,
    /// Events in the segment.
    pub events: u64,
    /// Length of the segment when it was sealed, octets.
    pub length: u64,
}

/// Write the sidecar of a segment at `path`: a filter of `keys` and its `span`. Written to
/// `path` + `.tmp`, fsynced, renamed; mode 0600.
///
/// # Errors
/// The I/O error of any step (the temporary file is removed).
pub fn write(path: &Path, keys: &HashSet<u64>, span: Span) -> io::Result<()> {
    let blocks = (keys.len() as u64 * BITS_PER_KEY)
        .div_ceil(BLOCK as u64 * 8)
        .max(1);
    let len = usize::try_from(blocks).map_err(io::Error::other)? * BLOCK;
    let mut filter = vec![0u8; len];
    for &hash in keys {
        let start = usize::try_from(block_of(hash, blocks)).map_err(io::Error::other)? * BLOCK;
        let block = &mut filter[start..start + BLOCK];
        for bit in bits_of(hash) {
            block[bit / 8] |= 1 << (bit % 8);
        }
    }
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
    for n in [
        span.first_at,
        span.last_at,
        span.events,
        blocks,
        span.length,
    ] {
        header.extend_from_slice(&n.to_le_bytes());
    }
    header.resize(HEADER_LEN as usize, 0);
    let tmp = path.with_extension("idx.tmp");
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&header)?;
        file.write_all(&filter)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// An open sidecar, read on demand.
#[derive(Debug)]
pub struct Sidecar {
    file: File,
    blocks: u64,
    /// The span its header records.
    pub span: Span,
}

impl Sidecar {
    /// Open the sidecar at `path` and check its header against its length.
    ///
    /// # Errors
    /// The I/O error, or [`io::ErrorKind::InvalidData`] for a file that is not a whole
    /// sidecar (then the segment is scanned in full, and indexed again by the writer).
    pub fn open(path: &Path) -> io::Result<Sidecar> {
        let mut file = File::open(path)?;
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact(&mut header)?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a journal index");
        if &header[..8] != MAGIC {
            return Err(bad());
        }
        let field = |i: usize| {
            let mut n = [0u8; 8];
            n.copy_from_slice(&header[8 + 8 * i..16 + 8 * i]);
            u64::from_le_bytes(n)
        };
        let blocks = field(3);
        let expected = blocks
            .checked_mul(BLOCK as u64)
            .and_then(|n| n.checked_add(HEADER_LEN));
        if blocks == 0 || expected != Some(file.metadata()?.len()) {
            return Err(bad());
        }
        let span = Span {
            first_at: field(0),
            last_at: field(1),
            events: field(2),
            length: field(4),
        };
        Ok(Sidecar { file, blocks, span })
    }

    /// Whether the segment may hold a key of hash `hash` (false: it certainly does not).
    ///
    /// # Errors
    /// The I/O error of the one read.
    pub fn may_contain(&self, hash: u64) -> io::Result<bool> {
        let mut block = [0u8; BLOCK];
        let offset = HEADER_LEN + block_of(hash, self.blocks) * BLOCK as u64;
        self.file.read_exact_at(&mut block, offset)?;
        Ok(block_has(&block, hash))
    }

    /// The whole filter in memory, for testing many keys against one segment.
    ///
    /// # Errors
    /// The I/O error of the read.
    pub fn load(&self) -> io::Result<Filter> {
        let len = usize::try_from(self.blocks).map_err(io::Error::other)? * BLOCK;
        let mut blocks = vec![0u8; len];
        self.file.read_exact_at(&mut blocks, HEADER_LEN)?;
        Ok(Filter {
            blocks,
            count: self.blocks,
        })
    }
}

/// A sidecar's filter held in memory.
#[derive(Debug)]
pub struct Filter {
    blocks: Vec<u8>,
    count: u64,
}

impl Filter {
    /// Whether the segment may hold a key of hash `hash`.
    pub fn may_contain(&self, hash: u64) -> bool {
        // `block_of` is below `count`, so the slice is in bounds.
        let start = block_of(hash, self.count) as usize * BLOCK;
        block_has(&self.blocks[start..start + BLOCK], hash)
    }
}
