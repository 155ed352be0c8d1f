//! Secrets kept out of messages and logs.

/// The URL without its password, for messages.
pub fn url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A webhook URL for logs: without its credentials, query string or fragment (a token
/// is often passed in one of them); the rest is kept, to tell endpoints apart.
pub fn webhook_url(url: &str) -> String {
    let cut = url.find(['?', '#']).unwrap_or(url.len());
    let mut shown = url[..cut].to_string();
    if let Some(scheme) = shown.find("://") {
        let authority_end = shown[scheme + 3..]
            .find('/')
            .map_or(shown.len(), |slash| scheme + 3 + slash);
        if let Some(at) = shown[..authority_end].rfind('@') {
            shown.replace_range(scheme + 3..=at, "***@");
        }
    }
    if cut < url.len() {
        shown.push_str("?***");
    }
    shown
}

#[cfg(test)]
mod tests {
    #[test]
    fn webhook_urls_lose_their_credentials_and_query() {
        assert_eq!(
            super::webhook_url("https://user:pw@hooks.example.com/in?token=abc"),
            "https://***@hooks.example.com/in?***"
        );
        assert_eq!(
            super::webhook_url("http://127.0.0.1:8080/hook"),
            "http://127.0.0.1:8080/hook"
        );
    }
}
