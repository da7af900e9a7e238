//! The worker's probe endpoint (`--health-addr`), for container orchestrators: `GET /healthz`
//! answers 200 while the process serves, `GET /readyz` 200 once the worker is registered with
//! its coordinator and not draining (503 with the reason otherwise). Plain HTTP/1.1, one
//! request per connection, bounded reads: it is a probe, not an API.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What `/readyz` reports.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, else why not.
    fn ready(&self) -> Result<(), &'static str>;
}

/// Serves probes on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, state: Arc<dyn Readiness>, stop: CancellationToken) {
    loop {
        let (mut conn, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    // Out of descriptors or similar: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while len < buf.len() {
                    match conn.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || buf[..len].contains(&b'\n') {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let (code, body) = answer(&buf[..len], state.as_ref());
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// The status and body for a request's first bytes.
fn answer(request: &[u8], state: &dyn Readiness) -> (u16, String) {
    let line = String::from_utf8_lossy(request);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    match path {
        "/healthz" => (200, "ok\n".into()),
        "/readyz" => match state.ready() {
            Ok(()) => (200, "ready\n".into()),
            Err(why) => (503, format!("{why}\n")),
        },
        _ => (404, "not found: /healthz and /readyz are served\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<(), &'static str>);
    impl Readiness for Fixed {
        fn ready(&self) -> Result<(), &'static str> {
            self.0
        }
    }

    #[test]
    fn probes_answer_by_path_and_state() {
        let ready = Fixed(Ok(()));
        let draining = Fixed(Err("draining"));
        assert_eq!(answer(b"GET /healthz HTTP/1.1\r\n\r\n", &draining).0, 200);
        assert_eq!(answer(b"GET /readyz HTTP/1.1\r\n\r\n", &ready).0, 200);
        assert_eq!(
            answer(b"GET /readyz HTTP/1.1\r\n\r\n", &draining),
            (503, "draining\n".to_owned())
        );
        assert_eq!(answer(b"GET /metrics HTTP/1.1\r\n\r\n", &ready).0, 404);
        assert_eq!(answer(b"\xff\xfe", &ready).0, 404);
    }
}
