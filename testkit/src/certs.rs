//! Test certificates: a CA, a coordinator certificate for 127.0.0.1 and localhost, and a worker
//! client certificate (and a second one) signed by the same CA (rcgen; a self-signed leaf would be refused by
//! rustls as a CA used as an end entity).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// PEM files written to a directory.
#[derive(Debug, Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub worker_cert: PathBuf,
    pub worker_key: PathBuf,
    /// A second client certificate (common name "intruder") from the same CA.
    pub other_cert: PathBuf,
    pub other_key: PathBuf,
}

/// Makes a CA and two leaves under `dir`.
pub fn make(dir: &Path) -> Certs {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "shardgate test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "coordinator",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (worker_cert, worker_key) = leaf(
        vec!["worker".into()],
        "worker",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (other_cert, other_key) = leaf(
        vec!["intruder".into()],
        "intruder",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Certs {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        worker_cert: write("worker.pem", &worker_cert),
        worker_key: write("worker.key", &worker_key),
        other_cert: write("other.pem", &other_cert),
        other_key: write("other.key", &other_key),
    }
}
