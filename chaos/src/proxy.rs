//! A TCP proxy in front of each replica's cluster port, so that every
//! replica-to-replica link can be cut, cut one way, delayed or made lossy
//! (this kernel has no netem).
//!
//! Each replica advertises its proxy's address as its Raft address, so
//! replica A reaches replica B through B's proxy, which sees A's address
//! and so knows the link. Bytes flowing from A to B are subject to the
//! faults of link A→B: held while it is cut (TCP backs up, as when packets
//! are dropped and retransmitted later), delayed by its delay, and the
//! connection is reset with its loss probability per chunk (a lossy link,
//! at the granularity a TCP proxy can see).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A link between two replica slots, in one direction.
pub type Link = (usize, usize);

/// The faults of every link.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    pub cut: BTreeSet<Link>,
    pub delay: BTreeMap<Link, Duration>,
    /// Probability of resetting a connection per forwarded chunk.
    pub loss: BTreeMap<Link, f64>,
}

impl Faults {
    pub fn is_clear(&self) -> bool {
        self.cut.is_empty() && self.delay.is_empty() && self.loss.is_empty()
    }
}

/// The shared fault table and who is at which address.
#[derive(Clone)]
pub struct Switchboard {
    pub faults: Arc<RwLock<Faults>>,
    /// Replica slot by its own (namespace) address.
    slots: Arc<RwLock<BTreeMap<IpAddr, usize>>>,
    seed: u64,
}

impl Switchboard {
    pub fn new(seed: u64) -> Switchboard {
        Switchboard {
            faults: Arc::new(RwLock::new(Faults::default())),
            slots: Arc::new(RwLock::new(BTreeMap::new())),
            seed,
        }
    }

    pub fn register(&self, ip: IpAddr, slot: usize) {
        self.slots.write().unwrap_or_else(|e| e.into_inner()).insert(ip, slot);
    }

    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.write().unwrap_or_else(|e| e.into_inner()));
    }

    fn slot_of(&self, ip: IpAddr) -> Option<usize> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).get(&ip).copied()
    }

    fn link_state(&self, link: Option<Link>) -> (bool, Duration, f64) {
        let Some(link) = link else {
            return (false, Duration::ZERO, 0.0);
        };
        let f = self.faults.read().unwrap_or_else(|e| e.into_inner());
        (
            f.cut.contains(&link),
            f.delay.get(&link).copied().unwrap_or_default(),
            f.loss.get(&link).copied().unwrap_or(0.0),
        )
    }

    /// Serves the proxy of replica `slot` on `listen`, towards `target`.
    pub async fn serve(&self, listen: TcpListener, target: SocketAddr, slot: usize) {
        let mut n = 0u64;
        loop {
            let Ok((client, from)) = listen.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            n += 1;
            let board = self.clone();
            let src = board.slot_of(from.ip());
            let rng = board.seed ^ (slot as u64) << 32 ^ n;
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = src.map(|s| (s, slot));
                let down = src.map(|s| (slot, s));
                let a = tokio::spawn(pump(board.clone(), cr, sw, up, rng));
                let b = tokio::spawn(pump(board, sr, cw, down, rng.rotate_left(17)));
                // Either side ending (or a loss reset) ends both.
                tokio::select! { _ = a => {}, _ = b => {} }
            });
        }
    }
}

/// A small deterministic generator for loss decisions.
fn next(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// Forwards one direction: a reader takes chunks as they come and a writer
/// sends each once its link is not cut and its delay has passed, so a delay
/// holds every chunk by the same amount without slowing the stream.
async fn pump(
    board: Switchboard,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Option<Link>,
    seed: u64,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut rng = seed | 1;
    while let Some((at, chunk)) = rx.recv().await {
        loop {
            let (cut, delay, loss) = board.link_state(link);
            if cut {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            if loss > 0.0 && next(&mut rng) < loss {
                reader.abort();
                return;
            }
            tokio::time::sleep_until(at + delay).await;
            if board.link_state(link).0 {
                continue;
            }
            break;
        }
        if to.write_all(&chunk).await.is_err() {
            break;
        }
    }
    reader.abort();
    let _ = to.shutdown().await;
}
