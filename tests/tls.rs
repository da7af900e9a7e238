//! TLS on real processes: a TLS coordinator serves clients that trust its CA over https, on both
//! ports, and refuses plaintext (an https:// URL never falls back to plaintext); under mTLS a
//! worker without a client certificate is refused while one with it runs shards, and a worker is
//! bound to its certificate.

mod harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use harness::{Cluster, bin, client, http_get, suite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` over HTTPS, trusting only the test CA: the status code.
fn https_get(cluster: &Cluster, path: &str) -> Result<u16, String> {
    let certs = cluster.certs.as_ref().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&certs.ca).unwrap();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let addr = cluster.http_addr.clone();
    let path = path.to_owned();
    tokio::runtime::Runtime::new().unwrap().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: shardgate\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut resp = Vec::new();
        let _ = tls.read_to_end(&mut resp).await;
        let text = String::from_utf8_lossy(&resp);
        text.get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {text:?}"))
    })
}

#[test]
fn a_tls_coordinator_serves_tls_clients_and_refuses_plaintext() {
    let cluster = Cluster::builder().workers(2).slots(1).with_tls(false).start();
    let tests = suite(&cluster.root, 6, &[2], "0");
    let r = cluster.run_tests(&tests, &[]);
    assert_eq!(r.code, 1, "the suite's verdict over TLS: {}", r.stderr);
    assert_eq!(r.json()["counts"]["failed"], 1);

    // Plaintext to the TLS port: refused, never served.
    let plain = cluster.url().replace("https://", "http://");
    let r = client(&["runs", "--coordinator", &plain]);
    assert_eq!(r.code, 2, "plaintext client: {}", r.stdout);
    // https without the CA: the certificate is not trusted, no fallback.
    let r = client(&["runs", "--coordinator", &cluster.url()]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    // The HTTP port speaks TLS only.
    assert_eq!(https_get(&cluster, "/healthz"), Ok(200));
    assert_eq!(https_get(&cluster, "/api/runs"), Ok(200));
    assert!(!matches!(http_get(&cluster.http_addr, "/healthz"), Ok((200, _))));
}

/// Runs a worker named `name` against the mTLS `cluster` with client certificate `cert` (or
/// none) until it gives up by itself (a refusal is not retried, so the wait is bounded by its
/// own exit): its exit code and stderr.
fn refused_worker(cluster: &Cluster, name: &str, cert: Option<(&Path, &Path)>) -> (Option<i32>, String) {
    let certs = cluster.certs.as_ref().unwrap();
    let mut cmd = Command::new(bin("shardgate-worker"));
    cmd.args(["--coordinator", &cluster.url(), "--name", name])
        .arg("--ca-cert")
        .arg(&certs.ca)
        .arg("--exec-root")
        .arg(&cluster.root)
        .env_remove("SHARDGATE_TLS_CERT")
        .env_remove("SHARDGATE_TLS_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((c, k)) = cert {
        cmd.arg("--tls-cert").arg(c).arg("--tls-key").arg(k);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn under_mtls_a_worker_without_a_client_certificate_is_refused() {
    let cluster = Cluster::builder().workers(1).slots(2).with_tls(true).start();
    let (code, stderr) = refused_worker(&cluster, "nocert", None);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("client certificate"), "{stderr}");

    // Clients need no certificate; the worker with one runs the suite.
    let tests = suite(&cluster.root, 4, &[], "0");
    let r = cluster.run_tests(&tests, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let workers = cluster.client(&["workers", "--json"]).json();
    let names: Vec<&str> = workers
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["w1"], "the worker without a certificate never registered");
}

#[test]
fn under_mtls_a_worker_is_its_certificate_and_another_certificate_cannot_take_its_name() {
    let cluster = Cluster::builder().workers(1).slots(2).with_tls(true).start();
    let certs = cluster.certs.clone().unwrap();
    let (code, stderr) = refused_worker(&cluster, "w1", Some((&certs.other_cert, &certs.other_key)));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("held by a live worker of another identity ('cert:worker')"),
        "{stderr}"
    );

    // The real w1 is untouched and runs the suite.
    let tests = suite(&cluster.root, 4, &[], "0");
    let r = cluster.run_tests(&tests, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
