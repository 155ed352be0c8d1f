//! What a webhook request carries: the Standard Webhooks body of a notification, and
//! its signatures (`v1,` base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`, one per
//! secret, so a receiver can rotate its secret without missing a request).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, Mac as _};
use secrecy::{ExposeSecret as _, SecretSlice, SecretString};
use sha2::Sha256;

use crate::domain::Notification;

/// The bytes a secret must decode to: Standard Webhooks asks for 24 to 64.
const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// The prefix of a secret, as Standard Webhooks and Svix write it.
const PREFIX: &str = "whsec_";

/// Why `RESTOCK_WEBHOOK_SECRET` was refused. Never holds any part of the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("is empty; set one or more whsec_<base64> secrets separated by spaces")]
    Empty,
    #[error("secret {0} does not start with whsec_")]
    NoPrefix(usize),
    #[error("secret {0} is not valid base64 after whsec_")]
    NotBase64(usize),
    #[error("secret {index} decodes to {len} bytes; it must be 24 to 64")]
    Length { index: usize, len: usize },
}

/// The signing keys, decoded from `RESTOCK_WEBHOOK_SECRET`. Each is a secrecy
/// `SecretSlice`, so `Debug` shows how many, never what.
#[derive(Clone, Debug)]
pub struct SigningKeys(Vec<SecretSlice<u8>>);

impl SigningKeys {
    /// Parses one or more space-separated `whsec_<base64>` secrets. Errors name the
    /// secret by its place in the list (1 is the first), never by its text.
    pub fn parse(secret: &SecretString) -> Result<Self, SecretError> {
        let mut keys = Vec::new();
        for (index, part) in secret.expose_secret().split_whitespace().enumerate() {
            let index = index + 1;
            let encoded = part
                .strip_prefix(PREFIX)
                .ok_or(SecretError::NoPrefix(index))?;
            let key = BASE64
                .decode(encoded)
                .map_err(|_| SecretError::NotBase64(index))?;
            if !KEY_BYTES.contains(&key.len()) {
                return Err(SecretError::Length {
                    index,
                    len: key.len(),
                });
            }
            keys.push(SecretSlice::from(key));
        }
        if keys.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self(keys))
    }

    /// The `webhook-signature` header: `v1,<base64>` for each key, space-separated.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut header = String::new();
        for key in &self.0 {
            let mut mac = Hmac::<Sha256>::new_from_slice(key.expose_secret())
                .expect("HMAC takes a key of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            if !header.is_empty() {
                header.push(' ');
            }
            header.push_str("v1,");
            header.push_str(&BASE64.encode(mac.finalize().into_bytes()));
        }
        header
    }
}

/// The body of a notification's request: the event envelope of Standard Webhooks with
/// the `Notification` in the proto3 JSON mapping (as grpcurl prints it: camelCase,
/// int64 as strings, the timestamp in RFC 3339). Built once per delivery and sent
/// unchanged by every attempt, so only `webhook-timestamp` and the signatures differ
/// between retries.
pub fn body(notification: &Notification) -> Bytes {
    let sent_at = notification
        .sent_at
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let id = notification.id;
    let mut data = serde_json::json!({
        "notificationId": id.to_string(),
        "productId": id.product_id.get().to_string(),
        "userId": id.user_id.get().to_string(),
        "restockRound": id.restock_round.to_string(),
        "sentAt": sent_at,
        "message": notification.message(),
    });
    // As the proto3 JSON mapping prints a map: an object, left out when empty.
    if !notification.attributes.is_empty() {
        data["attributes"] = notification
            .attributes
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    let value = serde_json::json!({
        "type": "restock.notification",
        "timestamp": sent_at,
        "data": data,
    });
    Bytes::from(serde_json::to_vec(&value).expect("a JSON value always serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(raw: &str) -> SecretString {
        SecretString::from(raw.to_string())
    }

    #[test]
    fn signs_as_the_standard_webhooks_reference_does() {
        // The example of the Standard Webhooks specification's reference libraries.
        let keys = SigningKeys::parse(&secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            keys.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn signs_with_every_secret() {
        let one = "whsec_".to_string() + &BASE64.encode([1u8; 32]);
        let two = "whsec_".to_string() + &BASE64.encode([2u8; 24]);
        let keys = SigningKeys::parse(&secret(&format!("{one} {two}"))).unwrap();
        let header = keys.signature("1-1-1", 1, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.split(' ').all(|s| s.starts_with("v1,")));
    }

    #[test]
    fn refuses_malformed_secrets_without_quoting_them() {
        let short = "whsec_".to_string() + &BASE64.encode([1u8; 23]);
        let long = "whsec_".to_string() + &BASE64.encode([1u8; 65]);
        let cases = [
            ("", SecretError::Empty),
            ("   ", SecretError::Empty),
            ("sk_abcdef", SecretError::NoPrefix(1)),
            ("whsec_!!notbase64!!", SecretError::NotBase64(1)),
            (short.as_str(), SecretError::Length { index: 1, len: 23 }),
            (long.as_str(), SecretError::Length { index: 1, len: 65 }),
        ];
        for (raw, expected) in cases {
            let err = SigningKeys::parse(&secret(raw)).unwrap_err();
            assert_eq!(err, expected, "{raw}");
            assert!(raw.trim().is_empty() || !err.to_string().contains(raw));
        }
        let keys = SigningKeys::parse(&secret(&("whsec_".to_string() + &BASE64.encode([7u8; 64]))))
            .unwrap();
        let debug = format!("{keys:?}");
        assert!(
            !debug.contains("whsec") && debug.contains("REDACTED"),
            "{debug}"
        );
    }
}
