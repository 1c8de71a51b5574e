//! The console's HTML: plain server-rendered pages (maud escapes every value), one inline
//! style sheet, no script and nothing fetched from anywhere else; forms do all the work, so
//! the pages work without JavaScript and read on a phone.

use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;

use super::Action;
use super::auth::Refusal;
use super::selection::Selection;
use crate::tools::dlq::{
    ActionReport, Detail, GroupRow, KINDS, LetterRow, Survey, cut, is_secret_name, short_time,
};

/// Small, readable on a phone: tables scroll sideways instead of squeezing.
const CSS: &str = "\
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}\
header{background:#263238;padding:.6em 1em}header a{color:#fff;text-decoration:none;font-weight:600}\
main{padding:1em;max-width:80em}h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}\
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:.35em .5em;border-bottom:1px solid #ddd;vertical-align:top}\
td.error{max-width:40em;overflow-wrap:anywhere}td.num{text-align:right}\
form.filter{display:flex;flex-wrap:wrap;gap:.5em;align-items:end}\
label{display:flex;flex-direction:column;font-size:.85em}input,select,button{font:inherit;padding:.3em}\
.actions a,.actions button{margin-right:.6em}a.danger,button.danger{color:#b71c1c}\
pre{background:#fff;border:1px solid #ddd;padding:.6em;overflow-x:auto;white-space:pre-wrap}\
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:.5em .8em}\
.bad{background:#ffebee;border-left:4px solid #c62828;padding:.5em .8em}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}";

/// Rows the overview lists; the groups still count every match.
pub(super) const LIST_ROWS: usize = 200;
/// Rows the confirmation page lists.
pub(super) const CONFIRM_ROWS: usize = 50;
/// Longest error shown in a list; the dead letter's own page shows it whole.
const ERROR_CHARS: usize = 160;

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="same-origin";
                title { (title) " · tenant-tokens" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header { a href="/dlq" { "tenant-tokens · dead letters" } }
                main { (body) }
            }
        }
    }
}

/// `/dlq`: the groups, the filter form and the first matches.
pub(super) fn overview(sel: &Selection, survey: &Survey, acting: bool) -> Markup {
    let filtered = !sel.given().is_empty();
    layout(
        "Dead letters",
        html! {
            h1 { "Dead letters" }
            p #total { (survey.total) " in tenant-tokens.dead" @if filtered { ", " (survey.matched) " match" } }
            (filter_form(sel))
            h2 { "By kind and error" }
            (groups_table(sel, &survey.groups, acting))
            h2 { "Dead letters" }
            @if survey.matched > survey.rows.len() {
                p.note { "Showing the first " (survey.rows.len()) " of " (survey.matched) "; narrow the filter to see the others." }
            }
            (letters_table(&survey.rows))
            @if acting && survey.matched > 0 {
                @let q = sel.or_all(&sel.filters().unwrap_or_default()).query();
                p.actions {
                    a #replay-matches href={ "/dlq/confirm?action=replay&" (q) } { "Replay these " (survey.matched) "…" }
                    a.danger href={ "/dlq/confirm?action=purge&" (q) } { "Purge these " (survey.matched) "…" }
                }
            }
        },
    )
}

fn filter_form(sel: &Selection) -> Markup {
    html! {
        form.filter #filter method="get" action="/dlq" {
            label { "Kind" select name="kind" {
                option value="" { "any" }
                @for k in KINDS { option value=(k) selected[sel.kind == k] { (k) } }
            } }
            label { "Tenant" input name="tenant" value=(sel.tenant) size="14"; }
            label { "Since (2h, RFC 3339)" input name="since" value=(sel.since) size="12"; }
            label { "Before" input name="before" value=(sel.before) size="12"; }
            label { "Error contains" input name="error" value=(sel.error) size="16"; }
            @if !sel.error_is.is_empty() { input type="hidden" name="error_is" value=(sel.error_is); }
            button type="submit" { "Filter" }
            a href="/dlq" { "Clear" }
        }
    }
}

fn groups_table(sel: &Selection, groups: &[GroupRow], acting: bool) -> Markup {
    let when = |t: Option<time::OffsetDateTime>| t.map_or_else(|| "-".to_owned(), short_time);
    html! {
        @if groups.is_empty() { p { "No dead letters match." } } @else {
            div.scroll { table #groups {
                thead { tr { th { "Count" } th { "Kind" } th { "Error" } th { "Oldest" } th { "Newest" } th { } } }
                tbody { @for g in groups {
                    @let q = Selection { kind: g.kind.clone(), error_is: g.error.clone(), ..sel.clone() }.query();
                    tr.group data-kind=(g.kind) {
                        td.num.count { (g.count) }
                        td.kind { (g.kind) }
                        td.error { (cut(&g.error, ERROR_CHARS)) }
                        td { (when(g.oldest)) }
                        td { (when(g.newest)) }
                        td.actions {
                            a.show href={ "/dlq?" (q) } { "list" }
                            @if acting {
                                a.replay href={ "/dlq/confirm?action=replay&" (q) } { "replay…" }
                                a.danger href={ "/dlq/confirm?action=purge&" (q) } { "purge…" }
                            }
                        }
                    }
                } }
            } }
        }
    }
}

fn letters_table(rows: &[LetterRow]) -> Markup {
    html! {
        @if !rows.is_empty() {
            div.scroll { table #letters {
                thead { tr { th { "Failed at" } th { "Kind" } th { "Tenant" } th { "Routing key" } th { "Attempts" } th { "Error" } } }
                tbody { @for r in rows {
                    tr.letter data-id=(r.id) {
                        td { a href={ "/dlq/letters/" (r.id) } { (r.failed_at.as_deref().unwrap_or("-")) } }
                        td.kind { (r.kind) }
                        td.tenant { (r.tenant_id.as_deref().unwrap_or("-")) }
                        td { (r.routing_key) }
                        td.num { (r.attempts) }
                        td.error { (cut(&r.error, ERROR_CHARS)) }
                    }
                } }
            } }
        }
    }
}

/// `/dlq/letters/{id}`: one dead letter in full; secret-looking headers and body fields are
/// redacted.
pub(super) fn detail(d: &Detail, acting: bool) -> Markup {
    let q = Selection {
        id: d.row.id.clone(),
        ..Default::default()
    }
    .query();
    layout(
        "Dead letter",
        html! {
            h1 { "Dead letter " code { (d.row.id) } }
            dl #overview { @for (k, v) in &d.overview { dt { (k) } dd { (v) } } }
            @if acting { p.actions {
                a.replay href={ "/dlq/confirm?action=replay&" (q) } { "Replay…" }
                a.danger href={ "/dlq/confirm?action=purge&" (q) } { "Purge…" }
            } }
            h2 { "Properties" }
            dl { @for (k, v) in &d.properties { dt { (k) } dd { (v) } } }
            h2 { "Headers" }
            @if d.headers.is_empty() { p { "(none)" } }
            dl #headers { @for (k, v) in &d.headers { dt { (k) } dd { (v) } } }
            h2 { "Body" }
            pre #body { (pretty_body(&d.body)) }
        },
    )
}

/// The confirmation step: what the action will take, and the form that does it.
pub(super) fn confirm(action: Action, sel: &Selection, survey: &Survey, acting: bool) -> Markup {
    let verb = action.verb();
    layout(
        "Confirm",
        html! {
            h1 { (capitalized(verb)) " " (survey.matched) " dead letters?" }
            p { "Selected by: " @for (k, v) in sel.given() { code { (k) "=" (v) } " " } }
            p.note { (action.promise()) }
            (letters_table(&survey.rows))
            @if survey.matched > survey.rows.len() { p { "… and " (survey.matched - survey.rows.len()) " more." } }
            @if !acting { p.bad { (Refusal::NoTokenConfigured.explain()) } }
            @else if survey.matched > 0 {
                form #act method="post" action="/dlq/act" {
                    input type="hidden" name="action" value=(verb);
                    input type="hidden" name="confirm" value="yes";
                    @for (k, v) in sel.given() { input type="hidden" name=(k) value=(v); }
                    label { "Ops token" input type="password" name="token" autocomplete="off" required; }
                    p { button.danger[action == Action::Purge] type="submit" { (capitalized(verb)) " " (survey.matched) " dead letters" } " " a href="/dlq" { "Cancel" } }
                }
            }
        },
    )
}

/// What an action did, with the exit status the command would have had.
pub(super) fn report(action: Action, r: &ActionReport) -> Markup {
    let done = action.done();
    layout(
        "Done",
        html! {
            h1 #outcome { (capitalized(done)) " " (r.tally.done) ", failed " (r.tally.failed) }
            @if r.tally.failed > 0 { p.bad { "Some dead letters could not be " (done) "; they stay in the queue. (The command would exit 1.)" } }
            @if r.tally.done + r.tally.failed == 0 { p.note { "Nothing matched; nothing was done." } }
            div.scroll { table #outcomes {
                thead { tr { th { "Id" } th { "Kind" } th { "Tenant" } th { "Routing key" } th { "Result" } } }
                tbody { @for (row, outcome) in &r.outcomes { tr {
                    td { code { (row.id) } } td { (row.kind) } td { (row.tenant_id.as_deref().unwrap_or("-")) } td { (row.routing_key) }
                    td { @match outcome { Ok(()) => { (done) } Err(reason) => { "FAILED: " (reason) } } }
                } } }
            } }
            p { a href="/dlq" { "Back to the dead letters" } }
        },
    )
}

/// A page that says what went wrong.
pub(super) fn problem(title: &str, message: &str) -> Markup {
    layout(
        title,
        html! { h1 { (title) } p.bad #problem { (message) } p { a href="/dlq" { "Back to the dead letters" } } },
    )
}

/// The body for reading: JSON pretty-printed with secret-looking fields redacted, other text
/// as it is, anything else as the hex of its start.
fn pretty_body(body: &[u8]) -> String {
    if let Ok(mut v) = serde_json::from_slice::<Value>(body) {
        redact(&mut v);
        return serde_json::to_string_pretty(&v).unwrap_or_default();
    }
    match std::str::from_utf8(body) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let shown = &body[..body.len().min(256)];
            format!(
                "({} bytes, not UTF-8; the first {} as hex)\n{}",
                body.len(),
                shown.len(),
                hex::encode(shown)
            )
        }
    }
}

fn redact(v: &mut Value) {
    match v {
        Value::Object(fields) => {
            for (k, x) in fields.iter_mut() {
                if is_secret_name(k) {
                    *x = Value::String("<redacted>".into());
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn capitalized(word: &str) -> String {
    let mut c = word.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_pretty_and_lose_their_secrets() {
        let shown =
            pretty_body(br#"{"tenant_id":"t1","data":{"api_key":"k-123","n":[{"password":"p"}]}}"#);
        assert!(shown.contains("\"tenant_id\": \"t1\""), "{shown}");
        assert!(
            !shown.contains("k-123") && !shown.contains("\"p\""),
            "{shown}"
        );
        assert!(pretty_body(b"\xff\xfe").contains("not UTF-8"));
    }

    #[test]
    fn values_are_escaped() {
        let page = problem("x", "<script>alert(1)</script>").into_string();
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("width=device-width"));
    }
}
