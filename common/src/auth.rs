//! Credentials: the four roles, bearer tokens and their SHA-256 digests, and the client side
//! that sends a token with every call. The coordinator keeps only digests; a secret is shown
//! once, when it is made, and never logged.

use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

crate::text_enum!(
    /// What a credential may do.
    Role, "role", {
        /// The worker service only.
        Worker => "worker",
        /// Submit runs, cancel its own, and read.
        Trigger => "trigger",
        /// Read only.
        Viewer => "viewer",
        /// Everything.
        Admin => "admin",
    }
);

/// The lowercase hex SHA-256 of a secret, as a tokens file stores it.
pub fn digest_hex(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

/// The lowercase hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `secret` hashes to `digest_hex`, compared in constant time.
pub fn matches(secret: &str, digest_hex_expected: &str) -> bool {
    let got = digest_hex(secret);
    got.as_bytes().ct_eq(digest_hex_expected.as_bytes()).into()
}

/// A fresh secret: 32 random bytes, hex.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "sg_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The secret in an `authorization: Bearer <secret>` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, secret) = value.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !secret.trim().is_empty()).then(|| secret.trim())
}

/// The header a standby coordinator names the leader's gRPC address in.
pub const LEADER_HEADER: &str = "x-shardgate-leader";

/// A channel that sends `authorization: Bearer <secret>` with every call (when it has a
/// token). Generated clients take it wherever they take a `Channel`.
///
/// Given several coordinator addresses ([`AuthChannel::following`]), it sends each call to the
/// one it believes leads, and moves on when that one cannot be reached (to the next address)
/// or answers as a standby (to the leader the standby names). The call that found out fails
/// as it did (`UNAVAILABLE`); the caller's retry goes to the new address.
#[derive(Debug, Clone)]
pub struct AuthChannel {
    targets: std::sync::Arc<Targets>,
    header: Option<http::HeaderValue>,
}

#[derive(Debug)]
struct Targets {
    /// Each address as given (`host:port`, with or without a scheme) and its channel.
    channels: Vec<(String, tonic::transport::Channel)>,
    /// The index of the address calls go to.
    current: std::sync::atomic::AtomicUsize,
}

impl Targets {
    /// Moves from address `from` to `to`, unless another call moved already.
    fn move_to(&self, from: usize, to: usize) {
        use std::sync::atomic::Ordering;
        if from != to
            && self
                .current
                .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            tracing::info!(
                from = %self.channels[from].0,
                to = %self.channels[to].0,
                "following the coordinator that leads"
            );
        }
    }

    /// Where to go after address `i` answered as a standby naming `leader`: the leader if it
    /// is one of ours, else the next address.
    fn follow(&self, i: usize, leader: &str) {
        let leader = strip_scheme(leader);
        let to = self
            .channels
            .iter()
            .position(|(a, _)| strip_scheme(a) == leader)
            .unwrap_or((i + 1) % self.channels.len());
        self.move_to(i, to);
    }
}

fn strip_scheme(a: &str) -> &str {
    let a = a.split_once("://").map_or(a, |(_, rest)| rest);
    a.trim_end_matches('/')
}

fn auth_header(token: Option<&str>) -> Result<Option<http::HeaderValue>, String> {
    token
        .map(|t| {
            let mut v = http::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                .map_err(|_| "the token has characters a header cannot carry".to_owned())?;
            v.set_sensitive(true);
            Ok::<_, String>(v)
        })
        .transpose()
}

impl AuthChannel {
    /// `token` is the secret, or `None` for a coordinator without credentials.
    pub fn new(inner: tonic::transport::Channel, token: Option<&str>) -> Result<Self, String> {
        Self::following(vec![(String::new(), inner)], token)
    }

    /// A channel over several coordinators (their addresses and channels, at least one) that
    /// follows the one that leads.
    pub fn following(
        channels: Vec<(String, tonic::transport::Channel)>,
        token: Option<&str>,
    ) -> Result<Self, String> {
        if channels.is_empty() {
            return Err("no coordinator address given".into());
        }
        Ok(Self {
            targets: std::sync::Arc::new(Targets {
                channels,
                current: std::sync::atomic::AtomicUsize::new(0),
            }),
            header: auth_header(token)?,
        })
    }
}

type ChannelResponse =
    <tonic::transport::Channel as tower::Service<http::Request<tonic::body::Body>>>::Response;
type ChannelError = <tonic::transport::Channel as tower::Service<http::Request<tonic::body::Body>>>::Error;

impl tower::Service<http::Request<tonic::body::Body>> for AuthChannel {
    type Response = ChannelResponse;
    type Error = ChannelError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call waits for its own channel to be ready (below): which channel is only known
        // when the call is made.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        use tower::ServiceExt;
        if let Some(h) = &self.header {
            req.headers_mut().insert(http::header::AUTHORIZATION, h.clone());
        }
        let targets = self.targets.clone();
        let i = targets.current.load(std::sync::atomic::Ordering::SeqCst);
        let channel = targets.channels[i].1.clone();
        Box::pin(async move {
            let r = channel.oneshot(req).await;
            if targets.channels.len() > 1 {
                match &r {
                    Ok(resp) => {
                        if let Some(leader) = resp.headers().get(LEADER_HEADER).and_then(|v| v.to_str().ok())
                        {
                            targets.follow(i, leader);
                        }
                    }
                    Err(_) => targets.move_to(i, (i + 1) % targets.channels.len()),
                }
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_matches_its_digest_only() {
        let s = new_secret();
        assert!(s.starts_with("sg_") && s.len() == 67, "{s}");
        let d = digest_hex(&s);
        assert_eq!(d.len(), 64);
        assert!(matches(&s, &d));
        assert!(!matches("other", &d));
        assert_ne!(new_secret(), s);
    }

    #[test]
    fn bearer_values_are_read_and_others_refused() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn roles_have_one_spelling() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), *r);
        }
        assert!("root".parse::<Role>().unwrap_err().contains("one of"));
    }
}
