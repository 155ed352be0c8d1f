//! Secrets kept out of messages and logs.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// A URL that may hold a password or a token (DATABASE_URL, REDIS_URL,
/// RESTOCK_WEBHOOK_URL). A secret is a type, not a convention: the whole URL is a
/// [`SecretString`], reached only through [`ExposeSecret`] where a connection is made,
/// and `Debug` and `Display` show it redacted, so it is safe in any log line.
#[derive(Clone)]
pub struct SecretUrl {
    secret: SecretString,
    /// The redacted form, made once.
    shown: String,
}

impl SecretUrl {
    /// A URL to connect to a store (database, Redis): shown without its password.
    pub fn connection(raw: impl Into<String>) -> Self {
        Self::shown_as(raw.into(), url)
    }

    /// A URL of an endpoint: shown without its credentials, query or fragment.
    pub fn endpoint(raw: impl Into<String>) -> Self {
        Self::shown_as(raw.into(), webhook_url)
    }

    fn shown_as(raw: String, redact: fn(&str) -> String) -> Self {
        Self {
            shown: redact(&raw),
            secret: raw.into(),
        }
    }
}

impl ExposeSecret<str> for SecretUrl {
    fn expose_secret(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.shown, f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// The URL without its password, for messages. The user and the rest are kept: they
/// tell an operator which server and account a message is about.
pub fn url(raw: &str) -> String {
    let Ok(mut url) = Url::parse(raw) else {
        return unparsed(raw);
    };
    if url.password().is_none() {
        return raw.to_string();
    }
    match url.set_password(Some("***")) {
        Ok(()) => url.into(),
        Err(()) => unparsed(raw),
    }
}

/// A webhook URL for logs: without its credentials, query string or fragment (a token
/// is often passed in one of them); the rest is kept, to tell endpoints apart.
pub fn webhook_url(raw: &str) -> String {
    let Ok(mut url) = Url::parse(raw) else {
        return unparsed(raw);
    };
    let had_query = url.query().is_some() || url.fragment().is_some();
    if (!url.username().is_empty() || url.password().is_some())
        && (url.set_password(None).is_err() || url.set_username("***").is_err())
    {
        return unparsed(raw);
    }
    url.set_query(None);
    url.set_fragment(None);
    let mut shown = String::from(url);
    if had_query {
        shown.push_str("?***");
    }
    shown
}

/// A setting that is not a URL the `url` crate reads: where its credentials or query
/// would be cannot be told, so all that follows the scheme is hidden, unless it has
/// none of the characters that would start them.
fn unparsed(raw: &str) -> String {
    if !raw.contains(['@', '?', '#']) {
        return raw.to_string();
    }
    match raw.split_once("://") {
        Some((scheme, _))
            if scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            format!("{scheme}://***")
        }
        _ => "***".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    #[test]
    fn a_secret_url_shows_only_its_redacted_form() {
        let url = super::SecretUrl::connection("mysql://u:hunter2@host/db");
        assert_eq!(format!("{url:?}"), "\"mysql://u:***@host/db\"");
        assert_eq!(url.to_string(), "mysql://u:***@host/db");
        assert_eq!(url.expose_secret(), "mysql://u:hunter2@host/db");
        let url = super::SecretUrl::endpoint("https://u:hunter2@hooks.example.com/in?t=x");
        assert_eq!(url.to_string(), "https://***@hooks.example.com/in?***");
        assert!(!format!("{url:?}").contains("hunter2"));
    }

    #[test]
    fn urls_lose_their_password_only() {
        for (raw, shown) in [
            (
                "mysql://u:hunter2@host:3306/db",
                "mysql://u:***@host:3306/db",
            ),
            ("rediss://:hunter2@host:6380", "rediss://:***@host:6380"),
            // An `@` in the password (percent-encoded by the parser) or in the path.
            ("mysql://u:hun@ter2@host/db", "mysql://u:***@host/db"),
            ("redis://host/0?x=a@b", "redis://host/0?x=a@b"),
            ("sqlite://restock.db", "sqlite://restock.db"),
            ("mysql://root@host/db", "mysql://root@host/db"),
            // Not a URL the parser reads (a bad port): nothing after the scheme is shown.
            ("mysql://u:hunter2@host:x/db", "mysql://***"),
            ("mysql://host:x/db", "mysql://host:x/db"),
        ] {
            assert_eq!(super::url(raw), shown, "{raw}");
        }
    }

    #[test]
    fn webhook_urls_lose_their_credentials_and_query() {
        for (raw, shown) in [
            (
                "https://user:pw@hooks.example.com/in?token=abc",
                "https://***@hooks.example.com/in?***",
            ),
            (
                "https://token@hooks.example.com/in#frag",
                "https://***@hooks.example.com/in?***",
            ),
            ("http://127.0.0.1:8080/hook", "http://127.0.0.1:8080/hook"),
            (
                "https://u:pw@hooks.example.com:x/in?token=abc",
                "https://***",
            ),
        ] {
            assert_eq!(super::webhook_url(raw), shown, "{raw}");
        }
    }
}
