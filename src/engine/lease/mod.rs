//! Run ownership (G8): a run is owned by one instance at a time through a lease in the
//! database, with a fencing token (the claim). The owner renews the lease with every
//! record; [`LeaseKeeper`], held by the run's recorder alone (every record goes through
//! it), tells it when it must stop sending because the lease could run out;
//! [`takeover`] is the loop that claims runs whose lease ran out, from a dead
//! instance or one that released them on shutdown.
//!
//! The lease lives in the database in both deployments (`Store::take_over_expired`,
//! `Store::record`): there is no second implementation because the database is the
//! source of truth for who owns a run, and every write of an owner is conditional on
//! its claim and on its lease not having run out.

pub mod takeover;

use std::time::Duration;

use tokio::time::Instant;

/// Settings of run ownership.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// How long an owner may go without renewing before another instance may take the
    /// run (`RESTOCK_RUN_LEASE`, 10 s by default).
    pub lease: Duration,
    /// How often each instance looks for runs to take over: [`TAKEOVER_INTERVAL`], or
    /// half the lease if that is shorter, so a run whose lease ran out waits at most
    /// half a lease more.
    pub takeover_interval: Duration,
}

/// How often each instance looks for runs to take over, at most. A second: a run
/// released on SIGTERM is continued elsewhere within about that time (G8), and the
/// query is one range on an index.
pub const TAKEOVER_INTERVAL: Duration = Duration::from_secs(1);

/// `RESTOCK_RUN_LEASE`'s default (G8): long enough that a database or Redis hiccup of a
/// few seconds is ridden out without a takeover, short enough that a dead instance's
/// runs continue within seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

impl LeaseSettings {
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            takeover_interval: TAKEOVER_INTERVAL.min(lease / 2),
        }
    }

    /// These settings for a lease of `lease`; a takeover interval already shorter than
    /// that lease asks for (a test's) stays.
    pub fn with_lease(self, lease: Duration) -> Self {
        let derived = Self::new(lease);
        Self {
            takeover_interval: self.takeover_interval.min(derived.takeover_interval),
            ..derived
        }
    }

    /// A waiting run renews its lease this often (every record renews it too): a third
    /// of the lease, so two renewals can fail before it runs out.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// How long before the lease runs out the owner stops sending: a fifth of the
    /// lease. The owner measures from the moment it *started* the renewing write, so
    /// its idea of the deadline is never later than the database's.
    pub fn stop_margin(&self) -> Duration {
        self.lease / 5
    }
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self::new(DEFAULT_LEASE)
    }
}

/// The owner's side of a lease: when it was last renewed, and so until when it may send.
#[derive(Debug)]
pub struct LeaseKeeper {
    settings: LeaseSettings,
    /// When the write that last renewed the lease started.
    renewed: Instant,
}

impl LeaseKeeper {
    /// A lease just granted by a claim that started at `claimed`.
    pub fn new(settings: LeaseSettings, claimed: Instant) -> Self {
        Self {
            settings,
            renewed: claimed,
        }
    }

    /// A renewing write that started at `started` has committed.
    pub fn renewed(&mut self, started: Instant) {
        self.renewed = self.renewed.max(started);
    }

    /// The instant after which this owner must not send (G8): the lease runs out a
    /// margin later, and only then may another instance take the run.
    pub fn send_deadline(&self) -> Instant {
        self.renewed + self.settings.lease - self.settings.stop_margin()
    }

    pub fn may_send(&self) -> bool {
        Instant::now() < self.send_deadline()
    }

    pub fn renewal_due(&self) -> bool {
        self.renewed.elapsed() >= self.settings.renew_every()
    }

    pub fn lease(&self) -> Duration {
        self.settings.lease
    }
}
