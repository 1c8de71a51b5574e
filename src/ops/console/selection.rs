//! Which dead letters a page shows or an action takes, as it travels in query strings and
//! forms: the same filters as the `dlq` commands, as text, parsed once into [`Filters`].

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::tools::dlq::{self, Filters, KINDS};

/// The filters of a page or an action, as text; empty means "not given".
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub(super) struct Selection {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) tenant: String,
    /// RFC 3339, or a duration meaning that long ago (as `--since`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) since: String,
    /// RFC 3339, or a duration meaning that long ago (as `--before`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) before: String,
    /// Text the error contains (as `--error-contains`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) error: String,
    /// The exact error of one group.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) error_is: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) id: String,
    /// `1`: act on every dead letter (as `--all`), required when nothing else selects.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) all: String,
}

impl Selection {
    /// The filters, or what is wrong with the text.
    pub(super) fn filters(&self) -> Result<Filters, String> {
        let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let kind = text(&self.kind);
        if let Some(k) = &kind
            && !KINDS.contains(&k.as_str())
        {
            return Err(format!("kind must be one of {}", KINDS.join(", ")));
        }
        let when = |s: &str, name: &str| -> Result<Option<OffsetDateTime>, String> {
            text(s)
                .map(|t| dlq::parse_when(&t).map_err(|e| format!("{name}: {e}")))
                .transpose()
        };
        Ok(Filters {
            kind,
            tenant: text(&self.tenant),
            since: when(&self.since, "since")?,
            before: when(&self.before, "before")?,
            error_contains: text(&self.error),
            error_is: (!self.error_is.is_empty()).then(|| self.error_is.clone()),
            id: text(&self.id),
            limit: None,
        })
    }

    /// Whether the operator chose every dead letter.
    pub(super) fn all(&self) -> bool {
        self.all == "1"
    }

    /// This selection with relative times (`2h`) turned into the times they mean now, so that
    /// a confirmed action takes the window the operator saw.
    pub(super) fn pinned(&self, filters: &Filters) -> Self {
        Self {
            since: dlq::rfc3339(filters.since).unwrap_or_default(),
            before: dlq::rfc3339(filters.before).unwrap_or_default(),
            ..self.clone()
        }
    }

    /// A selection of the dead letters that `filters` select with nothing else, or of all
    /// when they select nothing.
    pub(super) fn or_all(&self, filters: &Filters) -> Self {
        Self {
            all: if filters.selects() { "" } else { "1" }.to_owned(),
            ..self.clone()
        }
    }

    /// The query string (without `?`) that carries this selection.
    pub(super) fn query(&self) -> String {
        serde_urlencoded::to_string(self).unwrap_or_default()
    }

    /// The fields that are given, as `(name, value)`, for hidden form fields and for saying
    /// what an action will take.
    pub(super) fn given(&self) -> Vec<(&'static str, &str)> {
        [
            ("kind", &self.kind),
            ("tenant", &self.tenant),
            ("since", &self.since),
            ("before", &self.before),
            ("error", &self.error),
            ("error_is", &self.error_is),
            ("id", &self.id),
            ("all", &self.all),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k, v.as_str()))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_becomes_the_commands_filters() {
        let s = Selection {
            kind: "rejected".into(),
            since: "2h".into(),
            error_is: "issuer answered 400".into(),
            ..Default::default()
        };
        let f = s.filters().expect("valid");
        assert_eq!(f.kind.as_deref(), Some("rejected"));
        assert!(f.since.is_some());
        assert_eq!(f.error_is.as_deref(), Some("issuer answered 400"));
        assert!(f.selects());
        let pinned = s.pinned(&f);
        assert!(pinned.since.ends_with('Z'), "{}", pinned.since);
        assert!(pinned.query().contains("error_is=issuer+answered+400"));
        let bad = Selection {
            kind: "bogus".into(),
            ..Default::default()
        };
        assert!(bad.filters().is_err());
    }

    #[test]
    fn nothing_selected_means_all_only_when_asked() {
        let s = Selection::default();
        let f = s.filters().expect("valid");
        assert!(!f.selects());
        assert!(!s.all());
        assert!(s.or_all(&f).all());
    }
}
