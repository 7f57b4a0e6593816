//! Upstream SMTP client and delivery workers.
