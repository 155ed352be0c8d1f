//! The operator console in a real browser (`browser.rs`). A test binary of its own:
//! cargo runs test binaries one after another, so Chromium's load never overlaps the
//! timing-sensitive tests of `tests/api` (the send rate's windows, G2).

// The harness of `tests/api`; this binary uses only part of it.
#[macro_use]
#[allow(dead_code, unused_imports, unused_macros)]
#[path = "../api/helpers/mod.rs"]
mod helpers;

mod browser;
