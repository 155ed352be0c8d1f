//! "Why was (or wasn't) this user notified?": an alert's place in its product's queue,
//! its last notification, and what the product's latest round did with it.

use chrono::{DateTime, Utc};

use super::{Alert, RunStatus};

/// What the latest round of a product did with one alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertOutcome {
    /// The user was notified in that round.
    Notified,
    /// The round is in progress and has not reached the user yet.
    Pending,
    /// The round ended (sold out, or failed) before it reached the user.
    NotReached,
    /// The alert was registered, or registered again, after the round started: it is
    /// behind the round's queue, and waits for the next one.
    RegisteredAfter,
    /// The alert was cancelled before the round reached it.
    Inactive,
}

/// What is known of an alert and of the product's latest round, to decide its outcome.
#[derive(Debug, Clone, Copy)]
pub struct RoundFacts {
    pub notified_in_round: bool,
    pub alert_active: bool,
    /// The alert's place in the queue (registration order).
    pub alert_position: i64,
    /// The last place in the queue when the round started; `None` for rounds started
    /// before it was kept.
    pub round_queue_end: Option<i64>,
    pub round_status: RunStatus,
}

impl AlertOutcome {
    /// The outcome the facts give, the first that applies: notified; registered after
    /// the round started (its place is behind the round's queue); cancelled; not
    /// reached yet (in progress); not reached (the round ended).
    pub fn of(facts: RoundFacts) -> Self {
        if facts.notified_in_round {
            return AlertOutcome::Notified;
        }
        if facts
            .round_queue_end
            .is_some_and(|end| facts.alert_position > end)
        {
            return AlertOutcome::RegisteredAfter;
        }
        if !facts.alert_active {
            return AlertOutcome::Inactive;
        }
        match facts.round_status {
            RunStatus::InProgress => AlertOutcome::Pending,
            _ => AlertOutcome::NotReached,
        }
    }
}

/// An alert, where it stands, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertStatus {
    pub alert: Alert,
    /// 1-based among the product's active alerts in registration order; 0 if inactive.
    pub position: i64,
    /// Active alerts ahead of it.
    pub users_ahead: i64,
    /// The last round that notified the user, and when.
    pub last_notified: Option<(i64, DateTime<Utc>)>,
    /// The product's latest round and what it did with the alert.
    pub latest_round: Option<(i64, AlertOutcome)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(notified: bool, active: bool, position: i64, status: RunStatus) -> RoundFacts {
        RoundFacts {
            notified_in_round: notified,
            alert_active: active,
            alert_position: position,
            round_queue_end: Some(10),
            round_status: status,
        }
    }

    #[test]
    fn each_outcome_comes_from_its_facts() {
        use AlertOutcome::*;
        use RunStatus::*;
        let cases = [
            (facts(true, false, 12, CanceledBySoldOut), Notified),
            (facts(false, true, 11, InProgress), RegisteredAfter),
            (facts(false, false, 11, Completed), RegisteredAfter),
            (facts(false, false, 5, InProgress), Inactive),
            (facts(false, true, 5, InProgress), Pending),
            (facts(false, true, 5, CanceledBySoldOut), NotReached),
            (facts(false, true, 5, CanceledByError), NotReached),
        ];
        for (facts, outcome) in cases {
            assert_eq!(AlertOutcome::of(facts), outcome, "{facts:?}");
        }
    }
}
