use std::fmt;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// A tenant's webtask token. The text is only reachable through [`TenantToken::expose`], and
/// `Debug` prints a fingerprint, so the token cannot leak into logs or errors by accident.
#[derive(Clone)]
pub struct TenantToken(SecretString);

impl TenantToken {
    /// Wraps the issuer's answer, trimmed; `None` when nothing token-like is left.
    ///
    /// A token is a non-empty run of visible ASCII without white space (a JWT is three
    /// base64url parts): anything else is an issuer fault, not a token.
    pub fn parse(raw: &str) -> Option<Self> {
        let t = raw.trim();
        let ok = !t.is_empty() && t.len() <= 16 * 1024 && t.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self(SecretString::from(t.to_owned())))
    }

    /// The token text, for the one place that must have it (encryption, `--reveal`).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The first 16 hex characters of SHA-256 of the token: safe to log and publish.
    pub fn fingerprint(&self) -> TokenFingerprint {
        let d = Sha256::digest(self.expose().as_bytes());
        TokenFingerprint(hex::encode(&d[..8]))
    }

    /// The `jti` claim of the JWT payload, read without verifying the signature; it is stored
    /// so that the token can be revoked later.
    pub fn jti(&self) -> Option<String> {
        let payload = self.expose().split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let jti = claims.get("jti")?.as_str()?;
        // Stored as Postgres `text` and shown to operators: no control characters (a NUL
        // would make the token unstorable), bounded length.
        let fits = !jti.is_empty() && jti.len() <= 256 && !jti.chars().any(char::is_control);
        fits.then(|| jti.to_owned())
    }
}

impl fmt::Debug for TenantToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantToken({})", self.fingerprint())
    }
}

/// A token's public fingerprint (16 hex characters).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenFingerprint(String);

impl TokenFingerprint {
    /// The fingerprint as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(br#"{"alg":"HS256"}"#),
            e.encode(payload)
        )
    }

    #[test]
    fn trims_and_rejects_non_tokens() {
        assert_eq!(
            TenantToken::parse("  abc.def.ghi\n").map(|t| t.expose().to_owned()),
            Some("abc.def.ghi".into())
        );
        assert!(TenantToken::parse("   ").is_none());
        assert!(TenantToken::parse("<html> error </html>").is_none());
    }

    #[test]
    fn reads_the_jti_unverified() {
        let t = TenantToken::parse(&jwt(r#"{"ten":"c","jti":"abc123"}"#)).expect("token");
        assert_eq!(t.jti().as_deref(), Some("abc123"));
        let no = TenantToken::parse(&jwt(r#"{"ten":"c"}"#)).expect("token");
        assert_eq!(no.jti(), None);
        assert_eq!(TenantToken::parse("opaque").expect("token").jti(), None);
    }

    #[test]
    fn a_jti_that_postgres_text_cannot_hold_is_not_kept() {
        let nul = TenantToken::parse(&jwt(r#"{"ten":"c","jti":"a\u0000b"}"#)).expect("token");
        assert_eq!(nul.jti(), None);
        let long = format!(r#"{{"jti":"{}"}}"#, "j".repeat(257));
        assert_eq!(TenantToken::parse(&jwt(&long)).expect("token").jti(), None);
    }

    #[test]
    fn debug_shows_only_the_fingerprint() {
        let t = TenantToken::parse("very-secret-token").expect("token");
        let d = format!("{t:?}");
        assert!(!d.contains("very-secret"));
        assert_eq!(t.fingerprint().as_str().len(), 16);
    }
}
