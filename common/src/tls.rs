//! TLS for the processes that call the coordinator. An `https://` URL always means TLS (never
//! a plaintext fallback): with `--ca-cert` the coordinator's certificate must chain to that CA,
//! otherwise to the public web roots. A worker under mTLS also presents its own certificate.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How a client reaches a TLS coordinator.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA the coordinator's certificate must chain to.
    pub ca_cert: Option<PathBuf>,
    /// This process's own certificate and key, for mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn read(what: &str, path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("failed to read {what} '{}': {e}", path.display()))
}

/// The endpoint for `url`, with TLS when the URL is `https://`.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, String> {
    // `host:port` alone means plaintext, or TLS when TLS options are given.
    let url = match url.split_once("://") {
        Some((scheme, _))
            if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") =>
        {
            return Err(format!(
                "invalid coordinator URL '{url}': the scheme is http:// or https://, not {scheme}://"
            ));
        }
        Some(_) => url.to_owned(),
        None if tls.ca_cert.is_some() || tls.cert.is_some() => format!("https://{url}"),
        None => format!("http://{url}"),
    };
    let url = url.as_str();
    let endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|e| format!("invalid coordinator URL '{url}': {e}"))?;
    let https = url.to_ascii_lowercase().starts_with("https://");
    if !https {
        if tls.ca_cert.is_some() || tls.cert.is_some() {
            return Err(format!(
                "--ca-cert and --tls-cert are for TLS: use an https:// coordinator URL, not '{url}'"
            ));
        }
        return Ok(endpoint);
    }
    let mut cfg = ClientTlsConfig::new();
    cfg = match &tls.ca_cert {
        Some(p) => cfg.ca_certificate(Certificate::from_pem(read("--ca-cert", p)?)),
        None => cfg.with_webpki_roots(),
    };
    match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            cfg = cfg.identity(Identity::from_pem(read("--tls-cert", c)?, read("--tls-key", k)?));
        }
        (None, None) => {}
        _ => return Err("--tls-cert and --tls-key go together".into()),
    }
    endpoint
        .tls_config(cfg)
        .map_err(|e| format!("invalid TLS settings for '{url}': {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_need_an_https_url_and_come_in_pairs() {
        let ca = ClientTls {
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(endpoint("http://x:1", &ca).unwrap_err().contains("https://"));
        assert!(
            endpoint("https://x:1", &ca)
                .unwrap_err()
                .contains("failed to read --ca-cert")
        );
        let half = ClientTls {
            cert: Some("/a".into()),
            ..Default::default()
        };
        assert!(endpoint("http://x:1", &ClientTls::default()).is_ok());
        assert!(endpoint("https://x:1", &half).is_err());
    }

    #[test]
    fn a_bare_address_is_plaintext_or_tls_by_the_options_and_other_schemes_are_refused() {
        let plain = endpoint("coordinator:7070", &ClientTls::default()).unwrap();
        assert_eq!(plain.uri().to_string(), "http://coordinator:7070/");
        let ca = ClientTls {
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        // TLS options make it https (and so the missing CA file is what is reported).
        assert!(
            endpoint("coordinator:7070", &ca)
                .unwrap_err()
                .contains("failed to read --ca-cert")
        );
        let e = endpoint("ftp://x:1", &ClientTls::default()).unwrap_err();
        assert!(e.contains("the scheme is http:// or https://, not ftp://"), "{e}");
    }
}
