//! rustls server configuration from the policy's certificate and key.
