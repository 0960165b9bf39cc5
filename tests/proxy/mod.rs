//! A TCP proxy on a free loopback port in front of a real server, for fault tests: pass traffic, silently drop it
//! (a dead NAT entry or a firewall that drops packets), or close every connection.
//!
//! It runs on plain threads (one accept loop, two pumps per connection), so it works the same from any test, with
//! any Tokio runtime or none, and is not slowed down by the runtime under test.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// New connections are forwarded to the target.
    Pass,
    /// Every open connection and every new one is accepted and kept open, but all bytes are dropped both ways, and
    /// so is a close: neither end learns anything.
    Blackhole,
    /// Every open connection is closed; new ones are accepted and closed at once.
    Refuse,
}

/// One proxied connection: both sockets, and whether its bytes are dropped.
struct Link {
    client: TcpStream,
    server: TcpStream,
    /// Set by [`Proxy::blackhole`]; never cleared: a connection that went dead stays dead, as a lost NAT entry does.
    dead: AtomicBool,
    client_open: AtomicBool,
}

impl Link {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

struct Shared {
    target: u16,
    mode: Mutex<Mode>,
    links: Mutex<Vec<Arc<Link>>>,
    accepted: AtomicUsize,
    stopped: AtomicBool,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Link>>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A proxy to `127.0.0.1:<target>`, listening on [`Proxy::port`]; stopped (every connection closed) when dropped.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts a proxy to the server listening on `127.0.0.1:<target>`, passing traffic.
    pub fn start(target: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a loopback port for the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let shared = Arc::new(Shared {
            target,
            mode: Mutex::new(Mode::Pass),
            links: Mutex::default(),
            accepted: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
        });
        let accepting = shared.clone();
        thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept(&listener, &accepting))
            .expect("spawn the proxy's accept loop");
        Self { port, shared }
    }

    /// A `redis://` URL through the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// New connections pass again. Connections blackholed before stay dead: their ends must notice and reconnect.
    pub fn pass(&self) {
        *self.shared.mode.lock().unwrap_or_else(PoisonError::into_inner) = Mode::Pass;
    }

    /// Drops every byte (and every close) of every open connection, and of every new one until [`Proxy::pass`].
    pub fn blackhole(&self) {
        let links = self.shared.links();
        *self.shared.mode.lock().unwrap_or_else(PoisonError::into_inner) = Mode::Blackhole;
        for link in links.iter() {
            link.dead.store(true, Ordering::SeqCst);
        }
    }

    /// Closes every open connection, and every new one at once until [`Proxy::pass`].
    pub fn refuse(&self) {
        let mut links = self.shared.links();
        *self.shared.mode.lock().unwrap_or_else(PoisonError::into_inner) = Mode::Refuse;
        for link in links.drain(..) {
            link.close();
        }
    }

    /// Connections accepted so far (including refused ones).
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections whose client has not closed its end, whatever the mode (a blackholed one still sees its client
    /// hang up, though it tells nobody).
    pub fn open_clients(&self) -> usize {
        self.shared.links().iter().filter(|link| link.client_open.load(Ordering::SeqCst)).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for link in self.shared.links().drain(..) {
            link.close();
        }
    }
}

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let mode = shared.mode();
        if mode == Mode::Refuse {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(("127.0.0.1", shared.target)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = (client.set_nodelay(true), server.set_nodelay(true));
        let link = Arc::new(Link {
            client,
            server,
            dead: AtomicBool::new(mode == Mode::Blackhole),
            client_open: AtomicBool::new(true),
        });
        shared.links().push(link.clone());
        for from_client in [true, false] {
            let link = link.clone();
            thread::spawn(move || pump(&link, from_client));
        }
    }
}

/// Copies one direction of `link` until either end closes, dropping the bytes while the link is dead.
fn pump(link: &Link, from_client: bool) {
    let (mut reader, mut writer) = match (link.client.try_clone(), link.server.try_clone()) {
        (Ok(client), Ok(server)) if from_client => (client, server),
        (Ok(client), Ok(server)) => (server, client),
        _ => return link.close(),
    };
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => None,
            Ok(read) => Some(read),
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(_) => None,
        };
        let Some(read) = read else {
            if from_client {
                link.client_open.store(false, Ordering::SeqCst);
            }
            // A dead link swallows the close too; a live one passes it on.
            if !link.dead.load(Ordering::SeqCst) {
                link.close();
            }
            return;
        };
        if link.dead.load(Ordering::SeqCst) {
            continue;
        }
        if writer.write_all(&buffer[..read]).is_err() {
            return link.close();
        }
    }
}
