//! What the caller of `TriggerRestock` knows of the restock (the product's name, a deep
//! link, the price): stored with the run and carried by every notification of it, so
//! whoever writes to the user need not look the product up again per message.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Error, Invalid};

/// A run's attributes: at most [`Attributes::MAX_ENTRIES`] entries, keys of 1 to
/// [`Attributes::MAX_KEY_LEN`] bytes, keys and values together at most
/// [`Attributes::MAX_TOTAL`] bytes.
///
/// Shared, not copied: every batch and notification of a run holds the same map, so a
/// run of a million users keeps one copy per instance, not one per notification. Keys
/// are sorted, so a notification delivered again (a resume, a hand-over) carries them in
/// the same order, and so does its webhook body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes(Arc<BTreeMap<String, String>>);

impl Attributes {
    /// The most entries: what a message needs (name, link, price, image, a few
    /// more), not a catalogue.
    pub const MAX_ENTRIES: usize = 32;
    /// The longest key, in bytes.
    pub const MAX_KEY_LEN: usize = 64;
    /// Every key and value together, in bytes: small enough that a batch of
    /// notifications stays small on the bus and in every stream.
    pub const MAX_TOTAL: usize = 4 * 1024;

    /// Validates attributes from the outside world.
    pub fn parse(raw: impl IntoIterator<Item = (String, String)>) -> Result<Self, Error> {
        let map: BTreeMap<String, String> = raw.into_iter().collect();
        let invalid = |why| Err(Error::InvalidArgument(why));
        if map.len() > Self::MAX_ENTRIES {
            return invalid(Invalid::TooManyAttributes(map.len()));
        }
        if let Some(key) = map
            .keys()
            .find(|key| key.is_empty() || key.len() > Self::MAX_KEY_LEN)
        {
            return invalid(Invalid::AttributeKey {
                len: key.len(),
                quoted: Invalid::quote(key),
            });
        }
        let total: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total > Self::MAX_TOTAL {
            return invalid(Invalid::AttributesTooLarge(total));
        }
        Ok(Self(Arc::new(map)))
    }

    /// Attributes another instance validated (on the bus): taken as they are, so a
    /// batch is never dropped for a limit it was held to already.
    pub fn validated(raw: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(Arc::new(raw.into_iter().collect()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// As stored with the run: a JSON object, or nothing when there are none.
    pub fn to_stored(&self) -> Option<String> {
        (!self.is_empty())
            .then(|| serde_json::to_string(&*self.0).expect("a map of strings serializes"))
    }

    /// Read back from the run's row. The service wrote it after validating it, so a
    /// value that does not parse is a fault of the store.
    pub fn from_stored(stored: Option<&str>) -> Result<Self, serde_json::Error> {
        match stored {
            None => Ok(Self::default()),
            Some(text) => Ok(Self(Arc::new(serde_json::from_str(text)?))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str) -> (String, String) {
        (key.to_string(), value.to_string())
    }

    fn invalid(result: Result<Attributes, Error>) -> Invalid {
        match result {
            Err(Error::InvalidArgument(why)) => why,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_limits_are_entries_key_length_and_total_size() {
        let at_most = (0..32).map(|i| entry(&format!("k{i}"), "v"));
        assert_eq!(Attributes::parse(at_most).unwrap().iter().count(), 32);
        let too_many = (0..33).map(|i| entry(&format!("k{i}"), "v"));
        assert_eq!(
            invalid(Attributes::parse(too_many)),
            Invalid::TooManyAttributes(33)
        );
        assert!(matches!(
            invalid(Attributes::parse([entry("", "v")])),
            Invalid::AttributeKey { len: 0, .. }
        ));
        assert!(Attributes::parse([entry(&"k".repeat(64), "v")]).is_ok());
        assert!(matches!(
            invalid(Attributes::parse([entry(&"k".repeat(65), "v")])),
            Invalid::AttributeKey { len: 65, .. }
        ));
        // Bytes, not characters: 4,096 in all is allowed, one more is not.
        assert!(Attributes::parse([entry("name", &"é".repeat(2046))]).is_ok());
        assert_eq!(
            invalid(Attributes::parse([
                entry("name", &"é".repeat(2046)),
                entry("x", "")
            ])),
            Invalid::AttributesTooLarge(4097)
        );
    }

    #[test]
    fn stored_as_a_json_object_and_read_back_alike() {
        let attributes =
            Attributes::parse([entry("name", "Blue \"mug\""), entry("price", "9.90")]).unwrap();
        let stored = attributes.to_stored().unwrap();
        assert_eq!(stored, r#"{"name":"Blue \"mug\"","price":"9.90"}"#);
        assert_eq!(Attributes::from_stored(Some(&stored)).unwrap(), attributes);
        assert_eq!(Attributes::default().to_stored(), None);
        assert!(Attributes::from_stored(None).unwrap().is_empty());
    }
}
