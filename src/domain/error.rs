//! The errors of the service, in terms a caller can act on. The gRPC layer maps each
//! variant to a status code in one place.

use std::fmt;

/// What went wrong, as far as the caller is concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist; the message says what to create first.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but the current state refuses it (out of stock, a run
    /// in progress, nothing to resume); the message says what would make it acceptable.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A backing store failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A failure of MySQL, Redis or the notification bus.
#[derive(Debug, thiserror::Error)]
pub struct BackendError {
    /// Which store, for the caller: "database", "stock cache", ...
    pub store: &'static str,
    /// True when the store could not be reached at all (the caller may retry later);
    /// false for an unexpected error from a reachable store.
    pub unavailable: bool,
    #[source]
    pub source: anyhow::Error,
}

impl BackendError {
    pub fn new(store: &'static str, unavailable: bool, source: impl Into<anyhow::Error>) -> Self {
        Self {
            store,
            unavailable,
            source: source.into(),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unavailable {
            write!(f, "the {} is unavailable", self.store)
        } else {
            write!(f, "the {} failed", self.store)
        }
    }
}
