//! Waiting for something another task or process does: one poll loop with a deadline
//! that fails the test, never a sleep that hopes.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

/// How often a condition is looked at again: often enough that a test reacts within a
/// few milliseconds, seldom enough not to load the database it queries.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// Calls `check` until it returns `Ok`, and returns that value. `Err` carries what was
/// seen instead; once `within` has passed, the test fails with `what` and the last of
/// those. `within` is a deadline, not a measurement: it bounds how long a test may
/// wait for a guarantee's outcome.
pub async fn poll_until<T, Seen, Fut>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> Fut,
) -> T
where
    Seen: Debug,
    Fut: Future<Output = Result<T, Seen>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(done) => return done,
            Err(seen) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {within:?}; last seen {seen:?}"
            ),
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
