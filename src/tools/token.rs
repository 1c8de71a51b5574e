//! `token show`, `token rotate` and `token orphans`: a tenant's tokens, for operators.

use std::io::Write as _;

use clap::Subcommand;

use crate::cli::Failure;
use crate::configuration::{DatabaseArgs, KeyArgs};
use crate::domain::{TenantId, TenantToken, rfc3339};
use crate::store::TenantRow;
use crate::store::revocations::{self, PastToken};
use serde_json::{Value, json};

/// `token ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// A tenant's stored token: metadata, and the token itself only with --reveal.
    Show {
        /// The tenant id.
        tenant: String,
        /// Print the token itself (needs TOKEN_ENCRYPTION_KEY).
        #[arg(long)]
        reveal: bool,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Ask the workers for a new token for a tenant (publishes tenant.token.rotate); the old
    /// one is revoked after ROTATION_GRACE, or at once with --now.
    Rotate(super::rotate::RotateArgs),
    /// Tokens the issuer handed out that never became a tenant's stored token, and the state
    /// of their revocation.
    Orphans {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// Runs a `token` command.
pub async fn run(command: TokenCommand) -> Result<u8, Failure> {
    match command {
        TokenCommand::Show {
            tenant,
            reveal,
            json,
            database,
            key,
        } => show(&tenant, reveal, json, &database, &key).await,
        TokenCommand::Rotate(args) => super::rotate::run(args).await,
        TokenCommand::Orphans { json, database } => orphans(json, &database).await,
    }
}

async fn show(
    tenant: &str,
    reveal: bool,
    json: bool,
    database: &DatabaseArgs,
    key: &KeyArgs,
) -> Result<u8, Failure> {
    let id = TenantId::parse(tenant).map_err(|e| Failure::new(2, anyhow::anyhow!(e)))?;
    let cipher = if reveal { Some(key.cipher()?) } else { None };
    let store = database.connect().await?;
    let row = store
        .tenant(id.as_str())
        .await
        .map_err(anyhow::Error::from)?;
    let Some(row) = row.filter(|r| r.token.is_some() || r.deleted_at.is_some()) else {
        return Err(Failure::new(
            3,
            anyhow::anyhow!("tenant {id} has no stored token"),
        ));
    };
    let past = revocations::of_tenant(store.pool(), id.as_str())
        .await
        .map_err(anyhow::Error::from)?;
    let revealed = match (&cipher, row.token.as_ref().and_then(|t| t.sealed.as_ref())) {
        (Some(c), Some(sealed)) => Some(
            c.open(&id, sealed)
                .map_err(|e| anyhow::anyhow!("tenant {id}: {e}"))?,
        ),
        _ => None,
    };
    let text = if json {
        format!("{}\n", show_json(&row, &past, revealed.as_ref()))
    } else {
        show_text(&row, &past, revealed.as_ref())
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("writing output: {e}"))?;
    Ok(0)
}

/// `token show --json`: one object (contract §9), with the generations and the tombstone.
fn show_json(row: &TenantRow, past: &[PastToken], revealed: Option<&TenantToken>) -> Value {
    let token = row.token.as_ref();
    let mut obj = json!({
        "tenant_id": row.tenant_id,
        "container": row.container,
        "token_fingerprint": token.map(|t| t.fingerprint.as_str()),
        "issued_at": token.map(|t| rfc3339(t.issued_at)),
        "jti": token.and_then(|t| t.jti.as_deref()),
        "generation": row.generation,
        "deleted_at": row.deleted_at.map(rfc3339),
        "past_tokens": past.iter().map(|p| json!({
            "generation": p.generation,
            "token_fingerprint": p.fingerprint,
            "jti": p.jti,
            "reason": p.reason,
            "revocation_due_at": rfc3339(p.due_at),
            "revoked_at": p.revoked_at.map(rfc3339),
            "revocation_attempts": p.attempts,
        })).collect::<Vec<_>>(),
    });
    if let Some(t) = revealed {
        obj["token"] = Value::String(t.expose().to_owned());
    }
    obj
}

/// `token show`: the current token, then its predecessors and their revocation state.
fn show_text(row: &TenantRow, past: &[PastToken], revealed: Option<&TenantToken>) -> String {
    let mut text = format!(
        "tenant:      {}\ncontainer:   {}\n",
        row.tenant_id, row.container
    );
    if let Some(at) = row.deleted_at {
        text.push_str(&format!(
            "deleted_at:  {} (tombstone: no token)\n",
            rfc3339(at)
        ));
    }
    if let Some(t) = &row.token {
        text.push_str(&format!(
            "generation:  {}\nfingerprint: {}\nissued_at:   {}\njti:         {}\nkey_id:      {}\n",
            row.generation,
            t.fingerprint,
            rfc3339(t.issued_at),
            t.jti.as_deref().unwrap_or("-"),
            t.sealed.as_ref().map_or("-", |s| s.key_id.as_str()),
        ));
        match revealed {
            Some(t) => text.push_str(&format!("token:       {}\n", t.expose())),
            None => text.push_str("token:       (hidden; --reveal prints it)\n"),
        }
    }
    for p in past {
        let state = match p.revoked_at {
            Some(at) => format!("revoked {}", rfc3339(at)),
            None if p.attempts > 0 => format!(
                "revocation due {}, {} failed calls, last: {}",
                rfc3339(p.due_at),
                p.attempts,
                p.last_error.as_deref().unwrap_or("-")
            ),
            None => format!("revocation due {}", rfc3339(p.due_at)),
        };
        text.push_str(&format!(
            "generation {} ({}): {}  jti={}  {state}\n",
            p.generation,
            p.reason,
            p.fingerprint,
            p.jti.as_deref().unwrap_or("-")
        ));
    }
    text
}

async fn orphans(json: bool, database: &DatabaseArgs) -> Result<u8, Failure> {
    let store = database.connect().await?;
    let orphans = crate::store::orphaned_tokens(store.pool())
        .await
        .map_err(anyhow::Error::from)?;
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    if !json {
        text.push_str(&format!("{} orphaned token(s)\n", orphans.len()));
    }
    for t in &orphans {
        let state = match (t.revoked_at, t.revocation_due_at) {
            (Some(at), _) => format!("revoked {}", rfc3339(at)),
            (None, Some(_)) => format!(
                "revocation pending ({} failed calls)",
                t.revocation_attempts
            ),
            (None, None) => "not yet due".to_owned(),
        };
        if json {
            let line = serde_json::json!({
                "tenant_id": t.tenant_id,
                "container": t.container,
                "token_fingerprint": t.fingerprint,
                "jti": t.jti,
                "issued_at": rfc3339(t.issued_at),
                "revocation_due_at": t.revocation_due_at.map(rfc3339),
                "revoked_at": t.revoked_at.map(rfc3339),
                "revocation_attempts": t.revocation_attempts,
            });
            text.push_str(&format!("{line}\n"));
        } else {
            text.push_str(&format!(
                "{}  {}  {}  jti={}  {}  {state}\n",
                rfc3339(t.issued_at),
                t.tenant_id,
                t.container,
                t.jti.as_deref().unwrap_or("-"),
                t.fingerprint
            ));
        }
    }
    out.write_all(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("writing output: {e}"))?;
    Ok(0)
}
