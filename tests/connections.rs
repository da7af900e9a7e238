//! Connections cannot be hoarded: more silent connections than the cap, on the gRPC and the
//! HTTP port, neither stop a normal client from being served nor stay open past the idle
//! timeout.

mod harness;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use harness::{Cluster, suite};

#[test]
fn silent_connections_beyond_the_cap_do_not_lock_out_clients_and_are_closed_when_idle() {
    let cluster = Cluster::builder()
        .workers(1)
        .slots(1)
        .coordinator_args(&["--max-connections", "16", "--idle-timeout", "2s"])
        .start();
    // Silent connections to both ports.
    let silent: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&cluster.grpc_addr).unwrap())
        .chain((0..40).map(|_| TcpStream::connect(&cluster.http_addr).unwrap()))
        .collect();

    // A normal client is served (once idle connections ahead of it are closed).
    let started = Instant::now();
    let r = cluster.client(&["runs", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(30));
    let (code, _) = harness::http_get(&cluster.http_addr, "/healthz").unwrap();
    assert_eq!(code, 200, "the HTTP port serves too");
    // The worker's own connection was never idle: it still runs shards.
    let tests = suite(&cluster.root, 3, &[], "0");
    let r = cluster.run_tests(&tests, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // Every silent connection was closed by the coordinator.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => {
                // The server may have sent its HTTP/2 settings before closing; then EOF.
                let _ = n;
                let rest = s.read(&mut buf);
                assert!(matches!(rest, Ok(0) | Err(_)), "still open: {rest:?}");
            }
            Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "still open after 20 s"),
        }
    }
}
