//! Compiled book examples.
