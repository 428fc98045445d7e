//! The web dashboard: server-rendered HTML on the SLAP port (and so through
//! any gateway), with no script and nothing fetched from elsewhere.
//!
//! Pages: the cluster (members, leader, lag), computers with their
//! partitions and software, instance trees with their states, connection
//! parameters and agreed prices, recent errors, usage for a month
//! (invoices, and providers' statements), the market's offers
//! ([`market`]), and a form to request an instance. What a page shows depends on who asks (the TLS client
//! certificate, as for every call): an administrator sees everything, a
//! user their own trees and usage, a computer its own computer; the form
//! requests as the calling user. Without TLS (`--insecure-http`) the
//! dashboard shows everything and requests for the development user.
//!
//! A handler: must not import `slap`, `native`, `metrics` or the server that
//! mounts it.

mod market;

use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Router};

use crate::api::ClientWrite;
use crate::authz::Caller;
use crate::replica::Replica;
use crate::state::ledger::{format_money, Period, ReportFor};
use crate::state::{
    Command, Instance, InstanceReport, Master, Reply, RequestOrigin, RequestSpec, RequestedState, Role, SlapState,
    SoftwareReport, SupplyState,
};

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:0;color:#222}header{background:#2d3e50;color:#fff;padding:.6em 1em}\
header a{color:#fff;margin-right:1.2em;text-decoration:none}main{padding:1em}table{border-collapse:collapse;margin:.5em 0 1.5em}\
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#eef}\
.ok{color:#2a7a2a}.bad{color:#b00}.muted{color:#888}form label{display:block;margin:.4em 0}input,select,textarea{font:inherit}\
textarea{width:30em;height:6em}";

/// Who is looking.
fn viewer(caller: &Option<Extension<Caller>>) -> Option<Role> {
    caller.as_ref().map(|Extension(Caller(r))| r.clone())
}

fn sees_everything(role: &Option<Role>) -> bool {
    matches!(role, None | Some(Role::Admin))
}

fn may_see_instance(role: &Option<Role>, i: &Instance) -> bool {
    match role {
        None | Some(Role::Admin) => true,
        Some(Role::User(u)) => &i.owner == u,
        Some(Role::Computer(c)) => i.partition.as_ref().is_some_and(|(ic, _)| ic == c),
        _ => false,
    }
}

fn may_see_computer(role: &Option<Role>, computer: &str) -> bool {
    match role {
        None | Some(Role::Admin) => true,
        Some(Role::Computer(c)) => c == computer,
        _ => false,
    }
}

fn page(title: &str, role: &Option<Role>, body: &str) -> Response {
    let who = match role {
        None => "development mode: no TLS, everyone is everything".to_string(),
        Some(r) => format!("signed in as {r}"),
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} - SlapOS Master</title><style>{STYLE}</style></head>\
         <body><header><b>SlapOS Master</b> &nbsp; <a href=\"/dashboard\">Cluster</a><a href=\"/dashboard/computers\">Computers</a>\
         <a href=\"/dashboard/instances\">Instances</a><a href=\"/dashboard/market\">Market</a><a href=\"/dashboard/usage\">Usage</a><a href=\"/dashboard/request\">Request</a>\
         <span class=\"muted\" style=\"float:right\">{w}</span></header><main><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title),
        w = esc(&who),
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn cluster(State(replica): State<Arc<Replica>>, caller: Option<Extension<Caller>>) -> Response {
    let role = viewer(&caller);
    let st = replica.local_status();
    let mut b = String::new();
    let leader = match st.leader_id {
        Some(l) => format!("replica {l}"),
        None => "<span class=\"bad\">none known (election in progress, or no quorum)</span>".into(),
    };
    let _ = write!(
        b,
        "<p>Cluster <code>{}</code>, asked replica {} ({}): term {}, last log {}, committed {}, applied {}. Leader: {leader}.</p>",
        esc(&st.cluster_id),
        st.node_id,
        esc(&st.state),
        st.term,
        st.last_log_index,
        st.committed,
        st.applied
    );
    b.push_str("<table id=\"members\"><tr><th>replica</th><th>address</th><th>role</th><th>public address</th><th>matched</th><th>lag</th></tr>");
    let addrs = replica
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .replica_addrs
        .clone();
    let dash = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    for m in &st.members {
        let _ = write!(
            b,
            "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            m.id,
            if Some(m.id) == st.leader_id { " (leader)" } else { "" },
            esc(&m.addr),
            esc(&m.role),
            esc(addrs.get(&m.id).map(String::as_str).unwrap_or("")),
            dash(m.matched),
            dash(m.lag)
        );
    }
    b.push_str("</table>");
    if !st.leader_view {
        b.push_str("<p class=\"muted\">Lag is known to the leader only; ask the leader's dashboard.</p>");
    }
    page("Cluster", &role, &b)
}

async fn computers(State(replica): State<Arc<Replica>>, caller: Option<Extension<Caller>>) -> Response {
    let role = viewer(&caller);
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    let mut b = String::new();
    let visible: Vec<_> = state
        .computers
        .values()
        .filter(|c| may_see_computer(&role, &c.id))
        .collect();
    if visible.is_empty() {
        b.push_str("<p>No computer to show.</p>");
    }
    for c in visible {
        let categories = c
            .categories
            .iter()
            .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            b,
            "<h2 id=\"computer-{id}\">{id}</h2><p>{categories} <span class=\"muted\">revision {rev}</span></p>",
            id = esc(&c.id),
            rev = c.revision
        );
        b.push_str("<table><tr><th>partition</th><th>state</th><th>addresses</th><th>instance</th></tr>");
        for p in state.partitions_of(&c.id) {
            let inst = p
                .instance
                .as_ref()
                .and_then(|i| state.instances.get(i))
                .map(|i| format!("{} <span class=\"muted\">{}</span>", esc(&i.title), esc(&i.id)))
                .unwrap_or_default();
            let addrs = p.addresses.iter().map(|a| esc(&a.addr)).collect::<Vec<_>>().join(" ");
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{addrs}</td><td>{inst}</td></tr>",
                esc(&p.id),
                if p.state == SlapState::Busy { "busy" } else { "free" }
            );
        }
        b.push_str("</table><table><tr><th>software release</th><th>requested</th><th>reported</th></tr>");
        for s in state.installations_of(&c.id) {
            let reported = match &s.reported {
                None => "<span class=\"muted\">nothing yet</span>".to_string(),
                Some(SoftwareReport::Building) => "building".into(),
                Some(SoftwareReport::Available) => "<span class=\"ok\">available</span>".into(),
                Some(SoftwareReport::Destroyed) => "destroyed".into(),
                Some(SoftwareReport::Error(_)) => "<span class=\"bad\">error</span>".into(),
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{reported}</td></tr>",
                esc(&s.url),
                if s.requested == SupplyState::Available {
                    "available"
                } else {
                    "destroyed"
                }
            );
        }
        b.push_str("</table>");
    }
    drop(state);
    page("Computers", &role, &b)
}

fn reported(i: &Instance) -> String {
    match &i.reported {
        None => "<span class=\"muted\">not yet</span>".into(),
        Some(InstanceReport::Started) => "<span class=\"ok\">started</span>".into(),
        Some(InstanceReport::Stopped) => "stopped".into(),
        Some(InstanceReport::Error(_)) => "<span class=\"bad\">error</span>".into(),
    }
}

fn instance_rows(state: &Master, b: &mut String, i: &Instance, depth: usize) {
    let place = match (&i.partition, &i.host) {
        (Some((c, p)), _) => format!("{} / {}", esc(c), esc(p)),
        (None, Some(h)) => format!("shared on {}", esc(h)),
        (None, None) => format!(
            "<span class=\"bad\">pending: {}</span>",
            esc(i.pending_reason.as_deref().unwrap_or("not placed yet"))
        ),
    };
    let conn = i
        .connection
        .iter()
        .map(|(k, v)| format!("<b>{}</b>: {}", esc(k), esc(v)))
        .collect::<Vec<_>>()
        .join("<br>");
    let price = market::agreed_price(state, &i.id);
    let _ = write!(
        b,
        "<tr class=\"instance\"><td style=\"padding-left:{}em\">{}</td><td><span class=\"muted\">{}</span></td><td>{}</td><td>{}</td><td>{}</td><td>{place}</td><td>{price}</td><td>{conn}</td></tr>",
        0.6 + depth as f64 * 1.5,
        esc(&i.title),
        esc(&i.id),
        esc(&i.software_release),
        i.requested_state.as_str(),
        reported(i)
    );
    for child in state.children_of(&i.id) {
        instance_rows(state, b, child, depth + 1);
    }
    for shared in state.hosted_by(&i.id) {
        if !matches!(shared.requester, crate::state::Requester::Instance(ref r) if r == &i.id) {
            instance_rows(state, b, shared, depth + 1);
        }
    }
}

async fn instances(State(replica): State<Arc<Replica>>, caller: Option<Extension<Caller>>) -> Response {
    let role = viewer(&caller);
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    let mut b = String::from(
        "<table id=\"instances\"><tr><th>title</th><th>id</th><th>software release</th><th>requested</th><th>reported</th><th>where</th><th>price/hour</th><th>connection</th></tr>",
    );
    let mut shown = 0;
    for root in state
        .instances
        .values()
        .filter(|i| i.root == i.id && may_see_instance(&role, i))
    {
        if sees_everything(&role) {
            let _ = write!(
                b,
                "<tr><th colspan=\"8\">{} — tree of {}</th></tr>",
                esc(&root.title),
                esc(&root.owner)
            );
        }
        instance_rows(&state, &mut b, root, 0);
        shown += 1;
    }
    b.push_str("</table>");
    if shown == 0 {
        b.push_str("<p>No instance tree to show. <a href=\"/dashboard/request\">Request one.</a></p>");
    }
    // Recent errors: instances and software installations in error.
    let mut errors = String::new();
    for i in state.instances.values().filter(|i| may_see_instance(&role, i)) {
        if let Some(InstanceReport::Error(log)) = &i.reported {
            let _ = write!(
                errors,
                "<tr><td>instance {} ({})</td><td><pre>{}</pre></td></tr>",
                esc(&i.title),
                esc(&i.id),
                esc(tail(log))
            );
        }
    }
    for s in state
        .installations
        .values()
        .filter(|s| may_see_computer(&role, &s.computer))
    {
        if let Some(SoftwareReport::Error(log)) = &s.reported {
            let _ = write!(
                errors,
                "<tr><td>software {} on {}</td><td><pre>{}</pre></td></tr>",
                esc(&s.url),
                esc(&s.computer),
                esc(tail(log))
            );
        }
    }
    drop(state);
    b.push_str("<h2>Recent errors</h2>");
    if errors.is_empty() {
        b.push_str("<p class=\"ok\" id=\"no-errors\">None.</p>");
    } else {
        let _ = write!(b, "<table id=\"errors\">{errors}</table>");
    }
    page("Instances", &role, &b)
}

/// The last lines of a log, enough to see what failed.
fn tail(log: &str) -> &str {
    // Count line breaks before the final one so that a log ending with a
    // newline still shows its last 20 whole lines.
    let body = log.strip_suffix('\n').unwrap_or(log);
    let breaks: Vec<usize> = body.match_indices('\n').map(|(i, _)| i).collect();
    match breaks.len() {
        n if n >= 20 => &log[breaks[n - 20] + 1..],
        _ => log,
    }
}

fn query_field(q: &Option<String>, name: &str) -> Option<String> {
    slap_proto::form::parse(q.as_deref().unwrap_or(""))
        .ok()
        .and_then(|f| slap_proto::form::get(&f, name).map(String::from))
}

async fn usage(
    State(replica): State<Arc<Replica>>,
    caller: Option<Extension<Caller>>,
    RawQuery(q): RawQuery,
) -> Response {
    let role = viewer(&caller);
    let month = query_field(&q, "period").unwrap_or_else(|| {
        let now = crate::pki::now_secs() as i64;
        let days = now / 86400;
        // Civil date from days (Howard Hinnant's algorithm), for the default month.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!("{y:04}-{m:02}")
    });
    let mut b = format!(
        "<form method=\"get\"><label>Month <input name=\"period\" value=\"{}\" pattern=\"[0-9]{{4}}-[0-9]{{2}}\"></label><button>Show</button></form>",
        esc(&month)
    );
    let period = match Period::parse(&month) {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(b, "<p class=\"bad\">{}</p>", esc(&e));
            return page("Usage", &role, &b);
        }
    };
    let subscribers: Vec<String> = match &role {
        Some(Role::User(u)) => vec![u.clone()],
        None | Some(Role::Admin) => {
            let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
            let mut s: Vec<String> = state
                .ledger
                .movements
                .values()
                .map(|m| m.destination.clone())
                .chain(state.ledger.spans.values().map(|s| s.subscriber.clone()))
                .filter(|s| !s.is_empty())
                .collect();
            s.sort();
            s.dedup();
            s
        }
        _ => vec![],
    };
    if subscribers.is_empty() {
        b.push_str("<p>No usage to show.</p>");
    }
    for sub in subscribers {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        let report =
            crate::state::ledger::report(&state.ledger, &ReportFor::Subscriber(sub.clone()), &period, state.clock);
        drop(state);
        let _ = write!(
            b,
            "<h2>{}</h2><table class=\"usage\"><tr><th>subscription</th><th>resource</th><th>quantity</th><th>unit price</th><th>amount</th><th>release</th></tr>",
            esc(&sub)
        );
        for l in &report.lines {
            let (price, amount) = (line_price(l), line_amount(l));
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{:.3} {}</td><td>{price}</td><td>{amount}</td><td>{}</td></tr>",
                esc(&l.subscription),
                esc(&l.resource),
                l.quantity,
                esc(&l.unit),
                esc(&l.release)
            );
        }
        b.push_str("</table>");
        for (c, t) in &report.totals {
            let _ = write!(b, "<p><b>Total: {} {}</b></p>", format_money(*t), esc(c));
        }
    }
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    b.push_str(&market::statements(&state, &role, &period));
    drop(state);
    page("Usage", &role, &b)
}

/// A report line's unit price, per its unit, marked when agreed at allocation.
fn line_price(l: &crate::state::ledger::Line) -> String {
    match (&l.unit_price, &l.currency) {
        (Some(p), Some(c)) => format!(
            "{} {}/{}{}",
            format_money(*p),
            esc(c),
            esc(&l.price_unit),
            if l.agreed {
                " <span class=\"muted\">agreed</span>"
            } else {
                ""
            }
        ),
        _ => "<span class=\"muted\">unpriced</span>".into(),
    }
}

/// A report line's amount, empty when unpriced.
fn line_amount(l: &crate::state::ledger::Line) -> String {
    l.currency
        .as_ref()
        .map(|c| format!("{} {}", format_money(l.amount), esc(c)))
        .unwrap_or_default()
}

async fn request_form(State(replica): State<Arc<Replica>>, caller: Option<Extension<Caller>>) -> Response {
    let role = viewer(&caller);
    if !matches!(role, None | Some(Role::Admin) | Some(Role::User(_))) {
        return page("Request", &role, "<p>Only users request instances.</p>");
    }
    let releases: Vec<String> = {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        let mut r: Vec<String> = state
            .installations
            .values()
            .filter(|s| s.requested == SupplyState::Available)
            .map(|s| s.url.clone())
            .collect();
        r.sort();
        r.dedup();
        r
    };
    let mut options = String::new();
    for r in &releases {
        let _ = write!(options, "<option value=\"{0}\">{0}</option>", esc(r));
    }
    let body = format!(
        "<form method=\"post\" action=\"/dashboard/request\" id=\"request\">\
         <label>Title <input name=\"title\" required maxlength=\"200\"></label>\
         <label>Software release <input name=\"software_release\" list=\"releases\" required size=\"60\"></label>\
         <datalist id=\"releases\">{options}</datalist>\
         <label>Software type <input name=\"software_type\" value=\"default\"></label>\
         <label>Parameters (one <code>key=value</code> per line)<br><textarea name=\"parameters\"></textarea></label>\
         <label>SLA (one <code>key=value</code> per line, e.g. <code>region=eu</code>)<br><textarea name=\"sla\"></textarea></label>\
         <button type=\"submit\">Request</button></form>"
    );
    page("Request an instance", &role, &body)
}

fn key_values(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("{line:?} is not key=value"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

async fn request_submit(
    State(replica): State<Arc<Replica>>,
    caller: Option<Extension<Caller>>,
    body: Bytes,
) -> Response {
    let role = viewer(&caller);
    let user = match &role {
        Some(Role::User(u)) => u.clone(),
        None | Some(Role::Admin) => crate::authz::DEFAULT_USER.to_string(),
        _ => return page("Request", &role, "<p class=\"bad\">Only users request instances.</p>"),
    };
    let fields = match slap_proto::form::parse(&String::from_utf8_lossy(&body)) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let field = |n: &str| slap_proto::form::get(&fields, n).unwrap_or("").trim().to_string();
    let fail = |msg: String| {
        let mut r = page(
            "Request",
            &role,
            &format!("<p class=\"bad\" id=\"error\">{}</p>", esc(&msg)),
        );
        *r.status_mut() = StatusCode::BAD_REQUEST;
        r
    };
    let (parameters, sla) = match (key_values(&field("parameters")), key_values(&field("sla"))) {
        (Ok(p), Ok(s)) => (p.into_iter().collect(), s.into_iter().collect()),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let software_type = match field("software_type") {
        t if t.is_empty() => "default".to_string(),
        t => t,
    };
    let spec = RequestSpec {
        requester: RequestOrigin::User(user),
        title: field("title"),
        software_release: field("software_release"),
        software_type,
        parameters,
        sla,
        shared: false,
        state: Some(RequestedState::Started),
    };
    match replica
        .write(ClientWrite {
            request_id: None,
            command: Command::Request(spec),
        })
        .await
    {
        Ok((Reply::Refused(r), _)) => fail(r.to_string()),
        Ok(_) => Redirect::to("/dashboard/instances").into_response(),
        Err(s) => {
            let mut r = page("Request", &role, &format!("<p class=\"bad\">{}</p>", esc(s.message())));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        }
    }
}

async fn computer(Path(id): Path<String>) -> Redirect {
    Redirect::to(&format!("/dashboard/computers#computer-{id}"))
}

/// The dashboard's routes (under `/dashboard`), for a router whose state
/// gives the replica.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Arc<Replica>: axum::extract::FromRef<S>,
{
    Router::new()
        .route("/dashboard", get(cluster))
        .route("/dashboard/", get(cluster))
        .route("/dashboard/computers", get(computers))
        .route("/dashboard/computers/{id}", get(computer))
        .route("/dashboard/instances", get(instances))
        .route("/dashboard/usage", get(usage))
        .route("/dashboard/market", get(market::market))
        .route("/dashboard/request", get(request_form).post(request_submit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_parses() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        let kv = key_values("a=1\n\n b = two=2 \n").unwrap();
        assert_eq!(kv["a"], "1");
        assert_eq!(kv["b"], "two=2");
        assert!(key_values("novalue").is_err());
        let long: String = (0..30).map(|i| format!("line {i}\n")).collect();
        assert!(tail(&long).starts_with("line 10\n"));
        assert_eq!(tail(&long).lines().count(), 20);
        let unterminated = long.trim_end();
        assert!(tail(unterminated).starts_with("line 10\n"));
        assert_eq!(tail("a\nb"), "a\nb");
    }
}
