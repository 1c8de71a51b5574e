//! `tenant-tokens dlq list / show / replay / purge`: the operator's view of
//! `tenant-tokens.dead` (contract §2 and §9).
//!
//! # Reading the queue without disturbing it
//!
//! AMQP has no "peek". The dead-letter queue is a quorum queue, and on RabbitMQ 3.10 both
//! `basic.get` + requeue and a multiple-nack put messages back in a different order. So every
//! command *browses*: it consumes with manual acknowledgement and never acknowledges the
//! deliveries it does not act on. Closing a channel hands those back, and RabbitMQ returns
//! them in their original order, ahead of what was not browsed. Acting on a dead letter (after
//! a confirmed replay, or for `purge`) is a single `basic.ack` of that delivery. A command refuses to run while anything
//! else consumes the queue (checked before and after it starts consuming; quorum queues on 3.10
//! do not enforce exclusive consumers): another reader holds part of the queue, so the view
//! would be partial.
//!
//! # Bounded memory
//!
//! A browse is a stream: each command handles a dead letter as it arrives and keeps only what it
//! needs (a table row, a summary group), so a queue of 100,000 large messages does not have to
//! fit in memory. Unacknowledged deliveries count against a consumer's prefetch, so the browse
//! reads in *pages*: a consumer with a prefetch of [`BROWSE_PAGE`] on a channel of its own
//! receives one page and keeps it (unacknowledged, so the queue does not offer it again), and a
//! new consumer on a new channel receives the next page, in queue order. At the end the page
//! channels are closed one at a time, in order, each once the previous page is back in the
//! queue: a quorum queue returns the deliveries of one consumer in order, but those of several
//! consumers that go at once in no set order, and returns of many single `basic.nack`s get
//! batched and reordered. A browse stops at the queue's message count read when it started (a
//! passive `queue.declare`), so messages that arrive meanwhile are left for the next command,
//! or when nothing arrives for a second.
//!
//! Each browse bumps the broker's `x-delivery-count` header, so ids never depend on it (nor on
//! delivery tags): see [`dead_letter_id`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, Consumer,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::broker::message::{header_str, header_u32, table_int, table_str, value_str};
use crate::broker::publisher::{PublishError, Publisher};
use crate::broker::topology::{DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, headers};
use crate::configuration::parse_duration;
use crate::telemetry::redact_url;
use crate::tools::progress;

/// How long a browse waits for one more delivery before deciding the queue has no more.
const BROWSE_IDLE: Duration = Duration::from_secs(1);
/// Deliveries a browse takes per consumer (see the module docs): what bounds its memory, as at
/// most this many dead letters are in flight to the command at once.
const BROWSE_PAGE: u16 = 256;
/// Rows of the `list` table aligned together; the table is printed in blocks of this many rows
/// so that a long listing streams (columns only ever widen from one block to the next).
const TABLE_BLOCK: usize = 1000;
/// How long a replay waits for the broker's publisher confirm of one copy.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long we wait, after closing the browse channel, for RabbitMQ to make the untouched
/// dead letters ready again, so that a command run right after this one sees all of them.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Prefix of every header the worker adds to dead-lettered, retried or replayed messages.
const TT_HEADER_PREFIX: &str = "x-tt-";
/// Headers RabbitMQ adds when it dead-letters or redelivers a message; a replayed copy is a
/// fresh message and must not carry them.
const BROKER_HEADERS: &[&str] = &["x-death", "x-delivery-count"];
/// Header prefixes RabbitMQ adds when dead-lettering (`x-first-death-reason`, ...).
const BROKER_HEADER_PREFIXES: &[&str] = &["x-first-death-", "x-last-death-"];
/// The `x-death` reason RabbitMQ uses when a quorum queue's delivery limit is hit.
const DELIVERY_LIMIT_REASON: &str = "delivery_limit";
/// The error kinds of contract §2, plus `unknown` for a message that reached the dead-letter
/// queue without any dead-letter headers (published to the exchange by hand, say).
pub(crate) const KINDS: [&str; 5] = ["invalid", "rejected", "exhausted", "gone", "unknown"];
/// Longest error shown in the `list` table; `show` and `--json` print it whole.
const TABLE_ERROR_CHARS: usize = 80;
/// Widest tenant or routing key column in the `list` table.
const TABLE_COLUMN_CHARS: usize = 32;

/// `tenant-tokens dlq ...`: inspect dead letters, replay them to their original routing key,
/// or purge them. Every command reads the queue without reordering it (see the module docs).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters in queue order, oldest first (kind, error, attempts, tenant).
    List(ListArgs),
    /// Show one dead letter in full: headers, properties and body.
    Show {
        /// The dead letter's id, as printed by `dlq list`.
        id: String,
    },
    /// Republish matching dead letters to `tenant.events` with their original routing key;
    /// a dead letter is removed only once its copy is confirmed by the broker.
    Replay(ReplayArgs),
    /// Remove matching dead letters for good.
    Purge(PurgeArgs),
}

/// Which dead letters a command acts on. Shared by all commands so that an operator can
/// check a selection with `list` and then `replay` or `purge` exactly the same selection.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filters {
    /// Only this error kind.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(KINDS))]
    pub kind: Option<String>,
    /// Only this tenant (`tenant_id` of the body, top level or CloudEvents `data`).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only dead letters that failed at or after this time: RFC 3339, or a duration such as
    /// `2h`, `30m`, `45s`, `1d` meaning that long ago.
    #[arg(long, value_parser = parse_when, value_name = "TIME|AGO")]
    pub since: Option<OffsetDateTime>,
    /// Only dead letters that failed before this time: RFC 3339, or a duration meaning that
    /// long ago.
    #[arg(long, value_parser = parse_when, value_name = "TIME|AGO")]
    pub before: Option<OffsetDateTime>,
    /// Only dead letters whose error contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub error_contains: Option<String>,
    /// Only the dead letter with this id (as printed by `list`).
    #[arg(long)]
    pub id: Option<String>,
    /// Take only the first N matches, in queue order.
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub limit: Option<usize>,
    /// Only dead letters whose error is exactly this text: how the console selects one
    /// (kind, error) group, which `--error-contains` cannot do when one error contains another.
    #[arg(skip)]
    pub error_is: Option<String>,
}

/// Arguments of `dlq list`; a separate struct so `--summary` stays specific to listing.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ListArgs {
    /// Which dead letters to list.
    #[command(flatten)]
    pub filters: Filters,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Group by (kind, error) with count, oldest and newest instead of one row per message.
    #[arg(long)]
    pub summary: bool,
}

/// Arguments of `dlq replay`; `--all` exists so that replaying everything is a deliberate
/// choice rather than the result of a forgotten filter.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplayArgs {
    /// Which dead letters to replay.
    #[command(flatten)]
    pub filters: Filters,
    /// Replay every dead letter (required when no filter is given).
    #[arg(long)]
    pub all: bool,
    /// Only print what would be replayed.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object per dead letter instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `dlq purge`; `--yes` and a filter (or `--all`) are both required because
/// purging cannot be undone.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PurgeArgs {
    /// Which dead letters to remove.
    #[command(flatten)]
    pub filters: Filters,
    /// Purge every dead letter (required when no filter is given).
    #[arg(long)]
    pub all: bool,
    /// Confirm that the matching dead letters are to be removed for good.
    #[arg(long)]
    pub yes: bool,
    /// One JSON object per dead letter instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Exit status: done.
const EXIT_OK: i32 = 0;
/// Exit status: something failed (for example a replay that was not confirmed).
const EXIT_FAILURE: i32 = 1;
/// Exit status: usage error.
const EXIT_USAGE: i32 = 2;
/// Exit status: the requested id is not in the queue.
const EXIT_NOT_FOUND: i32 = 3;

/// Runs one `dlq` command against the broker at `amqp_url` (the vhost is part of the URL),
/// writing its human or JSON output to `out`, and returns the exit status of contract §9:
/// 0 done (also when nothing matched), 1 failure (a replay that did not go through), 2 usage
/// (`replay`/`purge` without a filter or `--all`, `purge` without `--yes`), 3 not found
/// (`show ID` or `--id` for an id that is not there). Usage and not-found explanations go to
/// standard error so that `--json` output stays machine-readable. An `Err` is a failure to
/// talk to the broker; the caller reports it and exits 1.
pub async fn run(
    cmd: DlqCommand,
    amqp_url: &str,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    if let Some(problem) = usage_problem(&cmd) {
        eprintln!("error: {problem}");
        return Ok(EXIT_USAGE);
    }
    let mut browse = Browse::open(amqp_url).await?;
    let result = match &cmd {
        DlqCommand::List(args) => list(&mut browse, args, out).await,
        DlqCommand::Show { id } => show(&mut browse, id, out).await,
        DlqCommand::Replay(args) => replay(&mut browse, args, out).await,
        DlqCommand::Purge(args) => purge(&mut browse, args, out).await,
    };
    browse.finish_with(result).await
}

/// The opaque, stable id of a dead letter.
///
/// It is the first 16 hex characters of a SHA-256 over what identifies the failure and never
/// changes while the message sits in the queue: `message_id`, the `x-tt-failed-at`,
/// `x-tt-original-routing-key` and `x-tt-error-kind` headers, RabbitMQ's own `x-death` record
/// (queue, reason, time, count and routing keys, for messages RabbitMQ dead-lettered itself)
/// and the body. It deliberately ignores the delivery tag and `x-delivery-count`, which change
/// on every browse, so ids stay the same across commands. It needs only the properties and the
/// body, so the worker can log the id of a dead letter at the moment it publishes it.
pub fn dead_letter_id(props: &BasicProperties, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    let mut field = |value: Option<&[u8]>| match value {
        None => hasher.update([0u8]),
        Some(bytes) => {
            hasher.update([1u8]);
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
    };
    field(props.message_id().as_ref().map(|m| m.as_str().as_bytes()));
    for name in [
        headers::FAILED_AT,
        headers::ORIGINAL_ROUTING_KEY,
        headers::ERROR_KIND,
    ] {
        field(header_str(props, name).map(str::as_bytes));
    }
    let deaths = x_deaths(props);
    let mut fingerprint = String::new();
    for death in &deaths {
        // `write!` to a String cannot fail.
        let _ = write!(
            fingerprint,
            "{:?}|{:?}|{:?}|{:?}|{:?};",
            death.queue, death.reason, death.time, death.count, death.routing_keys
        );
    }
    field((!deaths.is_empty()).then_some(fingerprint.as_bytes()));
    field(Some(body));
    let digest = hasher.finalize();
    hex::encode(&digest[..8])
}

/// The filters of the command line, for messages that tell how to select.
const FILTER_FLAGS: &str = "--kind, --tenant, --since, --before, --error-contains or --id";

/// Why a command must not run, checked before connecting so that a mistake costs nothing.
fn usage_problem(cmd: &DlqCommand) -> Option<String> {
    match cmd {
        DlqCommand::Replay(args) if !args.all && !args.filters.selects() => Some(format!(
            "dlq replay acts on nothing without a filter: give {FILTER_FLAGS}, or --all to replay every dead letter"
        )),
        DlqCommand::Purge(args) => {
            let mut missing = Vec::new();
            if !args.all && !args.filters.selects() {
                missing.push(format!(
                    "a filter ({FILTER_FLAGS}) or --all to purge every dead letter"
                ));
            }
            if !args.yes {
                missing.push(
                    "--yes to confirm that the matching dead letters are removed for good (check them first with `dlq list` and the same filters)"
                        .to_owned(),
                );
            }
            (!missing.is_empty()).then(|| format!("dlq purge needs {}", missing.join(", and ")))
        }
        _ => None,
    }
}

impl Filters {
    /// Whether a filter that narrows the selection is given (`--limit` alone does not count:
    /// "the first N of everything" is still everything to someone who forgot a filter).
    pub(crate) fn selects(&self) -> bool {
        self.kind.is_some()
            || self.tenant.is_some()
            || self.since.is_some()
            || self.before.is_some()
            || self.error_contains.is_some()
            || self.error_is.is_some()
            || self.id.is_some()
    }

    fn matches(&self, letter: &DeadLetter) -> bool {
        if self.kind.as_deref().is_some_and(|k| k != letter.kind) {
            return false;
        }
        if let Some(tenant) = &self.tenant
            && letter.tenant_id.as_deref() != Some(tenant.as_str())
        {
            return false;
        }
        if let Some(since) = self.since
            && letter.failed_at_time.is_none_or(|t| t < since)
        {
            return false;
        }
        if let Some(before) = self.before
            && letter.failed_at_time.is_none_or(|t| t >= before)
        {
            return false;
        }
        if let Some(text) = &self.error_contains
            && !letter.error.to_lowercase().contains(&text.to_lowercase())
        {
            return false;
        }
        if self.error_is.as_deref().is_some_and(|e| e != letter.error) {
            return false;
        }
        if self.id.as_deref().is_some_and(|id| id != letter.id) {
            return false;
        }
        true
    }

    /// Exit status for a command that matched nothing: not found when an id was asked for.
    fn nothing_matched(&self) -> i32 {
        if let Some(id) = &self.id {
            eprintln!("error: no dead letter with id {id} matches");
        }
        self.nothing_matched_code()
    }

    /// [`Filters::nothing_matched`] without the message, for callers that say it their way.
    fn nothing_matched_code(&self) -> i32 {
        if self.id.is_some() {
            EXIT_NOT_FOUND
        } else {
            EXIT_OK
        }
    }
}

/// Parses `--since`/`--before`: RFC 3339, or a duration (`2h`, `30m`, `45s`, `1d`, `1h30m`,
/// as [`parse_duration`] reads them) meaning that long before now. A bare number is refused:
/// it is more likely a mistyped time than a number of seconds.
pub(crate) fn parse_when(text: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let neither =
        || format!("`{text}` is neither an RFC 3339 time nor a duration like 2h, 30m, 45s or 1d");
    if text.trim().chars().all(|c| c.is_ascii_digit()) {
        return Err(neither());
    }
    let ago = parse_duration(text).map_err(|e| {
        if e.contains("out of range") {
            format!("`{text}` is too long ago (at most 365d)")
        } else {
            neither()
        }
    })?;
    let ago = time::Duration::try_from(ago).map_err(|_| format!("`{text}` is too long ago"))?;
    OffsetDateTime::now_utc()
        .checked_sub(ago)
        .ok_or_else(|| format!("`{text}` is too long ago"))
}

fn parse_limit(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("`{text}` is not a positive number")),
        Ok(n) => Ok(n),
    }
}

/// One dead letter as read from the queue, with what operators filter and read by.
struct DeadLetter {
    id: String,
    /// The routing key it was first published with; replay uses it.
    routing_key: String,
    tenant_id: Option<String>,
    kind: String,
    error: String,
    attempts: u32,
    message_id: Option<String>,
    /// As carried by the message (RFC 3339), for display.
    failed_at: Option<String>,
    failed_at_time: Option<OffsetDateTime>,
    /// The browse page it arrived in (see [`Browse::remove`]).
    page: usize,
    delivery: Delivery,
}

/// What we know about a dead letter from its routing key, properties and body alone.
#[derive(Debug, PartialEq)]
struct Description {
    routing_key: String,
    tenant_id: Option<String>,
    kind: String,
    error: String,
    attempts: u32,
    failed_at: Option<String>,
}

/// Reads a dead letter, whether the worker made it (`x-tt-*` headers) or RabbitMQ did
/// (delivery limit of the requests queue: only `x-death`).
fn describe(delivered_routing_key: &str, props: &BasicProperties, body: &[u8]) -> Description {
    let deaths = x_deaths(props);
    // RabbitMQ lists the most recent death first; the delivery limit is what we report.
    let broker_death = deaths
        .iter()
        .find(|d| d.reason.as_deref() == Some(DELIVERY_LIMIT_REASON))
        .or_else(|| deaths.first());
    let (kind, error) = kind_and_error(props, broker_death);
    let failed_at = header_str(props, headers::FAILED_AT)
        .map(str::to_owned)
        .or_else(|| {
            broker_death
                .and_then(|d| d.time)
                .and_then(timestamp_rfc3339)
        });
    Description {
        routing_key: original_routing_key(delivered_routing_key, props, &deaths),
        tenant_id: tenant_of(body),
        kind,
        error,
        attempts: header_u32(props, headers::ATTEMPTS).unwrap_or(0),
        failed_at,
    }
}

/// The error kind and text: the worker's headers, else RabbitMQ's dead-lettering reason, else
/// `unknown` for a message that reached the queue some other way.
fn kind_and_error(props: &BasicProperties, broker_death: Option<&Death>) -> (String, String) {
    if let Some(kind) = header_str(props, headers::ERROR_KIND) {
        let error = header_str(props, headers::ERROR)
            .map_or_else(|| format!("(no {} header)", headers::ERROR), str::to_owned);
        return (kind.to_owned(), error);
    }
    match broker_death {
        Some(death) => {
            let reason = death.reason.as_deref().unwrap_or("unknown reason");
            let error = if reason == DELIVERY_LIMIT_REASON {
                format!("delivery limit reached (dead-lettered by RabbitMQ: {reason})")
            } else {
                format!("dead-lettered by RabbitMQ: {reason}")
            };
            ("exhausted".to_owned(), error)
        }
        None => (
            "unknown".to_owned(),
            "no dead-letter headers (not dead-lettered by tenant-tokens or RabbitMQ)".to_owned(),
        ),
    }
}

/// The routing key to replay to: the worker's `x-tt-original-routing-key`; for a message
/// RabbitMQ dead-lettered, the routing key recorded in its oldest `x-death` entry that is not
/// one of our own queue names (retry queues route by queue name); else the delivery's.
fn original_routing_key(delivered: &str, props: &BasicProperties, deaths: &[Death]) -> String {
    if let Some(key) = header_str(props, headers::ORIGINAL_ROUTING_KEY) {
        return key.to_owned();
    }
    let candidates: Vec<&str> = deaths
        .iter()
        .rev()
        .flat_map(|d| d.routing_keys.iter().map(String::as_str))
        .chain(std::iter::once(delivered))
        .collect();
    candidates
        .iter()
        .find(|k| !k.starts_with("tenant-tokens."))
        .or(candidates.first())
        .map_or_else(|| delivered.to_owned(), |k| (*k).to_owned())
}

/// `tenant_id` at the top level of a JSON body, or under `data` for CloudEvents.
fn tenant_of(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value
        .get("tenant_id")
        .or_else(|| value.get("data").and_then(|d| d.get("tenant_id")))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// One entry of RabbitMQ's `x-death` header.
#[derive(Debug)]
struct Death {
    queue: Option<String>,
    reason: Option<String>,
    time: Option<u64>,
    count: Option<i64>,
    routing_keys: Vec<String>,
}

fn x_deaths(props: &BasicProperties) -> Vec<Death> {
    let entries = match props
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get("x-death"))
    {
        Some(AMQPValue::FieldArray(entries)) => entries,
        _ => return Vec::new(),
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|entry| match entry {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        })
        .map(|t| Death {
            queue: table_str(t, "queue").map(str::to_owned),
            reason: table_str(t, "reason").map(str::to_owned),
            time: table_int(t, "time").and_then(|n| u64::try_from(n).ok()),
            count: table_int(t, "count"),
            routing_keys: match t.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(keys)) => keys
                    .as_slice()
                    .iter()
                    .filter_map(value_str)
                    .map(str::to_owned)
                    .collect(),
                _ => Vec::new(),
            },
        })
        .collect()
}

fn timestamp_rfc3339(seconds: u64) -> Option<String> {
    let t = OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).ok()?).ok()?;
    t.format(&Rfc3339).ok()
}

/// The dead-letter queue, read as a stream of unacknowledged deliveries, one channel per page
/// (see the module docs), and handed back when [`Browse::finish`] closes those channels.
struct Browse {
    conn: Connection,
    /// For queue declarations; it never holds a delivery.
    channel: Channel,
    /// The consumer of the current page.
    consumer: Option<Consumer>,
    /// One channel per page, in order, with the number of its deliveries still held.
    pages: Vec<(Channel, u32)>,
    /// Deliveries the current page's consumer will still receive without further acks.
    page_left: u32,
    /// Message count of the queue when we started: the browse never reads more.
    count_at_start: u32,
    /// Deliveries browsed so far.
    seen: u32,
    /// Whether fewer messages arrived than were counted (nothing came for [`BROWSE_IDLE`]).
    ran_dry: bool,
    /// Dead letters handed out by [`Browse::next_match`], for `--limit`.
    matched: usize,
    /// Dead letters acknowledged (replayed or purged) by this command.
    removed: u32,
}

impl Browse {
    /// Connects, counts the queue and starts the first page; the connection is closed again if
    /// any of that fails.
    async fn open(amqp_url: &str) -> anyhow::Result<Self> {
        let conn = crate::broker::connect(amqp_url, "tenant-tokens dlq")
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", redact_url(amqp_url)))?;
        let channel = match conn.create_channel().await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = conn.close(200, "OK".into()).await;
                return Err(anyhow::Error::new(e).context("opening a channel"));
            }
        };
        let mut browse = Browse {
            conn,
            channel,
            consumer: None,
            pages: Vec::new(),
            page_left: 0,
            count_at_start: 0,
            seen: 0,
            ran_dry: false,
            matched: 0,
            removed: 0,
        };
        if let Err(e) = browse.start().await {
            // Closing the connection hands back whatever we had received.
            let _ = browse.conn.close(200, "OK".into()).await;
            return Err(e);
        }
        Ok(browse)
    }

    /// Reads the message count, refusing to start while another reader holds part of the
    /// queue, and starts the first page.
    async fn start(&mut self) -> anyhow::Result<()> {
        let queue = self.declare_passive().await.with_context(|| {
            format!(
                "looking up the dead-letter queue {DEAD_LETTER_QUEUE} \
                 (has `tenant-tokens migrate` run against this vhost?)"
            )
        })?;
        refuse_other_readers(queue.consumer_count(), 0)?;
        self.count_at_start = queue.message_count();
        if self.count_at_start == 0 {
            return Ok(());
        }
        self.next_page().await?;
        // Someone may have started reading between our declare and our consume.
        let again = self
            .declare_passive()
            .await
            .context("checking for other readers")?;
        refuse_other_readers(again.consumer_count(), 1)
    }

    async fn declare_passive(&self) -> Result<lapin::Queue, lapin::Error> {
        crate::broker::topology::inspect(&self.channel, DEAD_LETTER_QUEUE).await
    }

    /// Starts the next page: a consumer on a new channel, whose prefetch is the page size. The
    /// previous page's consumer has received all it will; it keeps its deliveries, and the
    /// queue offers the next ready messages to the new one.
    async fn next_page(&mut self) -> anyhow::Result<()> {
        let left = self.count_at_start.saturating_sub(self.seen);
        let page = u16::try_from(left).unwrap_or(BROWSE_PAGE).min(BROWSE_PAGE);
        let channel = self
            .conn
            .create_channel()
            .await
            .context("opening a channel for a page of the browse")?;
        // Registered first, so that `finish` closes it whatever happens next.
        self.pages.push((channel.clone(), 0));
        channel
            .basic_qos(page, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        let consumer = channel
            .basic_consume(
                DEAD_LETTER_QUEUE.into(),
                "".into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming from {DEAD_LETTER_QUEUE}"))?;
        self.consumer = Some(consumer);
        self.page_left = u32::from(page);
        Ok(())
    }

    /// The next dead letter in queue order, or `None` once the browse has read as many as the
    /// queue held at the start (or nothing more arrives).
    async fn next(&mut self) -> anyhow::Result<Option<DeadLetter>> {
        if self.seen >= self.count_at_start || self.ran_dry {
            return Ok(None);
        }
        if self.page_left == 0 {
            self.next_page().await?;
        }
        let Some(consumer) = self.consumer.as_mut() else {
            return Ok(None);
        };
        let delivery = match tokio::time::timeout(BROWSE_IDLE, consumer.next()).await {
            Err(_) | Ok(None) => {
                self.ran_dry = true;
                return Ok(None);
            }
            Ok(Some(delivery)) => delivery.context("reading a dead letter")?,
        };
        self.seen += 1;
        self.page_left -= 1;
        let page = self.pages.len() - 1;
        if let Some((_, held)) = self.pages.last_mut() {
            *held += 1;
        }
        Ok(Some(letter_of(delivery, page)))
    }

    /// The next dead letter that `filters` select, until `--limit` of them have been handed out.
    async fn next_match(&mut self, filters: &Filters) -> anyhow::Result<Option<DeadLetter>> {
        if self.matched >= filters.limit.unwrap_or(usize::MAX) {
            return Ok(None);
        }
        while let Some(letter) = self.next().await? {
            if filters.matches(&letter) {
                self.matched += 1;
                return Ok(Some(letter));
            }
        }
        Ok(None)
    }

    /// Removes `letter` from the queue for good (a single `basic.ack`); `false` when the
    /// broker did not take the acknowledgement, and the dead letter stays.
    async fn remove(&mut self, letter: &DeadLetter) -> bool {
        let acked = matches!(
            letter
                .delivery
                .ack(BasicAckOptions { multiple: false })
                .await,
            Ok(true)
        );
        if acked {
            self.removed += 1;
            if let Some((_, held)) = self.pages.get_mut(letter.page) {
                *held = held.saturating_sub(1);
            }
            // The ack frees a place in the page's prefetch: one more delivery will come.
            if letter.page + 1 == self.pages.len() {
                self.page_left += 1;
            }
        }
        acked
    }

    /// Hands the untouched dead letters back (see [`Browse::finish`]) whatever `result` is;
    /// returns `result`, or the failure to hand them back when `result` was fine.
    async fn finish_with<T>(self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        let finished = self.finish().await;
        let value = result?;
        finished?;
        Ok(value)
    }

    /// Hands every dead letter the browse holds back in its original order: closes the page
    /// channels one at a time, each once the queue counts the previous page as ready again
    /// (waiting at most [`SETTLE_TIMEOUT`] for each), then closes the connection.
    async fn finish(mut self) -> anyhow::Result<()> {
        drop(self.consumer.take());
        let mut first_error = None;
        let mut ready = match self.declare_passive().await {
            Ok(q) => Some(u64::from(q.message_count())),
            Err(e) => {
                first_error = Some(anyhow::Error::new(e).context("counting the queue"));
                None
            }
        };
        for (channel, held) in std::mem::take(&mut self.pages) {
            if let Err(e) = channel.close(200, "OK".into()).await {
                first_error.get_or_insert(
                    anyhow::Error::new(e).context("closing a channel that held dead letters"),
                );
                ready = None;
            }
            if let Some(before) = ready {
                let expected = before + u64::from(held);
                settle(&self.channel, expected).await;
                ready = Some(expected);
            }
        }
        let _ = self.channel.close(200, "OK".into()).await;
        let _ = self.conn.close(200, "OK".into()).await;
        first_error.map_or(Ok(()), Err)
    }
}

/// Fails when the queue has more consumers than `ours`: another reader holds some of the
/// dead letters, so we would see (and act on) only part of the queue.
fn refuse_other_readers(consumers: u32, ours: u32) -> anyhow::Result<()> {
    if consumers > ours {
        bail!(
            "{DEAD_LETTER_QUEUE} has {} other consumer(s): another `dlq` command or a consumer \
             is reading it, so only part of it would be visible; try again when it is done",
            consumers - ours
        );
    }
    Ok(())
}

/// Polls the queue's ready count until it reaches `expected` or [`SETTLE_TIMEOUT`] passes.
async fn settle(channel: &Channel, expected: u64) {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        match crate::broker::topology::inspect(channel, DEAD_LETTER_QUEUE).await {
            Ok(q) if u64::from(q.message_count()) < expected => {}
            _ => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn letter_of(delivery: Delivery, page: usize) -> DeadLetter {
    let d = describe(
        delivery.routing_key.as_str(),
        &delivery.properties,
        &delivery.data,
    );
    DeadLetter {
        id: dead_letter_id(&delivery.properties, &delivery.data),
        routing_key: d.routing_key,
        tenant_id: d.tenant_id,
        kind: d.kind,
        error: d.error,
        attempts: d.attempts,
        message_id: delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned()),
        failed_at_time: d
            .failed_at
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()),
        failed_at: d.failed_at,
        page,
        delivery,
    }
}

// ---------------------------------------------------------------------------------------
// list

async fn list(
    browse: &mut Browse,
    args: &ListArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    let matched = if args.summary {
        list_summary(browse, args, out).await?
    } else if args.json {
        list_json(browse, &args.filters, out).await?
    } else {
        list_table(browse, &args.filters, out).await?
    };
    if matched == 0 {
        return Ok(args.filters.nothing_matched());
    }
    Ok(EXIT_OK)
}

/// `list --json`: one line per match, written as it arrives. Returns the number of matches.
async fn list_json(
    browse: &mut Browse,
    filters: &Filters,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<usize> {
    let mut matched = 0;
    while let Some(letter) = browse.next_match(filters).await? {
        writeln!(out, "{}", letter_json(&letter))?;
        matched += 1;
    }
    Ok(matched)
}

fn letter_json(letter: &DeadLetter) -> Value {
    serde_json::to_value(letter.row()).unwrap_or(Value::Null)
}

/// One dead letter as `list --json` prints it and the console lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct LetterRow {
    pub(crate) id: String,
    pub(crate) routing_key: String,
    pub(crate) tenant_id: Option<String>,
    pub(crate) kind: String,
    pub(crate) error: String,
    pub(crate) attempts: u32,
    pub(crate) message_id: Option<String>,
    /// As the message carries it (RFC 3339).
    pub(crate) failed_at: Option<String>,
}

impl DeadLetter {
    fn row(&self) -> LetterRow {
        LetterRow {
            id: self.id.clone(),
            routing_key: self.routing_key.clone(),
            tenant_id: self.tenant_id.clone(),
            kind: self.kind.clone(),
            error: self.error.clone(),
            attempts: self.attempts,
            message_id: self.message_id.clone(),
            failed_at: self.failed_at.clone(),
        }
    }
}

/// The `list` table, streamed in blocks of [`TABLE_BLOCK`] rows. Returns the number of matches.
async fn list_table(
    browse: &mut Browse,
    filters: &Filters,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<usize> {
    let header = [
        "ID",
        "FAILED AT",
        "KIND",
        "ATTEMPTS",
        "TENANT",
        "ROUTING KEY",
        "ERROR",
    ]
    .map(str::to_owned);
    let mut table = Table::new(header);
    let mut matched = 0;
    while let Some(letter) = browse.next_match(filters).await? {
        table.push(table_row(&letter), out)?;
        matched += 1;
    }
    let total = browse.count_at_start;
    if matched == 0 {
        writeln!(
            out,
            "no dead letters match ({total} in {DEAD_LETTER_QUEUE})"
        )?;
        return Ok(0);
    }
    table.flush(out)?;
    writeln!(
        out,
        "{matched} of {total} dead letters in {DEAD_LETTER_QUEUE}"
    )?;
    Ok(matched)
}

fn table_row(l: &DeadLetter) -> [String; 7] {
    [
        l.id.clone(),
        l.failed_at_time
            .map(short_time)
            .or_else(|| l.failed_at.as_deref().map(one_line))
            .unwrap_or_else(|| "-".into()),
        l.kind.clone(),
        l.attempts.to_string(),
        cut(
            &one_line(l.tenant_id.as_deref().unwrap_or("-")),
            TABLE_COLUMN_CHARS,
        ),
        cut(&one_line(&l.routing_key), TABLE_COLUMN_CHARS),
        cut(&one_line(&l.error), TABLE_ERROR_CHARS),
    ]
}

/// A text table written in blocks: the rows of a block are aligned together, the header is
/// written with the first block, and columns never narrow from one block to the next.
struct Table<const N: usize> {
    header: [String; N],
    widths: [usize; N],
    block: Vec<[String; N]>,
    header_written: bool,
}

impl<const N: usize> Table<N> {
    fn new(header: [String; N]) -> Self {
        let widths = header.clone().map(|h| h.chars().count());
        Table {
            header,
            widths,
            block: Vec::new(),
            header_written: false,
        }
    }

    fn push(&mut self, row: [String; N], out: &mut (dyn Write + Send)) -> std::io::Result<()> {
        self.block.push(row);
        if self.block.len() >= TABLE_BLOCK {
            self.flush(out)?;
        }
        Ok(())
    }

    /// Writes the rows pushed so far (and the header, the first time).
    fn flush(&mut self, out: &mut (dyn Write + Send)) -> std::io::Result<()> {
        for row in &self.block {
            for (w, cell) in self.widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        if !self.header_written {
            write_row(&self.header, &self.widths, out)?;
            self.header_written = true;
        }
        for row in self.block.drain(..) {
            write_row(&row, &self.widths, out)?;
        }
        Ok(())
    }
}

/// One table line: cells padded to `widths` and two spaces apart, the last one unpadded.
fn write_row<const N: usize>(
    row: &[String; N],
    widths: &[usize; N],
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    let mut line = String::new();
    for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
        line.push_str(cell);
        if i + 1 < N {
            let pad = w - cell.chars().count();
            line.push_str(&" ".repeat(pad + 2));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// One (kind, error) group of matches, as `list --summary` prints it and the console shows it.
#[derive(Debug, Clone)]
pub(crate) struct GroupRow {
    pub(crate) kind: String,
    pub(crate) error: String,
    pub(crate) count: usize,
    pub(crate) oldest: Option<OffsetDateTime>,
    pub(crate) newest: Option<OffsetDateTime>,
}

/// The (kind, error) groups of a browse, built as dead letters arrive: only the counters are
/// kept, so a summary of a huge queue takes little memory.
#[derive(Default)]
struct Groups {
    /// Each group with the position of its first dead letter among the matches.
    groups: BTreeMap<(String, String), (usize, GroupRow)>,
    matched: usize,
}

impl Groups {
    fn add(&mut self, letter: &DeadLetter) {
        let first = self.matched;
        let (_, g) = self
            .groups
            .entry((letter.kind.clone(), letter.error.clone()))
            .or_insert_with(|| {
                let row = GroupRow {
                    kind: letter.kind.clone(),
                    error: letter.error.clone(),
                    count: 0,
                    oldest: None,
                    newest: None,
                };
                (first, row)
            });
        g.count += 1;
        if let Some(t) = letter.failed_at_time {
            g.oldest = Some(g.oldest.map_or(t, |o| o.min(t)));
            g.newest = Some(g.newest.map_or(t, |n| n.max(t)));
        }
        self.matched += 1;
    }

    /// Biggest groups first; ties keep queue order.
    fn into_rows(self) -> Vec<GroupRow> {
        let mut groups: Vec<(usize, GroupRow)> = self.groups.into_values().collect();
        groups.sort_by_key(|(first, g)| (std::cmp::Reverse(g.count), *first));
        groups.into_iter().map(|(_, g)| g).collect()
    }
}

/// `list --summary`: only the group counters are kept while browsing. Returns the number of
/// matches.
async fn list_summary(
    browse: &mut Browse,
    args: &ListArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<usize> {
    let mut groups = Groups::default();
    let bar = progress::counter("reading dead letters:");
    while let Some(letter) = browse.next_match(&args.filters).await? {
        groups.add(&letter);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let matched = groups.matched;
    write_summary(&groups.into_rows(), matched, args.json, out)?;
    Ok(matched)
}

fn write_summary(
    groups: &[GroupRow],
    matched: usize,
    as_json: bool,
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    if as_json {
        for g in groups {
            let line = json!({
                "kind": g.kind,
                "error": g.error,
                "count": g.count,
                "oldest": rfc3339(g.oldest),
                "newest": rfc3339(g.newest),
            });
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    if groups.is_empty() {
        return writeln!(out, "no dead letters match");
    }
    let header = ["COUNT", "KIND", "OLDEST", "NEWEST", "ERROR"].map(str::to_owned);
    let mut table = Table::new(header);
    for g in groups {
        let row = [
            g.count.to_string(),
            g.kind.clone(),
            g.oldest.map_or_else(|| "-".into(), short_time),
            g.newest.map_or_else(|| "-".into(), short_time),
            cut(&one_line(&g.error), TABLE_ERROR_CHARS),
        ];
        table.push(row, out)?;
    }
    table.flush(out)?;
    writeln!(out, "{matched} dead letters in {} groups", groups.len())
}

/// A time as RFC 3339, if there is one (and it can be formatted).
pub(crate) fn rfc3339(t: Option<OffsetDateTime>) -> Option<String> {
    t.and_then(|t| t.format(&Rfc3339).ok())
}

/// `2024-05-01T12:00:00Z`: seconds are enough in a table.
pub(crate) fn short_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Text from a message on one line, with control characters (terminal escapes included)
/// replaced, so that a hostile body or error cannot rewrite the operator's screen.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Like [`one_line`] but keeps line breaks and tabs, for multi-line output.
fn printable(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            s.push_str(&c.escape_unicode().to_string());
        } else {
            s.push(c);
        }
    }
    s
}

/// `text` cut to `max` characters, with `…` when it was longer.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

// ---------------------------------------------------------------------------------------
// show

async fn show(browse: &mut Browse, id: &str, out: &mut (dyn Write + Send)) -> anyhow::Result<i32> {
    let Some(detail) = find(browse, id).await? else {
        eprintln!("error: no dead letter with id {id} in {DEAD_LETTER_QUEUE}");
        return Ok(EXIT_NOT_FOUND);
    };
    for (name, value) in &detail.overview {
        writeln!(out, "{:<16}{}", format!("{name}:"), printable(value))?;
    }
    writeln!(out, "properties:")?;
    for (name, value) in &detail.properties {
        writeln!(out, "  {name}: {}", printable(value))?;
    }
    writeln!(out, "headers:")?;
    if detail.headers.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for (name, value) in &detail.headers {
        writeln!(out, "  {}: {}", one_line(name), printable(value))?;
    }
    write_body(&detail.body, out)?;
    Ok(EXIT_OK)
}

/// One dead letter in full, as `show` prints it and the console shows it. Secret-looking
/// headers are redacted already; the body is as the message carries it.
pub(crate) struct Detail {
    pub(crate) row: LetterRow,
    /// `(label, value)` lines: what `list` shows, in full, and how the letter was delivered.
    pub(crate) overview: Vec<(String, String)>,
    pub(crate) properties: Vec<(&'static str, String)>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

/// The dead letter with this id, in full, if the queue holds it.
async fn find(browse: &mut Browse, id: &str) -> anyhow::Result<Option<Detail>> {
    let only = Filters {
        id: Some(id.to_owned()),
        ..Default::default()
    };
    let Some(letter) = browse.next_match(&only).await? else {
        return Ok(None);
    };
    let props = &letter.delivery.properties;
    Ok(Some(Detail {
        row: letter.row(),
        overview: overview(&letter),
        properties: property_list(props),
        headers: header_list(props),
        body: letter.delivery.data.clone(),
    }))
}

/// The first lines of `show`: what `list` shows, in full, and how the letter was delivered.
fn overview(letter: &DeadLetter) -> Vec<(String, String)> {
    let mut lines: Vec<(String, String)> = vec![
        ("id".into(), letter.id.clone()),
        ("kind".into(), letter.kind.clone()),
        ("error".into(), letter.error.clone()),
        ("attempts".into(), letter.attempts.to_string()),
        (
            "tenant".into(),
            letter.tenant_id.clone().unwrap_or_else(|| "-".into()),
        ),
        ("routing key".into(), letter.routing_key.clone()),
        (
            "delivered with".into(),
            format!(
                "exchange {:?}, routing key {:?}",
                letter.delivery.exchange.as_str(),
                letter.delivery.routing_key.as_str()
            ),
        ),
        (
            "failed at".into(),
            letter.failed_at.clone().unwrap_or_else(|| "-".into()),
        ),
    ];
    if let Some(status) = header_u32(&letter.delivery.properties, headers::ISSUER_STATUS) {
        lines.push(("issuer status".into(), status.to_string()));
    }
    lines
}

/// Every header as `(name, shown value)`, with secret-looking ones redacted.
fn header_list(props: &BasicProperties) -> Vec<(String, String)> {
    let Some(table) = props.headers().as_ref() else {
        return Vec::new();
    };
    table
        .into_iter()
        .map(|(name, value)| {
            let shown = if is_secret_name(name.as_str()) {
                "<redacted>".to_owned()
            } else {
                match amqp_to_json(value) {
                    Value::String(s) => s,
                    other => other.to_string(),
                }
            };
            (name.as_str().to_owned(), shown)
        })
        .collect()
}

/// The body as text, or its start as hex when it is not UTF-8.
fn write_body(body: &[u8], out: &mut (dyn Write + Send)) -> std::io::Result<()> {
    match std::str::from_utf8(body) {
        Ok(text) => {
            writeln!(out, "body ({} bytes):", body.len())?;
            writeln!(out, "{}", printable(text))
        }
        Err(_) => {
            let shown = &body[..body.len().min(64)];
            writeln!(
                out,
                "body ({} bytes, not UTF-8; first {} as hex):",
                body.len(),
                shown.len()
            )?;
            writeln!(out, "{}", hex::encode(shown))
        }
    }
}

fn property_list(p: &BasicProperties) -> Vec<(&'static str, String)> {
    let s = |v: &Option<ShortString>| v.as_ref().map(|v| v.as_str().to_owned());
    [
        ("message_id", s(p.message_id())),
        ("correlation_id", s(p.correlation_id())),
        ("content_type", s(p.content_type())),
        ("content_encoding", s(p.content_encoding())),
        ("type", s(p.kind())),
        ("app_id", s(p.app_id())),
        ("user_id", s(p.user_id())),
        ("reply_to", s(p.reply_to())),
        ("expiration", s(p.expiration())),
        (
            "timestamp",
            p.timestamp()
                .map(|t| timestamp_rfc3339(t).unwrap_or_else(|| t.to_string())),
        ),
        ("delivery_mode", p.delivery_mode().map(|m| m.to_string())),
        ("priority", p.priority().map(|m| m.to_string())),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|v| (name, v)))
    .collect()
}

/// Header names whose values may be credentials; `show` never prints them.
pub(crate) fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "authorization",
        "token",
        "secret",
        "password",
        "passwd",
        "cookie",
        "api-key",
        "api_key",
        "apikey",
        "credential",
    ]
    .iter()
    .any(|needle| name.contains(needle))
}

/// A header value as JSON, for display; nested secret-looking keys are redacted too.
fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!({ "scale": d.scale, "value": d.value }),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => timestamp_rfc3339(*t).map_or_else(|| json!(t), Value::String),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| {
                    let v = if is_secret_name(k.as_str()) {
                        json!("<redacted>")
                    } else {
                        amqp_to_json(v)
                    };
                    (k.as_str().to_owned(), v)
                })
                .collect(),
        ),
        AMQPValue::ByteArray(b) => json!(hex::encode(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

// ---------------------------------------------------------------------------------------
// replay

async fn replay(
    browse: &mut Browse,
    args: &ReplayArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    if args.dry_run {
        return replay_dry_run(browse, args, out).await;
    }
    let bar = progress::counter("replaying dead letters:");
    let each = &mut |l: &DeadLetter, o: &Acted| {
        bar.inc(1);
        bar.suspend(|| write_replay_outcome(l, o, args.json, out))
    };
    let tally = replay_each(browse, &args.filters, each).await;
    bar.finish_and_clear();
    let tally = tally?;
    if tally.total() == 0 {
        if !args.json {
            writeln!(out, "no dead letters match; nothing to replay")?;
        }
        return Ok(args.filters.nothing_matched());
    }
    if !args.json {
        writeln!(out, "replayed {}, failed {}", tally.done, tally.failed)?;
    }
    Ok(tally.code(&args.filters))
}

/// What became of one dead letter that a replay or a purge acted on: `Err` says why it stays.
pub(crate) type Acted = Result<(), String>;

/// Called with each dead letter a replay or purge acted on, as soon as it did.
type OnEach<'a> = &'a mut (dyn FnMut(&DeadLetter, &Acted) -> std::io::Result<()> + Send);

/// How many dead letters an action handled.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tally {
    /// Replayed (confirmed, then removed) or purged.
    pub(crate) done: usize,
    /// Left in the queue because something failed.
    pub(crate) failed: usize,
}

impl Tally {
    fn record(&mut self, outcome: &Acted) {
        match outcome {
            Ok(()) => self.done += 1,
            Err(_) => self.failed += 1,
        }
    }

    fn total(&self) -> usize {
        self.done + self.failed
    }

    /// The exit status of contract §9: 0 done (also when nothing matched), 1 when any failed,
    /// 3 when an id was asked for and nothing matched.
    fn code(&self, filters: &Filters) -> i32 {
        if self.total() == 0 {
            filters.nothing_matched_code()
        } else if self.failed > 0 {
            EXIT_FAILURE
        } else {
            EXIT_OK
        }
    }
}

/// Replays every match, each one removed only after its copy is confirmed (the lossless
/// guarantee of `dlq replay`), telling `on_each` what became of it.
async fn replay_each(
    browse: &mut Browse,
    filters: &Filters,
    on_each: OnEach<'_>,
) -> anyhow::Result<Tally> {
    let mut replayer: Option<Replayer> = None;
    let mut tally = Tally::default();
    let result = async {
        while let Some(letter) = browse.next_match(filters).await? {
            let r = match &replayer {
                Some(r) => r,
                None => replayer.insert(Replayer::open(&browse.conn).await?),
            };
            let outcome = match r.republish(&letter).await {
                Err(reason) => Err(reason),
                // Only now, with the copy safely confirmed, remove the dead letter.
                Ok(()) if browse.remove(&letter).await => Ok(()),
                Ok(()) => Err(
                    "replayed, but the dead letter could not be removed; it is still in the queue"
                        .to_owned(),
                ),
            };
            tally.record(&outcome);
            on_each(&letter, &outcome)?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(r) = replayer {
        r.close().await;
    }
    result.map(|()| tally)
}

/// `replay --dry-run`: what would be replayed, without publishing or removing anything.
async fn replay_dry_run(
    browse: &mut Browse,
    args: &ReplayArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    let mut matched = 0usize;
    while let Some(l) = browse.next_match(&args.filters).await? {
        matched += 1;
        if args.json {
            writeln!(out, "{}", outcome_json(&l, "would_replay", None))?;
        } else {
            writeln!(
                out,
                "would replay {}  to {EVENTS_EXCHANGE} with routing key {}  (tenant {}, {}: {})",
                l.id,
                one_line(&l.routing_key),
                one_line(l.tenant_id.as_deref().unwrap_or("-")),
                l.kind,
                cut(&one_line(&l.error), TABLE_ERROR_CHARS)
            )?;
        }
    }
    if matched == 0 {
        if !args.json {
            writeln!(out, "no dead letters match; nothing to replay")?;
        }
        return Ok(args.filters.nothing_matched());
    }
    if !args.json {
        writeln!(out, "dry run: {matched} dead letters would be replayed")?;
    }
    Ok(EXIT_OK)
}

fn write_replay_outcome(
    letter: &DeadLetter,
    outcome: &Result<(), String>,
    as_json: bool,
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    if as_json {
        let (result, reason) = match outcome {
            Ok(()) => ("replayed", None),
            Err(reason) => ("failed", Some(reason.as_str())),
        };
        return writeln!(out, "{}", outcome_json(letter, result, reason));
    }
    match outcome {
        Ok(()) => writeln!(
            out,
            "replayed {}  to routing key {}  (tenant {})",
            letter.id,
            one_line(&letter.routing_key),
            one_line(letter.tenant_id.as_deref().unwrap_or("-"))
        ),
        Err(reason) => writeln!(
            out,
            "FAILED   {}  to routing key {}: {}  (the dead letter stays)",
            letter.id,
            one_line(&letter.routing_key),
            one_line(reason)
        ),
    }
}

fn outcome_json(letter: &DeadLetter, result: &str, reason: Option<&str>) -> Value {
    json!({
        "id": letter.id,
        "routing_key": letter.routing_key,
        "tenant_id": letter.tenant_id,
        "kind": letter.kind,
        "result": result,
        "reason": reason,
    })
}

/// The confirmed publisher of a replay, opened on the first match (a command that matches
/// nothing opens no channel), with the replay time every copy of this command carries.
struct Replayer {
    channel: Channel,
    publisher: Publisher,
    replayed_at: String,
}

impl Replayer {
    async fn open(conn: &Connection) -> anyhow::Result<Self> {
        let channel = conn
            .create_channel()
            .await
            .context("opening the publishing channel")?;
        let publisher = Publisher::new(channel.clone())
            .await
            .context("enabling publisher confirms")?;
        let replayed_at = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .context("formatting the replay time")?;
        Ok(Replayer {
            channel,
            publisher,
            replayed_at,
        })
    }

    /// Publishes the replayed copy (`mandatory`) and waits at most [`CONFIRM_TIMEOUT`] for the
    /// broker's verdict; `Err` says why it did not go through (the dead letter then stays).
    async fn republish(&self, letter: &DeadLetter) -> Result<(), String> {
        let props = replay_properties(&letter.delivery.properties, &self.replayed_at);
        let publish = self.publisher.publish(
            EVENTS_EXCHANGE,
            &letter.routing_key,
            &letter.delivery.data,
            props,
            true,
        );
        match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
            Err(_) => Err(format!(
                "not confirmed by the broker within {}s",
                CONFIRM_TIMEOUT.as_secs()
            )),
            Ok(Ok(())) => Ok(()),
            Ok(Err(PublishError::Unroutable(_))) => Err(format!(
                "unroutable: no queue is bound to {EVENTS_EXCHANGE} for this routing key"
            )),
            Ok(Err(PublishError::Nacked)) => Err("rejected by the broker (nack)".to_owned()),
            Ok(Err(PublishError::Name { detail, .. })) => {
                Err(format!("the original routing key is not usable: {detail}"))
            }
            Ok(Err(e @ (PublishError::Broker(_) | PublishError::Encode(_)))) => {
                Err(format!("publishing failed: {e}"))
            }
        }
    }

    async fn close(self) {
        let _ = self.channel.close(200, "OK".into()).await;
    }
}

/// The properties of a replayed copy: the original ones, as a fresh persistent message. The
/// worker's `x-tt-*` headers (error, attempts, ...) and RabbitMQ's dead-letter headers are
/// dropped so the worker starts counting attempts from zero; `x-tt-replayed-at` records the
/// replay. `expiration` is dropped (the copy must not expire on arrival), and `user_id` too
/// (RabbitMQ rejects a publish whose `user_id` is not the connecting user).
fn replay_properties(original: &BasicProperties, replayed_at: &str) -> BasicProperties {
    let mut headers_out = FieldTable::default();
    if let Some(table) = original.headers() {
        for (name, value) in table {
            let n = name.as_str();
            let drop = n.starts_with(TT_HEADER_PREFIX)
                || BROKER_HEADERS.contains(&n)
                || BROKER_HEADER_PREFIXES.iter().any(|p| n.starts_with(p));
            if !drop {
                headers_out.insert(name.clone(), value.clone());
            }
        }
    }
    headers_out.insert(
        headers::REPLAYED_AT.into(),
        AMQPValue::LongString(replayed_at.into()),
    );
    let mut p = BasicProperties::default()
        .with_headers(headers_out)
        .with_delivery_mode(2);
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.priority() {
        p = p.with_priority(*v);
    }
    p
}

// ---------------------------------------------------------------------------------------
// purge

async fn purge(
    browse: &mut Browse,
    args: &PurgeArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    let bar = progress::counter("purging dead letters:");
    let each = &mut |l: &DeadLetter, o: &Acted| {
        bar.inc(1);
        bar.suspend(|| write_purge_outcome(l, o.is_ok(), args.json, out))
    };
    let tally = purge_each(browse, &args.filters, each).await;
    bar.finish_and_clear();
    let tally = tally?;
    if tally.total() == 0 {
        if !args.json {
            writeln!(out, "no dead letters match; nothing to purge")?;
        }
        return Ok(args.filters.nothing_matched());
    }
    if !args.json {
        writeln!(out, "purged {}, failed {}", tally.done, tally.failed)?;
    }
    Ok(tally.code(&args.filters))
}

/// Removes every match for good, telling `on_each` what became of it.
async fn purge_each(
    browse: &mut Browse,
    filters: &Filters,
    on_each: OnEach<'_>,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    while let Some(letter) = browse.next_match(filters).await? {
        let outcome = if browse.remove(&letter).await {
            Ok(())
        } else {
            Err("could not acknowledge the dead letter; it stays".to_owned())
        };
        tally.record(&outcome);
        on_each(&letter, &outcome)?;
    }
    Ok(tally)
}

fn write_purge_outcome(
    letter: &DeadLetter,
    removed: bool,
    as_json: bool,
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    if as_json {
        let (result, reason) = if removed {
            ("purged", None)
        } else {
            ("failed", Some("could not acknowledge the dead letter"))
        };
        writeln!(out, "{}", outcome_json(letter, result, reason))
    } else if removed {
        writeln!(
            out,
            "purged {}  ({}, tenant {})",
            letter.id,
            letter.kind,
            one_line(letter.tenant_id.as_deref().unwrap_or("-"))
        )
    } else {
        writeln!(out, "FAILED {}: could not remove it; it stays", letter.id)
    }
}

// ---------------------------------------------------------------------------------------
// the console's entry points: the same browse and the same actions as the commands

/// What a page of the console shows of the queue: the groups of the matches and the first
/// of them, from one browse.
pub(crate) struct Survey {
    pub(crate) groups: Vec<GroupRow>,
    /// The first matches in queue order (at most the number asked for).
    pub(crate) rows: Vec<LetterRow>,
    pub(crate) matched: usize,
    /// Dead letters in the queue when the browse started.
    pub(crate) total: u32,
}

/// Browses the queue once (as `list` does, without disturbing it) for the groups of what
/// `filters` select and the first `max_rows` of them.
pub(crate) async fn survey(
    amqp_url: &str,
    filters: &Filters,
    max_rows: usize,
) -> anyhow::Result<Survey> {
    let mut browse = Browse::open(amqp_url).await?;
    let result = async {
        let mut groups = Groups::default();
        let mut rows = Vec::new();
        while let Some(letter) = browse.next_match(filters).await? {
            groups.add(&letter);
            if rows.len() < max_rows {
                rows.push(letter.row());
            }
        }
        anyhow::Ok(Survey {
            matched: groups.matched,
            groups: groups.into_rows(),
            rows,
            total: browse.count_at_start,
        })
    }
    .await;
    browse.finish_with(result).await
}

/// One dead letter in full, as `show` reads it; `None` when the queue does not hold it.
pub(crate) async fn detail(amqp_url: &str, id: &str) -> anyhow::Result<Option<Detail>> {
    let mut browse = Browse::open(amqp_url).await?;
    let result = find(&mut browse, id).await;
    browse.finish_with(result).await
}

/// What the console can do to the dead letters a filter selects: what `dlq replay` and
/// `dlq purge --yes` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Republish to the original routing key, removing each only once its copy is confirmed.
    Replay,
    /// Remove for good.
    Purge,
}

/// Outcomes an action keeps for its report; the tally counts them all.
const OUTCOMES_KEPT: usize = 500;

/// What an action did: the tally, the first [`OUTCOMES_KEPT`] outcomes, and the exit status
/// the command would have had.
pub(crate) struct ActionReport {
    pub(crate) tally: Tally,
    pub(crate) outcomes: Vec<(LetterRow, Acted)>,
    pub(crate) code: i32,
}

/// Runs `action` on what `filters` select, exactly as the command does. Like the command, it
/// refuses to act on everything unless `all` says so.
pub(crate) async fn act(
    amqp_url: &str,
    action: Action,
    filters: &Filters,
    all: bool,
) -> anyhow::Result<ActionReport> {
    if !all && !filters.selects() {
        bail!("acting on every dead letter needs an explicit choice of all of them");
    }
    let mut browse = Browse::open(amqp_url).await?;
    let mut outcomes = Vec::new();
    let each = &mut |l: &DeadLetter, o: &Acted| {
        if outcomes.len() < OUTCOMES_KEPT {
            outcomes.push((l.row(), o.clone()));
        }
        std::io::Result::Ok(())
    };
    let result = match action {
        Action::Replay => replay_each(&mut browse, filters, each).await,
        Action::Purge => purge_each(&mut browse, filters, each).await,
    };
    let tally = browse.finish_with(result).await?;
    Ok(ActionReport {
        code: tally.code(filters),
        tally,
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    fn worker_props() -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(headers::ERROR.into(), s("tenant_id missing"));
        h.insert(headers::ERROR_KIND.into(), s("invalid"));
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongInt(3));
        h.insert(headers::ORIGINAL_ROUTING_KEY.into(), s("tenant.created"));
        h.insert(headers::FAILED_AT.into(), s("2024-05-01T12:00:00.5Z"));
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(h)
    }

    fn broker_props() -> BasicProperties {
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("reason".into(), s("delivery_limit"));
        death.insert("queue".into(), s("tenant-tokens.requests"));
        death.insert("time".into(), AMQPValue::Timestamp(1_714_564_800));
        death.insert("exchange".into(), s("tenant.events"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![s("extension.requested")])),
        );
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        h.insert("x-first-death-reason".into(), s("delivery_limit"));
        h.insert("traceparent".into(), s("00-abc-def-01"));
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn id_ignores_delivery_count_but_not_content() {
        let body = br#"{"tenant_id":"t1"}"#;
        let props = worker_props();
        let id = dead_letter_id(&props, body);
        assert_eq!(id.len(), 16);
        let mut h = props.headers().clone().unwrap_or_default();
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(7));
        let bumped = props.clone().with_headers(h);
        assert_eq!(dead_letter_id(&bumped, body), id);
        assert_ne!(dead_letter_id(&props, br#"{"tenant_id":"t2"}"#), id);
        assert_ne!(dead_letter_id(&broker_props(), body), id);
    }

    #[test]
    fn describes_worker_dead_letters() {
        let d = describe("tenant.created", &worker_props(), br#"{"tenant_id":"t1"}"#);
        assert_eq!(d.kind, "invalid");
        assert_eq!(d.error, "tenant_id missing");
        assert_eq!(d.attempts, 3);
        assert_eq!(d.routing_key, "tenant.created");
        assert_eq!(d.tenant_id.as_deref(), Some("t1"));
        assert_eq!(d.failed_at.as_deref(), Some("2024-05-01T12:00:00.5Z"));
    }

    #[test]
    fn describes_dead_letters_made_by_rabbitmq() {
        let body = br#"{"specversion":"1.0","data":{"tenant_id":"ce-1"}}"#;
        let d = describe("whatever", &broker_props(), body);
        assert_eq!(d.kind, "exhausted");
        assert_eq!(
            d.error,
            "delivery limit reached (dead-lettered by RabbitMQ: delivery_limit)"
        );
        assert_eq!(d.attempts, 0);
        assert_eq!(d.routing_key, "extension.requested");
        assert_eq!(d.tenant_id.as_deref(), Some("ce-1"));
        assert_eq!(d.failed_at.as_deref(), Some("2024-05-01T12:00:00Z"));
    }

    #[test]
    fn unknown_messages_are_still_described() {
        let d = describe("tenant.created", &BasicProperties::default(), b"\xff\xfe");
        assert_eq!(d.kind, "unknown");
        assert_eq!(d.tenant_id, None);
        assert_eq!(d.routing_key, "tenant.created");
    }

    #[test]
    fn replay_properties_strip_dead_letter_headers() {
        let p = replay_properties(&broker_props(), "2024-05-02T00:00:00Z");
        let h = p.headers().clone().unwrap_or_default();
        assert!(!h.contains_key("x-death"));
        assert!(!h.contains_key("x-first-death-reason"));
        assert!(h.contains_key("traceparent"));
        assert_eq!(
            table_str(&h, headers::REPLAYED_AT),
            Some("2024-05-02T00:00:00Z")
        );
        let p = replay_properties(&worker_props(), "2024-05-02T00:00:00Z");
        let h = p.headers().clone().unwrap_or_default();
        assert_eq!(h.inner().len(), 1, "only x-tt-replayed-at remains: {h:?}");
        assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("m-1"));
        assert_eq!(*p.delivery_mode(), Some(2));
    }

    #[test]
    fn durations_and_times() {
        let ago = |text: &str| {
            let t = parse_when(text).unwrap_or(OffsetDateTime::UNIX_EPOCH);
            OffsetDateTime::now_utc() - t
        };
        let about = |d: time::Duration, want: time::Duration| {
            d >= want - time::Duration::minutes(1) && d <= want + time::Duration::minutes(1)
        };
        assert!(about(ago("1h"), time::Duration::hours(1)));
        assert!(about(ago("1h30m"), time::Duration::minutes(90)));
        assert!(about(ago("1d"), time::Duration::days(1)));
        assert!(about(ago("1w"), time::Duration::weeks(1)));
        assert!(parse_when("2024-05-01T12:00:00Z").is_ok());
        for bad in ["yesterday", "45", "h", "2x", "1h30", ""] {
            assert!(parse_when(bad).is_err(), "{bad:?}");
        }
        assert!(parse_when("400d").is_err_and(|e| e.contains("too long ago")));
        assert!(parse_limit("0").is_err());
        assert_eq!(parse_limit("3"), Ok(3));
    }

    #[test]
    fn secrets_and_escapes_are_not_printed() {
        assert!(is_secret_name("Authorization"));
        assert!(is_secret_name("x-auth-token"));
        assert!(!is_secret_name("traceparent"));
        assert_eq!(one_line("a\x1b[2Jb\nc"), "a [2Jb c");
        assert_eq!(
            redact_url("amqp://user:pw@host:5672/v"),
            "amqp://user:***@host:5672/v"
        );
    }

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: DlqCommand,
        }
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "dlq",
            "replay",
            "--kind",
            "rejected",
            "--since",
            "2h",
            "--limit",
            "5",
            "--dry-run",
        ]);
        assert!(matches!(
            cli.map(|c| c.cmd),
            Ok(DlqCommand::Replay(ReplayArgs {
                dry_run: true,
                filters: Filters { limit: Some(5), .. },
                ..
            }))
        ));
        assert!(Cli::try_parse_from(["dlq", "list", "--kind", "bogus"]).is_err());
        assert!(Cli::try_parse_from(["dlq", "list", "--since", "soon"]).is_err());
    }

    #[test]
    fn usage_is_checked_before_connecting() {
        let replay = DlqCommand::Replay(ReplayArgs::default());
        assert!(usage_problem(&replay).is_some());
        let purge = DlqCommand::Purge(PurgeArgs {
            all: true,
            ..Default::default()
        });
        assert!(usage_problem(&purge).is_some_and(|p| p.contains("--yes")));
        let purge = DlqCommand::Purge(PurgeArgs {
            yes: true,
            filters: Filters {
                kind: Some("invalid".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        assert!(usage_problem(&purge).is_none());
    }
}
