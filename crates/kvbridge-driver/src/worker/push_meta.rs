//! Push mode on the engine thread: a step's push metadata (P: requests computing or
//! finished; D: registrations to send, aborts), and the forward's layer and end signals,
//! all handed to the writer thread as `Work` or to the side channel.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kvbridge_core::ranks::{self, RankAddr};
use kvbridge_core::transport::Transport;
use kvbridge_core::wire::{ConnectorMetadata, HandshakeRequest, PushRegistration, WIRE_VERSION};
use kvbridge_core::worker::push_plan::{self, PushCtl};

use crate::side_channel::SideChannel;

/// A registration waiting for P's rank table: (P rank, P TP size, registration).
type Deferred = (u32, u32, PushRegistration);

use super::push_state::{Fence, Work};
use super::{lock_ctl, now_unix, WorkerDriver};

impl<T: Transport + 'static> WorkerDriver<T> {
    /// The push parts of a step's metadata.
    pub(crate) fn start_push(&self, md: &mut ConnectorMetadata) {
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
                let ranks = match push_plan::p_ranks_for(self.cfg.tp_size, self.cfg.tp_rank, r.tp_size) {
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
                let table = c.tables.get(&(r.host.clone(), r.port)).cloned();
                for q in ranks {
                    c.stats.registrations_sent += 1;
                    // Rank 0 is the directory itself; another rank's address comes from
                    // the directory's table (fetched once per P engine, below).
                    let to = match (&table, q) {
                        (_, 0) => Some((r.host.clone(), r.port)),
                        (Some(t), q) => ranks::resolve(t, &r.host, r.port, 0, q, r.tp_size),
                        (None, _) => None,
                    };
                    sends.push((
                        to,
                        (r.host.clone(), r.port, q, r.tp_size),
                        PushRegistration {
                            version: WIRE_VERSION,
                            transfer_id: r.transfer_id.clone(),
                            request_id: r.req_id.clone(),
                            target_engine_id: r.engine_id.clone(),
                            engine_id: self.cfg.engine_id.clone(),
                            host: self.cfg.local_host().to_string(),
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
        let mut later: HashMap<(String, u16), Vec<Deferred>> = HashMap::new();
        for (to, (dir_host, dir_port, q, p_tp), reg) in sends {
            match to {
                Some((host, port)) => send_registration(&self.side, &self.push, host, port, reg, self.cfg.handshake_timeout),
                None => later.entry((dir_host, dir_port)).or_default().push((q, p_tp, reg)),
            }
        }
        for ((host, port), regs) in later {
            self.register_via_directory(host, port, regs);
        }
    }

    /// D: fetch P's rank table from its directory (`host:port`), keep it, then send `regs`
    /// (`(P rank, P TP size, registration)`) where it says. A directory that cannot be
    /// reached or has no table: the single-host arithmetic (`port + rank`), as before.
    fn register_via_directory(&self, host: String, port: u16, regs: Vec<Deferred>) {
        let req = HandshakeRequest { version: WIRE_VERSION, from_engine: self.cfg.engine_id.clone(), from_tp_rank: self.cfg.tp_rank };
        let (side, push, timeout) = (self.side.clone(), self.push.clone(), self.cfg.handshake_timeout);
        let retries = self.cfg.handshake_retries;
        self.side.clone().fetch(host.clone(), port, req, timeout, retries, move |res| {
            let table: Vec<RankAddr> = res.ok().and_then(|b| ranks::table_of(&b).ok()).unwrap_or_default();
            if !table.is_empty() {
                let mut c = lock_ctl(&push);
                if c.tables.len() >= 4096 {
                    c.tables.clear();
                }
                c.tables.insert((host.clone(), port), table.clone());
            }
            for (q, p_tp, reg) in regs {
                match ranks::resolve(&table, &host, port, 0, q, p_tp) {
                    Some((h, p)) => send_registration(&side, &push, h, p, reg, timeout),
                    None => lock_ctl(&push)
                        .receiver
                        .on_registration_failed(&reg.request_id, format!("no address for rank {q} of {host}:{port}")),
                }
            }
        });
    }

    /// Push, P: layer `layer_name` is computed in the running forward. Never blocks on
    /// the network: the writer thread posts the WRITEs.
    pub fn save_layer(&self, layer_name: &str) {
        let _ = self.save_layer_fenced(layer_name, || Ok::<_, std::convert::Infallible>(None));
    }

    /// True while a layer-wise push forward runs: only then does `save_layer` post.
    pub fn layerwise_now(&self) -> bool {
        self.layerwise_now.load(Ordering::Acquire)
    }

    /// [`save_layer`](Self::save_layer) for a GPU cache: `fence` records the point in the
    /// forward's stream after this layer's KV write (called only when the layer will be
    /// written now); the writer posts the layer's WRITEs once it has passed.
    pub fn save_layer_fenced<E>(&self, layer_name: &str, fence: impl FnOnce() -> Result<Option<Box<dyn Fence>>, E>) -> Result<(), E> {
        if !self.layerwise_now.load(Ordering::Acquire) {
            return Ok(());
        }
        let idx = self.layer_index.read().ok().and_then(|m| m.get(layer_name).copied());
        if let Some(i) = idx {
            self.send_work(Work::Layer(i, fence()?));
        }
        Ok(())
    }

    /// Push, P: the forward ended. The WRITEs it started finish on the writer thread;
    /// P's blocks stay held until they have.
    pub fn wait_for_save(&self) {
        self.wait_for_save_fenced(None);
    }

    /// [`wait_for_save`](Self::wait_for_save) for a GPU cache: the end-of-forward WRITEs
    /// are posted once `fence` (recorded after the forward's last KV write) has passed.
    pub fn wait_for_save_fenced(&self, fence: Option<Box<dyn Fence>>) {
        self.stage_now();
        self.digest_now();
        if !self.layerwise_now.swap(false, Ordering::AcqRel) {
            return;
        }
        let computing = std::mem::take(&mut lock_ctl(&self.push).computing);
        self.send_work(Work::ForwardDone { computing, fence });
    }
}

/// D: send a registration to P rank at `host:port`; a refusal or delivery failure fails the
/// request's load.
fn send_registration(
    side: &SideChannel,
    push: &Arc<Mutex<PushCtl>>,
    host: String,
    port: u16,
    reg: PushRegistration,
    timeout: std::time::Duration,
) {
    let push = push.clone();
    let req = reg.request_id.clone();
    tracing::debug!(request_id = %req, %host, port, "kvbridge: registering blocks with the prefill engine");
    side.register(host.clone(), port, reg, timeout, move |res| {
        if let Err(reason) = res {
            tracing::error!(request_id = %req, %host, port, %reason, "kvbridge: push registration failed");
            lock_ctl(&push).receiver.on_registration_failed(&req, format!("registration with {host}:{port} failed: {reason}"));
        }
    });
}
