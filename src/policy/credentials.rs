//! Password hashing (placeholder until merged).
