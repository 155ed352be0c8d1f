//! What a `TriggerRestock` asks for, and the idempotency key that makes a retry of it
//! harmless: a call with a key already used for the product within
//! [`IdempotencyKey::RETENTION`] returns the run that key started, as it is now, and
//! changes nothing.

use std::time::Duration;

use super::{Attributes, Error, Invalid, Wave};

/// A caller's name for one restock, sent again with every retry of it: 1 to
/// [`IdempotencyKey::MAX_LEN`] bytes, compared byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The longest key, in bytes (UTF-8): long enough for any UUID, ULID or
    /// `"<order>-<shipment>"` composite, short enough for a unique index.
    pub const MAX_LEN: usize = 255;

    /// How long a key is remembered. A retry comes seconds or minutes after the
    /// first call; a day covers a caller's retries across an outage of its own, as the
    /// notification services that offer this do, and bounds the table. An older key is
    /// a new one.
    pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

    /// Validates a key from the outside world.
    pub fn parse(raw: String) -> Result<Self, Error> {
        if raw.is_empty() {
            return Err(Error::InvalidArgument(Invalid::EmptyIdempotencyKey));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(Error::InvalidArgument(Invalid::IdempotencyKeyTooLong {
                len: raw.len(),
                quoted: Invalid::quote(&raw),
            }));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A request to start a product's next round. Named fields, so that a setting added to
/// the trigger travels to the store without touching every signature on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerRequest {
    /// Written first (as `SetStock` would), then checked.
    pub stock: Option<i64>,
    /// Makes a retry return the run the first call started.
    pub idempotency_key: Option<IdempotencyKey>,
    /// Notify in waves that follow the stock.
    pub wave: Option<Wave>,
    /// Stored with the run, and carried by each of its notifications.
    pub attributes: Attributes,
    /// The W3C `traceparent` of the call's span, when traces are exported: the run's
    /// spans link to it, on whichever instance drives the run.
    pub trace_parent: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_one_to_255_bytes() {
        assert_eq!(IdempotencyKey::parse("a".into()).unwrap().as_str(), "a");
        assert!(IdempotencyKey::parse("k".repeat(255)).is_ok());
        assert!(matches!(
            IdempotencyKey::parse(String::new()),
            Err(Error::InvalidArgument(Invalid::EmptyIdempotencyKey))
        ));
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        match IdempotencyKey::parse("é".repeat(128)) {
            Err(Error::InvalidArgument(Invalid::IdempotencyKeyTooLong { len, quoted })) => {
                assert_eq!(len, 256);
                assert!(quoted.len() <= Invalid::QUOTE_MAX + '…'.len_utf8());
            }
            other => panic!("{other:?}"),
        }
        assert!(IdempotencyKey::parse("é".repeat(127) + "a").is_ok());
    }
}
