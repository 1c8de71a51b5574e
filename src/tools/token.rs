//! `token show` and `token orphans`: what is stored, for operators.

use std::io::Write as _;

use clap::Subcommand;

use crate::cli::Failure;
use crate::configuration::{DatabaseArgs, KeyArgs};
use crate::domain::{TenantId, rfc3339};

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
    /// Tokens the issuer handed out that never became a tenant's stored token (to revoke by jti).
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
    let Some((row, token)) = row.and_then(|r| r.token.clone().map(|t| (r, t))) else {
        return Err(Failure::new(
            3,
            anyhow::anyhow!("tenant {id} has no stored token"),
        ));
    };
    let revealed = match (&cipher, &token.sealed) {
        (Some(c), Some(sealed)) => Some(
            c.open(&id, sealed)
                .map_err(|e| anyhow::anyhow!("tenant {id}: {e}"))?,
        ),
        _ => None,
    };
    let mut out = std::io::stdout().lock();
    let issued_at = rfc3339(token.issued_at);
    let written = if json {
        let mut obj = serde_json::json!({
            "tenant_id": row.tenant_id,
            "container": row.container,
            "token_fingerprint": token.fingerprint,
            "issued_at": issued_at,
        });
        if let Some(t) = &revealed {
            obj["token"] = serde_json::Value::String(t.expose().to_owned());
        }
        writeln!(out, "{obj}")
    } else {
        let mut text = format!(
            "tenant:      {}\ncontainer:   {}\nfingerprint: {}\nissued_at:   {}\njti:         {}\nkey_id:      {}\n",
            row.tenant_id,
            row.container,
            token.fingerprint,
            issued_at,
            token.jti.as_deref().unwrap_or("-"),
            token.sealed.as_ref().map_or("-", |s| s.key_id.as_str()),
        );
        match &revealed {
            Some(t) => text.push_str(&format!("token:       {}\n", t.expose())),
            None => text.push_str("token:       (hidden; --reveal prints it)\n"),
        }
        out.write_all(text.as_bytes())
    };
    written.map_err(|e| anyhow::anyhow!("writing output: {e}"))?;
    Ok(0)
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
    for (t, at) in &orphans {
        if json {
            let line = serde_json::json!({
                "tenant_id": t.tenant_id,
                "container": t.container,
                "token_fingerprint": t.fingerprint,
                "jti": t.jti,
                "issued_at": rfc3339(*at),
            });
            text.push_str(&format!("{line}\n"));
        } else {
            text.push_str(&format!(
                "{}  {}  {}  jti={}  {}\n",
                rfc3339(*at),
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
