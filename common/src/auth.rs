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

/// A channel that sends `authorization: Bearer <secret>` with every call (when it has a
/// token). Generated clients take it wherever they take a `Channel`.
#[derive(Debug, Clone)]
pub struct AuthChannel {
    inner: tonic::transport::Channel,
    header: Option<http::HeaderValue>,
}

impl AuthChannel {
    /// `token` is the secret, or `None` for a coordinator without credentials.
    pub fn new(inner: tonic::transport::Channel, token: Option<&str>) -> Result<Self, String> {
        let header = token
            .map(|t| {
                let mut v = http::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                    .map_err(|_| "the token has characters a header cannot carry".to_owned())?;
                v.set_sensitive(true);
                Ok::<_, String>(v)
            })
            .transpose()?;
        Ok(Self { inner, header })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for AuthChannel {
    type Response = <tonic::transport::Channel as tower::Service<http::Request<tonic::body::Body>>>::Response;
    type Error = <tonic::transport::Channel as tower::Service<http::Request<tonic::body::Body>>>::Error;
    type Future = <tonic::transport::Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(h) = &self.header {
            req.headers_mut().insert(http::header::AUTHORIZATION, h.clone());
        }
        self.inner.call(req)
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
