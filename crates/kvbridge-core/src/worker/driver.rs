//! Runs the worker's actions against a [`Transport`] and the side channel.
//!
//! Threads: the engine's thread calls `start_load` / `get_finished` (and, in push mode,
//! `save_layer` / `wait_for_save`); handshakes run on the side channel's tokio thread,
//! which, when a handshake completes, loads the peer and posts the queued READs at once
//! instead of waiting for the next engine step. Pull paths go through one mutex; NIXL
//! calls made under it are short (post, poll, notify).
//!
//! Push mode (P) adds a writer thread (`kvbridge-push`): the engine thread and the side
//! channel only send it `Work` over a channel and touch the push state under a short
//! lock of its own (`PushCtl`), so the engine step never waits on a WRITE being posted.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::pull::{Action, PullStats, PullWorker};
use super::push::PushAction;
use super::push_io::{self, DPeer, Geometry, Job, PushCtl, PushStats, Work, WriterState};
use super::staging::StagingBuffer;
use super::{FinishedSets, XferStats};
use crate::config::{ConnectorConfig, TransferMode};
use crate::error::{Error, HandshakeError, TransportError};
use crate::layout::{KvLayout, TensorInfo};
use crate::plan::TransferPlan;
use crate::side_channel::{Handlers, HeartbeatHandler, Identity, InspectHandler, PayloadCell, RegisterHandler, SideChannel};
use crate::transport::{Transport, XferId, XferPoll};
use crate::wire::{
    self, AgentMetadata, ConnectorMetadata, HandshakePayload, HandshakeRequest, HeartbeatRequest, Notif, PushRegistration, StageReq,
    WIRE_VERSION,
};

/// The current time as Unix seconds (0 if the clock reads before 1970).
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
    push: Arc<Mutex<PushCtl>>,
    /// To P's writer thread (push mode only).
    work: Option<mpsc::Sender<Work>>,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Layer name → index (push, layer-wise).
    layer_index: RwLock<HashMap<String, usize>>,
    /// A forward with layer-wise writes is running.
    layerwise_now: AtomicBool,
    /// The engine incarnation from the scheduler's metadata (0 until the first step).
    epoch: Arc<AtomicU64>,
    /// When idle remote engines were last looked for (engine_ttl), as Unix seconds bits.
    last_evict: AtomicU64,
    /// Held blocks at the last stats sample.
    last_held: AtomicU64,
    /// P, pull with staging: the staging memory (after registration). With a host buffer
    /// (`kv_buffer_device="cpu"`), on either side: the host mirror of the cache.
    staging: RwLock<Option<Arc<StagingBuffer>>>,
    /// D with a host buffer: the blocks each load fills, copied to the cache once read.
    host_loads: Mutex<HashMap<String, Vec<u32>>>,
    /// P, pull with staging: copies ordered by this step's metadata, done in `wait_for_save`.
    to_stage: Mutex<Vec<StageReq>>,
}

fn lock<T: Transport>(m: &Mutex<Inner<T>>) -> MutexGuard<'_, Inner<T>> {
    // A panic while holding the lock would be a bug in this crate; keep serving anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_ctl(m: &Mutex<PushCtl>) -> MutexGuard<'_, PushCtl> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Transport + 'static> WorkerDriver<T> {
    /// A driver for `cfg` over `transport`. Starts the side channel's runtime and, for a
    /// push-mode producer, P's writer thread; handshakes are served once
    /// [`register`](Self::register) is called.
    pub fn new(cfg: ConnectorConfig, transport: T) -> Result<Self, Error> {
        cfg.log_startup("worker");
        let hash = wire::compat_hash(&cfg.compat, cfg.mode);
        let mut core = PullWorker::new(cfg.engine_id.clone(), cfg.tp_rank, cfg.tp_size, hash.clone(), cfg.enforce_handshake_compat);
        core.coalesce = cfg.coalesce_descriptors;
        core.null_block = cfg.null_block_id;
        core.compat = cfg.compat.clone();
        core.mode = cfg.mode.as_str().to_string();
        let identity = Identity {
            engine_id: cfg.engine_id.clone(),
            compat_hash: hash,
            compat: Some(cfg.compat.clone()),
            mode: cfg.mode.as_str().to_string(),
            enforce: cfg.enforce_handshake_compat,
        };
        let side =
            Arc::new(SideChannel::with_identity(identity).map_err(|e| Error::Other(format!("cannot start side-channel runtime: {e}")))?);
        let inner = Arc::new(Mutex::new(Inner { core, transport, xfers: HashMap::new() }));
        let push = Arc::new(Mutex::new(PushCtl::new(cfg.engine_id.clone(), cfg.tp_size, cfg.kv_lease_duration.as_secs_f64())));
        let stop = Arc::new(AtomicBool::new(false));
        let (work, writer) = if cfg.mode == TransferMode::Push && cfg.role.can_produce() {
            let (tx, rx) = mpsc::channel();
            let w = Writer {
                inner: inner.clone(),
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
        Ok(Self {
            block_size: cfg.compat.block_size,
            read_timeout: cfg.kv_lease_duration,
            cfg,
            inner,
            side,
            payload: Arc::new(Mutex::new(None)),
            push,
            work,
            stop,
            writer,
            layer_index: RwLock::new(HashMap::new()),
            layerwise_now: AtomicBool::new(false),
            epoch: Arc::new(AtomicU64::new(0)),
            last_evict: AtomicU64::new(0),
            last_held: AtomicU64::new(0),
            staging: RwLock::new(None),
            to_stage: Mutex::new(Vec::new()),
            host_loads: Mutex::new(HashMap::new()),
        })
    }

    fn send_work(&self, w: Work) {
        if let Some(tx) = &self.work {
            let _ = tx.send(w);
        }
    }

    /// The configuration this driver was built with.
    pub fn config(&self) -> &ConnectorConfig {
        &self.cfg
    }

    /// Register the KV cache tensors and start serving handshakes. `num_blocks` counts
    /// logical (scheduler) blocks.
    pub fn register(&self, tensors: &[TensorInfo], num_blocks: u64) -> Result<KvLayout, Error> {
        let cache = KvLayout::from_tensors(tensors, num_blocks, self.cfg.tp_rank, self.cfg.tp_size)?;
        // The logical block size in tokens: the engine's word (`compat.block_size`), else
        // what labelled tensors say (kernel block tokens x kernel blocks per logical block).
        let block_size = match self.block_size {
            0 => cache
                .regions
                .iter()
                .find(|r| r.block_tokens > 0)
                .map(|r| r.block_tokens.saturating_mul(cache.blocks_per_logical.max(1)))
                .ok_or_else(|| crate::error::ConfigError::InvalidValue {
                    key: "block_size".into(),
                    reason: "unknown: set EngineInfo.compat.block_size (tokens per block) or label the tensors' axes".into(),
                })?,
            b => b,
        };
        // Host buffer (`kv_buffer_device="cpu"`): NIXL sees a host mirror of the cache, not
        // the cache; everything below plans and moves the mirror.
        let (layout, mirror) = if self.cfg.host_buffer {
            let m = StagingBuffer::mirror(&cache)?;
            tracing::info!(mib = m.bytes() as f64 / (1u64 << 20) as f64, cache = ?m.source, "kvbridge: host buffer allocated (kv_buffer_device=cpu)");
            (KvLayout { regions: m.regions.clone(), ..cache.clone() }, Some(Arc::new(m)))
        } else {
            (cache.clone(), None)
        };
        // Staging memory is registered with the cache (one registration call), and
        // advertised next to it.
        let staging = match self.cfg.staging_blocks() {
            0 => mirror,
            n => {
                let st = StagingBuffer::new(&layout, n)?;
                tracing::info!(slots = n, mib = st.bytes() as f64 / (1u64 << 20) as f64, "kvbridge: staging buffer allocated");
                Some(Arc::new(st))
            }
        };
        // Staging slots are registered and advertised next to the cache; a host mirror
        // already is `layout`.
        let staging_regions = match &staging {
            Some(st) if !self.cfg.host_buffer => st.regions.clone(),
            _ => Vec::new(),
        };
        let payload = {
            let mut g = lock(&self.inner);
            g.transport.register(&KvLayout { regions: [layout.regions.clone(), staging_regions.clone()].concat(), ..layout.clone() })?;
            let nixl_md = g.transport.local_metadata()?;
            let md = AgentMetadata {
                engine_id: self.cfg.engine_id.clone(),
                agent_name: g.transport.agent_name().to_string(),
                tp_rank: self.cfg.tp_rank,
                tp_size: self.cfg.tp_size,
                block_size,
                blocks_per_logical: layout.blocks_per_logical,
                regions: layout.regions.clone(),
                nixl_md,
                staging_regions,
            };
            g.core.on_registered(layout.clone(), block_size);
            if self.work.is_some() {
                let (geo, names) = Geometry::new(&layout, tensors, num_blocks, md.clone());
                if let Ok(mut li) = self.layer_index.write() {
                    *li = names;
                }
                self.send_work(Work::Registered(Box::new(geo)));
            }
            HandshakePayload {
                compat_hash: g.core.compat_hash().to_string(),
                agent_metadata: wire::encode("AgentMetadata", &md)?,
                error: None,
                compat: Some(self.cfg.compat.clone()),
                kvbridge_version: wire::KVBRIDGE_VERSION.to_string(),
                mode: self.cfg.mode.as_str().to_string(),
                epoch: self.epoch.load(Ordering::Acquire),
                now_unix: 0.0,
            }
        };
        if let Ok(mut p) = self.payload.lock() {
            *p = Some(payload);
        }
        if let Ok(mut st) = self.staging.write() {
            *st = staging;
        }
        let port = self.cfg.local_listener_port().ok_or_else(|| Error::Other("side-channel port out of range".into()))?;
        let on_register: Option<RegisterHandler> = self.work.as_ref().map(|tx| {
            let push = self.push.clone();
            let tx = Mutex::new(tx.clone());
            let h: RegisterHandler = Arc::new(move |reg: PushRegistration| {
                let actions = {
                    let mut c = lock_ctl(&push);
                    match c.sender.on_registration(reg.clone(), now_unix()) {
                        Ok(a) => {
                            c.stats.registrations_accepted += 1;
                            a
                        }
                        Err(e) => {
                            c.stats.registrations_refused += 1;
                            return Err(e.to_string());
                        }
                    }
                };
                tracing::debug!(request_id = %reg.request_id, transfer_id = %reg.transfer_id, from = %reg.engine_id, rank = reg.tp_rank, writes = actions.len(), "kvbridge: push registration accepted");
                let tx = tx.lock().map_err(|_| "writer unavailable".to_string())?;
                let _ = tx.send(Work::Connect(reg));
                for action in actions {
                    let _ = tx.send(Work::Action { action, layerwise: false });
                }
                Ok(())
            });
            h
        });
        let handlers = Handlers { register: on_register, heartbeat: Some(self.heartbeat_handler()), inspect: Some(self.inspect_handler()) };
        self.side.serve_with(&self.cfg.side_channel_host, port, self.payload.clone(), handlers)?;
        tracing::info!(
            regions = layout.regions.len(),
            num_blocks,
            port,
            host_buffer = self.cfg.host_buffer,
            "kvbridge: KV caches registered"
        );
        Ok(cache)
    }

    /// P: renew leases on a decode engine's heartbeat (by 2/3 of the lease, as vLLM).
    fn heartbeat_handler(&self) -> HeartbeatHandler {
        // Weak: side-channel tasks must not keep the NIXL agent alive after the driver is
        // dropped (it would then outlive the process's teardown).
        let inner = Arc::downgrade(&self.inner);
        let extend = self.cfg.kv_lease_duration.as_secs_f64() * 2.0 / 3.0;
        let epoch = self.epoch.clone();
        Arc::new(move |from: &str, hb: HeartbeatRequest| {
            let Some(inner) = inner.upgrade() else { return wire::HeartbeatReply::default() };
            let mut reply = lock(&inner).core.base.on_heartbeat(&hb, now_unix(), extend);
            reply.epoch = epoch.load(Ordering::Acquire);
            tracing::debug!(
                from,
                held = reply.held.len(),
                expired = reply.expired.len(),
                unknown = reply.unknown.len(),
                "kvbridge: heartbeat"
            );
            reply
        })
    }

    /// The accounting view served to `Inspect` requests (and [`accounting`](Self::accounting)).
    fn inspect_handler(&self) -> InspectHandler {
        let inner = Arc::downgrade(&self.inner);
        let push = self.push.clone();
        let engine = self.cfg.engine_id.clone();
        let rank = self.cfg.tp_rank;
        Arc::new(move || match inner.upgrade() {
            Some(inner) => accounting(&inner, &push, &engine, rank).to_string(),
            None => "{}".to_string(),
        })
    }

    /// Blocks held for remote peers and loads in flight on this rank, with counters.
    pub fn accounting(&self) -> serde_json::Value {
        accounting(&self.inner, &self.push, &self.cfg.engine_id, self.cfg.tp_rank)
    }

    /// A new engine incarnation from the scheduler: advertise it in handshakes.
    fn set_epoch(&self, epoch: u64) {
        if epoch == 0 || self.epoch.swap(epoch, Ordering::AcqRel) == epoch {
            return;
        }
        if let Ok(mut p) = self.payload.lock() {
            if let Some(p) = p.as_mut() {
                p.epoch = epoch;
            }
        }
    }

    /// D: send the heartbeats in a step's metadata, to every P rank this rank reads from.
    fn send_heartbeats(&self, targets: Vec<wire::HeartbeatTarget>) {
        for t in targets {
            let ranks = lock(&self.inner).core.heartbeat_ranks(t.tp_size);
            let peer = format!("{}@{}:{}", t.engine_id, t.host, t.port);
            for q in ranks {
                let Some(port) = u16::try_from(q).ok().and_then(|q| t.port.checked_add(q)) else { continue };
                let inner = Arc::downgrade(&self.inner);
                let peer = peer.clone();
                let sent = now_unix();
                lock(&self.inner).core.stats.heartbeats_sent += 1;
                let req = HeartbeatRequest { request_ids: t.request_ids.clone() };
                self.side.heartbeat(t.host.clone(), port, req, self.cfg.handshake_timeout, move |res| {
                    if let Some(inner) = inner.upgrade() {
                        lock(&inner).core.on_heartbeat_reply(&peer, res, sent, now_unix());
                    }
                });
            }
        }
    }

    /// Bind a step's metadata (opaque bytes from the scheduler) and start loads.
    pub fn start_load(&self, metadata: &[u8]) -> Result<(), Error> {
        let mut md = ConnectorMetadata::from_bytes(metadata)?;
        self.set_epoch(md.epoch);
        if md.is_empty() {
            return Ok(());
        }
        let hb = std::mem::take(&mut md.heartbeats);
        if !hb.is_empty() {
            self.send_heartbeats(hb);
        }
        let stage = std::mem::take(&mut md.stage);
        if !stage.is_empty() {
            if let Ok(mut v) = self.to_stage.lock() {
                v.extend(stage);
            }
        }
        if self.cfg.host_buffer {
            // D: the blocks each load fills (pull: READ; push: P's writes), for the copy to
            // the cache once it is done.
            let pull = md.reqs_to_recv.iter().filter(|r| !r.notify_only).map(|r| (&r.req_id, &r.local_block_ids));
            let push = md.push_register.iter().filter(|r| !r.notify_only).map(|r| (&r.req_id, &r.local_block_ids));
            if let Ok(mut h) = self.host_loads.lock() {
                for (req, blocks) in pull.chain(push) {
                    let ids = blocks.iter().flatten().copied().filter(|&b| Some(b) != self.cfg.null_block_id);
                    h.insert(req.clone(), ids.collect());
                }
            }
        }
        self.start_push(&mut md);
        if md.reqs_to_recv.is_empty() && md.reqs_to_send.is_empty() && md.reqs_failed.is_empty() {
            return Ok(());
        }
        let actions = lock(&self.inner).core.on_metadata(md, now_unix());
        run(&self.inner, &self.side, &self.cfg, actions);
        Ok(())
    }

    /// The push parts of a step's metadata.
    fn start_push(&self, md: &mut ConnectorMetadata) {
        let now = now_unix();
        let saves = std::mem::take(&mut md.push_saves);
        let finished = std::mem::take(&mut md.push_finished);
        let register = std::mem::take(&mut md.push_register);
        let aborted = std::mem::take(&mut md.push_aborted);
        if saves.is_empty() && finished.is_empty() && register.is_empty() && aborted.is_empty() {
            return;
        }
        let mut work = Vec::new();
        let mut sends = Vec::new();
        {
            let mut c = lock_ctl(&self.push);
            if !saves.is_empty() && self.work.is_some() {
                work.push(Work::ForwardStart);
                self.layerwise_now.store(true, Ordering::Release);
                for s in saves {
                    for action in c.sender.on_computing(&s.req_id, &s.transfer_id, s.block_ids, s.num_tokens) {
                        work.push(Work::Action { action, layerwise: true });
                    }
                    c.computing.push(s.req_id);
                }
            }
            for s in finished {
                let actions = if s.aborted {
                    c.sender.on_aborted(&s.req_id, &s.transfer_id, now, s.hold)
                } else {
                    c.sender.on_finished(&s.req_id, &s.transfer_id, s.block_ids, s.num_tokens, s.expiry_unix, 0)
                };
                work.extend(actions.into_iter().map(|action| Work::Action { action, layerwise: false }));
            }
            // D side.
            for r in register {
                let ranks = match push_io::p_ranks_for(self.cfg.tp_size, self.cfg.tp_rank, r.tp_size) {
                    Ok(q) => q,
                    Err(e) => {
                        if !r.notify_only {
                            tracing::error!(request_id = %r.req_id, error = %e, "kvbridge: cannot register with the prefill engine");
                            c.receiver.on_registered(&r.req_id, 1, f64::INFINITY);
                            c.d_blocks.insert(r.req_id.clone(), r.local_block_ids.concat());
                            c.receiver.on_registration_failed(&r.req_id, e.to_string());
                        }
                        continue;
                    }
                };
                let Some(my_port) = self.cfg.local_listener_port() else { continue };
                if !r.notify_only {
                    let deadline = now + self.cfg.push_registration_timeout.as_secs_f64();
                    c.receiver.on_registered(&r.req_id, ranks.len() as u32, deadline);
                    c.d_blocks.insert(r.req_id.clone(), r.local_block_ids.concat());
                }
                for q in ranks {
                    let Some(port) = u16::try_from(q).ok().and_then(|q| r.port.checked_add(q)) else { continue };
                    c.stats.registrations_sent += 1;
                    sends.push((
                        r.host.clone(),
                        port,
                        PushRegistration {
                            version: WIRE_VERSION,
                            transfer_id: r.transfer_id.clone(),
                            request_id: r.req_id.clone(),
                            target_engine_id: r.engine_id.clone(),
                            engine_id: self.cfg.engine_id.clone(),
                            host: self.cfg.side_channel_host.clone(),
                            port: my_port,
                            tp_size: self.cfg.tp_size,
                            tp_rank: self.cfg.tp_rank,
                            block_ids: if r.notify_only { vec![Vec::new()] } else { r.local_block_ids.clone() },
                            num_tokens: r.num_tokens,
                        },
                    ));
                }
            }
            for r in aborted {
                // Still waiting: report it in `finished_sending` once settled (vLLM holds
                // its blocks until then). Otherwise it was already reported in
                // `finished_recving`, which is what frees a finished request's blocks.
                if c.receiver.is_waiting(&r) {
                    c.d_aborted.insert(r);
                }
            }
        }
        for w in work {
            self.send_work(w);
        }
        for (host, port, reg) in sends {
            let push = self.push.clone();
            let req = reg.request_id.clone();
            tracing::debug!(request_id = %req, %host, port, "kvbridge: registering blocks with the prefill engine");
            self.side.register(host.clone(), port, reg, self.cfg.handshake_timeout, move |res| {
                if let Err(reason) = res {
                    tracing::error!(request_id = %req, %host, port, %reason, "kvbridge: push registration failed");
                    lock_ctl(&push).receiver.on_registration_failed(&req, format!("registration with {host}:{port} failed: {reason}"));
                }
            });
        }
    }

    /// Push, P: layer `layer_name` is computed in the running forward. Never blocks on
    /// the network: the writer thread posts the WRITEs.
    pub fn save_layer(&self, layer_name: &str) {
        if !self.layerwise_now.load(Ordering::Acquire) {
            return;
        }
        let idx = self.layer_index.read().ok().and_then(|m| m.get(layer_name).copied());
        if let Some(i) = idx {
            self.send_work(Work::Layer(i));
        }
    }

    /// Push, P: the forward ended. The WRITEs it started finish on the writer thread;
    /// P's blocks stay held until they have.
    pub fn wait_for_save(&self) {
        self.stage_now();
        if !self.layerwise_now.swap(false, Ordering::AcqRel) {
            return;
        }
        let computing = std::mem::take(&mut lock_ctl(&self.push).computing);
        self.send_work(Work::ForwardDone { computing });
    }

    /// Pull, P with staging: copies wait for this step's `wait_for_save` (an engine may
    /// release its interpreter lock for them, and only then).
    pub fn has_staging_work(&self) -> bool {
        self.to_stage.lock().map(|v| !v.is_empty()).unwrap_or(false)
    }

    /// Pull, P with staging: copy the prefills this step completed into their slots.
    fn stage_now(&self) {
        let todo = match self.to_stage.lock() {
            Ok(mut v) if !v.is_empty() => std::mem::take(&mut *v),
            _ => return,
        };
        let st = self.staging.read().ok().and_then(|g| g.clone());
        for s in todo {
            let _span = tracing::debug_span!("stage", request_id = %s.req_id, blocks = s.block_ids.len()).entered();
            let t0 = std::time::Instant::now();
            let res = self.host_copy(st.as_deref(), &s, false);
            match res {
                Ok(bytes) => tracing::debug!(request_id = %s.req_id, bytes, us = t0.elapsed().as_secs_f64() * 1e6, "kvbridge: staged"),
                // Block ids come from vLLM and slots from our scheduler: an error here is
                // a bug. The slots hold stale bytes, and a READ is one-sided, so P cannot
                // stop one: the lease is ended on arrival instead, so D's heartbeats and
                // lease check report the KV gone (a READ started before that still reads
                // the stale slots).
                Err(e) => {
                    tracing::error!(request_id = %s.req_id, error = %e, "kvbridge: staging copy failed");
                    lock(&self.inner).core.base.refuse_lease(&s.req_id);
                }
            }
        }
    }

    /// Copy `s`'s blocks between the cache and `st` (staging or the host mirror): to the
    /// host, or back to the cache when `to_cache`. DRAM caches with `memcpy`, GPU caches
    /// through the transport (CUDA). Returns the bytes copied.
    fn host_copy(&self, st: Option<&StagingBuffer>, s: &StageReq, to_cache: bool) -> Result<u64, Error> {
        let st = st.ok_or_else(|| Error::Other("a host copy was ordered but no staging or host buffer is registered".into()))?;
        if st.source == crate::layout::MemKind::Dram {
            return if to_cache { st.restore(s) } else { st.copy(s) };
        }
        let c = st.copies(s)?;
        let bytes = c.iter().map(|x| x.2).sum();
        let mut g = lock(&self.inner);
        let res = if to_cache { g.transport.copy_host_to_device(st.device, &c) } else { g.transport.copy_device_to_host(st.device, &c) };
        res.map(|_| bytes).map_err(Error::from)
    }

    /// D with a host buffer: copy what finished loads read into the host mirror back to
    /// the cache, before vLLM hears the loads finished. A failed copy fails the load.
    fn restore_loads(&self, out: &mut FinishedSets) {
        let mut loads = match self.host_loads.lock() {
            Ok(h) if !h.is_empty() => h,
            _ => return,
        };
        let done: Vec<(String, Vec<u32>)> = out.recving.iter().filter_map(|r| loads.remove(r).map(|b| (r.clone(), b))).collect();
        // Push, D: a request aborted while P could still write ends in `sending`; nothing
        // is copied for it.
        for r in &out.sending {
            loads.remove(r);
        }
        drop(loads);
        let st = self.staging.read().ok().and_then(|g| g.clone());
        for (req, blocks) in done {
            if out.failed_recving.contains(&req) || blocks.is_empty() {
                continue;
            }
            let _span = tracing::debug_span!("host_to_cache", request_id = %req, blocks = blocks.len()).entered();
            let t0 = std::time::Instant::now();
            let s = StageReq { req_id: req.clone(), slots: blocks.clone(), block_ids: blocks };
            match self.host_copy(st.as_deref(), &s, true) {
                Ok(bytes) => {
                    tracing::debug!(request_id = %req, bytes, us = t0.elapsed().as_secs_f64() * 1e6, "kvbridge: host buffer copied to the cache")
                }
                Err(e) => {
                    tracing::error!(request_id = %req, error = %e, "kvbridge: copying the host buffer to the cache failed; the load fails");
                    out.invalid_block_ids.extend(s.block_ids);
                    out.failed_recving.push(req);
                }
            }
        }
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
    /// holds blocks for a remote reader, or a READ is in flight) and nothing has finished,
    /// keep polling — sleeping 100 µs between polls — for up to `max_wait`. An engine calls
    /// this on steps with no forward pass, so a P that holds leases (vLLM keeps stepping it)
    /// does not spin a core while D needs the CPU, and completions are still seen at once.
    pub fn get_finished_wait(&self, max_wait: Duration) -> FinishedSets {
        let t0 = std::time::Instant::now();
        loop {
            let f = self.poll_once();
            let waiting = {
                let (held, recv) = self.push_pending();
                held > 0 || recv > 0 || {
                    let g = lock(&self.inner);
                    g.core.base.held_requests() > 0 || !g.xfers.is_empty()
                }
            };
            if f != FinishedSets::default() || !waiting || t0.elapsed() >= max_wait {
                return f;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn poll_once(&self) -> FinishedSets {
        let now = now_unix();
        if self.work.is_some() && !self.cfg.role.can_consume() {
            // A push-mode P: nothing to poll here (the writer thread owns the transfers),
            // and the engine thread must not wait on the transport lock a WRITE post holds.
            let mut c = lock_ctl(&self.push);
            return FinishedSets { sending: c.sender.take_sending(), ..Default::default() };
        }
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
        let notifs = match g.transport.take_notifs() {
            Ok(ns) => ns,
            Err(e) => {
                tracing::warn!(error = %e, "kvbridge: reading notifications failed");
                Vec::new()
            }
        };
        let push_mode = self.cfg.mode == TransferMode::Push;
        let mut c = lock_ctl(&self.push);
        for n in notifs {
            // Push (D): P's write notifications. Everything else is a pull reader's.
            if push_mode {
                if let Ok(parsed) = Notif::from_bytes(&n) {
                    if c.receiver.on_notif(&parsed) {
                        continue;
                    }
                }
            }
            g.core.base.on_notif(&n, now);
        }
        g.core.base.tick(now);
        let last = f64::from_bits(self.last_evict.load(Ordering::Relaxed));
        if now - last >= 1.0 {
            self.last_evict.store(now.to_bits(), Ordering::Relaxed);
            follow.extend(g.core.evict_idle(now, self.cfg.engine_ttl.as_secs_f64()));
        }
        drop(g);
        if !follow.is_empty() {
            run(&self.inner, &self.side, &self.cfg, follow);
        }
        let mut out = lock(&self.inner).core.base.take_finished();
        if push_mode {
            c.receiver.tick(now);
            let (ok, failed) = c.receiver.take();
            for r in ok {
                c.d_blocks.remove(&r);
                c.stats.recv_ok += 1;
                if c.d_aborted.remove(&r) {
                    out.sending.push(r);
                } else {
                    out.recving.push(r);
                }
            }
            for (r, reason) in failed {
                let blocks = c.d_blocks.remove(&r).unwrap_or_default();
                c.stats.recv_failed += 1;
                c.xfer.record_failed_transfer();
                if c.d_aborted.remove(&r) {
                    out.sending.push(r);
                    continue;
                }
                tracing::error!(request_id = %r, %reason, "kvbridge: push load failed");
                out.invalid_block_ids.extend(blocks.into_iter().filter(|&b| Some(b) != self.cfg.null_block_id));
                out.recving.push(r.clone());
                out.failed_recving.push(r);
            }
            out.sending.extend(c.sender.take_sending());
        }
        drop(c);
        if self.cfg.host_buffer {
            self.restore_loads(&mut out);
        }
        out
    }

    /// vLLM's per-interval stats (`get_kv_connector_stats`): everything observed since the
    /// last call, or `None` when nothing was (the common case, and cheap).
    pub fn take_xfer_stats(&self) -> Option<XferStats> {
        let (mut out, held) = {
            let mut g = lock(&self.inner);
            (g.core.base.xfer.take(), g.core.base.held_blocks())
        };
        out.merge(lock_ctl(&self.push).xfer.take());
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
        lock(&self.inner).core.stats.clone()
    }

    /// Requests whose blocks this rank still holds for remote readers.
    pub fn held_requests(&self) -> usize {
        lock(&self.inner).core.base.held_requests()
    }

    /// READs posted on this rank and not yet completed.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner).xfers.len()
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

/// P's writer thread: every push-mode NIXL call is made here.
struct Writer<T: Transport + 'static> {
    inner: Arc<Mutex<Inner<T>>>,
    side: Arc<SideChannel>,
    cfg: ConnectorConfig,
    push: Arc<Mutex<PushCtl>>,
    tx: mpsc::Sender<Work>,
    st: WriterState,
}

impl<T: Transport + 'static> Writer<T> {
    fn run(mut self, rx: mpsc::Receiver<Work>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Acquire) {
            // Poll in-flight WRITEs every 100 µs; otherwise wake on work, or every 20 ms
            // to expire leases and stale registrations. While a layer-wise forward runs,
            // only post (on each layer's message): this thread shares the engine's cores,
            // and polling every 100 µs then steals them from the forward it overlaps. The
            // notifications reach D when the WRITEs complete whether or not we poll.
            let wait = if self.st.wxfers.is_empty() || self.st.layers_done.is_some() {
                Duration::from_millis(20)
            } else {
                Duration::from_micros(100)
            };
            let first = match rx.recv_timeout(wait) {
                Ok(w) => Some(w),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let now = now_unix();
            for w in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                self.handle(w, now);
            }
            self.poll(now);
            let expired = lock_ctl(&self.push).sender.tick(now);
            for action in expired {
                self.dispatch(action, false, now);
            }
        }
    }

    fn handle(&mut self, w: Work, now: f64) {
        match w {
            Work::Registered(g) => self.st.geo = *g,
            Work::Connect(reg) => {
                let key = push_io::d_key(&reg);
                if !self.st.d_peers.contains_key(&key) {
                    self.st.d_peers.insert(key.clone(), DPeer::Handshaking { pending: Vec::new() });
                    self.handshake(key, reg);
                }
            }
            Work::Action { action, layerwise } => self.dispatch(action, layerwise, now),
            Work::ForwardStart => self.st.layers_done = Some(vec![false; self.st.geo.num_layers.max(1)]),
            Work::Layer(i) => {
                if let Some(d) = self.st.layers_done.as_mut().and_then(|d| d.get_mut(i)) {
                    *d = true;
                }
                self.post_pending();
            }
            Work::ForwardDone { computing } => {
                self.st.layers_done = None;
                self.post_pending();
                let mut actions = Vec::new();
                {
                    let mut c = lock_ctl(&self.push);
                    for r in &computing {
                        actions.extend(c.sender.on_computed(r));
                    }
                }
                for a in actions {
                    self.dispatch(a, false, now);
                }
            }
            Work::PeerDone { key, res } => {
                let pending = match self.st.d_peers.remove(&key) {
                    Some(DPeer::Handshaking { pending }) => pending,
                    _ => Vec::new(),
                };
                let loaded = res.and_then(|(plan, md)| {
                    let t0 = std::time::Instant::now();
                    lock(&self.inner).transport.add_remote(&key, &md).map_err(Error::from)?;
                    tracing::info!(%key, ms = t0.elapsed().as_secs_f64() * 1e3, "kvbridge: push peer loaded");
                    Ok(plan)
                });
                let (told, e) = match loaded {
                    Ok(Ok(plan)) => {
                        self.st.d_peers.insert(key, DPeer::Ready { plan });
                        for (a, lw) in pending {
                            self.dispatch(a, lw, now);
                        }
                        return;
                    }
                    // D is loaded but P cannot write its layout: tell each waiting request now
                    // (a failure notification), so D fails it at once. The peer is not kept:
                    // a later registration handshakes again.
                    Ok(Err(e)) => (true, e),
                    // D cannot be reached through NIXL: its requests fail at their
                    // registration timeout there.
                    Err(e) => (false, e),
                };
                if told {
                    tracing::error!(%key, error = %e, "kvbridge: cannot plan writes to the decode rank; failing its requests");
                } else {
                    tracing::error!(%key, error = %e, "kvbridge: cannot load the decode rank; its writes are dropped");
                }
                for (a, _) in pending {
                    let (PushAction::Write { reg, .. } | PushAction::Reject { reg, .. }) = &a;
                    if told {
                        self.notify(&key, &push_io::notif(reg, &self.cfg.engine_id, self.cfg.tp_rank, false, 1));
                    }
                    if let PushAction::Write { p_req, .. } = a {
                        let mut c = lock_ctl(&self.push);
                        c.write_failed();
                        c.sender.on_write_done(&p_req);
                    }
                }
            }
        }
    }

    /// Fetch D rank `reg`'s handshake payload; check and plan on the side-channel thread,
    /// then hand the result back to the writer.
    fn handshake(&self, key: String, reg: PushRegistration) {
        let req = HandshakeRequest { version: WIRE_VERSION, from_engine: self.cfg.engine_id.clone(), from_tp_rank: self.cfg.tp_rank };
        let tx = self.tx.clone();
        let geo = self.st.geo.clone();
        let inner = Arc::downgrade(&self.inner);
        let null = self.cfg.null_block_id;
        let p_tp = self.cfg.tp_size;
        let addr = format!("{}:{}", reg.host, reg.port);
        tracing::debug!(%key, %addr, "kvbridge: push handshake with a decode rank");
        self.side.fetch(reg.host.clone(), reg.port, req, self.cfg.handshake_timeout, self.cfg.handshake_retries, move |res| {
            let out = (|| -> Result<(Result<Box<TransferPlan>, Error>, AgentMetadata), Error> {
                let bytes = res?;
                let inner = inner.upgrade().ok_or_else(|| Error::Other("the worker is shutting down".into()))?;
                let (md, _, _) = lock(&inner).core.check_payload(&reg.engine_id, &addr, &bytes)?;
                if md.tp_rank != reg.tp_rank || md.tp_size != reg.tp_size {
                    return Err(HandshakeError::Rejected {
                        addr: addr.clone(),
                        reason: format!(
                            "registered as rank {} of {}, handshake says {} of {}",
                            reg.tp_rank, reg.tp_size, md.tp_rank, md.tp_size
                        ),
                    }
                    .into());
                }
                // D is known and checked from here: a plan that cannot be made is D's to
                // hear about (a failure notification), not to wait out.
                let plan = (|| -> Result<Box<TransferPlan>, Error> {
                    let ranks = push_io::p_ranks_for(md.tp_size, md.tp_rank, p_tp)?;
                    let p_mds = ranks.iter().map(|&q| geo.sibling_md(q)).collect::<Result<Vec<_>, _>>()?;
                    Ok(Box::new(TransferPlan::build_push(&md, &p_mds, null)?))
                })();
                Ok((plan, md))
            })();
            let _ = tx.send(Work::PeerDone { key, res: out });
        });
    }

    fn notify(&self, key: &str, msg: &[u8]) {
        if let Err(e) = lock(&self.inner).transport.notify(key, msg) {
            tracing::warn!(%key, error = %e, "kvbridge: push notification failed");
            lock_ctl(&self.push).xfer.record_failed_notification();
        }
    }

    fn dispatch(&mut self, action: PushAction, layerwise: bool, now: f64) {
        let reg = match &action {
            PushAction::Write { reg, .. } | PushAction::Reject { reg, .. } => reg,
        };
        let key = push_io::d_key(reg);
        let plan = match self.st.d_peers.get_mut(&key) {
            Some(DPeer::Ready { plan }) => plan,
            Some(DPeer::Handshaking { pending }) => return pending.push((action, layerwise)),
            None => {
                let reg = reg.clone();
                self.st.d_peers.insert(key.clone(), DPeer::Handshaking { pending: vec![(action, layerwise)] });
                return self.handshake(key, reg);
            }
        };
        let me = (self.cfg.engine_id.as_str(), self.cfg.tp_rank);
        match action {
            PushAction::Reject { reg, reason } => {
                tracing::warn!(request_id = %reg.request_id, %reason, "kvbridge: telling the decode rank its request will not be written");
                let msg = push_io::notif(&reg, me.0, me.1, false, 1);
                self.notify(&key, &msg);
            }
            PushAction::Write { p_req, p_blocks, reg, .. } => {
                let pieces = push_io::write_pieces(plan, me.1, &p_blocks, &reg, self.cfg.coalesce_descriptors);
                let pieces = match pieces {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(request_id = %p_req, d_request = %reg.request_id, error = %e, "kvbridge: cannot plan the push write");
                        self.notify(&key, &push_io::notif(&reg, me.0, me.1, false, 1));
                        let mut c = lock_ctl(&self.push);
                        c.write_failed();
                        c.sender.on_write_done(&p_req);
                        return;
                    }
                };
                if pieces.is_empty() {
                    // Nothing of ours to write (another rank holds it, or D needs nothing).
                    self.notify(&key, &push_io::notif(&reg, me.0, me.1, true, 1));
                    lock_ctl(&self.push).sender.on_write_done(&p_req);
                    return;
                }
                let bytes = pieces.iter().map(|p| p.len).sum();
                let layers = if layerwise { self.st.geo.by_layer(pieces) } else { vec![pieces] };
                let writes = layers.iter().filter(|l| !l.is_empty()).count() as u32;
                let job = Job {
                    p_req,
                    key,
                    posted: layers.iter().map(Vec::is_empty).collect(),
                    layers,
                    layerwise,
                    notif_ok: push_io::notif(&reg, me.0, me.1, true, writes),
                    notif_fail: push_io::notif(&reg, me.0, me.1, false, writes),
                    in_flight: 0,
                    failed: false,
                    bytes,
                    started: now,
                    post_secs: 0.0,
                };
                self.st.next_job += 1;
                let id = self.st.next_job;
                self.st.jobs.insert(id, job);
                self.post(id);
            }
        }
    }

    fn post_pending(&mut self) {
        let ids: Vec<u64> = self.st.jobs.iter().filter(|(_, j)| j.posted.iter().any(|p| !p)).map(|(i, _)| *i).collect();
        for id in ids {
            self.post(id);
        }
    }

    /// Post what job `id` may post now: every layer already computed (all of them when
    /// not layer-wise, or when no forward is running).
    fn post(&mut self, id: u64) {
        let Some(job) = self.st.jobs.get_mut(&id) else { return };
        let _span = tracing::debug_span!("write", request_id = %job.p_req, key = %job.key).entered();
        let mut g = lock(&self.inner);
        let mut posts = 0;
        for i in 0..job.layers.len() {
            if job.posted[i] || job.failed {
                continue;
            }
            let ready = !job.layerwise || self.st.layers_done.as_ref().map_or(true, |d| d.get(i).copied().unwrap_or(true));
            if !ready {
                continue;
            }
            job.posted[i] = true;
            let t0 = std::time::Instant::now();
            let res = g.transport.write(&job.key, &job.layers[i], &job.notif_ok);
            job.post_secs += t0.elapsed().as_secs_f64();
            match res {
                Ok(x) => {
                    job.in_flight += 1;
                    posts += 1;
                    self.st.wxfers.insert(x, id);
                }
                Err(e) => {
                    tracing::error!(request_id = %job.p_req, key = %job.key, error = %e, "kvbridge: push WRITE could not be posted; failing the decode side");
                    job.failed = true;
                    if let Err(e) = g.transport.notify(&job.key, &job.notif_fail) {
                        tracing::warn!(key = %job.key, error = %e, "kvbridge: push notification failed");
                    }
                }
            }
        }
        if job.failed {
            job.posted.iter_mut().for_each(|p| *p = true);
        }
        drop(g);
        if posts > 0 {
            lock_ctl(&self.push).stats.write_posts += posts;
        }
        self.maybe_finish(id);
    }

    fn maybe_finish(&mut self, id: u64) {
        let done = self.st.jobs.get(&id).is_some_and(|j| j.in_flight == 0 && j.posted.iter().all(|&p| p));
        if !done {
            return;
        }
        let Some(job) = self.st.jobs.remove(&id) else { return };
        let now = now_unix();
        if job.failed {
            // The D rank may have restarted or gone: forget it, so its next registration
            // loads it afresh (as pull forgets a peer after a failed READ).
            if self.st.d_peers.remove(&job.key).is_some() {
                lock(&self.inner).transport.remove_remote(&job.key);
            }
        }
        let mut c = lock_ctl(&self.push);
        if job.failed {
            c.write_failed();
        } else {
            let descs = job.layers.iter().map(|l| l.len() as u64).sum();
            c.xfer.record_transfer(now - job.started, job.post_secs, job.bytes, descs);
            c.stats.writes_ok += 1;
            c.stats.bytes_written += job.bytes;
            c.stats.last_write_secs = (now - job.started).max(0.0);
            tracing::info!(request_id = %job.p_req, key = %job.key, bytes = job.bytes, secs = now - job.started, layerwise = job.layerwise, "kvbridge-push");
        }
        c.sender.on_write_done(&job.p_req);
    }

    fn poll(&mut self, now: f64) {
        if self.st.wxfers.is_empty() {
            return;
        }
        let timeout = self.cfg.kv_lease_duration.as_secs_f64();
        let mut ended = Vec::new();
        {
            let mut g = lock(&self.inner);
            for (&x, &id) in &self.st.wxfers {
                let started = self.st.jobs.get(&id).map(|j| j.started).unwrap_or(now);
                let res = match g.transport.poll(x) {
                    Ok(XferPoll::Pending) if now - started > timeout => Some(false),
                    Ok(XferPoll::Pending) => None,
                    Ok(XferPoll::Done) => Some(true),
                    Err(e) => {
                        tracing::error!(error = %e, "kvbridge: push WRITE failed");
                        Some(false)
                    }
                };
                if let Some(ok) = res {
                    g.transport.release(x);
                    ended.push((x, id, ok));
                }
            }
            for &(x, id, ok) in &ended {
                self.st.wxfers.remove(&x);
                let Some(job) = self.st.jobs.get_mut(&id) else { continue };
                job.in_flight = job.in_flight.saturating_sub(1);
                if !ok && !job.failed {
                    job.failed = true;
                    job.posted.iter_mut().for_each(|p| *p = true);
                    if let Err(e) = g.transport.notify(&job.key, &job.notif_fail) {
                        tracing::warn!(key = %job.key, error = %e, "kvbridge: push notification failed");
                    }
                }
            }
        }
        for (_, id, _) in ended {
            self.maybe_finish(id);
        }
    }
}

/// The accounting view of one worker rank (see `WorkerDriver::accounting`).
fn accounting<T: Transport>(inner: &Mutex<Inner<T>>, push: &Mutex<PushCtl>, engine: &str, rank: u32) -> serde_json::Value {
    let g = lock(inner);
    let (loading_requests, loading_blocks) = g.core.loading_blocks();
    let b = &g.core.base;
    let st = &g.core.stats;
    let mut v = serde_json::json!({
        "engine_id": engine,
        "tp_rank": rank,
        "held_requests": b.held_requests(),
        "held_blocks": b.held_blocks(),
        "loading_requests": loading_requests,
        "loading_blocks": loading_blocks,
        "reads_in_flight": g.xfers.len(),
        "expired_leases": b.expired_leases,
        "released_leases": b.released_leases,
        "heartbeats_received": b.heartbeats_received,
        "heartbeats_sent": st.heartbeats_sent,
        "heartbeats_failed": st.heartbeats_failed,
        "leases_lost": st.leases_lost,
        "reads_ok": st.reads_ok,
        "reads_failed": st.reads_failed,
        "handshakes_ok": st.handshakes_ok,
        "handshakes_failed": st.handshakes_failed,
        "engines_evicted": st.engines_evicted,
        "ready_peers": g.core.ready_peers(),
    });
    drop(g);
    let c = lock_ctl(push);
    let push_held = c.sender.held();
    let push_blocks = c.sender.held_blocks();
    let d_waiting = c.receiver.waiting();
    let d_blocks: u64 = c.d_blocks.values().map(|b| b.len() as u64).sum();
    drop(c);
    if let Some(o) = v.as_object_mut() {
        // Push-mode holds count as held (P) and loading (D) too.
        let add = |o: &mut serde_json::Map<String, serde_json::Value>, k: &str, n: u64| {
            let cur = o.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            o.insert(k.into(), (cur + n).into());
        };
        add(o, "held_requests", push_held as u64);
        add(o, "held_blocks", push_blocks);
        add(o, "loading_requests", d_waiting as u64);
        add(o, "loading_blocks", d_blocks);
    }
    v
}

/// Execute actions until none are left. Handshakes go to the side channel; their
/// completion re-enters here on the side-channel thread.
fn run<T: Transport + 'static>(inner: &Arc<Mutex<Inner<T>>>, side: &Arc<SideChannel>, cfg: &ConnectorConfig, actions: Vec<Action>) {
    let mut q: VecDeque<Action> = actions.into();
    while let Some(a) = q.pop_front() {
        match a {
            Action::Handshake { peer, rank, host, port } => {
                tracing::debug!(%peer, rank, %host, port, "kvbridge: handshake");
                let weak = Arc::downgrade(inner);
                let side2 = side.clone();
                let cfg2 = cfg.clone();
                let addr = format!("{host}:{port}");
                let req = HandshakeRequest { version: WIRE_VERSION, from_engine: cfg.engine_id.clone(), from_tp_rank: cfg.tp_rank };
                let t0 = std::time::Instant::now();
                let sent = now_unix();
                side.fetch(host, port, req, cfg.handshake_timeout, cfg.handshake_retries, move |res| {
                    let fetched_ms = t0.elapsed().as_secs_f64() * 1e3;
                    let recv = now_unix();
                    let Some(inner2) = weak.upgrade() else { return }; // the worker is gone
                    let _span = tracing::info_span!("handshake", %peer, rank).entered();
                    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let follow = lock(&inner2).core.on_handshake_payload(&peer, rank, &addr, res, sent, recv);
                        run(&inner2, &side2, &cfg2, follow);
                    }));
                    if handled.is_err() {
                        // Never leave requests queued behind a handshake that cannot finish.
                        tracing::error!(%peer, "kvbridge: internal error while completing a handshake; failing its requests");
                        let err = HandshakeError::Io { addr: addr.clone(), reason: "internal error completing the handshake".into() };
                        let follow = lock(&inner2).core.on_handshake_payload(&peer, rank, &addr, Err(err), sent, recv);
                        run(&inner2, &side2, &cfg2, follow);
                    }
                    tracing::info!(fetch_ms = fetched_ms, total_ms = t0.elapsed().as_secs_f64() * 1e3, "kvbridge: handshake finished");
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
                let _span = tracing::debug_span!("read", request_id = %req_id, %key, bytes, descs = pieces.len()).entered();
                let mut g = lock(inner);
                let now = now_unix();
                let t0 = std::time::Instant::now();
                let res = g.transport.read(&key, &pieces, &notif);
                let post_secs = t0.elapsed().as_secs_f64();
                match res {
                    Ok(x) => {
                        tracing::debug!(request_id = %req_id, %key, bytes, descs = pieces.len(), post_us = post_secs * 1e6, "kvbridge: READ posted");
                        g.core.mark_posted(&req_id, now, post_secs);
                        g.xfers.insert(x, (req_id, key));
                    }
                    Err(e) => {
                        let follow = g.core.on_read_done(&req_id, &key, Err(e), now);
                        q.extend(follow);
                    }
                }
            }
            Action::Notify { key, msg } => {
                let _span = tracing::debug_span!("notify", %key).entered();
                let mut g = lock(inner);
                if let Err(e) = g.transport.notify(&key, &msg) {
                    tracing::warn!(%key, error = %e, "kvbridge: notification failed");
                    g.core.base.xfer.record_failed_notification();
                }
            }
        }
    }
}
