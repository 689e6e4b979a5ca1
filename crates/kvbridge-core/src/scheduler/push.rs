//! Push mode on the scheduler side: D registers its blocks with P, P writes into them.
//!
//! D: a request with push params (`"transfer_mode": "push"`, P's coordinates, a transfer
//! id) is parked as an async load; once its blocks are allocated, the workers send P a
//! registration ([`PushRecv`]). If it is aborted while P may still write, its blocks are
//! held until the worker says no write can land in them any more.
//!
//! P: a `do_remote_decode` request's blocks are held when it finishes ([`PushSend`] in
//! `push_finished`) until every D rank has been written. With layer-wise push, the step
//! that completes its prefill also lists it in `push_saves`, so the workers can write
//! each layer as soon as it is computed.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;

use super::{params_kind, FinishReason, Finished, Matched, SchedulerBase, SchedulerSide};
use crate::config::ConnectorConfig;
use crate::error::{ParamsError, RoleError};
use crate::groups::{clip_groups, Clip};
use crate::params::{KvParams, PushPrefill, ReqParams};
use crate::wire::{ConnectorMetadata, PushRecv, PushSend};

/// The push-mode scheduler. Pure: inputs are vLLM's calls, outputs are return values
/// plus the metadata built each step.
#[derive(Debug)]
pub struct PushScheduler {
    cfg: ConnectorConfig,
    /// The ledgers every mode shares.
    pub base: SchedulerBase,
    /// P: producing requests seen at matching, with their transfer ids.
    producing: HashMap<String, String>,
    /// P: requests listed in a layer-wise save (writes may start before they finish).
    saving: HashSet<String>,
    /// D: matched, not yet allocated.
    awaiting_alloc: HashMap<String, (PushPrefill, u64)>,
    /// D: params already acted on (see `PullScheduler::consumed`).
    consumed: HashSet<String>,
    /// D: aborted while P may still write; blocks held until the workers report them.
    held_aborted: HashSet<String>,
    /// Per KV-cache group, the blocks a transfer carries.
    clips: Vec<Clip>,
    /// Trailing prompt tokens D computes itself (1 with state groups).
    backoff: u64,
}

impl PushScheduler {
    /// A scheduler for `cfg` (logs the startup settings).
    pub fn new(cfg: ConnectorConfig) -> Self {
        cfg.log_startup("scheduler");
        Self {
            base: SchedulerBase::new(&cfg),
            clips: cfg.compat.clips(),
            backoff: cfg.compat.prefill_backoff(),
            cfg,
            producing: HashMap::new(),
            saving: HashSet::new(),
            awaiting_alloc: HashMap::new(),
            consumed: HashSet::new(),
            held_aborted: HashSet::new(),
        }
    }

    fn recv(req_id: &str, pp: &PushPrefill, num_tokens: u64, local: Vec<Vec<u32>>, notify_only: bool) -> PushRecv {
        PushRecv {
            req_id: req_id.to_string(),
            transfer_id: pp.transfer_id.clone(),
            local_block_ids: local,
            num_tokens,
            notify_only,
            engine_id: pp.remote_engine_id.clone(),
            host: pp.remote_host.clone(),
            port: pp.remote_port,
            tp_size: pp.tp_size,
        }
    }

    /// Requests D holds after an abort (for tests and stats).
    pub fn held_aborted(&self) -> usize {
        self.held_aborted.len()
    }
}

impl SchedulerSide for PushScheduler {
    fn config(&self) -> &ConnectorConfig {
        &self.cfg
    }

    fn base(&self) -> &SchedulerBase {
        &self.base
    }

    fn tick(&mut self, now_unix: f64) {
        self.base.tick(now_unix);
    }

    fn get_num_new_matched_tokens_parsed(
        &mut self,
        req_id: &str,
        num_prompt_tokens: u64,
        num_computed_tokens: u64,
        params: Option<&Arc<ReqParams>>,
    ) -> Matched {
        if self.consumed.contains(req_id) {
            return Matched::NONE;
        }
        self.base.rejected.remove(req_id);
        self.awaiting_alloc.remove(req_id);
        let kind = match params_kind(params) {
            Ok(k) => k,
            Err(e) => return self.base.reject(req_id, num_prompt_tokens, num_computed_tokens, e.clone().into()),
        };
        let transfer_id = || params.map_or(Ok(None), |p| p.transfer_id.clone());
        match kind {
            KvParams::None => Matched::NONE,
            KvParams::RemoteDecode if self.cfg.role.can_produce() => match transfer_id() {
                Ok(t) => {
                    self.producing.insert(req_id.to_string(), t.unwrap_or_default());
                    Matched::NONE
                }
                Err(e) => self.base.reject(req_id, num_prompt_tokens, num_computed_tokens, e.into()),
            },
            KvParams::RemoteDecode => {
                self.base.reject(req_id, num_prompt_tokens, num_computed_tokens, RoleError::RemoteDecodeOnConsumer.into())
            }
            KvParams::PushPrefill(_) | KvParams::RemotePrefill(_) if !self.cfg.role.can_consume() => {
                self.base.reject(req_id, num_prompt_tokens, num_computed_tokens, RoleError::RemotePrefillOnProducer.into())
            }
            KvParams::RemotePrefill(_) => self.base.reject(
                req_id,
                num_prompt_tokens,
                num_computed_tokens,
                ParamsError::Invalid(
                    "pull-mode params (remote_block_ids) sent to a push-mode engine: send \"transfer_mode\": \"push\" with P's address"
                        .into(),
                )
                .into(),
            ),
            KvParams::PushPrefill(pp) => {
                // State groups: D computes the last prompt token itself, from P's h(N-1).
                let n = if num_prompt_tokens > self.backoff { num_prompt_tokens - self.backoff } else { num_prompt_tokens };
                let count = n.saturating_sub(num_computed_tokens);
                tracing::debug!(request_id = %req_id, count, transfer_id = %pp.transfer_id, "kvbridge: push prefill matched");
                self.awaiting_alloc.insert(req_id.to_string(), (pp.clone(), n));
                Matched { num_tokens: count, load_async: count > 0 }
            }
        }
    }

    fn update_state_after_alloc_groups(&mut self, req_id: &str, unhashed_block_ids: &[Vec<u32>], num_external_tokens: u64) {
        if let Some(reason) = self.base.rejected.remove(req_id) {
            self.consumed.insert(req_id.to_string());
            self.base.loading.insert(req_id.to_string());
            self.base.push_failed(req_id, reason);
            return;
        }
        let Some((pp, n)) = self.awaiting_alloc.remove(req_id) else { return };
        self.consumed.insert(req_id.to_string());
        let load = num_external_tokens > 0;
        if load {
            self.base.loading.insert(req_id.to_string());
        }
        // A sliding-window group registers only the blocks inside its window.
        let local = if load { clip_groups(unhashed_block_ids, &self.clips) } else { vec![Vec::new()] };
        self.base.push_push_register(Self::recv(req_id, &pp, n, local, !load));
    }

    fn prefill_completing_groups(&mut self, req_id: &str, groups: &[Vec<u32>], num_tokens: u64) {
        let groups = clip_groups(groups, &self.clips);
        let all: Vec<u32>;
        let block_ids: &[u32] = match groups.as_slice() {
            [one] => one,
            _ => {
                all = groups.iter().flatten().copied().filter(|&b| Some(b) != self.cfg.null_block_id).collect();
                &all
            }
        };
        // Integrity: digest the blocks after this step's forward, under the key D fetches
        // them by (the transfer id, else the base request id).
        if self.cfg.kv_integrity != crate::integrity::IntegrityMode::Off && !self.saving.contains(req_id) {
            if let Some(t) = self.producing.get(req_id) {
                let key = crate::integrity::push_key(t, crate::wire::base_request_id(req_id));
                match groups.as_slice() {
                    [_] => self.base.order_digest(key, block_ids, block_ids),
                    _ => self.base.order_group_digest(key, &groups),
                }
            }
        }
        // Host buffer: copy the blocks to their own ids in the host mirror after this
        // step's forward; the whole-request writes read them from there.
        if self.cfg.host_buffer {
            if self.producing.contains_key(req_id) {
                self.base.order_host_copy(req_id, block_ids);
            }
            return;
        }
        if !self.cfg.push_layerwise || self.saving.contains(req_id) {
            return;
        }
        let Some(t) = self.producing.get(req_id) else { return };
        self.saving.insert(req_id.to_string());
        self.base.push_push_save(PushSend {
            req_id: req_id.to_string(),
            transfer_id: t.clone(),
            block_ids: groups.clone(),
            num_tokens,
            expiry_unix: f64::INFINITY,
            hold: false,
            aborted: false,
        });
    }

    fn request_finished_groups(
        &mut self,
        req_id: &str,
        block_ids: &[Vec<u32>],
        reason: FinishReason,
        num_computed_tokens: u64,
        params: Option<&Arc<ReqParams>>,
        now_unix: f64,
    ) -> Finished {
        let none = Finished { delay_free: false, kv_transfer_params: None };
        self.base.rejected.remove(req_id);
        let consumed = self.consumed.remove(req_id);
        // D: gave up before allocating. Tell P, so it frees its blocks now.
        if let Some((pp, n)) = self.awaiting_alloc.remove(req_id) {
            self.base.push_push_register(Self::recv(req_id, &pp, n, vec![Vec::new()], true));
            return none;
        }
        // D: ended before it was ever matched (aborted while queued): tell P too.
        if !consumed && self.cfg.role.can_consume() && !self.base.loading.contains(req_id) {
            if let Ok(KvParams::PushPrefill(pp)) = params_kind(params) {
                self.base.push_push_register(Self::recv(req_id, pp, 0, vec![Vec::new()], true));
                return none;
            }
        }
        // D: ended while a write may still land in its blocks. Hold them.
        if self.base.loading.contains(req_id) {
            self.base.loading.remove(req_id);
            self.held_aborted.insert(req_id.to_string());
            self.base.push_push_aborted(req_id);
            return Finished { delay_free: true, kv_transfer_params: None };
        }
        let host_copied = self.base.take_host_copied(req_id);
        let Some(transfer_id) = self.producing.remove(req_id) else { return none };
        let was_saving = self.saving.remove(req_id);
        let uncopied = self.cfg.host_buffer && !host_copied;
        if uncopied {
            tracing::error!(request_id = %req_id, "kvbridge: the prefill's KV was never copied to the host buffer (its completing step was not reported); not writing it to D");
        }
        let expiry = now_unix + self.cfg.kv_lease_duration.as_secs_f64();
        // A sliding-window group writes only the blocks inside its window.
        let block_ids = clip_groups(block_ids, &self.clips);
        let null = self.cfg.null_block_id;
        let num_blocks = u32::try_from(block_ids.iter().flatten().filter(|&&b| Some(b) != null).count()).unwrap_or(u32::MAX);
        let send = |hold: bool, aborted: bool| PushSend {
            req_id: req_id.to_string(),
            transfer_id: transfer_id.clone(),
            block_ids: if hold { block_ids.clone() } else { Vec::new() },
            num_tokens: num_computed_tokens,
            expiry_unix: expiry,
            hold,
            aborted,
        };
        let port = self.cfg.advertised_port();
        if !reason.completed() || block_ids.iter().all(Vec::is_empty) || port.is_none() || uncopied {
            // Registrations for it are refused. Layer-wise writes may be in flight: then
            // the blocks are held until they end.
            self.base.push_push_finished(send(was_saving, true));
            if was_saving {
                self.base.leased.insert(req_id.to_string(), expiry);
                self.base.leased_blocks.insert(req_id.to_string(), num_blocks);
            }
            return Finished { delay_free: was_saving, kv_transfer_params: None };
        }
        self.base.leased.insert(req_id.to_string(), expiry);
        self.base.leased_blocks.insert(req_id.to_string(), num_blocks);
        self.base.push_push_finished(send(true, false));
        Finished {
            delay_free: true,
            kv_transfer_params: Some(json!({
                "do_remote_prefill": true,
                "do_remote_decode": false,
                "transfer_mode": "push",
                "transfer_id": transfer_id,
                "remote_engine_id": self.cfg.engine_id,
                "remote_request_id": req_id,
                "remote_host": self.cfg.advertised_host(),
                "remote_port": port,
                "tp_size": self.cfg.tp_size,
                "remote_num_tokens": num_computed_tokens,
                "remote_blocks_expiry_time": expiry,
                "remote_epoch": self.base.epoch,
            })),
        }
    }

    fn build_connector_meta(&mut self) -> ConnectorMetadata {
        self.base.build_connector_meta()
    }

    fn update_connector_output(&mut self, finished_sending: &[String], finished_recving: &[String]) -> Vec<String> {
        // A held D request is released by its worker's `finished_sending`, or, if the
        // worker had already reported it in `finished_recving` (the abort raced the
        // load's end), by that: vLLM frees a finished request's blocks on it.
        for r in finished_sending.iter().chain(finished_recving) {
            self.held_aborted.remove(r);
        }
        self.base.update_connector_output(finished_sending.iter().map(String::as_str), finished_recving.iter().map(String::as_str));
        Vec::new()
    }

    fn has_pending_block_frees(&self) -> bool {
        self.base.has_pending_block_frees() || !self.held_aborted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EngineInfo;

    fn sched(role: &str, extra: &str) -> PushScheduler {
        let j = format!(
            r#"{{"kv_role":"{role}","engine_id":"E","kv_connector_extra_config":{{"transfer_mode":"push","side_channel_host":"127.0.0.1","side_channel_port":5600{extra}}}}}"#
        );
        PushScheduler::new(ConnectorConfig::from_json(&j, EngineInfo::default(), |_| None).unwrap())
    }
    const P: &str = r#"{"do_remote_decode":true,"transfer_id":"t1"}"#;
    const D: &str = r#"{"do_remote_prefill":true,"transfer_mode":"push","transfer_id":"t1","remote_engine_id":"P","remote_host":"127.0.0.1","remote_port":5600}"#;

    #[test]
    fn p_holds_finished_blocks_and_lists_layerwise_saves() {
        let mut s = sched("kv_producer", "");
        assert_eq!(s.get_num_new_matched_tokens("p", 300, 0, Some(P)), Matched::NONE);
        s.prefill_completing("p", &[1, 2, 3], 300);
        s.prefill_completing("other", &[4], 10); // not a producing request: ignored
        let m = s.build_connector_meta();
        assert_eq!(m.push_saves.len(), 1);
        assert_eq!((m.push_saves[0].transfer_id.as_str(), m.push_saves[0].block_ids.clone()), ("t1", vec![vec![1, 2, 3]]));
        let f = s.request_finished("p", &[1, 2, 3], FinishReason::LengthCapped, 300, Some(P), 100.0);
        assert!(f.delay_free);
        let params = f.kv_transfer_params.unwrap();
        assert_eq!((params["transfer_mode"].as_str(), params["remote_port"].as_u64()), (Some("push"), Some(5600)));
        let m = s.build_connector_meta();
        assert!(m.push_finished[0].hold && !m.push_finished[0].aborted);
        assert!(s.has_pending_block_frees());
        s.update_connector_output(&["p".into()], &[]);
        assert!(!s.has_pending_block_frees());
    }

    #[test]
    fn p_abort_holds_blocks_only_when_layerwise_writes_may_be_in_flight() {
        let mut s = sched("kv_producer", "");
        s.get_num_new_matched_tokens("a", 300, 0, Some(P));
        let f = s.request_finished("a", &[1], FinishReason::Aborted, 10, Some(P), 0.0);
        assert!(!f.delay_free);
        let m = s.build_connector_meta();
        assert!(m.push_finished[0].aborted && !m.push_finished[0].hold, "registrations are still refused");
        s.get_num_new_matched_tokens("b", 300, 0, Some(P));
        s.prefill_completing("b", &[1], 300);
        assert!(s.request_finished("b", &[1], FinishReason::Aborted, 300, Some(P), 0.0).delay_free);
        let m = s.build_connector_meta();
        assert!(m.push_finished[0].aborted && m.push_finished[0].hold);
        let mut off = sched("kv_producer", r#","push_layerwise":false"#);
        off.get_num_new_matched_tokens("c", 300, 0, Some(P));
        off.prefill_completing("c", &[1], 300);
        assert!(off.build_connector_meta().push_saves.is_empty(), "layer-wise off: no saves");
    }

    #[test]
    fn d_registers_after_alloc_and_holds_blocks_when_aborted_while_waiting() {
        let mut s = sched("kv_consumer", "");
        assert_eq!(s.get_num_new_matched_tokens("d", 300, 0, Some(D)), Matched { num_tokens: 300, load_async: true });
        s.update_state_after_alloc("d", &[7, 8, 9], 300);
        let m = s.build_connector_meta();
        assert_eq!(m.push_register.len(), 1);
        assert_eq!((m.push_register[0].local_block_ids.clone(), m.push_register[0].notify_only), (vec![vec![7, 8, 9]], false));
        assert_eq!(s.get_num_new_matched_tokens("d", 300, 0, Some(D)), Matched::NONE, "params are acted on once");
        let f = s.request_finished("d", &[7, 8, 9], FinishReason::Aborted, 0, Some(D), 0.0);
        assert!(f.delay_free, "P may still write into D's blocks");
        assert_eq!(s.build_connector_meta().push_aborted, vec!["d".to_string()]);
        // Released by the worker's finished_sending, or by a finished_recving that raced it.
        s.update_connector_output(&[], &["d".into()]);
        assert!(!s.has_pending_block_frees());
    }

    #[test]
    fn d_rejects_pull_params_and_aborts_before_alloc_notify_p() {
        let mut s = sched("kv_consumer", "");
        let pull = r#"{"do_remote_prefill":true,"remote_engine_id":"P","remote_request_id":"r","remote_block_ids":[1],"remote_host":"h","remote_port":1}"#;
        let m = s.get_num_new_matched_tokens("x", 300, 0, Some(pull));
        assert!(m.load_async, "parked, then failed through the worker");
        s.update_state_after_alloc("x", &[1, 2, 3], 300);
        let md = s.build_connector_meta();
        assert!(md.reqs_failed[0].reason.contains("push-mode engine"), "{:?}", md.reqs_failed);
        s.get_num_new_matched_tokens("y", 300, 0, Some(D));
        assert!(!s.request_finished("y", &[], FinishReason::Aborted, 0, Some(D), 0.0).delay_free);
        let md = s.build_connector_meta();
        assert!(md.push_register[0].notify_only && md.push_register[0].local_block_ids == vec![Vec::<u32>::new()]);
        // Aborted while still queued (never matched): P is told too, once.
        assert!(!s.request_finished("z", &[], FinishReason::Aborted, 0, Some(D), 0.0).delay_free);
        let md = s.build_connector_meta();
        assert_eq!(md.push_register.len(), 1);
        assert!(md.push_register[0].notify_only && md.push_register[0].req_id == "z");
        // A request that loaded normally is not notified again when it finishes.
        s.get_num_new_matched_tokens("w", 300, 0, Some(D));
        s.update_state_after_alloc("w", &[4, 5, 6], 300);
        s.build_connector_meta();
        s.update_connector_output(&[], &["w".into()]);
        s.request_finished("w", &[4, 5, 6], FinishReason::LengthCapped, 310, Some(D), 1.0);
        assert!(s.build_connector_meta().push_register.is_empty());
    }
}
