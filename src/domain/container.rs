use std::fmt;

use sha2::{Digest, Sha256};

use super::{TenantId, TenantName};

/// A webtask container name: `^[a-z0-9][a-z0-9-]{0,62}$` (contract §5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerName(String);

impl ContainerName {
    /// The longest name a container may have.
    pub(crate) const MAX_LEN: usize = 63;

    /// Validates a stored or configured container name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-'));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(format!(
                "container name {raw:?} does not match ^[a-z0-9][a-z0-9-]{{0,62}}$"
            ))
        }
    }

    /// A name read back from our own database, where only parsed names are written.
    pub(crate) fn from_stored(s: String) -> Self {
        Self(s)
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a new tenant's container is named. Only used the first time: a stored tenant keeps
/// its container whatever later messages say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NamingStrategy {
    /// Readable, from the tenant's name (or id), plus a digest of the id: `acme-corp-3f9a12c0`.
    #[default]
    Derived,
    /// Random and unique: `t-` and 24 hex characters.
    Random,
}

/// Hex characters of the tenant id's digest appended to derived names. 8 hex = 32 bits; the
/// stored-container uniqueness constraint is the backstop for the astronomically rare clash.
const DIGEST_HEX: usize = 8;

impl NamingStrategy {
    /// The container name for a tenant that has none yet.
    pub(crate) fn name(self, id: &TenantId, name: Option<&TenantName>) -> ContainerName {
        match self {
            Self::Derived => derived(id, name),
            Self::Random => ContainerName(format!(
                "t-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..24]
            )),
        }
    }
}

fn derived(id: &TenantId, name: Option<&TenantName>) -> ContainerName {
    let digest = hex::encode(Sha256::digest(id.as_str().as_bytes()));
    let source = name.map(TenantName::as_str).filter(|n| !slug(n).is_empty());
    let base = slug(source.unwrap_or(id.as_str()));
    // Room for the base: 63 - '-' - digest.
    let room = ContainerName::MAX_LEN - 1 - DIGEST_HEX;
    let mut base: String = base.chars().take(room).collect();
    while base.ends_with('-') {
        base.pop();
    }
    let name = if base.is_empty() {
        format!("t-{}", &digest[..DIGEST_HEX])
    } else {
        format!("{base}-{}", &digest[..DIGEST_HEX])
    };
    ContainerName(name)
}

/// Lowercase `[a-z0-9]` runs joined by single dashes; everything else is a separator.
fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut dash = false;
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn id(s: &str) -> TenantId {
        TenantId::parse(s).expect("valid id")
    }

    fn valid(name: &ContainerName) -> bool {
        ContainerName::parse(name.as_str()).is_ok()
    }

    #[test]
    fn derived_names_read_like_the_tenant() {
        let n = NamingStrategy::Derived.name(
            &id("acme-42"),
            Some(&TenantName::parse("Acme Corp.").expect("name")),
        );
        assert!(n.as_str().starts_with("acme-corp-"), "{n}");
        assert_eq!(n.as_str().len(), "acme-corp-".len() + DIGEST_HEX);
        let from_id = NamingStrategy::Derived.name(&id("Shop_7"), None);
        assert!(from_id.as_str().starts_with("shop-7-"), "{from_id}");
    }

    #[test]
    fn unusable_names_fall_back_to_the_id() {
        let n = NamingStrategy::Derived
            .name(&id("abc"), Some(&TenantName::parse("日本").expect("name")));
        assert!(n.as_str().starts_with("abc-"), "{n}");
        let n =
            NamingStrategy::Derived.name(&id("z"), Some(&TenantName::parse("!!!").expect("name")));
        assert!(n.as_str().starts_with("z-"), "{n}");
        let n = NamingStrategy::Derived.name(&id("9:@"), None);
        assert!(n.as_str().starts_with("9-"), "{n}");
    }

    #[test]
    fn random_names_are_valid_and_differ() {
        let a = NamingStrategy::Random.name(&id("x"), None);
        let b = NamingStrategy::Random.name(&id("x"), None);
        assert!(valid(&a) && valid(&b));
        assert_ne!(a, b);
    }

    fn tenant_id() -> impl Strategy<Value = TenantId> {
        "[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}".prop_map(|s| id(&s))
    }

    proptest! {
        #[test]
        fn derived_names_match_the_charset(t in tenant_id(), name in proptest::option::of(".{0,256}")) {
            let name = name.and_then(|n| TenantName::parse(&n).ok());
            let c = NamingStrategy::Derived.name(&t, name.as_ref());
            prop_assert!(valid(&c), "{}", c);
        }

        #[test]
        fn derived_names_are_stable(t in tenant_id(), name in ".{0,64}") {
            let name = TenantName::parse(&name).ok();
            prop_assert_eq!(
                NamingStrategy::Derived.name(&t, name.as_ref()),
                NamingStrategy::Derived.name(&t, name.as_ref())
            );
        }

        #[test]
        fn random_names_match_the_charset(t in tenant_id()) {
            prop_assert!(valid(&NamingStrategy::Random.name(&t, None)));
        }
    }

    #[test]
    fn many_tenants_with_one_name_never_share_a_container() {
        let name = TenantName::parse("Same Name Inc").expect("name");
        let mut seen = HashSet::new();
        for i in 0..20_000 {
            let c = NamingStrategy::Derived.name(&id(&format!("tenant-{i}")), Some(&name));
            assert!(seen.insert(c), "collision at {i}");
        }
    }
}
