//! The sans-IO SMTP protocol engine.
