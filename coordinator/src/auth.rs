//! Credentials per role, checked in one tower layer in front of every gRPC service and one
//! middleware in front of the HTTP API. A request's credential (`authorization: Bearer
//! <secret>`) is hashed and compared in constant time with every token's SHA-256; the secret is
//! never stored or logged. The caller's [`Identity`] rides in the request's extensions, so the
//! handlers record who acted and bind workers (and their attempts) to it.
//!
//! Without a tokens file the coordinator has no credentials: every caller is anonymous with
//! every right, which `server.rs` allows on loopback addresses only unless told otherwise.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Deserialize;
use shardgate_common::Error;
use shardgate_common::auth::{Role, bearer, matches};

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's name; empty when the coordinator has no credentials.
    pub name: String,
    pub role: Role,
}

impl Identity {
    /// The caller of a coordinator without credentials.
    pub fn anonymous() -> Self {
        Self {
            name: String::new(),
            role: Role::Admin,
        }
    }

    /// Whether the coordinator knows who this is (it has credentials).
    pub fn known(&self) -> bool {
        !self.name.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("failed to read tokens file '{path}': {error}")]
    Read { path: String, error: std::io::Error },
    #[error("invalid tokens file: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("token '{name}': {reason}")]
    Invalid { name: String, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tokens: BTreeMap<String, Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    role: Role,
    sha256: String,
}

/// The tokens a coordinator accepts: name, role and the SHA-256 of the secret.
#[derive(Debug, Clone)]
pub struct Tokens {
    entries: Vec<(String, Role, String)>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|error| TokensError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, TokensError> {
        let file: File = toml::from_str(text)?;
        let mut entries = Vec::new();
        for (name, e) in file.tokens {
            let invalid = |reason: &str| TokensError::Invalid {
                name: name.clone(),
                reason: reason.to_owned(),
            };
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(invalid(
                    "a token name uses letters, digits, '-', '_', '.' and '@', at most 64",
                ));
            }
            let digest = e.sha256.trim().to_ascii_lowercase();
            if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(
                    "sha256 must be 64 hex digits (the SHA-256 of the secret)",
                ));
            }
            if entries.iter().any(|(_, _, d)| *d == digest) {
                return Err(invalid("another token has the same secret"));
            }
            entries.push((name, e.role, digest));
        }
        if entries.is_empty() {
            return Err(TokensError::Invalid {
                name: "-".into(),
                reason: "the file has no [tokens.NAME] table".into(),
            });
        }
        Ok(Self { entries })
    }

    /// The identity whose secret this is. Every token is compared, in constant time each, so
    /// the time taken says nothing about which one matched.
    pub fn identify(&self, secret: &str) -> Option<Identity> {
        let mut found = None;
        for (name, role, digest) in &self.entries {
            if matches(secret, digest) && found.is_none() {
                found = Some(Identity {
                    name: name.clone(),
                    role: *role,
                });
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health, readiness, reflection.
    Open,
    /// The worker service.
    Work,
    /// Reads: runs, watches, the dashboard, gate lists, the JSON API.
    Read,
    /// Submitting and cancelling runs (a trigger cancels only its own).
    Submit,
    /// Quarantine and anything not named.
    Admin,
}

impl Access {
    /// What a gRPC method (`/package.Service/Method`) needs.
    pub fn of_grpc(path: &str) -> Self {
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        match (service, method) {
            ("grpc.health.v1.Health", _) => Access::Open,
            (s, _) if s.starts_with("grpc.reflection.") => Access::Open,
            ("shardgate.v1.WorkerService", _) => Access::Work,
            ("shardgate.v1.RunService", "SubmitRun" | "CancelRun") => Access::Submit,
            ("shardgate.v1.RunService", "GetRun" | "WatchRun" | "ListRuns") => Access::Read,
            ("shardgate.v1.DashboardService", _) => Access::Read,
            ("shardgate.v1.GateService", "ListFlaky" | "ListQuarantine" | "ListDeploys") => Access::Read,
            _ => Access::Admin,
        }
    }

    /// What an HTTP path needs.
    pub fn of_http(path: &str) -> Self {
        match path {
            "/healthz" | "/readyz" | "/login" => Access::Open,
            p if p.starts_with("/assets/") => Access::Open,
            _ => Access::Read,
        }
    }

    pub fn allows(self, role: Role) -> bool {
        match self {
            Access::Open => true,
            Access::Work => matches!(role, Role::Worker | Role::Admin),
            Access::Read => matches!(role, Role::Viewer | Role::Trigger | Role::Admin),
            Access::Submit => matches!(role, Role::Trigger | Role::Admin),
            Access::Admin => role == Role::Admin,
        }
    }
}

/// The coordinator's credentials: none (anonymous callers with every right) or a tokens file.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Option<Arc<Tokens>>,
}

impl Auth {
    pub fn open() -> Self {
        Self::default()
    }

    pub fn with_tokens(tokens: Tokens) -> Self {
        Self {
            tokens: Some(Arc::new(tokens)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// Who presented `authorization` (the header's value), and whether they may have `access`.
    pub fn check(&self, authorization: Option<&str>, access: Access) -> Result<Identity, Error> {
        let Some(tokens) = &self.tokens else {
            return Ok(Identity::anonymous());
        };
        let identity = authorization
            .and_then(bearer)
            .and_then(|secret| tokens.identify(secret));
        match identity {
            Some(id) if access.allows(id.role) => Ok(id),
            Some(id) => Err(Error::PermissionDenied(format!(
                "token '{}' has role '{}', which may not do this",
                id.name, id.role
            ))),
            None if access == Access::Open => Ok(Identity {
                name: String::new(),
                role: Role::Viewer,
            }),
            None if authorization.is_none() => Err(Error::Unauthenticated(
                "this coordinator needs a token: pass --token (or SHARDGATE_TOKEN), sent as 'authorization: Bearer <secret>'".into(),
            )),
            None => Err(Error::Unauthenticated("unknown or malformed token".into())),
        }
    }
}

/// The caller of a gRPC handler (put there by [`AuthLayer`]).
pub fn caller<T>(req: &tonic::Request<T>) -> Identity {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .unwrap_or_else(Identity::anonymous)
}

/// Checks every gRPC request before it reaches a service.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Auth,
    worker_certs: bool,
}

impl AuthLayer {
    pub fn new(auth: Auth) -> Self {
        Self {
            auth,
            worker_certs: false,
        }
    }

    /// Under mTLS: the worker service answers only callers with a verified client certificate.
    pub fn require_worker_certs(mut self, yes: bool) -> Self {
        self.worker_certs = yes;
        self
    }
}

/// The identity of the client certificate the connection presented (verified by the TLS layer):
/// `cert:` and the subject's common name, else its first DNS name, else its SHA-256.
fn client_cert_identity<B>(req: &http::Request<B>) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())?;
    let der = certs.first()?;
    Some(format!("cert:{}", cert_name(der.as_ref())))
}

/// A certificate's name as an identity.
pub fn cert_name(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let parsed = X509Certificate::from_der(der).ok().map(|(_, c)| c);
    let common_name = parsed.as_ref().and_then(|c| {
        c.subject()
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok().map(str::to_owned))
    });
    let dns_name = || {
        let c = parsed.as_ref()?;
        let san = c.subject_alternative_name().ok().flatten()?;
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
    };
    let printable = |s: String| !s.is_empty() && !s.chars().any(char::is_control);
    common_name
        .filter(|s| printable(s.clone()))
        .or_else(|| dns_name().filter(|s| printable(s.clone())))
        .unwrap_or_else(|| format!("sha256:{}", shardgate_common::auth::sha256_hex(der)))
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
            worker_certs: self.worker_certs,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Auth,
    worker_certs: bool,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let access = Access::of_grpc(req.uri().path());
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let cert = client_cert_identity(&req);
        let checked = if access == Access::Work && self.worker_certs && cert.is_none() {
            Err(Error::Unauthenticated(
                "workers must present a client certificate (this coordinator requires mTLS): pass --tls-cert and --tls-key".into(),
            ))
        } else {
            self.auth.check(header, access).map(|id| match cert {
                // Without tokens, a worker is who its certificate names: it owns the workers
                // it registers, and another certificate cannot act for them.
                Some(name) if !id.known() && access == Access::Work => Identity {
                    name,
                    role: Role::Worker,
                },
                _ => id,
            })
        };
        match checked {
            Ok(identity) => {
                req.extensions_mut().insert(identity);
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let mut resp = fut.await?;
                    bad_request_not_internal(&mut resp);
                    Ok(resp)
                })
            }
            Err(e) => {
                tracing::debug!(path = %req.uri().path(), error = %e, "request refused");
                let status: tonic::Status = e.into();
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// A request that does not decode (invalid UTF-8 in a string, a malformed message) is the
/// caller's error: tonic reports it as `INTERNAL`; it is answered `INVALID_ARGUMENT`.
fn bad_request_not_internal<B>(resp: &mut http::Response<B>) {
    let headers = resp.headers_mut();
    let internal = headers.get("grpc-status").is_some_and(|v| v == "13");
    let undecodable = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.starts_with("failed%20to%20decode") || m.starts_with("failed to decode"));
    if internal && undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

/// The dashboard's token cookie.
pub const TOKEN_COOKIE: &str = "shardgate_token";

fn token_cookie(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == TOKEN_COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// A dashboard page (not the JSON API, metrics or events): asked for without a valid token,
/// it answers with the login form rather than JSON.
fn is_page(path: &str) -> bool {
    !(path.starts_with("/api/") || path == "/metrics")
}

/// The HTTP middleware: the same check for the JSON API (401 and 403 as JSON).
pub async fn http_layer(
    axum::extract::State(auth): axum::extract::State<Auth>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = req.uri().path().to_owned();
    let access = Access::of_http(&path);
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        // A browser on the dashboard carries its token in a cookie set by `/login`.
        .or_else(|| token_cookie(req.headers()).map(|t| format!("Bearer {t}")));
    match auth.check(header.as_deref(), access) {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        Err(_) if is_page(&path) && req.method() == http::Method::GET => {
            crate::web::login_page(&path, header.is_some())
        }
        Err(e) => {
            let code = match e {
                Error::PermissionDenied(_) => http::StatusCode::FORBIDDEN,
                _ => http::StatusCode::UNAUTHORIZED,
            };
            (code, axum::Json(serde_json::json!({ "error": e.to_string() }))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use shardgate_common::auth::{digest_hex, new_secret};

    use super::*;

    fn tokens() -> (Tokens, [String; 4]) {
        let secrets = [new_secret(), new_secret(), new_secret(), new_secret()];
        let text = format!(
            "[tokens.w1]\nrole = \"worker\"\nsha256 = \"{}\"\n[tokens.ci]\nrole = \"trigger\"\nsha256 = \"{}\"\n[tokens.board]\nrole = \"viewer\"\nsha256 = \"{}\"\n[tokens.ops]\nrole = \"admin\"\nsha256 = \"{}\"\n",
            digest_hex(&secrets[0]),
            digest_hex(&secrets[1]),
            digest_hex(&secrets[2]),
            digest_hex(&secrets[3]),
        );
        (Tokens::parse(&text).unwrap(), secrets)
    }

    #[test]
    fn each_role_may_do_its_calls_and_no_other() {
        let (t, s) = tokens();
        let auth = Auth::with_tokens(t);
        let bearer = |i: usize| format!("Bearer {}", s[i]);
        let may = |i: usize, path: &str| auth.check(Some(&bearer(i)), Access::of_grpc(path)).is_ok();
        let register = "/shardgate.v1.WorkerService/Register";
        let submit = "/shardgate.v1.RunService/SubmitRun";
        let get = "/shardgate.v1.RunService/GetRun";
        let quarantine = "/shardgate.v1.GateService/AddQuarantine";
        let health = "/grpc.health.v1.Health/Check";
        //               worker   trigger  viewer   admin
        for (path, want) in [
            (register, [true, false, false, true]),
            (submit, [false, true, false, true]),
            (get, [false, true, true, true]),
            (quarantine, [false, false, false, true]),
            (health, [true, true, true, true]),
            ("/shardgate.v1.Bogus/Call", [false, false, false, true]),
        ] {
            for (i, w) in want.iter().enumerate() {
                assert_eq!(may(i, path), *w, "{path} by token {i}");
            }
        }
        let denied = auth.check(Some(&bearer(0)), Access::Read).unwrap_err();
        assert!(matches!(denied, Error::PermissionDenied(_)), "{denied}");
        let who = auth.check(Some(&bearer(1)), Access::Submit).unwrap();
        assert_eq!((who.name.as_str(), who.role), ("ci", Role::Trigger));
    }

    #[test]
    fn a_missing_or_unknown_token_is_unauthenticated_and_health_stays_open() {
        let (t, _) = tokens();
        let auth = Auth::with_tokens(t);
        for header in [None, Some("Bearer nope"), Some("Basic abc")] {
            let e = auth.check(header, Access::Read).unwrap_err();
            assert!(matches!(e, Error::Unauthenticated(_)), "{header:?}: {e}");
        }
        assert!(auth.check(None, Access::Open).is_ok());
        assert!(auth.check(None, Access::of_http("/healthz")).is_ok());
        assert!(auth.check(None, Access::of_http("/api/runs")).is_err());
        let open = Auth::open().check(None, Access::Admin).unwrap();
        assert!(!open.known());
    }

    #[test]
    fn bad_tokens_files_name_the_problem() {
        for (text, want) in [
            (
                "[tokens.a]\nrole = \"root\"\nsha256 = \"00\"",
                "unknown role 'root'",
            ),
            ("[tokens.a]\nrole = \"admin\"\nsha256 = \"xyz\"", "64 hex digits"),
            ("[tokens.a]\nrole = \"admin\"\nsecret = \"x\"", "unknown field"),
            ("", "no [tokens.NAME] table"),
        ] {
            let e = Tokens::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
