//! Who may act: reading the console needs nothing (it listens on loopback by default), but a
//! replay or a purge needs `OPS_TOKEN`, typed into the confirmation form (or sent as
//! `Authorization: Bearer`), and must come from the console's own pages.
//!
//! The token in the form is what defeats cross-site request forgery: another site can make a
//! browser post to the console, but it cannot know the token. The `Origin` and
//! `Sec-Fetch-Site` checks refuse such posts before the token is even looked at. No cookie
//! is ever set, so there is no ambient credential to abuse.

use axum::http::{HeaderMap, StatusCode, header};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};

/// Why an action was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The worker has no `OPS_TOKEN`: the console is read-only.
    NoTokenConfigured,
    /// No token, or not the right one.
    WrongToken,
    /// The request came from another site (or says nothing trustworthy about where from).
    CrossSite,
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub(super) fn status(self) -> StatusCode {
        match self {
            Self::WrongToken => StatusCode::UNAUTHORIZED,
            Self::NoTokenConfigured | Self::CrossSite => StatusCode::FORBIDDEN,
        }
    }

    /// What the operator reads.
    pub(super) fn explain(self) -> &'static str {
        match self {
            Self::NoTokenConfigured => {
                "Actions are disabled: the worker has no OPS_TOKEN, so the console is read-only."
            }
            Self::WrongToken => "The ops token is missing or wrong; nothing was done.",
            Self::CrossSite => {
                "The request did not come from this console's own pages; nothing was done."
            }
        }
    }
}

/// Allows an action when it comes from the console itself and carries the token, from the
/// form (`form_token`) or an `Authorization: Bearer` header.
pub(super) fn permit(
    configured: Option<&SecretString>,
    headers: &HeaderMap,
    form_token: &str,
) -> Result<(), Refusal> {
    let configured = configured.ok_or(Refusal::NoTokenConfigured)?;
    if !same_origin(headers) {
        return Err(Refusal::CrossSite);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer.unwrap_or(form_token);
    if given.is_empty() || !same_secret(given, configured.expose_secret()) {
        return Err(Refusal::WrongToken);
    }
    Ok(())
}

/// Whether the browser says the request comes from the console's own origin. A request
/// without `Origin` and `Sec-Fetch-Site` (curl, a script) is not a browser's cross-site
/// request and is left to the token.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, a)| a);
    // Behind a proxy the browser's host is the proxy's, which the proxy forwards.
    let host = text("x-forwarded-host").or_else(|| text(header::HOST.as_str()));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

/// Compares two secrets in time that does not depend on where they differ (their SHA-256
/// digests, byte by byte, without stopping early).
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn actions_need_a_configured_token_and_the_right_one() {
        let token = SecretString::from("s3cret-token".to_owned());
        let same = headers(&[
            ("host", "127.0.0.1:9400"),
            ("origin", "http://127.0.0.1:9400"),
        ]);
        assert_eq!(
            permit(None, &same, "s3cret-token"),
            Err(Refusal::NoTokenConfigured)
        );
        assert_eq!(permit(Some(&token), &same, ""), Err(Refusal::WrongToken));
        assert_eq!(
            permit(Some(&token), &same, "s3cret"),
            Err(Refusal::WrongToken)
        );
        assert_eq!(permit(Some(&token), &same, "s3cret-token"), Ok(()));
        let bearer = headers(&[("authorization", "Bearer s3cret-token")]);
        assert_eq!(permit(Some(&token), &bearer, ""), Ok(()));
    }

    #[test]
    fn cross_site_posts_are_refused_even_with_the_token() {
        let token = SecretString::from("s3cret-token".to_owned());
        for h in [
            headers(&[
                ("host", "127.0.0.1:9400"),
                ("origin", "https://evil.example"),
            ]),
            headers(&[("host", "127.0.0.1:9400"), ("origin", "null")]),
            headers(&[("host", "127.0.0.1:9400"), ("sec-fetch-site", "cross-site")]),
            headers(&[("host", "127.0.0.1:9400"), ("sec-fetch-site", "same-site")]),
        ] {
            assert_eq!(
                permit(Some(&token), &h, "s3cret-token"),
                Err(Refusal::CrossSite),
                "{h:?}"
            );
        }
        let proxied = headers(&[
            ("host", "127.0.0.1:9400"),
            ("x-forwarded-host", "ops.example.com"),
            ("origin", "https://ops.example.com"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(permit(Some(&token), &proxied, "s3cret-token"), Ok(()));
    }
}
