//! Registration: the KV caches (or their host mirror) with the transport, the handshake
//! payload, and the side-channel listener with its push, heartbeat and inspect handlers.
use std::sync::{Arc, Mutex};

use kvbridge_core::config::TransferMode;
use kvbridge_core::error::{ConfigError, Error};
use kvbridge_core::layout::{KvLayout, TensorInfo};
use kvbridge_core::side::{Handlers, HeartbeatHandler, InspectHandler, RegisterHandler};
use kvbridge_core::transport::Transport;
use kvbridge_core::wire::{self, AgentMetadata, HandshakePayload, HeartbeatRequest, PushRegistration};
use kvbridge_core::worker::push_plan::Geometry;

use super::push_state::Work;
use super::{accounting, lock_ctl, now_unix, WorkerDriver};
use crate::recv::RecvStaging;
use crate::staging::StagingBuffer;

impl<T: Transport + 'static> WorkerDriver<T> {
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
                .ok_or_else(|| ConfigError::InvalidValue {
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
        // D, pull: receive staging for READs a layout difference would fragment.
        let recv = if self.cfg.role.can_consume() && self.cfg.mode == TransferMode::Pull && !self.cfg.host_buffer {
            RecvStaging::new(u64::from(self.cfg.kv_recv_staging_mib) << 20, &layout)?
        } else {
            None
        };
        let recv_region: Vec<_> = recv.iter().map(|r| r.region()).collect();
        if let Some(r) = &recv {
            tracing::info!(mib = self.cfg.kv_recv_staging_mib, ?r, "kvbridge: receive staging allocated (kv_recv_staging_mib)");
        }
        let payload = {
            let (agent_name, nixl_md) = {
                let mut t = self.shared.transport();
                let all = [layout.regions.clone(), staging_regions.clone(), recv_region].concat();
                t.register(&KvLayout { regions: all, ..layout.clone() })?;
                *self.shared.recv() = recv;
                (t.agent_name().to_string(), t.local_metadata()?)
            };
            let mut g = self.shared.state();
            let md = AgentMetadata {
                engine_id: self.cfg.engine_id.clone(),
                agent_name,
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
                epoch: self.epoch.load(std::sync::atomic::Ordering::Acquire),
                now_unix: 0.0,
                ranks: self.rank_table(),
            }
        };
        if let Ok(mut p) = self.payload.lock() {
            *p = Some(payload);
        }
        // kv_integrity digests the cache when it is DRAM, else the host mirror NIXL moves.
        let mirror = staging.as_ref().filter(|_| self.cfg.host_buffer).map(|m| KvLayout { regions: m.regions.clone(), ..cache.clone() });
        self.integrity.on_registered(&cache, mirror.as_ref(), block_size);
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
        let handlers = Handlers {
            register: on_register,
            heartbeat: Some(self.heartbeat_handler()),
            inspect: Some(self.inspect_handler()),
            digests: Some(self.digests_handler()),
        };
        self.side.serve_with(self.cfg.local_host(), port, self.payload.clone(), handlers)?;
        if self.cfg.role.can_consume() && self.cfg.mode == kvbridge_core::config::TransferMode::Pull {
            for (host, port) in self.cfg.peers.clone() {
                self.warm_up(host, port);
            }
        }
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
    pub(crate) fn heartbeat_handler(&self) -> HeartbeatHandler {
        // Weak: side-channel tasks must not keep the NIXL agent alive after the driver is
        // dropped (it would then outlive the process's teardown).
        let shared = Arc::downgrade(&self.shared);
        let extend = self.cfg.kv_lease_duration.as_secs_f64() * 2.0 / 3.0;
        let epoch = self.epoch.clone();
        Arc::new(move |from: &str, hb: HeartbeatRequest| {
            let Some(shared) = shared.upgrade() else { return wire::HeartbeatReply::default() };
            let mut reply = shared.state().core.base.on_heartbeat(&hb, now_unix(), extend);
            reply.epoch = epoch.load(std::sync::atomic::Ordering::Acquire);
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
    pub(crate) fn inspect_handler(&self) -> InspectHandler {
        let shared = Arc::downgrade(&self.shared);
        let push = self.push.clone();
        let engine = self.cfg.engine_id.clone();
        let rank = self.cfg.tp_rank;
        let integrity = self.integrity.clone();
        Arc::new(move || match shared.upgrade() {
            Some(shared) => accounting::view(&shared, &push, &engine, rank, &integrity).to_string(),
            None => "{}".to_string(),
        })
    }
}
