//! Erasure of one user (`ForgetUser`): every alert and history row of the user, and,
//! with the same certainty as a sold-out stock write (G3), no notification of the user
//! from any run in progress once it has returned.
//!
//! A run's owner holds pages of the queue it read before the call, and may have
//! delivered notifications it has not recorded yet. Per product, under the fence's
//! write lock (as a stock write takes it), the alert is deleted and the run, if its
//! owner may still reach the user, is released under a newer claim epoch: the owner
//! can no longer record (its claim is gone from the database) nor, once the fence has
//! seen the newer claim, deliver or start a webhook request (G8). The instance that
//! takes the run over (within a beat of the takeover loop) reads the queue again from
//! the recorded cursor, without the user. The history is deleted last: nobody can add
//! to it by then.

use std::sync::Arc;

use super::Engine;
use super::bus::RunKey;
use super::run_to_completion;
use crate::domain::{Error, ProductId, UserId};

/// What `ForgetUser` deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub alerts: u64,
    pub notifications: u64,
}

impl Engine {
    /// Erases `user` everywhere. Idempotent: a second call deletes nothing. Once this
    /// returns, no instance sends the user another notification.
    pub async fn forget_user(self: &Arc<Self>, user: UserId) -> Result<Forgotten, Error> {
        let engine = self.clone();
        run_to_completion(async move {
            let mut forgotten = Forgotten::default();
            for product in engine.store.products_of_user(user).await? {
                forgotten.alerts += u64::from(engine.forget_alert(product, user).await?);
                forgotten.notifications += engine.store.forget_history(product, user).await?;
            }
            tracing::info!(%user, ?forgotten, "user forgotten");
            Ok(forgotten)
        })
        .await
    }

    /// Deletes the user's alert for `product` and takes the product's run from an
    /// owner that may still reach the user; `true` if there was an alert.
    async fn forget_alert(&self, product: ProductId, user: UserId) -> Result<bool, Error> {
        let _exclusive = self.stock_fence.lock_for_write(product).await;
        let forgot = self.store.forget_alert(product, user).await?;
        if let Some(superseded) = forgot.superseded {
            let run = RunKey {
                product_id: product,
                restock_round: superseded.restock_round,
            };
            // G8: from here on, a delivery of the owner's claim does nothing, and its
            // webhook passes (held, or unexpired) are waited for.
            self.stock_fence
                .claim(run, superseded.token, superseded.cursor)
                .await?;
            self.channel.drain_passes(product).await?;
            tracing::info!(%product, round = superseded.restock_round, "run handed over to forget a user");
        }
        Ok(forgot.alert_deleted)
    }
}
