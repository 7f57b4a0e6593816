//! Pure policy decisions compiled from the configuration, named after SMTP stages.

pub mod credentials;
