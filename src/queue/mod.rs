//! The durable spool.
