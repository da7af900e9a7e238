//! Connections the coordinator accepts: at most a cap of them at once (below the process's file
//! limit, so a flood of silent connections cannot take every descriptor), each closed once
//! nothing has moved on it for an idle timeout (a connection that never speaks, or whose peer
//! vanished), and accept errors (out of descriptors) backed off instead of spun on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How connections are limited.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most connections open at once; more wait in the listen backlog.
    pub max: usize,
    /// A connection on which nothing moved for this long is closed.
    pub idle: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max: default_max_connections(),
            idle: Duration::from_secs(60),
        }
    }
}

/// The soft file limit less room for the database, logs, hooks and the like.
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024);
    soft.saturating_sub(256).max(64)
}

/// Accepts connections under the cap, backing off on errors; each accepted stream holds a
/// permit until it is dropped.
async fn accept_loop(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    mut each: impl FnMut(TcpStream, OwnedSemaphorePermit) -> bool,
) {
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = loop {
            match listener.accept().await {
                Ok((s, _)) => break s,
                Err(e) => {
                    // Out of descriptors and the like: wait for some to come back.
                    tracing::warn!(error = %e, "failed to accept a connection; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        if !each(stream, permit) {
            return;
        }
    }
}

/// A connection of the HTTP port: plain or TLS, under the same cap and idle timeout.
pub type HttpIo = Box<dyn HttpStream>;

/// What the HTTP server needs of a connection.
pub trait HttpStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> HttpStream for T {}

/// The HTTP port's listener for axum: connections under a cap, closed when idle, with TLS
/// (handshakes done off the accept loop, each within 10 s) when an acceptor is given.
pub struct HttpListener {
    rx: tokio::sync::mpsc::Receiver<(HttpIo, std::net::SocketAddr)>,
    addr: std::net::SocketAddr,
}

impl HttpListener {
    pub fn new(
        listener: TcpListener,
        limits: ConnLimits,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let permits = Arc::new(Semaphore::new(limits.max));
        tokio::spawn(accept_loop(listener, permits, move |stream, permit| {
            let peer = stream.peer_addr().unwrap_or(addr);
            let conn = Limited::new(stream, permit, limits.idle);
            let open = !tx.is_closed();
            let tx = tx.clone();
            match &tls {
                None => {
                    tokio::spawn(async move {
                        let _ = tx.send((Box::new(conn) as HttpIo, peer)).await;
                    });
                    open
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(conn)).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send((Box::new(tls) as HttpIo, peer)).await;
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    });
                    open
                }
            }
        }));
        Ok(Self { rx, addr })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = HttpIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Accepted connections, at most `limits.max` open at once, with Nagle's algorithm off (a
/// reply written in more than one piece would otherwise wait for the client's delayed ACK).
///
/// With `closed`, each connection's peer address is sent there when the connection ends.
pub fn incoming(
    listener: TcpListener,
    limits: ConnLimits,
    closed: Option<tokio::sync::mpsc::UnboundedSender<std::net::SocketAddr>>,
) -> impl tokio_stream::Stream<Item = io::Result<Limited>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let permits = Arc::new(Semaphore::new(limits.max));
    tokio::spawn(accept_loop(listener, permits, move |stream, permit| {
        let mut conn = Limited::new(stream, permit, limits.idle);
        if let (Some(closed), Ok(peer)) = (&closed, conn.io.peer_addr()) {
            conn.on_close = Some((peer, closed.clone()));
        }
        // The server takes connections as fast as they come; a full channel is a stopped one.
        match tx.try_send(Ok(conn)) {
            Ok(()) => true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(c)) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(c).await;
                });
                true
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
        }
    }));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A connection that holds its place under the cap and closes itself when idle.
#[derive(Debug)]
pub struct Limited<T = TcpStream> {
    io: T,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    /// When bytes last moved; the timer is re-armed from it only when it fires, not on every
    /// read and write (the runtime's timer is shared with everything else).
    last: std::time::Instant,
    deadline: Pin<Box<Sleep>>,
    /// Told the peer's address when the connection ends.
    on_close: Option<(
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedSender<std::net::SocketAddr>,
    )>,
}

impl<T> Drop for Limited<T> {
    fn drop(&mut self) {
        if let Some((peer, tx)) = self.on_close.take() {
            let _ = tx.send(peer);
        }
    }
}

impl<T> Limited<T> {
    fn new(io: T, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        Self {
            io,
            _permit: permit,
            idle,
            last: std::time::Instant::now(),
            deadline: Box::pin(tokio::time::sleep(idle)),
            on_close: None,
        }
    }

    fn touched(&mut self) {
        self.last = std::time::Instant::now();
    }

    /// When nothing can move now, an expired idle deadline ends the connection; a deadline
    /// that fires after recent traffic is moved to `last + idle` instead.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last + self.idle;
            if std::time::Instant::now() >= due {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
            }
            self.deadline.as_mut().reset(Instant::from_std(due));
        }
    }
}

use std::future::Future;

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touched();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.check_idle(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touched();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check_idle(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Limited<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
