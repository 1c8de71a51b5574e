//! The dead-letter console: `/dlq` on the ops server, the `dlq` commands in a browser.
//!
//! Every page is one browse of `tenant-tokens.dead` through the very functions behind
//! `dlq list`, `show`, `replay` and `purge` ([`crate::tools::dlq`]), so the page sees what the
//! commands see and an action keeps their guarantees: a replayed dead letter is removed only
//! once its copy is confirmed, and the outcome carries the exit status the command would have
//! had. Browses are taken one at a time (a second one would find the first reading the queue).
//!
//! - `GET /dlq`: groups by (kind, error) with counts, oldest and newest; a filter form (kind,
//!   tenant, time, error text); the first matches.
//! - `GET /dlq/letters/{id}`: one dead letter in full, secrets redacted.
//! - `GET /dlq/confirm?action=replay|purge&…`: the confirmation step.
//! - `POST /dlq/act`: the action; needs `OPS_TOKEN` (see [`auth`]).

mod auth;
mod selection;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::Markup;
use secrecy::SecretString;
use serde::Deserialize;

use self::selection::Selection;
use crate::tools::dlq::{self, Action as DlqAction};

/// What the console needs: where the queue is, and the token that allows actions.
pub struct Console {
    amqp_url: String,
    token: Option<SecretString>,
    /// Held while a page browses the queue.
    browsing: tokio::sync::Mutex<()>,
}

impl Console {
    /// A console for the dead-letter queue of `amqp_url`; read-only without `token`.
    pub fn new(amqp_url: String, token: Option<SecretString>) -> Self {
        Self {
            amqp_url,
            token,
            browsing: tokio::sync::Mutex::new(()),
        }
    }

    /// The console's routes, to merge into the ops router.
    pub(crate) fn router(self) -> Router {
        Router::new()
            .route("/dlq", get(overview))
            .route("/dlq/letters/{id}", get(letter))
            .route("/dlq/confirm", get(confirm))
            .route("/dlq/act", post(act))
            .with_state(Arc::new(self))
    }

    fn acting(&self) -> bool {
        self.token.is_some()
    }
}

type Shared = State<Arc<Console>>;

/// What the console can do, as its forms name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Replay,
    Purge,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Purge => "purge",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Self::Replay => "replayed",
            Self::Purge => "purged",
        }
    }

    /// What the operator is promised before confirming.
    fn promise(self) -> &'static str {
        match self {
            Self::Replay => {
                "Each dead letter is republished to tenant.events with its original routing key \
                 and removed only once the broker has confirmed the copy; one that cannot be \
                 republished stays."
            }
            Self::Purge => "Purged dead letters are gone for good.",
        }
    }

    fn of_dlq(self) -> DlqAction {
        match self {
            Self::Replay => DlqAction::Replay,
            Self::Purge => DlqAction::Purge,
        }
    }
}

async fn overview(State(c): Shared, Query(sel): Query<Selection>) -> Response {
    let filters = match sel.filters() {
        Ok(f) => f,
        Err(e) => return page(StatusCode::BAD_REQUEST, views::problem("Bad filter", &e)),
    };
    let _one_at_a_time = c.browsing.lock().await;
    match dlq::survey(&c.amqp_url, &filters, views::LIST_ROWS).await {
        Ok(survey) => page(StatusCode::OK, views::overview(&sel, &survey, c.acting())),
        Err(e) => unreadable(&e),
    }
}

async fn letter(State(c): Shared, Path(id): Path<String>) -> Response {
    let _one_at_a_time = c.browsing.lock().await;
    match dlq::detail(&c.amqp_url, &id).await {
        Ok(Some(d)) => page(StatusCode::OK, views::detail(&d, c.acting())),
        Ok(None) => page(
            StatusCode::NOT_FOUND,
            views::problem("Not found", "No dead letter with this id is in the queue."),
        ),
        Err(e) => unreadable(&e),
    }
}

/// The action and the selection it takes, as the confirmation page and its form carry them.
#[derive(Debug, Deserialize)]
struct ActionQuery {
    action: Action,
    #[serde(flatten)]
    selection: Selection,
}

async fn confirm(State(c): Shared, Query(q): Query<ActionQuery>) -> Response {
    let filters = match selected(&q.selection) {
        Ok(f) => f,
        Err(e) => {
            return page(
                StatusCode::BAD_REQUEST,
                views::problem("Nothing selected", &e),
            );
        }
    };
    let _one_at_a_time = c.browsing.lock().await;
    match dlq::survey(&c.amqp_url, &filters, views::CONFIRM_ROWS).await {
        Ok(survey) => {
            let sel = q.selection.pinned(&filters);
            page(
                StatusCode::OK,
                views::confirm(q.action, &sel, &survey, c.acting()),
            )
        }
        Err(e) => unreadable(&e),
    }
}

/// The confirmed action's form.
#[derive(Debug, Deserialize)]
struct ActionForm {
    action: Action,
    /// `yes`, set by the confirmation page: an action is never one click away from a list.
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    token: String,
    #[serde(flatten)]
    selection: Selection,
}

async fn act(State(c): Shared, headers: HeaderMap, Form(f): Form<ActionForm>) -> Response {
    if let Err(refusal) = auth::permit(c.token.as_ref(), &headers, &f.token) {
        tracing::warn!(
            ?refusal,
            action = f.action.verb(),
            "dead-letter console action refused"
        );
        return page(
            refusal.status(),
            views::problem("Refused", refusal.explain()),
        );
    }
    if f.confirm != "yes" {
        let msg = "Actions go through the confirmation page.";
        return page(
            StatusCode::BAD_REQUEST,
            views::problem("Not confirmed", msg),
        );
    }
    let filters = match selected(&f.selection) {
        Ok(filters) => filters,
        Err(e) => {
            return page(
                StatusCode::BAD_REQUEST,
                views::problem("Nothing selected", &e),
            );
        }
    };
    let _one_at_a_time = c.browsing.lock().await;
    let all = f.selection.all();
    match dlq::act(&c.amqp_url, f.action.of_dlq(), &filters, all).await {
        Ok(report) => {
            tracing::info!(
                action = f.action.verb(),
                done = report.tally.done,
                failed = report.tally.failed,
                "dead-letter console action"
            );
            page(status_of(report.code), views::report(f.action, &report))
        }
        Err(e) => unreadable(&e),
    }
}

/// The filters of an action's selection: like `dlq replay`/`purge`, an action needs a filter,
/// or every dead letter chosen explicitly.
fn selected(sel: &Selection) -> Result<dlq::Filters, String> {
    let filters = sel.filters()?;
    if !filters.selects() && !sel.all() {
        return Err(
            "Choose the dead letters to act on (a filter, a group or one dead letter), \
                    or all of them explicitly."
                .into(),
        );
    }
    Ok(filters)
}

/// The HTTP status for a command's exit status (contract §9): 0 done, 1 failure, 2 usage,
/// 3 not found.
fn status_of(code: i32) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        2 => StatusCode::BAD_REQUEST,
        3 => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn unreadable(e: &anyhow::Error) -> Response {
    let message = format!("{e:#}");
    tracing::warn!(error = %message, "dead-letter console could not read the queue");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        views::problem("The dead-letter queue cannot be read now", &message),
    )
}

/// A page, with headers that keep it out of frames, caches and other sites' reach.
fn page(status: StatusCode, body: Markup) -> Response {
    let mut r = (status, body.into_string()).into_response();
    let h = r.headers_mut();
    let set = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // Not `no-referrer`: under it a browser sends `Origin: null` with the console's own
        // form posts, which the cross-site check must then refuse. `same-origin` still keeps
        // the console's URLs (filters, ids) from other sites.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in set {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}
