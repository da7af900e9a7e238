//! A TCP proxy that can cut the network between one worker and the coordinator.
//!
//! While cut, the proxy is a black hole rather than a refusal: connections stay open, bytes
//! sent either way are read and dropped, and new connections are accepted and never answered.
//! That is what a real partition looks like to the worker (no RST, no error, just silence), so
//! only its own timeouts and keep-alives can tell it. On heal, every connection that lived
//! through the cut is closed (its byte stream has holes in it) and new ones are forwarded.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[derive(Default)]
struct State {
    cut: AtomicBool,
    stopping: AtomicBool,
    /// Incremented at each cut; a connection opened before the current cut began is stale.
    epoch: AtomicU64,
    /// Open connections: the epoch they were opened in, and both ends (the upstream end is
    /// absent for a connection accepted while cut).
    conns: Mutex<Vec<Conn>>,
    cuts: AtomicU64,
}

struct Conn {
    tainted: bool,
    client: TcpStream,
    upstream: Option<TcpStream>,
}

impl Conn {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(u) = &self.upstream {
            let _ = u.shutdown(Shutdown::Both);
        }
    }
}

pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("cut", &self.is_cut())
            .finish()
    }
}

impl Proxy {
    /// Listens on a loopback port chosen by the OS and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let s = state.clone();
        let accept = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || accept_loop(listener, upstream, s))?;
        Ok(Self {
            addr,
            state,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// How many times the proxy was cut.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// Starts a partition: from now on nothing gets through, in either direction.
    pub fn cut(&self) {
        let mut conns = self.state.conns.lock().unwrap();
        if self.state.cut.swap(true, Ordering::SeqCst) {
            return;
        }
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
        self.state.cuts.fetch_add(1, Ordering::SeqCst);
        for c in conns.iter_mut() {
            c.tainted = true;
        }
    }

    /// Ends a partition: connections that lived through it are closed; new ones get through.
    pub fn heal(&self) {
        let mut conns = self.state.conns.lock().unwrap();
        if !self.state.cut.swap(false, Ordering::SeqCst) {
            return;
        }
        conns.retain(|c| {
            if c.tainted || c.upstream.is_none() {
                c.close();
                false
            } else {
                true
            }
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for c in self.state.conns.lock().unwrap().drain(..) {
            c.close();
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, state: Arc<State>) {
    for client in listener.incoming() {
        if state.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let _ = client.set_nodelay(true);
        let mut conns = state.conns.lock().unwrap();
        let epoch = state.epoch.load(Ordering::SeqCst);
        if state.cut.load(Ordering::SeqCst) {
            // Accepted, never answered: the handshake hangs like a packet lost on the way.
            let Ok(c) = client.try_clone() else { continue };
            spawn_pump(c, None, state.clone(), epoch);
            conns.push(Conn {
                tainted: true,
                client,
                upstream: None,
            });
            continue;
        }
        let Ok(up) = TcpStream::connect(upstream) else {
            // The coordinator is down: the worker sees what it would see without the proxy.
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = up.set_nodelay(true);
        let (Ok(c1), Ok(c2), Ok(u1), Ok(u2)) = (
            client.try_clone(),
            client.try_clone(),
            up.try_clone(),
            up.try_clone(),
        ) else {
            continue;
        };
        spawn_pump(c1, Some(u1), state.clone(), epoch);
        spawn_pump(u2, Some(c2), state.clone(), epoch);
        conns.push(Conn {
            tainted: false,
            client,
            upstream: Some(up),
        });
        // Forget connections both of whose pumps are gone.
        conns.retain(|c| c.client.peer_addr().is_ok());
    }
}

/// Copies `from` to `to` while the proxy is not cut; drops what it reads while it is.
fn spawn_pump(mut from: TcpStream, to: Option<TcpStream>, state: Arc<State>, epoch: u64) {
    std::thread::spawn(move || {
        let mut to = to;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let stale = state.epoch.load(Ordering::SeqCst) != epoch;
            if state.cut.load(Ordering::SeqCst) || stale {
                continue;
            }
            if let Some(t) = to.as_mut()
                && t.write_all(&buf[..n]).is_err()
            {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        // A close does not cross a partition either: the other end learns of it only at the
        // heal, when every connection that lived through the cut is closed.
        let cut = state.cut.load(Ordering::SeqCst) || state.epoch.load(Ordering::SeqCst) != epoch;
        if let Some(t) = to
            && !cut
        {
            let _ = t.shutdown(Shutdown::Both);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn forwards_then_blackholes_then_heals() {
        let proxy = Proxy::start(echo_server()).unwrap();
        let mut before = TcpStream::connect(proxy.addr()).unwrap();
        assert_eq!(echo(&mut before, b"hello").unwrap(), b"hello");

        proxy.cut();
        before.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let err = echo(&mut before, b"lost").unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "silence, not an error: {err}"
        );
        // A new connection during the cut is accepted and never answered.
        let mut during = TcpStream::connect(proxy.addr()).unwrap();
        during.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        assert!(echo(&mut during, b"x").is_err());

        proxy.heal();
        // Connections that lived through the cut are closed...
        before.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        assert!(matches!(before.read(&mut buf), Ok(0) | Err(_)));
        // ...and new ones get through.
        let mut after = TcpStream::connect(proxy.addr()).unwrap();
        after.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(echo(&mut after, b"back").unwrap(), b"back");
        assert_eq!(proxy.cuts(), 1);
    }
}
