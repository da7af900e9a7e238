//! The dashboard's pages, rendered from the read side's data (the same the JSON API serves).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use shardgate_common::{Outcome, RunId, RunStatus, pb};

use super::{Live, esc, page, query_value};
use crate::http::{ApiError, AppState, RunsQuery};
use crate::model::Now;

/// Most failures and flaky tests a run page shows (the JSON and JUnit have them all).
const NOTABLE_LIMIT: u32 = 200;

/// `1h 02m`, `3m 07s`, `12.4s`, `310ms`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// A moment as "… ago", which the page's script keeps current.
fn ago(ms: u64, now: u64) -> String {
    if ms == 0 {
        return "—".into();
    }
    format!(
        r#"<time data-ms="{ms}" title="{ms}">{} ago</time>"#,
        duration(now.saturating_sub(ms))
    )
}

fn status_of(s: &pb::RunSummary) -> RunStatus {
    RunStatus::from_wire(s.status).unwrap_or(RunStatus::Queued)
}

fn pill(state: &str) -> String {
    format!(
        r#"<span class="pill s-{}">{}</span>"#,
        esc(&state.replace(' ', "_")),
        esc(&state.replace('_', " "))
    )
}

/// A run's deploy on its page: its state, when, how long, a link to the board. While the
/// deploy is pending or running the page asks to be re-read (`data-poll`): the run's own event
/// stream has ended with its verdict.
fn deploy_line(d: &pb::Deploy, now: u64) -> String {
    let when = match (d.started_at_ms, d.finished_at_ms) {
        (0, _) => format!("queued {}", ago(d.created_at_ms, now)),
        (s, 0) => format!("started {}", ago(s, now)),
        (s, f) => format!("started {} · took {}", ago(s, now), duration(f.saturating_sub(s))),
    };
    let live = matches!(d.state.as_str(), "pending" | "running");
    let authors = if d.authors.is_empty() {
        String::new()
    } else {
        format!(" with <b>{}</b>", esc(&d.authors.join(", ")))
    };
    format!(
        r#"<p class="deploy" data-state="{state}"{poll}>Deploy {pill} · {when} · by <b>{who}</b>{authors} · <a href="/deploys">deploy board</a>{detail}</p>"#,
        state = esc(&d.state),
        poll = if live { r#" data-poll="2000""# } else { "" },
        pill = pill(&d.state),
        who = esc(&d.requested_by),
        detail = match d.detail.lines().next() {
            Some(l) if !l.is_empty() => format!("<br><small>{}</small>", esc(l)),
            _ => String::new(),
        },
    )
}

fn counts(s: &pb::RunSummary) -> pb::RunCounts {
    s.counts.unwrap_or_default()
}

fn done_of(c: &pb::RunCounts) -> u32 {
    c.passed + c.failed + c.skipped + c.flaky + c.timed_out + c.infra_error
}

/// A bar split by outcome, for a run's counts.
fn progress_bar(c: &pb::RunCounts, big: bool) -> String {
    let total = c.total.max(1) as f64;
    let seg = |n: u32, class: &str| {
        if n == 0 {
            String::new()
        } else {
            format!(
                r#"<span class="seg {class}" style="width:{:.3}%"></span>"#,
                f64::from(n) * 100.0 / total
            )
        }
    };
    format!(
        r#"<div class="bar{}" role="img" aria-label="{} of {} done">{}{}{}{}{}{}{}</div>"#,
        if big { " big" } else { "" },
        done_of(c),
        c.total,
        seg(c.passed, "o-passed"),
        seg(c.skipped, "o-skipped"),
        seg(c.flaky, "o-flaky"),
        seg(c.failed, "o-failed"),
        seg(c.timed_out, "o-timed_out"),
        seg(c.infra_error, "o-infra_error"),
        seg(c.running + c.assigned, "o-running"),
    )
}

fn reds(c: &pb::RunCounts) -> u32 {
    c.failed + c.timed_out + c.infra_error
}

/// The list of runs, newest first, filtered and paged.
pub async fn runs(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<RunsQuery>,
) -> Result<Response, ApiError> {
    let filter = q.filter()?;
    let limit = if filter.limit == 0 {
        50
    } else {
        filter.limit.min(1000)
    };
    let runs = app.reads.search_runs(filter.clone()).await?;
    let fleet = app.reads.list_workers(false).await?;
    let deploys = app.reads.list_deploys(1, None, Now::real()).await?;
    let now = Now::real().ms;
    let mut h = String::new();
    // The strip: what is going on right now.
    let active = runs.iter().filter(|r| !status_of(r).is_terminal()).count();
    let live: Vec<_> = fleet.iter().filter(|w| w.state == "live").collect();
    let slots: u32 = live.iter().map(|w| w.slots).sum();
    let busy: u32 = live.iter().map(|w| w.busy_slots).sum();
    let _ = write!(
        h,
        r#"<section class="strip">
<div class="stat"><b>{active}</b><span>active runs shown</span></div>
<div class="stat"><b>{}</b><span>live workers</span></div>
<div class="stat"><b>{busy}/{slots}</b><span>slots busy</span></div>
<div class="stat"><b>{}</b><span>last deploy</span></div>
</section>"#,
        live.len(),
        if deploys.last_started_at_ms > 0 {
            ago(deploys.last_started_at_ms, now)
        } else {
            "none yet".into()
        },
    );
    // The filter form: plain GET, so it works without scripts.
    let opt = |v: &str| {
        let sel = if filter.status.as_deref() == Some(v) {
            " selected"
        } else {
            ""
        };
        format!(r#"<option value="{v}"{sel}>{v}</option>"#)
    };
    let states: String = RunStatus::ALL.iter().map(|s| opt(s.as_str())).collect();
    let _ = write!(
        h,
        r#"<form class="filters" method="get" action="/">
<label>Suite <input name="suite" value="{}" placeholder="any"></label>
<label>State <select name="state"><option value="">any</option>{states}</select></label>
<label>Who <input name="who" value="{}" placeholder="anyone"></label>
<button type="submit">Filter</button>
</form>"#,
        esc(filter.suite.as_deref().unwrap_or("")),
        esc(filter.requested_by.as_deref().unwrap_or("")),
    );
    if runs.is_empty() {
        h.push_str(r#"<p class="empty">No runs match.</p>"#);
    } else {
        h.push_str(
            r#"<table class="runs"><thead><tr><th>State</th><th>Suite</th><th>Revision</th><th>Who</th><th class="wide">Progress</th><th>Red</th><th>Took</th><th>Submitted</th></tr></thead><tbody>"#,
        );
        for r in &runs {
            let c = counts(r);
            let st = status_of(r);
            let took = if r.started_at_ms == 0 {
                "—".to_owned()
            } else if r.finished_at_ms > 0 {
                duration(r.finished_at_ms.saturating_sub(r.started_at_ms))
            } else {
                duration(now.saturating_sub(r.started_at_ms))
            };
            let _ = write!(
                h,
                r#"<tr data-run="{id}"><td>{pill}</td><td>{suite}</td><td><a href="/runs/{id}"><code>{rev}</code></a></td><td>{who}</td><td class="wide">{bar}<small>{done}/{total}</small></td><td class="{redclass}">{red}</td><td>{took}</td><td>{ago}</td></tr>"#,
                id = esc(&r.run_id),
                pill = pill(st.as_str()),
                suite = esc(&r.suite),
                rev = esc(&short(&r.revision)),
                who = esc(&r.requested_by),
                bar = progress_bar(&c, false),
                done = done_of(&c),
                total = c.total,
                redclass = if reds(&c) > 0 { "red" } else { "" },
                red = reds(&c),
                ago = ago(r.created_at_ms, now),
            );
        }
        h.push_str("</tbody></table>");
        if runs.len() as u32 >= limit
            && let Some(last) = runs.last()
        {
            let mut next = format!("/?before={}&limit={limit}", last.created_at_ms);
            for (k, v) in [
                ("suite", &filter.suite),
                ("state", &filter.status),
                ("who", &filter.requested_by),
            ] {
                if let Some(v) = v {
                    let _ = write!(next, "&{k}={}", query_value(v));
                }
            }
            let _ = write!(
                h,
                r#"<p class="pager"><a href="{}">Older runs →</a></p>"#,
                esc(&next)
            );
        }
    }
    Ok(page(
        &headers,
        "Runs",
        "Runs",
        Live::Events("/api/events".into()),
        h,
    ))
}

fn short(rev: &str) -> String {
    if rev.len() > 12 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        rev[..12].to_owned()
    } else {
        rev.to_owned()
    }
}

/// Packs each worker's shards into lanes (one per slot at most): a shard goes in the first lane
/// free at its start. Returns (worker, lane index, shard) in worker-name order.
fn lanes(shards: &[pb::ShardProgress], now: u64) -> Vec<(String, Vec<Vec<&pb::ShardProgress>>)> {
    let mut by_worker: BTreeMap<&str, Vec<&pb::ShardProgress>> = BTreeMap::new();
    for s in shards {
        by_worker.entry(&s.worker).or_default().push(s);
    }
    by_worker
        .into_iter()
        .map(|(w, mut list)| {
            list.sort_by_key(|s| (s.started_at_ms, s.attempt_id.clone()));
            let mut lanes: Vec<(u64, Vec<&pb::ShardProgress>)> = Vec::new();
            for s in list {
                let end = if s.ended_at_ms > 0 { s.ended_at_ms } else { now };
                match lanes.iter_mut().find(|(free, _)| *free <= s.started_at_ms) {
                    Some(lane) => {
                        lane.0 = end;
                        lane.1.push(s);
                    }
                    None => lanes.push((end, vec![s])),
                }
            }
            (w.to_owned(), lanes.into_iter().map(|(_, l)| l).collect())
        })
        .collect()
}

/// A run: live progress, its timeline, failures and flaky tests with their output.
pub async fn run(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = RunId::parse_field("run id", &id)?;
    let p = app.reads.run_page(id, NOTABLE_LIMIT).await?;
    let now = Now::real().ms;
    let r = &p.run;
    let c = counts(r);
    let st = status_of(r);
    let mut h = String::new();
    let elapsed = if r.started_at_ms == 0 {
        0
    } else if r.finished_at_ms > 0 {
        r.finished_at_ms.saturating_sub(r.started_at_ms)
    } else {
        now.saturating_sub(r.started_at_ms)
    };
    let labels: Vec<String> = r
        .labels
        .iter()
        .map(|l| format!("{}={}", l.key, l.value))
        .collect();
    let _ = write!(
        h,
        r#"<section class="runhead" data-status="{status}">
<div class="title"><h1>{suite} <code>{rev}</code></h1>{pill}</div>
<p class="meta">run <code>{id}</code> · by <b>{who}</b> · runner <b>{runner}</b>{labels}{tested} · submitted {submitted}</p>
{message}{deploy}
</section>"#,
        deploy = p.deploy.as_ref().map(|d| deploy_line(d, now)).unwrap_or_default(),
        status = st.as_str(),
        suite = esc(&r.suite),
        rev = esc(&r.revision),
        pill = pill(st.as_str()),
        id = esc(&r.run_id),
        who = esc(&r.requested_by),
        runner = esc(&r.runner),
        labels = if labels.is_empty() {
            String::new()
        } else {
            format!(" · labels <b>{}</b>", esc(&labels.join(",")))
        },
        submitted = ago(r.created_at_ms, now),
        tested = if r.tested_commit.is_empty() {
            String::new()
        } else {
            format!(
                r#" · tested commit <code title="{c}">{s}</code>"#,
                c = esc(&r.tested_commit),
                s = esc(&short(&r.tested_commit))
            )
        },
        message = if r.message.is_empty() {
            String::new()
        } else {
            format!(r#"<p class="message">{}</p>"#, esc(&r.message))
        },
    );
    let eta = if st.is_terminal() {
        "done".to_owned()
    } else if r.eta_ms > 0 {
        format!("~{}", duration(r.eta_ms))
    } else {
        "—".to_owned()
    };
    let _ = write!(
        h,
        r#"<section class="progress">
<div class="big-numbers">
<div class="stat"><b id="done">{done}/{total}</b><span>tests done</span></div>
<div class="stat"><b id="eta">{eta}</b><span>ETA</span></div>
<div class="stat"><b>{elapsed}</b><span>{elapsed_label}</span></div>
<div class="stat"><b>{slots}</b><span>slots busy</span></div>
<div class="stat"><b>{shards}</b><span>shards</span></div>
</div>
{bar}
<ul class="counts">
<li class="o-passed">passed <b>{passed}</b></li>
<li class="o-failed">failed <b>{failed}</b></li>
<li class="o-flaky">flaky <b>{flaky}</b></li>
<li class="o-timed_out">timed out <b>{timed_out}</b></li>
<li class="o-infra_error">infra error <b>{infra}</b></li>
<li class="o-skipped">skipped <b>{skipped}</b></li>
<li class="o-running">running <b>{running}</b></li>
<li>assigned <b>{assigned}</b></li>
<li>queued <b>{queued}</b></li>
</ul>
<p class="links"><a href="/api/runs/{id}/junit">JUnit XML</a> · <a href="/api/runs/{id}">JSON</a> · <a href="/api/runs/{id}/progress">progress JSON</a></p>
</section>"#,
        done = done_of(&c),
        total = c.total,
        elapsed = duration(elapsed),
        elapsed_label = if st.is_terminal() { "makespan" } else { "elapsed" },
        slots = r.slots_busy,
        shards = r.shards,
        bar = progress_bar(&c, true),
        passed = c.passed,
        failed = c.failed,
        flaky = c.flaky,
        timed_out = c.timed_out,
        infra = c.infra_error,
        skipped = c.skipped,
        running = c.running,
        assigned = c.assigned,
        queued = c.queued,
        id = esc(&r.run_id),
    );
    timeline(&mut h, r, &p.shards, now);
    notable(&mut h, &p.notable);
    let live = if st.is_terminal() {
        Live::Still
    } else {
        Live::Events(format!("/api/runs/{}/events", r.run_id))
    };
    Ok(page(
        &headers,
        &format!("{} {}", r.suite, short(&r.revision)),
        "Runs",
        live,
        h,
    ))
}

fn timeline(h: &mut String, r: &pb::RunSummary, shards: &[pb::ShardProgress], now: u64) {
    h.push_str(r#"<section class="timeline"><h2>Timeline</h2>"#);
    if shards.is_empty() {
        h.push_str(r#"<p class="empty">No shard handed out yet.</p></section>"#);
        return;
    }
    let start = shards
        .iter()
        .map(|s| s.started_at_ms)
        .min()
        .unwrap_or(r.started_at_ms)
        .min(if r.started_at_ms > 0 {
            r.started_at_ms
        } else {
            u64::MAX
        });
    let end = if r.finished_at_ms > 0 {
        r.finished_at_ms
    } else {
        now + r.eta_ms
    }
    .max(shards.iter().map(|s| s.ended_at_ms).max().unwrap_or(0))
    .max(start + 1);
    let span = (end - start) as f64;
    let pct = |t: u64| (t.saturating_sub(start)) as f64 * 100.0 / span;
    let _ = write!(
        h,
        r#"<div class="axis"><span>0</span><span>{}</span></div>"#,
        duration(end - start)
    );
    for (worker, lanes) in lanes(shards, now) {
        for (i, lane) in lanes.iter().enumerate() {
            let _ = write!(
                h,
                r#"<div class="lane"><span class="who">{}{}</span><div class="track">"#,
                esc(&worker),
                if lanes.len() > 1 {
                    format!(" <small>#{}</small>", i + 1)
                } else {
                    String::new()
                }
            );
            for s in lane {
                let stop = if s.ended_at_ms > 0 { s.ended_at_ms } else { now };
                let state = if s.state.is_empty() { "running" } else { &s.state };
                let title = format!(
                    "{} · {}/{} tests · {} · {}{}",
                    s.worker,
                    s.done,
                    s.tests,
                    state,
                    duration(stop.saturating_sub(s.started_at_ms)),
                    if s.current_test.is_empty() {
                        String::new()
                    } else {
                        format!(" · now: {}", s.current_test)
                    }
                );
                let _ = write!(
                    h,
                    r#"<span class="shard st-{}" style="left:{:.3}%;width:{:.3}%" title="{}"></span>"#,
                    esc(&state.replace(' ', "_")),
                    pct(s.started_at_ms),
                    (pct(stop) - pct(s.started_at_ms)).max(0.25),
                    esc(&title)
                );
            }
            h.push_str("</div>");
            // What the slot runs now.
            if let Some(s) = lane
                .iter()
                .find(|s| s.ended_at_ms == 0 && !s.current_test.is_empty())
            {
                let _ = write!(
                    h,
                    r#"<code class="now" title="running now">{}</code>"#,
                    esc(&s.current_test)
                );
            }
            h.push_str("</div>");
        }
    }
    h.push_str(
        r#"<p class="legend"><span class="shard st-running"></span>running <span class="shard st-finished"></span>finished <span class="shard st-lease_expired"></span>lost <span class="shard st-drained"></span>drained <span class="shard st-runner_error"></span>runner error</p></section>"#,
    );
}

fn notable(h: &mut String, results: &[pb::TestResult]) {
    let (flaky, red): (Vec<_>, Vec<_>) = results
        .iter()
        .partition(|t| Outcome::from_wire(t.outcome) == Some(Outcome::Flaky));
    for (title, list, class) in [("Failures", &red, "failures"), ("Flaky tests", &flaky, "flaky")] {
        let _ = write!(
            h,
            r#"<section class="{class}"><h2>{title} <small>{}</small></h2>"#,
            list.len()
        );
        if list.is_empty() {
            h.push_str(r#"<p class="empty">None.</p>"#);
        }
        for t in list.iter() {
            let outcome = Outcome::from_wire(t.outcome).map_or("unknown", Outcome::as_str);
            let _ = write!(
                h,
                r#"<details class="test"><summary>{pill} <code>{id}</code> <small>{dur} · {attempts} attempt{s} · {worker}{q}</small>{detail}</summary><pre>{output}</pre></details>"#,
                pill = pill(outcome),
                id = esc(&t.test_id),
                dur = duration(t.duration_ms),
                attempts = t.attempts,
                s = if t.attempts == 1 { "" } else { "s" },
                worker = esc(&t.worker),
                q = if t.quarantined { " · quarantined" } else { "" },
                detail = if t.detail.is_empty() {
                    String::new()
                } else {
                    format!(r#" <span class="detail">{}</span>"#, esc(&t.detail))
                },
                output = if t.output.is_empty() {
                    "(no output)".to_owned()
                } else {
                    esc(&t.output)
                },
            );
        }
        h.push_str("</section>");
    }
}

#[derive(Deserialize)]
pub struct FleetQuery {
    /// Show workers that are gone too.
    all: Option<String>,
}

/// The fleet: every live or lost worker (gone ones on request), what each slot runs.
pub async fn fleet(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<FleetQuery>,
) -> Result<Response, ApiError> {
    let all = q.all.is_some_and(|v| v != "0" && v != "false");
    let workers = app.reads.list_workers(all).await?;
    let progress = app.reads.progress(None, false).await?;
    let now = Now::real().ms;
    let mut running: BTreeMap<&str, Vec<&pb::ShardProgress>> = BTreeMap::new();
    for s in &progress.shards {
        running.entry(&s.worker).or_default().push(s);
    }
    let live: Vec<_> = workers.iter().filter(|w| w.state == "live").collect();
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<section class="strip">
<div class="stat"><b>{}</b><span>live</span></div>
<div class="stat"><b>{}</b><span>lost</span></div>
<div class="stat"><b>{}</b><span>draining</span></div>
<div class="stat"><b>{}/{}</b><span>slots busy</span></div>
</section>"#,
        live.len(),
        workers.iter().filter(|w| w.state == "lost").count(),
        live.iter().filter(|w| w.draining).count(),
        live.iter().map(|w| w.busy_slots).sum::<u32>(),
        live.iter().map(|w| w.slots).sum::<u32>(),
    );
    let _ = write!(
        h,
        r#"<p class="toggle">{}</p>"#,
        if all {
            r#"Showing every worker. <a href="/fleet">Hide gone workers</a>"#
        } else {
            r#"Gone workers are hidden. <a href="/fleet?all=1">Show them</a>"#
        }
    );
    if workers.is_empty() {
        h.push_str(r#"<p class="empty">No workers.</p>"#);
    } else {
        h.push_str(r#"<table class="fleet"><thead><tr><th>Worker</th><th>State</th><th>Slots</th><th class="wide">Running now</th><th>Last heartbeat</th><th>Labels</th><th>Runners</th></tr></thead><tbody>"#);
        for w in &workers {
            let state = if w.draining && w.state == "live" {
                "draining"
            } else {
                &w.state
            };
            let mut now_running = String::new();
            for s in running.get(w.name.as_str()).into_iter().flatten() {
                let _ = write!(
                    now_running,
                    r#"<div><a href="/runs/{run}">{short}</a> {done}/{tests} <code>{test}</code></div>"#,
                    run = esc(&s.run_id),
                    short = esc(&s.run_id[..8.min(s.run_id.len())]),
                    done = s.done,
                    tests = s.tests,
                    test = esc(&s.current_test),
                );
            }
            let labels: Vec<String> = w
                .labels
                .iter()
                .map(|l| format!("{}={}", l.key, l.value))
                .collect();
            let mut runners: Vec<String> = w.runners.iter().map(|r| esc(&r.name)).collect();
            for u in &w.unavailable_runners {
                runners.push(format!(r#"<s title="{}">{}</s>"#, esc(&u.reason), esc(&u.name)));
            }
            let _ = write!(
                h,
                r#"<tr data-worker="{name}"><td><b>{name}</b></td><td>{pill}</td><td>{busy}/{slots}</td><td class="wide">{now_running}</td><td class="seen">{seen}</td><td>{labels}</td><td>{runners}</td></tr>"#,
                name = esc(&w.name),
                pill = pill(state),
                busy = w.busy_slots,
                slots = w.slots,
                seen = ago(w.last_seen_ms, now),
                labels = esc(&labels.join(", ")),
                runners = runners.join(", "),
            );
        }
        h.push_str("</tbody></table>");
    }
    Ok(page(&headers, "Fleet", "Fleet", Live::Poll, h))
}

/// The deploy board, after Flickr's: the last deploy and how long ago, by whom with which
/// authors, deploys today and this week, and the log.
pub async fn deploys(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let d = app.reads.list_deploys(50, None, Now::real()).await?;
    let now = Now::real().ms;
    let mut h = String::new();
    let last = d.deploys.iter().find(|x| x.started_at_ms > 0);
    match last {
        Some(l) => {
            let authors = if l.authors.is_empty() {
                String::new()
            } else {
                format!(" with <b>{}</b>", esc(&l.authors.join(", ")))
            };
            let _ = write!(
                h,
                r#"<section class="board">
<p class="last">The site was last deployed <b class="huge">{ago}</b></p>
<p>by <b>{who}</b>{authors} · revision <code>{rev}</code> of <b>{suite}</b> · {pill}</p>
</section>"#,
                ago = ago(l.started_at_ms, now),
                who = esc(&l.requested_by),
                rev = esc(&short(&l.revision)),
                suite = esc(&l.suite),
                pill = pill(&l.state),
            );
        }
        None => h.push_str(r#"<section class="board"><p class="last">No deploy yet.</p></section>"#),
    }
    let _ = write!(
        h,
        r#"<section class="strip">
<div class="stat"><b>{}</b><span>deploys in the last 24 h</span></div>
<div class="stat"><b>{}</b><span>deploys in the last 7 days</span></div>
</section>"#,
        d.last_day, d.last_week
    );
    h.push_str("<h2>Deploy log</h2>");
    if d.deploys.is_empty() {
        h.push_str(r#"<p class="empty">Nothing deployed yet: a run that passes with a rollout hook configured deploys.</p>"#);
    } else {
        h.push_str(r#"<table class="deploys"><thead><tr><th>State</th><th>Revision</th><th>Suite</th><th>By</th><th>Authors</th><th>Started</th><th>Took</th><th class="wide">Detail</th></tr></thead><tbody>"#);
        for x in &d.deploys {
            let took = if x.finished_at_ms > 0 && x.started_at_ms > 0 {
                duration(x.finished_at_ms - x.started_at_ms)
            } else {
                "—".into()
            };
            let _ = write!(
                h,
                r#"<tr><td>{pill}</td><td><a href="/runs/{run}"><code>{rev}</code></a></td><td>{suite}</td><td>{who}</td><td>{authors}</td><td>{started}</td><td>{took}</td><td class="wide"><small>{detail}</small></td></tr>"#,
                pill = pill(&x.state),
                run = esc(&x.run_id),
                rev = esc(&short(&x.revision)),
                suite = esc(&x.suite),
                who = esc(&x.requested_by),
                authors = esc(&x.authors.join(", ")),
                started = ago(x.started_at_ms, now),
                detail = esc(x.detail.lines().next().unwrap_or("")),
            );
        }
        h.push_str("</tbody></table>");
    }
    Ok(page(
        &headers,
        "Deploys",
        "Deploys",
        Live::Events("/api/events".into()),
        h,
    ))
}

#[derive(Deserialize)]
pub struct FlakyQuery {
    suite: Option<String>,
}

/// The flakiest tests of a suite and the quarantine.
pub async fn flaky(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<FlakyQuery>,
) -> Result<Response, ApiError> {
    // The suite asked for, else the newest run's.
    let suite = match q.suite.filter(|s| !s.trim().is_empty()) {
        Some(s) => s,
        None => app
            .reads
            .list_runs(1)
            .await?
            .first()
            .map(|r| r.suite.clone())
            .unwrap_or_else(|| "default".into()),
    };
    let tests = app.reads.list_flaky(suite.clone(), 100).await?;
    let quarantine = app.reads.list_quarantine(String::new()).await?;
    let now = Now::real().ms;
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<form class="filters" method="get" action="/flaky"><label>Suite <input name="suite" value="{}"></label><button type="submit">Show</button></form>
<h2>Flakiest tests of {}</h2>"#,
        esc(&suite),
        esc(&suite)
    );
    if tests.is_empty() {
        h.push_str(r#"<p class="empty">No flaky test in this suite's history.</p>"#);
    } else {
        h.push_str(r#"<table class="flaky"><thead><tr><th class="wide">Test</th><th>Flake rate</th><th>Runs</th><th>Flakes</th><th>Failures</th><th>Flips</th><th>Last flake</th><th>Quarantine</th></tr></thead><tbody>"#);
        for t in &tests {
            let _ = write!(
                h,
                r#"<tr><td class="wide"><code>{id}</code></td><td>{rate:.1}%</td><td>{runs}</td><td>{flakes}</td><td>{failures}</td><td>{flips}</td><td>{last}</td><td>{q}</td></tr>"#,
                id = esc(&t.test_id),
                rate = t.flake_rate * 100.0,
                runs = t.runs,
                flakes = t.flakes,
                failures = t.failures,
                flips = t.flips,
                last = ago(t.last_flake_at_ms, now),
                q = if t.quarantined {
                    pill("quarantined")
                } else if t.propose_quarantine {
                    pill("proposed")
                } else {
                    String::new()
                },
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("<h2>Quarantine</h2>");
    if quarantine.is_empty() {
        h.push_str(r#"<p class="empty">No test is quarantined.</p>"#);
    } else {
        h.push_str(r#"<table class="quarantine"><thead><tr><th>Suite</th><th class="wide">Test</th><th>Reason</th><th>By</th><th>Since</th></tr></thead><tbody>"#);
        for e in &quarantine {
            let _ = write!(
                h,
                r#"<tr><td>{}</td><td class="wide"><code>{}</code></td><td>{}</td><td>{}{}</td><td>{}</td></tr>"#,
                esc(&e.suite),
                esc(&e.test_id),
                esc(&e.reason),
                esc(&e.added_by),
                if e.automatic { " (automatic)" } else { "" },
                ago(e.added_at_ms, now),
            );
        }
        h.push_str("</tbody></table>");
    }
    Ok(page(&headers, "Flaky tests", "Flaky", Live::Still, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(worker: &str, start: u64, end: u64) -> pb::ShardProgress {
        pb::ShardProgress {
            worker: worker.into(),
            started_at_ms: start,
            ended_at_ms: end,
            attempt_id: format!("{worker}-{start}"),
            ..Default::default()
        }
    }

    #[test]
    fn shards_of_one_worker_pack_into_as_few_lanes_as_overlap_needs() {
        let shards = [
            shard("w1", 0, 10),
            shard("w1", 2, 8),
            shard("w1", 10, 20),
            shard("w1", 8, 0), // running
            shard("w2", 5, 6),
        ];
        let l = lanes(&shards, 30);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].0, "w1");
        assert_eq!(l[0].1.len(), 2, "two at a time at most");
        assert_eq!(l[1].1.len(), 1);
    }

    #[test]
    fn text_is_escaped_and_durations_read_well() {
        assert_eq!(esc(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(duration(310), "310ms");
        assert_eq!(duration(12_400), "12.4s");
        assert_eq!(duration(187_000), "3m 07s");
        assert_eq!(duration(3_720_000), "1h 02m");
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }
}
