//! `tenant-tokens rekey`: re-encrypts every stored token (the tenants' current tokens, the
//! superseded ones waiting for revocation, and the journal's) with the current key, so a
//! retired key can be dropped from `TOKEN_DECRYPTION_KEYS` (see `docs/keys.md`).
//!
//! It runs beside the workers: each batch is one short transaction that claims rows with
//! `FOR UPDATE SKIP LOCKED` ([`crate::store::sealed`]), opens each token with its old key,
//! checks it against the stored fingerprint, seals it with the current key, opens the new
//! ciphertext again and compares, and commits. No token changes, only its encryption. A kill
//! loses nothing: committed batches are done, the rest still holds the old key, and a rerun
//! picks up what is not on the current key yet. Rows skipped because a worker held them are
//! taken by a later pass. Exit status: 0 every row is on the current key; 1 some rows name a
//! key that is not configured (listed with their counts), did not decrypt, or stayed locked;
//! 2 configuration error.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use crate::cli::Failure;
use crate::configuration::{DatabaseArgs, KeyArgs, parse_duration};
use crate::crypto::{CryptoError, Sealed, TokenCipher};
use crate::domain::TenantId;
use crate::store::sealed::{self, Claim, Holder, SealedRow};
use crate::store::{Store, StoreError};

/// Passes over the tables before giving up on rows that keep appearing with an old key.
const MAX_PASSES: u32 = 10;
/// How long rows that workers hold may keep a pass from finishing.
const LOCKED_PATIENCE: Duration = Duration::from_secs(60);

/// `tenant-tokens rekey`.
#[derive(clap::Args, Debug)]
pub(crate) struct RekeyArgs {
    /// Rows per transaction (each batch is committed on its own).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    batch_size: i64,
    /// Count the rows to rekey, by table and key id, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Pause between batches, to spare a busy database (e.g. `50ms`).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pause: Duration,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    key: KeyArgs,
}

/// Why one row was left as it was. Names the row, never the token.
#[derive(Debug, thiserror::Error)]
enum RowError {
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    #[error("the stored tenant id is not valid: {0}")]
    Tenant(String),
    #[error("the decrypted token does not match the stored fingerprint")]
    Fingerprint,
    #[error("the new ciphertext does not decrypt to the same token")]
    RoundTrip,
}

/// What the run did and found.
#[derive(Default)]
struct Tally {
    /// Rows moved to the current key, by holder.
    rekeyed: BTreeMap<&'static str, u64>,
    /// Rows left alone: holder, primary key, tenant, why.
    failed: Vec<(Holder, String, String, String)>,
}

impl Tally {
    fn total(&self) -> u64 {
        self.rekeyed.values().sum()
    }

    fn skip(&self, holder: Holder) -> Vec<String> {
        self.failed
            .iter()
            .filter(|f| f.0 == holder)
            .map(|f| f.1.clone())
            .collect()
    }
}

/// Runs `rekey`.
pub(crate) async fn run(args: RekeyArgs) -> Result<u8, Failure> {
    let cipher = args.key.cipher()?;
    let store = args.database.connect().await?;
    let census = Census::take(&store, &cipher)
        .await
        .map_err(anyhow::Error::from)?;
    let plan = format!(
        "{} token(s) to rekey to key {}{}\n",
        census.known_total(),
        cipher.current_key_id(),
        by_holder(&census.known_by_holder())
    );
    write(&plan)?;
    if args.dry_run {
        return Ok(census.report_missing());
    }
    let started = Instant::now();
    let mut progress = Progress::new(census.known_total());
    let tally = rekey_all(&store, &cipher, &args, &mut progress).await?;
    progress.finish();
    let summary = format!(
        "rekeyed {} token(s) to key {} in {:.1?}{}\n",
        tally.total(),
        cipher.current_key_id(),
        started.elapsed(),
        by_holder(&tally.rekeyed)
    );
    write(&summary)?;
    let after = Census::take(&store, &cipher)
        .await
        .map_err(anyhow::Error::from)?;
    let mut code = after.report_missing();
    for (holder, _, tenant, why) in &tally.failed {
        eprintln!(
            "error: a {} token of tenant {tenant} was left as it was: {why}",
            holder.label()
        );
        code = 1;
    }
    let locked = after
        .known_total()
        .saturating_sub(tally.failed.len() as u64);
    if locked > 0 {
        eprintln!(
            "error: {locked} token(s) are still sealed with a retired key: rows held by workers \
             for over {LOCKED_PATIENCE:?}, or workers still seal new tokens with a retired key \
             (every worker must run with the same TOKEN_ENCRYPTION_KEY); run rekey again"
        );
        code = 1;
    }
    Ok(code)
}

/// Passes over every holder until no row with a configured retired key is left (rows that
/// failed aside), a pass makes no progress for [`LOCKED_PATIENCE`], or [`MAX_PASSES`].
async fn rekey_all(
    store: &Store,
    cipher: &TokenCipher,
    args: &RekeyArgs,
    progress: &mut Progress,
) -> anyhow::Result<Tally> {
    let retired: Vec<String> = cipher
        .key_ids()
        .into_iter()
        .filter(|id| id != cipher.current_key_id())
        .collect();
    let mut tally = Tally::default();
    let mut idle_since: Option<Instant> = None;
    let mut wait = Duration::from_millis(100);
    for _ in 0..MAX_PASSES {
        let before = tally.total() + tally.failed.len() as u64;
        for holder in Holder::ALL {
            rekey_holder(store, cipher, args, holder, &retired, &mut tally, progress).await?;
        }
        let left = Census::take(store, cipher).await?.known_total();
        if left <= tally.failed.len() as u64 {
            break;
        }
        if tally.total() + tally.failed.len() as u64 > before {
            idle_since = None;
            continue;
        }
        // Every row left is held by a worker (a claim, a rotation, a revoke call): wait.
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= LOCKED_PATIENCE {
            break;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
    Ok(tally)
}

/// One pass over one holder, batch after batch in primary-key order.
async fn rekey_holder(
    store: &Store,
    cipher: &TokenCipher,
    args: &RekeyArgs,
    holder: Holder,
    retired: &[String],
    tally: &mut Tally,
    progress: &mut Progress,
) -> Result<(), StoreError> {
    let mut after = holder.before_all().to_owned();
    loop {
        let skip = tally.skip(holder);
        let claim = Claim {
            holder,
            keys: retired,
            after: &after,
            skip: &skip,
            limit: args.batch_size,
        };
        let mut tx = store.pool().begin().await?;
        let rows = sealed::claim(&mut tx, &claim).await?;
        let Some(last) = rows.last() else {
            tx.commit().await?;
            return Ok(());
        };
        after = last.key.clone();
        let mut resealed = Vec::with_capacity(rows.len());
        for row in &rows {
            match reseal(cipher, row) {
                Ok(new) => resealed.push((row, new)),
                Err(e) => tally.failed.push((
                    holder,
                    row.key.clone(),
                    row.tenant_id.clone(),
                    e.to_string(),
                )),
            }
        }
        let done = sealed::replace(&mut tx, holder, &resealed).await?;
        tx.commit().await?;
        *tally.rekeyed.entry(holder.label()).or_default() += done;
        progress.advance(done, holder);
        if !args.pause.is_zero() {
            tokio::time::sleep(args.pause).await;
        }
    }
}

/// The row's token sealed with the current key, after checking that it is the stored token
/// (fingerprint) and that the new ciphertext opens to exactly the same token.
fn reseal(cipher: &TokenCipher, row: &SealedRow) -> Result<Sealed, RowError> {
    let tenant = TenantId::parse(&row.tenant_id).map_err(RowError::Tenant)?;
    let token = cipher.open(&tenant, &row.sealed)?;
    if token.fingerprint().as_str() != row.fingerprint {
        return Err(RowError::Fingerprint);
    }
    let new = cipher.seal(&tenant, &token);
    if cipher.open(&tenant, &new)?.expose() != token.expose() {
        return Err(RowError::RoundTrip);
    }
    Ok(new)
}

/// Stored ciphertexts not on the current key, split into those a configured key opens and
/// those whose key is missing.
struct Census {
    known: Vec<(Holder, String, i64)>,
    missing: Vec<(Holder, String, i64)>,
}

impl Census {
    async fn take(store: &Store, cipher: &TokenCipher) -> Result<Self, StoreError> {
        let ids = cipher.key_ids();
        let (known, missing) = sealed::census(store.pool(), cipher.current_key_id())
            .await?
            .into_iter()
            .partition(|(_, key, _)| ids.contains(key));
        Ok(Self { known, missing })
    }

    fn known_total(&self) -> u64 {
        self.known.iter().map(|c| count(c.2)).sum()
    }

    fn known_by_holder(&self) -> BTreeMap<&'static str, u64> {
        let mut by = BTreeMap::new();
        for (holder, _, n) in &self.known {
            *by.entry(holder.label()).or_default() += count(*n);
        }
        by
    }

    /// Prints the rows whose key is not configured, by key id; 1 if there are any, else 0.
    fn report_missing(&self) -> u8 {
        let mut by_key: BTreeMap<&str, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for (holder, key, n) in &self.missing {
            *by_key
                .entry(key.as_str())
                .or_default()
                .entry(holder.label())
                .or_default() += count(*n);
        }
        for (key, counts) in &by_key {
            eprintln!(
                "error: {} stored token(s) are sealed with key {key}, which is not configured{}: \
                 add that key to TOKEN_DECRYPTION_KEYS and run rekey again",
                counts.values().sum::<u64>(),
                by_holder(counts)
            );
        }
        u8::from(!by_key.is_empty())
    }
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// ` (current 3, journal 1)`, or nothing when every count is zero.
fn by_holder(counts: &BTreeMap<&'static str, u64>) -> String {
    let parts: Vec<String> = Holder::ALL
        .iter()
        .filter_map(|h| counts.get(h.label()).filter(|n| **n > 0).map(|n| (h, n)))
        .map(|(h, n)| format!("{} {n}", h.label()))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Prints `text` on stdout, now (progress goes to stderr in between).
fn write(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("writing output: {e}"))
}

/// Progress on stderr: the commands' progress bar ([`super::progress`]) on a terminal, a
/// plain line every few seconds otherwise (the log of a Kubernetes Job, where the bar hides
/// itself).
struct Progress {
    bar: indicatif::ProgressBar,
    total: u64,
    done: u64,
    tty: bool,
    last: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(5);

    fn new(total: u64) -> Self {
        Self {
            bar: super::progress::bar(total, "rekeyed"),
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
        }
    }

    fn advance(&mut self, n: u64, holder: Holder) {
        self.done += n;
        let total = self.total.max(self.done);
        self.bar.set_length(total);
        self.bar.set_position(self.done);
        self.bar.set_message(format!("({} tokens)", holder.label()));
        if self.tty || self.last.elapsed() < Self::EVERY {
            return;
        }
        self.last = Instant::now();
        eprintln!("rekeyed {}/{total} ({} tokens)", self.done, holder.label());
    }

    fn finish(&self) {
        self.bar.finish();
    }
}
