//! Test harness for cross-process tests (filled by later issues).
