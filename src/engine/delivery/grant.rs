//! A run's call to the send limiter that stays in place while the run does other work
//! (G2): slots that fall due while no call waits are lost to the run, since the
//! limiter never saves them up.

use std::sync::Arc;

use tokio::time::Instant;

use crate::domain::BackendError;
use crate::engine::limiter::SendLimiter;

/// A call to the limiter that outlives the borrow of the engine, and says when its
/// slots arrived (they may wait while the run takes answers in).
pub(super) type Grant = std::pin::Pin<Box<dyn std::future::Future<Output = Granted> + Send>>;
pub(super) type Granted = (Result<u32, BackendError>, Instant);

/// Asks the limiter on a task of its own; dropping the grant cancels the call. The
/// instant that comes with the slots is the one the limiter handed them out at, so
/// the time the run then takes to use them (however late this task or the run woke)
/// is known (G2).
pub(super) fn ask_limiter(limiter: &Arc<dyn SendLimiter>, want: usize) -> Grant {
    let limiter = limiter.clone();
    let want = u32::try_from(want).unwrap_or(u32::MAX);
    let call = tokio::spawn(async move {
        match limiter.acquire(want).await {
            Ok(slots) => (Ok(slots.count), slots.at),
            Err(error) => (Err(error), Instant::now()),
        }
    });
    Box::pin(async move {
        let mut call = CancelOnDrop(call);
        match (&mut call.0).await {
            Ok(granted) => granted,
            Err(join) => (
                Err(BackendError::new(
                    crate::domain::Component::SendLimiter,
                    false,
                    anyhow::anyhow!("the call to the limiter failed: {join}"),
                )),
                Instant::now(),
            ),
        }
    })
}

/// The slots of `grant` when it is held; never, when not (a branch of a `select!` that
/// waits for a grant only if one was asked for).
pub(super) async fn granted(grant: &mut Option<Grant>) -> Granted {
    match grant {
        Some(grant) => grant.await,
        None => std::future::pending().await,
    }
}

/// Cancels a task when its handle is dropped.
struct CancelOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for CancelOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
