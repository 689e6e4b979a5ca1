//! Runs the pull worker's actions against a [`Transport`] and the side channel.
//!
//! Threads: the engine's thread calls `start_load` / `get_finished`; handshakes run on the
//! side channel's tokio thread, which, when a handshake completes, loads the peer and posts
//! the queued READs at once instead of waiting for the next engine step. Both paths go
//! through one mutex; NIXL calls made under it are short (post, poll, notify).
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::pull::{Action, PullStats, PullWorker};
use super::FinishedSets;
use crate::config::ConnectorConfig;
use crate::error::{Error, HandshakeError, TransportError};
use crate::layout::{KvLayout, TensorInfo};
use crate::side_channel::{PayloadCell, SideChannel};
use crate::transport::{Transport, XferId, XferPoll};
use crate::wire::{self, AgentMetadata, ConnectorMetadata, HandshakePayload, HandshakeRequest, WIRE_VERSION};

pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

struct Inner<T: Transport> {
    core: PullWorker,
    transport: T,
    /// In-flight READs: transfer → (request, remote key).
    xfers: HashMap<XferId, (String, String)>,
}

/// A worker-side connector: state machine + transport + side channel.
pub struct WorkerDriver<T: Transport + 'static> {
    cfg: ConnectorConfig,
    inner: Arc<Mutex<Inner<T>>>,
    side: Arc<SideChannel>,
    payload: PayloadCell,
    block_size: u32,
    read_timeout: Duration,
}

fn lock<T: Transport>(m: &Mutex<Inner<T>>) -> MutexGuard<'_, Inner<T>> {
    // A panic while holding the lock would be a bug in this crate; keep serving anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Transport + 'static> WorkerDriver<T> {
    pub fn new(cfg: ConnectorConfig, transport: T) -> Result<Self, Error> {
        cfg.log_startup("worker");
        let hash = wire::compat_hash(&cfg.compat, cfg.mode);
        let mut core = PullWorker::new(cfg.engine_id.clone(), cfg.tp_rank, cfg.tp_size, hash, cfg.enforce_handshake_compat);
        core.coalesce = cfg.coalesce_descriptors;
        core.null_block = cfg.null_block_id;
        let side = SideChannel::new().map_err(|e| Error::Other(format!("cannot start side-channel runtime: {e}")))?;
        Ok(Self {
            block_size: cfg.compat.block_size,
            read_timeout: cfg.kv_lease_duration,
            cfg,
            inner: Arc::new(Mutex::new(Inner { core, transport, xfers: HashMap::new() })),
            side: Arc::new(side),
            payload: Arc::new(Mutex::new(None)),
        })
    }

    pub fn config(&self) -> &ConnectorConfig {
        &self.cfg
    }

    /// Register the KV cache tensors and start serving handshakes. `num_blocks` counts
    /// logical (scheduler) blocks.
    pub fn register(&self, tensors: &[TensorInfo], num_blocks: u64) -> Result<KvLayout, Error> {
        let layout = KvLayout::from_tensors(tensors, num_blocks, self.cfg.tp_rank, self.cfg.tp_size)?;
        let payload = {
            let mut g = lock(&self.inner);
            g.transport.register(&layout)?;
            let nixl_md = g.transport.local_metadata()?;
            let md = AgentMetadata {
                engine_id: self.cfg.engine_id.clone(),
                agent_name: g.transport.agent_name().to_string(),
                tp_rank: self.cfg.tp_rank,
                tp_size: self.cfg.tp_size,
                block_size: self.block_size,
                blocks_per_logical: layout.blocks_per_logical,
                regions: layout.regions.clone(),
                nixl_md,
            };
            g.core.on_registered(layout.clone(), self.block_size);
            wire::encode(
                "HandshakePayload",
                &HandshakePayload {
                    compat_hash: g.core.compat_hash().to_string(),
                    agent_metadata: wire::encode("AgentMetadata", &md)?,
                    error: None,
                },
            )?
        };
        if let Ok(mut p) = self.payload.lock() {
            *p = Some(payload);
        }
        let port = self.cfg.local_listener_port().ok_or_else(|| Error::Other("side-channel port out of range".into()))?;
        self.side.serve(&self.cfg.side_channel_host, port, self.payload.clone())?;
        tracing::info!(regions = layout.regions.len(), num_blocks, port, "kvbridge: KV caches registered");
        Ok(layout)
    }

    /// Bind a step's metadata (opaque bytes from the scheduler) and start loads.
    pub fn start_load(&self, metadata: &[u8]) -> Result<(), Error> {
        let md = ConnectorMetadata::from_bytes(metadata)?;
        if md.is_empty() {
            return Ok(());
        }
        let actions = lock(&self.inner).core.on_metadata(md, now_unix());
        run(&self.inner, &self.side, &self.cfg, actions);
        Ok(())
    }

    /// Poll transfers and notifications; return what finished since the last call.
    pub fn get_finished(&self) -> FinishedSets {
        self.get_finished_wait(Duration::ZERO)
    }

    /// Like [`get_finished`](Self::get_finished), but when this rank is only waiting (it
    /// holds blocks for a remote reader, or a READ is in flight) and nothing has finished,
    /// keep polling — sleeping 100 µs between polls — for up to `max_wait`. An engine calls
    /// this on steps with no forward pass, so a P that holds leases (vLLM keeps stepping it)
    /// does not spin a core while D needs the CPU, and completions are still seen at once.
    pub fn get_finished_wait(&self, max_wait: Duration) -> FinishedSets {
        let t0 = std::time::Instant::now();
        loop {
            let f = self.poll_once();
            let waiting = {
                let g = lock(&self.inner);
                g.core.base.held_requests() > 0 || !g.xfers.is_empty()
            };
            if f != FinishedSets::default() || !waiting || t0.elapsed() >= max_wait {
                return f;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn poll_once(&self) -> FinishedSets {
        let now = now_unix();
        let mut g = lock(&self.inner);
        let mut follow = Vec::new();
        let xfers: Vec<(XferId, String, String)> = g.xfers.iter().map(|(x, (r, k))| (*x, r.clone(), k.clone())).collect();
        for (x, req, key) in xfers {
            let res = match g.transport.poll(x) {
                Ok(XferPoll::Pending) => {
                    let started = g.core.read_started(&req).unwrap_or(now);
                    if now - started > self.read_timeout.as_secs_f64() {
                        Some(Err(TransportError::new("timeout", format!("READ for {req} did not finish in {:?}", self.read_timeout))))
                    } else {
                        None
                    }
                }
                Ok(XferPoll::Done) => Some(Ok(())),
                Err(e) => Some(Err(e)),
            };
            if let Some(res) = res {
                g.transport.release(x);
                g.xfers.remove(&x);
                follow.extend(g.core.on_read_done(&req, &key, res, now));
            }
        }
        match g.transport.take_notifs() {
            Ok(ns) => {
                for n in ns {
                    g.core.base.on_notif(&n, now);
                }
            }
            Err(e) => tracing::warn!(error = %e, "kvbridge: reading notifications failed"),
        }
        g.core.base.tick(now);
        drop(g);
        if !follow.is_empty() {
            run(&self.inner, &self.side, &self.cfg, follow);
        }
        lock(&self.inner).core.base.take_finished()
    }

    pub fn stats(&self) -> PullStats {
        lock(&self.inner).core.stats.clone()
    }

    /// Requests whose blocks this rank still holds for remote readers.
    pub fn held_requests(&self) -> usize {
        lock(&self.inner).core.base.held_requests()
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.inner).xfers.len()
    }
}

/// Execute actions until none are left. Handshakes go to the side channel; their
/// completion re-enters here on the side-channel thread.
fn run<T: Transport + 'static>(inner: &Arc<Mutex<Inner<T>>>, side: &Arc<SideChannel>, cfg: &ConnectorConfig, actions: Vec<Action>) {
    let mut q: VecDeque<Action> = actions.into();
    while let Some(a) = q.pop_front() {
        match a {
            Action::Handshake { peer, rank, host, port } => {
                tracing::debug!(%peer, rank, %host, port, "kvbridge: handshake");
                let inner2 = inner.clone();
                let side2 = side.clone();
                let cfg2 = cfg.clone();
                let addr = format!("{host}:{port}");
                let req = HandshakeRequest { version: WIRE_VERSION, from_engine: cfg.engine_id.clone(), from_tp_rank: cfg.tp_rank };
                let t0 = std::time::Instant::now();
                side.fetch(host, port, req, cfg.handshake_timeout, move |res| {
                    let fetched_ms = t0.elapsed().as_secs_f64() * 1e3;
                    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let follow = lock(&inner2).core.on_handshake_payload(&peer, rank, &addr, res);
                        run(&inner2, &side2, &cfg2, follow);
                    }));
                    if handled.is_err() {
                        // Never leave requests queued behind a handshake that cannot finish.
                        tracing::error!(%peer, "kvbridge: internal error while completing a handshake; failing its requests");
                        let err = HandshakeError::Io { addr: addr.clone(), reason: "internal error completing the handshake".into() };
                        let follow = lock(&inner2).core.on_handshake_payload(&peer, rank, &addr, Err(err));
                        run(&inner2, &side2, &cfg2, follow);
                    }
                    tracing::info!(%peer, rank, fetch_ms = fetched_ms, total_ms = t0.elapsed().as_secs_f64() * 1e3, "kvbridge: handshake finished");
                });
            }
            Action::AddRemote { peer, rank, key, md } => {
                let mut g = lock(inner);
                let t0 = std::time::Instant::now();
                let res = g.transport.add_remote(&key, &md);
                tracing::debug!(%key, ms = t0.elapsed().as_secs_f64() * 1e3, ok = res.is_ok(), "kvbridge: peer loaded");
                let follow = g.core.on_remote_added(&peer, rank, res, now_unix());
                q.extend(follow);
            }
            Action::RemoveRemote { key } => lock(inner).transport.remove_remote(&key),
            Action::Read { req_id, key, pieces, notif, bytes } => {
                let mut g = lock(inner);
                let now = now_unix();
                match g.transport.read(&key, &pieces, &notif) {
                    Ok(x) => {
                        tracing::debug!(request_id = %req_id, %key, bytes, descs = pieces.len(), "kvbridge: READ posted");
                        g.core.mark_posted(&req_id, now);
                        g.xfers.insert(x, (req_id, key));
                    }
                    Err(e) => {
                        let follow = g.core.on_read_done(&req_id, &key, Err(e), now);
                        q.extend(follow);
                    }
                }
            }
            Action::Notify { key, msg } => {
                if let Err(e) = lock(inner).transport.notify(&key, &msg) {
                    tracing::warn!(%key, error = %e, "kvbridge: notification failed");
                }
            }
        }
    }
}
