//! The takeover loop (G8): every instance looks, once a `takeover_interval`, for runs in
//! progress whose lease ran out (their instance died, or released them on shutdown),
//! claims them with a fresh fencing token and drives them on from their recorded
//! cursor. The claim is a conditional write, so of several instances racing for a run
//! exactly one gets it. It looks at once on start, so a run left by an instance that
//! stopped while no other was alive is continued by the next one to start.
//!
//! The same loop starts the waves of wave runs: a run waiting for its next wave has no
//! owner and a lease that runs out when the wave is due, so the next wave starts within
//! one look of its time, on whichever instance is alive then.
//! On the same beat it deletes a bounded batch of `TriggerRestock` idempotency keys
//! that have expired (older than 24 hours), so their table does not grow without
//! bound: one range read of an index when there is nothing to delete, and no extra
//! work in the trigger's transaction, which holds the product's lock. With
//! `RESTOCK_HISTORY_RETENTION`, it also deletes the per-user history of rounds that
//! ended longer ago, for at most a fifth of the beat, on one instance at a time.

use std::sync::Arc;

use crate::engine::Engine;

/// Runs claimed per look, at most: a burst of released runs is spread over instances.
const CLAIMS_PER_LOOK: u32 = 16;

/// Expired idempotency keys deleted per look, at most: far more than keys are made (one
/// per run started), so the sweep keeps up, while one statement stays short.
const EXPIRED_KEYS_PER_LOOK: u32 = 1_000;

/// How long one look's retention sweep goes on, at most: a fifth of the beat, so the
/// takeover loop keeps its pace, and 1,000-row statements a few milliseconds each.
const SWEEP_BUDGET: std::time::Duration = std::time::Duration::from_millis(200);

impl Engine {
    /// One look's share of the retention sweep (on one instance at a time).
    async fn sweep_history(&self, retention: std::time::Duration) {
        match self.store.sweep_history(retention, SWEEP_BUDGET).await {
            Ok(swept) => {
                for statement in &swept.statements {
                    self.metrics
                        .history_sweep_statement_seconds
                        .record(statement.as_secs_f64());
                }
                if swept.deleted > 0 {
                    self.metrics.history_deleted.increment(swept.deleted);
                    tracing::debug!(deleted = swept.deleted, "deleted expired history");
                }
            }
            Err(err) => tracing::warn!(error = ?err, "cannot delete expired history"),
        }
    }

    /// Takes over abandoned runs until shutdown, in the background.
    pub fn spawn_takeover(self: &Arc<Self>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(engine.settings.lease.takeover_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = engine.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let taken = engine
                    .store
                    .take_over_expired(engine.settings.lease.lease, CLAIMS_PER_LOOK)
                    .await;
                match taken {
                    Ok(runs) => {
                        // Claimed just as shutdown began, a run stops at once and
                        // releases itself again.
                        for claimed in runs {
                            let product = claimed.claim.product_id;
                            let round = claimed.claim.restock_round;
                            if claimed.run.wave.is_some_and(|w| w.next_wave_at.is_some()) {
                                // A wave run whose wait is over: its lease ran out on
                                // purpose, at the next wave's time.
                                tracing::info!(%product, round, "starting the next wave of a run");
                            } else {
                                tracing::warn!(
                                    %product,
                                    round,
                                    resume_cursor = ?claimed.cursor,
                                    "took over a run whose lease ran out"
                                );
                                engine.metrics.runs_taken_over.increment(1);
                            }
                            engine.spawn_run(claimed);
                        }
                    }
                    Err(err) => tracing::warn!(error = ?err, "cannot look for runs to take over"),
                }
                match engine
                    .store
                    .forget_expired_trigger_keys(EXPIRED_KEYS_PER_LOOK)
                    .await
                {
                    Ok(0) => {}
                    Ok(deleted) => tracing::debug!(deleted, "deleted expired idempotency keys"),
                    Err(err) => {
                        tracing::warn!(error = ?err, "cannot delete expired idempotency keys")
                    }
                }
                if let Some(retention) = engine.settings.history_retention {
                    engine.sweep_history(retention).await;
                }
            }
        });
    }
}
