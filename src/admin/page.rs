//! The status page (`/`): one server-rendered HTML document with inline SVG charts, no
//! external assets, readable on a phone.
//!
//! SKELETON: the status-page part of the observability issue fills this in.

use crate::observe::status::Status;

/// The page for `status`, a complete HTML document.
pub fn render(status: &Status) -> String {
    let _ = status;
    String::new()
}
