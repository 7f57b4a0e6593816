//! Mirror of the TOML policy file (serde only, no logic).
