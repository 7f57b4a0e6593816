//! Wires config, listeners, queue and delivery workers together; owns shutdown and reload.
