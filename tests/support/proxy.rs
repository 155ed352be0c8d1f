//! A TCP proxy that puts a real network between the service and what it depends on
//! (Redis, MySQL): latency each way, one request held on the wire, a partition that
//! holds every byte (an owner cut off), and connections cut. Shared by the integration
//! tests and the benchmark (included with `#[path]`), so both fault the same way.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Which way bytes flow through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the service to the server: requests.
    Up,
    /// From the server to the service: replies.
    Down,
}

struct Hold {
    way: Way,
    /// Only a chunk containing these bytes is held (empty: the next chunk).
    matching: Vec<u8>,
    duration: Duration,
}

#[derive(Default)]
struct Faults {
    /// Added to every chunk, each way.
    delay: Duration,
    hold: Option<Hold>,
    /// How many chunks the hold took (so a test knows it happened).
    held: u64,
    /// How many held requests have been answered: a reply came back on the held
    /// request's connection after the request reached the server.
    answered: u64,
}

/// A proxy listening on `127.0.0.1:0`, forwarding to one upstream address.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    /// While true, nothing is forwarded either way: bytes wait, connections stay open.
    frozen: watch::Sender<bool>,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let (frozen, _) = watch::channel(false);
        let (cut, _) = watch::channel(0u64);
        let accept = {
            let faults = faults.clone();
            let frozen = frozen.clone();
            let cut = cut.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    client.set_nodelay(true).ok();
                    server.set_nodelay(true).ok();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Set once a held request reaches the server, until a reply to it
                    // comes back on this connection.
                    let awaiting_answer = Arc::new(AtomicBool::new(false));
                    for (way, from, to) in [
                        (Way::Up, Box::new(cr) as Reader, Box::new(sw) as Writer),
                        (Way::Down, Box::new(sr) as Reader, Box::new(cw) as Writer),
                    ] {
                        tokio::spawn(pump(
                            way,
                            from,
                            to,
                            faults.clone(),
                            awaiting_answer.clone(),
                            frozen.subscribe(),
                            cut.subscribe(),
                        ));
                    }
                }
            })
        };
        Self {
            addr,
            upstream,
            faults,
            frozen,
            cut,
            accept,
        }
    }

    /// Proxies a `host:port` upstream given as a URL's authority (`redis://127.0.0.1:6379`).
    pub async fn for_url(url: &str) -> Self {
        let authority = url
            .split("://")
            .nth(1)
            .unwrap_or(url)
            .split('/')
            .next()
            .unwrap();
        let authority = authority.rsplit('@').next().unwrap();
        let upstream = tokio::net::lookup_host(authority)
            .await
            .expect("resolve upstream")
            .next()
            .expect("an upstream address");
        Self::start(upstream).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        format!(
            "{scheme}://{}{}{path}",
            userinfo.unwrap_or_default(),
            self.addr
        )
    }

    /// Adds `delay` to every chunk, each way (a round trip gains twice that).
    pub fn set_delay(&self, delay: Duration) {
        self.faults.lock().unwrap().delay = delay;
    }

    /// Holds the next chunk going `way` that contains `matching` for `duration` (and,
    /// as TCP would, everything behind it on that connection).
    pub fn hold_next(&self, way: Way, matching: &[u8], duration: Duration) {
        self.faults.lock().unwrap().hold = Some(Hold {
            way,
            matching: matching.to_vec(),
            duration,
        });
    }

    /// How many chunks have been held so far.
    pub fn held(&self) -> u64 {
        self.faults.lock().unwrap().held
    }

    /// How many held requests (`Way::Up`) have been answered so far: after one reached
    /// the server, the server sent something back on its connection. A server that
    /// answers a connection's requests in order (Redis, MySQL) had then executed it.
    pub fn answered(&self) -> u64 {
        self.faults.lock().unwrap().answered
    }

    /// A partition: nothing crosses either way until `thaw`, and no connection closes,
    /// so each side sees a silent peer.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Closes every open connection (new ones are accepted).
    pub fn cut_all(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// Reads chunks one way, stamps each with the instant it may be passed on, and writes
/// them in order on a second task, so latency does not limit throughput.
async fn pump(
    way: Way,
    mut from: Reader,
    mut to: Writer,
    faults: Arc<Mutex<Faults>>,
    awaiting_answer: Arc<AtomicBool>,
    mut frozen: watch::Receiver<bool>,
    mut cut: watch::Receiver<u64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, bool)>();
    let mut write_cut = cut.clone();
    let answers = faults.clone();
    let writer = tokio::spawn(async move {
        let mut not_before = Instant::now();
        loop {
            let (at, chunk, held) = tokio::select! {
                next = rx.recv() => match next { Some(next) => next, None => break },
                _ = write_cut.changed() => break,
            };
            not_before = not_before.max(at);
            tokio::select! {
                _ = tokio::time::sleep_until(not_before) => {}
                _ = write_cut.changed() => break,
            }
            while *frozen.borrow() {
                tokio::select! {
                    changed = frozen.changed() => if changed.is_err() { return },
                    _ = write_cut.changed() => return,
                }
            }
            // Marked before the held request is written: its answer cannot come sooner.
            if way == Way::Up && held {
                awaiting_answer.store(true, Ordering::SeqCst);
            }
            let written = to.write_all(&chunk).await;
            // An answer counts even if its client has gone.
            if way == Way::Down && awaiting_answer.swap(false, Ordering::SeqCst) {
                answers.lock().unwrap().answered += 1;
            }
            if written.is_err() {
                break;
            }
        }
        to.shutdown().await.ok();
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = cut.changed() => break,
        };
        let chunk = buf[..n].to_vec();
        let (release, held) = {
            let mut f = faults.lock().unwrap();
            let mut at = Instant::now() + f.delay;
            let take = f.hold.as_ref().is_some_and(|h| {
                h.way == way
                    && (h.matching.is_empty()
                        || chunk.windows(h.matching.len()).any(|w| w == h.matching))
            });
            if take {
                at += f.hold.take().unwrap().duration;
                f.held += 1;
            }
            (at, take)
        };
        if tx.send((release, chunk, held)).is_err() {
            break;
        }
    }
    drop(tx);
    writer.await.ok();
}
