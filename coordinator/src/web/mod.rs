//! The web dashboard: server-rendered pages on the HTTP port, with their stylesheet and
//! script built into the binary (no CDN, no npm). Every page is complete HTML, so it reads
//! with scripts off (and then refreshes itself every few seconds); with scripts on, a page
//! follows the coordinator's event stream (server-sent events) and swaps in its own freshly
//! rendered `<main>` when something changed, at most once a second.

mod pages;

use axum::Router;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::http::AppState;

const CSS: &str = include_str!("app.css");
const JS: &str = include_str!("app.js");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/fleet", get(pages::fleet))
        .route("/deploys", get(pages::deploys))
        .route("/flaky", get(pages::flaky))
        .route("/login", get(login_form).post(login))
        .route("/assets/app.css", get(|| asset(CSS, "text/css; charset=utf-8")))
        .route(
            "/assets/app.js",
            get(|| asset(JS, "text/javascript; charset=utf-8")),
        )
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_form(axum::extract::Query(q): axum::extract::Query<LoginQuery>) -> Response {
    login_page(q.next.as_deref().unwrap_or("/"), false)
}

/// The login form (status 401): the coordinator needs a token, and a browser cannot send a
/// header, so the form stores it in a cookie for this site.
pub fn login_page(next: &str, wrong: bool) -> Response {
    let body = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>Sign in · shardgate</title><link rel="stylesheet" href="/assets/app.css"></head>
<body><header class="top"><span class="brand">shardgate</span></header><main id="main"><section class="login">
<h1>This coordinator needs a token</h1>
{wrong}<p>Paste a viewer (or trigger, or admin) token. It is kept in a cookie for this site only.</p>
<form method="post" action="/login"><input type="hidden" name="next" value="{next}"><input type="password" name="token" autocomplete="current-password" required autofocus><button type="submit">Sign in</button></form>
</section></main></body></html>"#,
        wrong = if wrong {
            r#"<p class="message">That token was refused.</p>"#
        } else {
            ""
        },
        next = esc(next),
    );
    (axum::http::StatusCode::UNAUTHORIZED, Html(body)).into_response()
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Stores the token in a cookie and goes back to the page asked for; the next request checks
/// the token as any other.
async fn login(axum::extract::Form(f): axum::extract::Form<LoginForm>) -> Response {
    let next = f
        .next
        .filter(|n| n.starts_with('/') && !n.starts_with("//"))
        .unwrap_or_else(|| "/".into());
    let token: String = f
        .token
        .trim()
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != ';')
        .collect();
    (
        axum::http::StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!(
                    "{}={token}; Path=/; HttpOnly; SameSite=Strict",
                    crate::auth::TOKEN_COOKIE
                ),
            ),
            (header::LOCATION, next),
        ],
    )
        .into_response()
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Escapes text for HTML content and attribute values.
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

/// Escapes a query-string value.
pub fn query_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// How a page is followed live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Server-sent events at this URL.
    Events(String),
    /// Re-read every few seconds (the fleet: heartbeats are not events).
    Poll,
    /// Nothing changes (an ended run).
    Still,
}

/// A whole page, or only its `<main>` when the page's script asks for a fresh copy.
pub fn page(headers: &HeaderMap, title: &str, nav: &str, live: Live, main: String) -> Response {
    if headers.get("x-shardgate-fragment").is_some() {
        return Html(main).into_response();
    }
    let (live_attr, refresh) = match live {
        Live::Events(url) => (format!(r#" data-events="{}""#, esc(&url)), true),
        Live::Poll => (r#" data-poll="2000""#.to_owned(), true),
        Live::Still => (String::new(), false),
    };
    let noscript = if refresh {
        r#"<noscript><meta http-equiv="refresh" content="5"></noscript>"#
    } else {
        ""
    };
    let link = |href: &str, name: &str| {
        let current = if name == nav {
            r#" aria-current="page""#
        } else {
            ""
        };
        format!(r#"<a href="{href}"{current}>{name}</a>"#)
    };
    let body = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · shardgate</title>
<link rel="stylesheet" href="/assets/app.css">
{noscript}
<script src="/assets/app.js" defer></script>
</head>
<body{live_attr}>
<header class="top">
<a class="brand" href="/">shardgate</a>
<nav>{runs}{fleet}{deploys}{flaky}</nav>
<span class="live-dot" title="live updates"></span>
</header>
<main id="main">
{main}
</main>
</body>
</html>
"#,
        title = esc(title),
        runs = link("/", "Runs"),
        fleet = link("/fleet", "Fleet"),
        deploys = link("/deploys", "Deploys"),
        flaky = link("/flaky", "Flaky"),
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}
