use std::fmt;

/// A tenant's id: 1 to 128 characters of `^[A-Za-z0-9][A-Za-z0-9._:@-]*$` (contract §3).
///
/// Holding one proves the id was checked, so names, keys and SQL never see a bad id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// The longest id the contract allows.
    pub(crate) const MAX_LEN: usize = 128;

    /// Validates `raw` as a tenant id; the error says what is wrong, without echoing long input.
    ///
    /// ```
    /// use tenant_tokens::domain::TenantId;
    /// assert_eq!(TenantId::parse("acme-42").map(|t| t.to_string()), Ok("acme-42".to_owned()));
    /// assert!(TenantId::parse("-acme").is_err());
    /// ```
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("tenant_id is empty".into());
        }
        if raw.chars().count() > Self::MAX_LEN {
            return Err(format!(
                "tenant_id is longer than {} characters",
                Self::MAX_LEN
            ));
        }
        let mut chars = raw.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "._:@-".contains(c));
        if !(first_ok && rest_ok) {
            return Err(
                "tenant_id must match ^[A-Za-z0-9][A-Za-z0-9._:@-]*$ (letters, digits and ._:@- , not starting with punctuation)"
                    .into(),
            );
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant's display name, at most 256 characters; used only to derive a readable container
/// name and stored beside the tenant for operators.
///
/// JSON can carry U+0000 in a string, but a Postgres `text` column cannot hold it, so the name
/// is decided here, at the edge: NUL characters are dropped (the container name, made of
/// `[a-z0-9-]`, never had them anyway). Every other character is storable as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantName(String);

impl TenantName {
    /// The longest name the contract allows.
    pub(crate) const MAX_LEN: usize = 256;

    /// Validates the length of a tenant name and drops what Postgres cannot store (U+0000).
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.chars().count() > Self::MAX_LEN {
            return Err(format!(
                "tenant_name is longer than {} characters",
                Self::MAX_LEN
            ));
        }
        Ok(Self(raw.replace('\0', "")))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_contract_alphabet() {
        for ok in ["a", "acme-42", "A.b_c:d@e-f", &"x".repeat(128)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "-a", ".a", "a b", "a/b", "ä", &"x".repeat(129), "a\n"] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_drop_what_postgres_text_cannot_hold() {
        let name = TenantName::parse("Ac\0me\0").expect("valid");
        assert_eq!(name.as_str(), "Acme");
    }

    #[test]
    fn names_are_bounded() {
        assert!(TenantName::parse(&"n".repeat(256)).is_ok());
        assert!(TenantName::parse(&"n".repeat(257)).is_err());
    }
}
