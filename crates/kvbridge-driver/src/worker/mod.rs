//! Runs the worker's actions against a [`Transport`] and the side channel.
//!
//! Threads: the engine's thread calls `start_load` / `get_finished` (and, in push mode,
//! `save_layer` / `wait_for_save`); handshakes run on the side channel's tokio thread,
//! which, when a handshake completes, loads the peer and posts the queued READs at once
//! instead of waiting for the next engine step.
//!
//! Two locks, never held together and never across the network: `state` guards the
//! sans-IO state machine (microseconds of bookkeeping per call), `transport` serialises
//! NIXL calls. So stats, accounting and heartbeats never wait for a READ being posted or
//! a peer being loaded, and a side-channel callback never holds either across its I/O.
//!
//! Push mode (P) adds a writer thread (`kvbridge-push`, [`writer`]): the engine thread and
//! the side channel only send it `Work` over a channel and touch the push state under a
//! short lock of its own (`PushCtl`), so the engine step never waits on a WRITE being posted.
//!
//! The modules, by concern: [`register`] (caches, listener, handlers), [`load`] (pull:
//! actions, polling, heartbeats), [`push_meta`] (push metadata on the engine thread),
//! [`writer`] (P's writer thread), [`host`] (staging and host-buffer copies),
//! [`accounting`] (the inspect view).
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use kvbridge_core::config::{ConnectorConfig, TransferMode};
use kvbridge_core::error::Error;
use kvbridge_core::side::{Identity, PayloadCell};
use kvbridge_core::transport::{Transport, XferId};
use kvbridge_core::wire::{self, StageReq};
use kvbridge_core::worker::host_loads::HostLoads;
use kvbridge_core::worker::pull::{PullStats, PullWorker};
use kvbridge_core::worker::push_plan::{PushCtl, PushStats};
use kvbridge_core::worker::{FinishedSets, XferStats};

use crate::side_channel::SideChannel;
use crate::staging::StagingBuffer;
use push_state::{Work, WriterState};

pub mod accounting;
#[cfg(feature = "fault-inject")]
pub(crate) mod fault;
pub mod host;
pub mod integrity;
pub mod load;
pub mod push_meta;
pub(crate) mod push_state;
pub mod register;
pub mod writer;

pub use crate::clock::now_unix;
pub use push_state::Fence;

/// The worker's sans-IO state: the state machine and the READs it has in flight.
pub(crate) struct State {
    pub core: PullWorker,
    /// In-flight READs: transfer → (request, remote key).
    pub xfers: HashMap<XferId, (String, String)>,
}

/// The pieces the side channel's callbacks and the writer thread share with the driver.
pub(crate) struct Shared<T: Transport> {
    pub state: Mutex<State>,
    pub transport: Mutex<T>,
    /// D, pull: the receive staging for fragmented READs (after registration; DRAM caches).
    pub recv: Mutex<Option<crate::recv::RecvStaging>>,
}

impl<T: Transport> Shared<T> {
    /// The state machine (never held across I/O).
    pub fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this crate; keep serving anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The receive staging (never held across a NIXL call).
    pub fn recv(&self) -> MutexGuard<'_, Option<crate::recv::RecvStaging>> {
        self.recv.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transport (NIXL calls are serialised here, and nothing else is held).
    pub fn transport(&self) -> MutexGuard<'_, T> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) fn lock_ctl(m: &Mutex<PushCtl>) -> MutexGuard<'_, PushCtl> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker-side connector: state machine + transport + side channel.
pub struct WorkerDriver<T: Transport + 'static> {
    pub(crate) cfg: ConnectorConfig,
    pub(crate) shared: Arc<Shared<T>>,
    pub(crate) side: Arc<SideChannel>,
    pub(crate) payload: PayloadCell,
    pub(crate) block_size: u32,
    pub(crate) read_timeout: Duration,
    pub(crate) push: Arc<Mutex<PushCtl>>,
    /// To P's writer thread (push mode only).
    pub(crate) work: Option<mpsc::Sender<Work>>,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Layer name → index (push, layer-wise).
    pub(crate) layer_index: RwLock<HashMap<String, usize>>,
    /// A forward with layer-wise writes is running.
    pub(crate) layerwise_now: AtomicBool,
    /// The engine incarnation from the scheduler's metadata (0 until the first step).
    pub(crate) epoch: Arc<AtomicU64>,
    /// Held blocks at the last stats sample.
    last_held: AtomicU64,
    /// P, pull with staging: the staging memory (after registration). With a host buffer
    /// (`kv_buffer_device="cpu"`), on either side: the host mirror of the cache.
    pub(crate) staging: RwLock<Option<Arc<StagingBuffer>>>,
    /// D with a host buffer: the blocks each load fills, copied to the cache once read.
    pub(crate) host_loads: Mutex<HostLoads>,
    /// P, pull with staging: copies ordered by this step's metadata, done in `wait_for_save`.
    pub(crate) to_stage: Mutex<Vec<StageReq>>,
    /// `kv_integrity`: digests (P), checks (D) and counters.
    pub(crate) integrity: Arc<integrity::Integrity>,
    /// GPU caches: the engine's CUDA stream for this step ([`NO_STREAM`]: none named), on
    /// which staging and host-buffer copies are queued and waited for.
    pub(crate) stream: AtomicU64,
    /// Where every rank of this engine listens, served in handshakes (`kvbridge_core::ranks`).
    pub(crate) rank_table: Mutex<Vec<kvbridge_core::ranks::RankAddr>>,
    /// D: the last heartbeat batch sent to each P engine (what `shutdown` releases).
    pub(crate) last_heartbeats: Mutex<HashMap<String, kvbridge_core::wire::HeartbeatTarget>>,
}

/// `WorkerDriver::stream` when the engine named no stream (never a valid `CUstream`).
const NO_STREAM: u64 = u64::MAX;

impl<T: Transport + 'static> WorkerDriver<T> {
    /// A driver for `cfg` over `transport`. Starts the side channel's runtime and, for a
    /// push-mode producer, P's writer thread; handshakes are served once
    /// [`register`](Self::register) is called.
    pub fn new(cfg: ConnectorConfig, transport: T) -> Result<Self, Error> {
        cfg.log_startup("worker");
        let rank_table = cfg.rank_table();
        let hash = wire::compat_hash(&cfg.compat, cfg.mode);
        let mut core = PullWorker::new(cfg.engine_id.clone(), cfg.tp_rank, cfg.tp_size, hash.clone(), cfg.enforce_handshake_compat);
        core.coalesce = cfg.coalesce_descriptors;
        core.null_block = cfg.null_block_id;
        core.compat = cfg.compat.clone();
        core.mode = cfg.mode.as_str().to_string();
        core.read_timeout_secs = cfg.kv_lease_duration.as_secs_f64();
        core.engine_ttl_secs = cfg.engine_ttl.as_secs_f64();
        let identity = Identity {
            engine_id: cfg.engine_id.clone(),
            compat_hash: hash,
            compat: Some(cfg.compat.clone()),
            mode: cfg.mode.as_str().to_string(),
            enforce: cfg.enforce_handshake_compat,
        };
        let side =
            Arc::new(SideChannel::with_identity(identity).map_err(|e| Error::Other(format!("cannot start side-channel runtime: {e}")))?);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { core, xfers: HashMap::new() }),
            transport: Mutex::new(transport),
            recv: Mutex::new(None),
        });
        let push = Arc::new(Mutex::new(PushCtl::new(cfg.engine_id.clone(), cfg.tp_size, cfg.kv_lease_duration.as_secs_f64())));
        let stop = Arc::new(AtomicBool::new(false));
        let (work, writer) = if cfg.mode == TransferMode::Push && cfg.role.can_produce() {
            let (tx, rx) = mpsc::channel();
            let w = writer::Writer {
                shared: shared.clone(),
                side: side.clone(),
                cfg: cfg.clone(),
                push: push.clone(),
                tx: tx.clone(),
                st: WriterState::default(),
            };
            let stop2 = stop.clone();
            let h = std::thread::Builder::new()
                .name("kvbridge-push".into())
                .spawn(move || w.run(rx, stop2))
                .map_err(|e| Error::Other(format!("cannot start the push writer thread: {e}")))?;
            (Some(tx), Some(h))
        } else {
            (None, None)
        };
        let cfg_integrity = (cfg.kv_integrity, cfg.kv_integrity_sample_every);
        Ok(Self {
            block_size: cfg.compat.block_size,
            read_timeout: cfg.kv_lease_duration,
            cfg,
            shared,
            side,
            payload: Arc::new(Mutex::new(None)),
            push,
            work,
            stop,
            writer,
            layer_index: RwLock::new(HashMap::new()),
            layerwise_now: AtomicBool::new(false),
            epoch: Arc::new(AtomicU64::new(0)),
            last_held: AtomicU64::new(0),
            staging: RwLock::new(None),
            to_stage: Mutex::new(Vec::new()),
            host_loads: Mutex::new(HostLoads::default()),
            stream: AtomicU64::new(NO_STREAM),
            rank_table: Mutex::new(rank_table),
            last_heartbeats: Mutex::new(HashMap::new()),
            integrity: Arc::new(integrity::Integrity::new(cfg_integrity.0, cfg_integrity.1)),
        })
    }

    /// GPU caches: the CUDA stream the engine's forwards run on (a `CUstream` handle, as
    /// torch's `current_stream().cuda_stream`), for this and later steps until changed.
    /// P's staging and D's host-buffer copies are queued on it, after the forward's KV
    /// writes, and only it is waited for. None: they wait for the whole device context.
    pub fn set_stream(&self, stream: Option<u64>) {
        self.stream.store(stream.unwrap_or(NO_STREAM), Ordering::Relaxed);
    }

    /// The stream [`set_stream`](Self::set_stream) named, if any.
    pub(crate) fn stream(&self) -> Option<u64> {
        Some(self.stream.load(Ordering::Relaxed)).filter(|&s| s != NO_STREAM)
    }

    pub(crate) fn send_work(&self, w: Work) {
        if let Some(tx) = &self.work {
            let _ = tx.send(w);
        }
    }

    /// The configuration this driver was built with.
    pub fn config(&self) -> &ConnectorConfig {
        &self.cfg
    }

    /// The side channel (its connection and task counts, for tests and tools).
    pub fn side_channel(&self) -> &SideChannel {
        &self.side
    }

    /// A new engine incarnation from the scheduler: advertise it in handshakes.
    pub(crate) fn set_epoch(&self, epoch: u64) {
        if epoch == 0 || self.epoch.swap(epoch, Ordering::AcqRel) == epoch {
            return;
        }
        if let Ok(mut p) = self.payload.lock() {
            if let Some(p) = p.as_mut() {
                p.epoch = epoch;
            }
        }
    }

    /// Where every rank of this engine (its DP rank) listens: served in every handshake
    /// so readers dial each rank at its own host. By default the table the config
    /// describes ([`ConnectorConfig::rank_table`]); an engine whose ranks span nodes sets
    /// the table its ranks exchanged at start-up (vLLM: an all-gather over its CPU group).
    pub fn set_rank_table(&self, table: Vec<kvbridge_core::ranks::RankAddr>) {
        let mut table = table;
        table.truncate(kvbridge_core::ranks::MAX_RANKS);
        if let Ok(mut p) = self.payload.lock() {
            if let Some(p) = p.as_mut() {
                p.ranks = table.clone();
            }
        }
        if let Ok(mut t) = self.rank_table.lock() {
            *t = table;
        }
    }

    /// This engine's rank table as served in handshakes.
    pub fn rank_table(&self) -> Vec<kvbridge_core::ranks::RankAddr> {
        self.rank_table.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Pipeline parallel (D): every stage's layer names, index = PP rank, as the engine's
    /// ranks exchanged them at start-up. A P rank read by several D stages then expects a
    /// notification from each ([`kvbridge_core::plan::TransferPlan::build_stages`]).
    pub fn set_stage_layers(&self, layers: Vec<Vec<String>>) {
        let mut layers = layers;
        layers.truncate(kvbridge_core::plan::MAX_PP_SIZE as usize);
        self.shared.state().core.set_stage_layers(layers);
    }

    /// Push mode's counters so far.
    pub fn push_stats(&self) -> PushStats {
        lock_ctl(&self.push).stats.clone()
    }

    /// Push: requests P holds for D ranks, and D requests waiting for P's writes.
    pub fn push_pending(&self) -> (usize, usize) {
        let c = lock_ctl(&self.push);
        (c.sender.held(), c.receiver.waiting())
    }

    /// Poll transfers and notifications; return what finished since the last call.
    pub fn get_finished(&self) -> FinishedSets {
        self.get_finished_wait(Duration::ZERO)
    }

    /// Like [`get_finished`](Self::get_finished), but when this rank is only waiting (it
    /// holds blocks for a remote reader, or a load is in flight) and nothing has finished,
    /// keep polling for up to `max_wait`: every 20 µs while this rank loads (a READ in
    /// flight, or push writes awaited), so D sees a completion within tens of µs, and every
    /// 100 µs while it only holds blocks for readers. An engine calls this on steps with no
    /// forward pass, so a P that holds leases (vLLM keeps stepping it) does not spin a core
    /// while D needs the CPU, and completions are still seen at once.
    pub fn get_finished_wait(&self, max_wait: Duration) -> FinishedSets {
        let t0 = std::time::Instant::now();
        loop {
            let f = self.poll_once();
            let (held, recv) = self.push_pending();
            let (holding, loading) = {
                let g = self.shared.state();
                (held > 0 || g.core.base.held_requests() > 0, recv > 0 || !g.xfers.is_empty())
            };
            let loading = loading || self.verifying() > 0;
            if f != FinishedSets::default() || !(holding || loading) || t0.elapsed() >= max_wait {
                return f;
            }
            std::thread::sleep(Duration::from_micros(if loading { 20 } else { 100 }));
        }
    }

    /// vLLM's per-interval stats (`get_kv_connector_stats`): everything observed since the
    /// last call, or `None` when nothing was (the common case, and cheap).
    pub fn take_xfer_stats(&self) -> Option<XferStats> {
        let (mut out, held) = {
            let mut g = self.shared.state();
            (g.core.base.xfer.take(), g.core.base.held_blocks())
        };
        out.merge(lock_ctl(&self.push).xfer.take());
        let bad = self.integrity.new_mismatches.swap(0, Ordering::Relaxed);
        out.num_integrity_mismatches.extend(std::iter::repeat(1).take(bad.min(65_536) as usize));
        // Held blocks are sampled when anything else happened, or when they changed.
        let changed = self.last_held.swap(held, Ordering::Relaxed) != held;
        if out.is_empty() && !changed {
            return None;
        }
        out.held_blocks.push(held);
        Some(out)
    }

    /// Pull mode's counters so far.
    pub fn stats(&self) -> PullStats {
        self.shared.state().core.stats.clone()
    }

    /// Requests whose blocks this rank still holds for remote readers.
    pub fn held_requests(&self) -> usize {
        self.shared.state().core.base.held_requests()
    }

    /// READs posted on this rank and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.shared.state().xfers.len()
    }
}

impl<T: Transport + 'static> WorkerDriver<T> {
    /// The engine is shutting down. D: tell every P engine it renewed leases with (its
    /// last heartbeat batch) that it will never read those requests, so P frees their
    /// blocks now rather than at lease expiry; waits up to `timeout` for the answers.
    /// Returns how many leases P reported released.
    pub fn shutdown(&self, timeout: Duration) -> usize {
        let targets: Vec<_> = self.last_heartbeats.lock().map(|mut m| m.drain().map(|(_, t)| t).collect()).unwrap_or_default();
        let (tx, rx) = mpsc::channel();
        let mut sent = 0;
        for t in targets {
            // The state lock is not held while the releases are queued.
            let addrs = self.shared.state().core.heartbeat_addrs(&t.engine_id, &t.host, t.port, t.tp_size);
            for (_, host, port) in addrs {
                let tx = tx.clone();
                let req = kvbridge_core::wire::HeartbeatRequest { request_ids: t.request_ids.clone(), release: true };
                self.side.heartbeat(host, port, req, timeout, move |res| {
                    let _ = tx.send(res.map(|r| r.released.len()).unwrap_or(0));
                });
                sent += 1;
            }
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut released = 0;
        for _ in 0..sent {
            match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok(n) => released += n,
                Err(_) => break,
            }
        }
        if sent > 0 {
            tracing::info!(released, ranks = sent, "kvbridge: shutdown: told the prefill engines which leases this engine will not read");
        }
        released
    }
}

impl<T: Transport + 'static> Drop for WorkerDriver<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.work = None;
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}
