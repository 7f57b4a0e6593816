//! The firing alerts kept across a restart: `SPOOL/alerts.json`, the alerts of the last
//! transition (name, since, value, threshold, text), replaced atomically (temporary file,
//! fsync, rename, directory fsync; mode 0600) whenever one starts or ends. The next start
//! seeds the [`super::Engine`] with them, so an alert whose condition still holds carries on
//! with its `since` and no second announcement, and one whose condition is over ends with a
//! `resolved` as it would have without the restart. A damaged or unreadable file is logged
//! and ignored (the alerts then start afresh).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use tracing::warn;

use super::ActiveAlert;

/// The file's name under the spool.
pub const FILE_NAME: &str = "alerts.json";

/// Largest file read: a few alerts fit in a few KiB.
const MAX_FILE: u64 = 1 << 20;

/// The alerts `path` says were firing; none when it is missing, and none (logged) when it
/// cannot be read or is damaged.
pub fn load(path: &Path) -> Vec<ActiveAlert> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read the alert state; alerts start afresh");
            return Vec::new();
        }
    };
    if text.len() as u64 > MAX_FILE {
        warn!(file = %path.display(), "alert state file too large; ignored, alerts start afresh");
        return Vec::new();
    }
    match serde_json::from_slice::<Vec<ActiveAlert>>(&text) {
        Ok(alerts) => alerts,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "alert state file damaged; ignored, alerts start afresh");
            Vec::new()
        }
    }
}

/// Replace `path` with `alerts`, atomically.
///
/// # Errors
/// The I/O error of the write, the fsyncs or the rename; `path` is then as it was.
pub fn save(path: &Path, alerts: &[ActiveAlert]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    let mut json = serde_json::to_vec_pretty(alerts).map_err(std::io::Error::other)?;
    json.push(b'\n');
    // A leftover temporary file would keep its mode: start from none.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&json)?;
    f.sync_data()?;
    drop(f);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}
