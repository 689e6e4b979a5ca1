//! Pull mode on the scheduler side: D reads P's blocks.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;

use super::{params_kind, FinishReason, Finished, Matched, SchedulerBase, SchedulerSide, Staging};
use crate::config::ConnectorConfig;
use crate::error::{ParamsError, RoleError};
use crate::groups::{clip_groups, Clip};
use crate::integrity::IntegrityMode;
use crate::params::{KvParams, RemotePrefill, ReqParams};
use crate::wire::{ConnectorMetadata, RecvReq, RemoteRef, SendLease, StageReq};

/// The pull-mode scheduler. Pure: inputs are vLLM's calls, outputs are return values
/// plus the metadata built each step.
#[derive(Debug)]
pub struct PullScheduler {
    cfg: ConnectorConfig,
    /// The ledgers every mode shares.
    pub base: SchedulerBase,
    /// Per request, from its match to its end: where it stands (one record, one lookup).
    reqs: HashMap<String, Stage>,
    /// P: requests asking for a remote decode (their KV may be staged), from their first
    /// match to their end.
    producing: HashSet<String>,
    /// P: the staging slots (`kv_staging_blocks`; disabled when 0).
    pub staging: Staging,
    /// Per KV-cache group, the blocks a transfer carries.
    clips: Vec<Clip>,
    /// Trailing prompt tokens D computes itself (1 with state groups).
    backoff: u64,
}

/// Producing requests tracked for staging at once (past this they are not staged).
const MAX_PRODUCING: usize = 65_536;

/// Where a request stands in the pull scheduler (absent: not matched yet, or ended).
#[derive(Debug)]
enum Stage {
    /// D: a remote prefill matched (its params, and the prompt's token count), blocks not
    /// yet allocated.
    Matched(Arc<ReqParams>, u64),
    /// Its params were acted on (a load shipped, or a failure): vLLM calls
    /// `get_num_new_matched_tokens` again when the request returns to WAITING after its
    /// load, and it must not trigger a second transfer (vLLM's NixlConnector flips
    /// `do_remote_prefill` for the same reason). Cleared in `request_finished`.
    Consumed,
}

/// The remote prefill `p` names (`Stage::Matched` holds only those).
fn remote_prefill(p: &ReqParams) -> Option<&RemotePrefill> {
    match &p.kind {
        Ok(KvParams::RemotePrefill(rp)) => Some(rp),
        _ => None,
    }
}

impl PullScheduler {
    /// A scheduler for `cfg` (logs the startup settings).
    pub fn new(cfg: ConnectorConfig) -> Self {
        cfg.log_startup("scheduler");
        Self {
            base: SchedulerBase::new(&cfg),
            staging: Staging::new(cfg.staging_blocks()),
            clips: cfg.compat.clips(),
            backoff: cfg.compat.prefill_backoff(),
            cfg,
            reqs: HashMap::new(),
            producing: HashSet::new(),
        }
    }

    /// The `kv_transfer_params` P returns for D.
    fn params(&self, req_id: &str, block_ids: &[Vec<u32>], port: u16, num_tokens: u64, expiry: f64, staged: bool) -> serde_json::Value {
        let mut v = json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_block_ids": block_ids,
            "remote_engine_id": self.cfg.engine_id,
            "remote_request_id": req_id,
            "remote_host": self.cfg.advertised_host(),
            "remote_port": port,
            "tp_size": self.cfg.tp_size,
            "remote_num_tokens": num_tokens,
            "remote_blocks_expiry_time": expiry,
            "remote_epoch": self.base.epoch,
            "transfer_mode": self.cfg.mode.as_str(),
        });
        if let (true, Some(o)) = (staged, v.as_object_mut()) {
            o.insert("remote_staged".into(), json!(true));
        }
        v
    }

    /// `request_finished` for a request whose KV sits in staging slots.
    fn finish_staged(&mut self, req_id: &str, reason: FinishReason, num_tokens: u64, now_unix: f64) -> Finished {
        let port = self.cfg.advertised_port();
        let slots: Vec<u32> = self.staging.slots(req_id).map(<[u32]>::to_vec).unwrap_or_default();
        let (Some(port), true) = (port, reason.completed()) else {
            self.staging.release(req_id); // nothing will read them
            return Finished { delay_free: false, kv_transfer_params: None };
        };
        let expiry = now_unix + self.cfg.kv_lease_duration.as_secs_f64();
        self.staging.mark_leased(req_id);
        let num_blocks = u32::try_from(slots.len()).unwrap_or(u32::MAX);
        self.base.push_send(SendLease { req_id: req_id.to_string(), expiry_unix: expiry, expected_readers: 1, num_blocks });
        Finished { delay_free: false, kv_transfer_params: Some(self.params(req_id, &[slots], port, num_tokens, expiry, true)) }
    }

    /// D: P's sliding-window groups are the tail of what P computed, so they line up with
    /// the prompt only if P computed exactly the prompt (a prefill with max_tokens=1).
    fn misplaced_window(&self, rp: &RemotePrefill, num_prompt_tokens: u64) -> bool {
        self.clips.iter().any(|w| matches!(w, Clip::Last(_)))
            && rp.remote_block_ids.len() > 1
            && rp.remote_num_tokens.is_some_and(|m| m != self.loaded_tokens(num_prompt_tokens))
    }

    /// D: the prompt tokens loaded from P (all but the backoff).
    fn loaded_tokens(&self, num_prompt_tokens: u64) -> u64 {
        if num_prompt_tokens > self.backoff {
            num_prompt_tokens - self.backoff
        } else {
            num_prompt_tokens
        }
    }

    /// P, several KV-cache groups: a host buffer copies every group's blocks (block ids are
    /// one space across groups), `kv_integrity` digests each group's offered blocks in its
    /// own regions; staging handles one group so far (the blocks stay held in place).
    fn prefill_completing_hybrid(&mut self, req_id: &str, groups: &[Vec<u32>]) {
        if self.cfg.host_buffer {
            let all: Vec<u32> = groups.iter().flatten().copied().filter(|&b| Some(b) != self.cfg.null_block_id).collect();
            self.base.order_host_copy(req_id, &all);
        }
        // Integrity: each group cut as `request_finished` will offer it.
        if self.cfg.kv_integrity != IntegrityMode::Off {
            self.base.order_group_digest(req_id.to_string(), &clip_groups(groups, &self.clips));
        }
    }

    /// The worker's plan aligns the blocks: the local ones cover the end of the prompt (a
    /// local prefix hit covers the start), the remote ones all of it, in blocks of either
    /// side's size.
    fn recv_req(req_id: &str, rp: &RemotePrefill, num_tokens: u64, local_block_ids: Vec<Vec<u32>>, notify_only: bool) -> RecvReq {
        RecvReq {
            req_id: req_id.to_string(),
            local_block_ids,
            num_tokens,
            notify_only,
            remote: RemoteRef {
                engine_id: rp.remote_engine_id.clone(),
                host: rp.remote_host.clone(),
                port: rp.remote_port,
                request_id: rp.remote_request_id.clone(),
                block_ids: rp.remote_block_ids.clone(),
                tp_size: rp.tp_size,
                epoch: rp.remote_epoch,
                expiry_unix: rp.remote_expiry_unix,
                staged: rp.remote_staged,
            },
        }
    }
}

impl SchedulerSide for PullScheduler {
    fn config(&self) -> &ConnectorConfig {
        &self.cfg
    }

    fn base(&self) -> &SchedulerBase {
        &self.base
    }

    fn on_new_request_parsed(&mut self, req_id: &str, params: Option<&Arc<ReqParams>>) {
        if !self.cfg.role.can_consume() {
            return;
        }
        if let Some(rp) = params.and_then(|p| remote_prefill(p)) {
            self.base.heartbeats.track(req_id, rp);
        }
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
        // A retry (e.g. no free blocks last step) starts from a clean slate.
        match self.reqs.get(req_id) {
            Some(Stage::Consumed) => return Matched::NONE,
            Some(Stage::Matched(..)) => {
                self.reqs.remove(req_id);
            }
            None => {}
        }
        if !self.base.rejected.is_empty() {
            self.base.rejected.remove(req_id);
        }
        let kind = match params_kind(params) {
            Ok(k) => k,
            Err(e) => return self.base.reject(req_id, num_prompt_tokens, num_computed_tokens, e.clone().into()),
        };
        match kind {
            KvParams::None => Matched::NONE,
            KvParams::RemoteDecode if self.cfg.role.can_produce() => {
                // A host buffer needs every producing request's copy, and kv_integrity its
                // digests: no bound there (the set holds running requests only;
                // `request_finished` removes them).
                let every = self.cfg.host_buffer || self.cfg.kv_integrity != IntegrityMode::Off;
                if every || (self.staging.enabled() && self.producing.len() < MAX_PRODUCING) {
                    self.producing.insert(req_id.to_string());
                }
                Matched::NONE
            }
            KvParams::RemoteDecode => {
                self.base.reject(req_id, num_prompt_tokens, num_computed_tokens, RoleError::RemoteDecodeOnConsumer.into())
            }
            KvParams::PushPrefill(_) => self.base.reject(
                req_id,
                num_prompt_tokens,
                num_computed_tokens,
                ParamsError::Invalid(
                    "transfer_mode \"push\" sent to a pull-mode engine (use KVBridgePushConnector, or transfer_mode=push)".into(),
                )
                .into(),
            ),
            KvParams::RemotePrefill(_) if !self.cfg.role.can_consume() => {
                self.base.reject(req_id, num_prompt_tokens, num_computed_tokens, RoleError::RemotePrefillOnProducer.into())
            }
            KvParams::RemotePrefill(rp) if self.misplaced_window(rp, num_prompt_tokens) => {
                let why = format!(
                    "P computed {} tokens for a {num_prompt_tokens}-token prompt: its sliding-window blocks (the window's tail) \
                     cannot be placed on the prompt; prefill with max_tokens=1",
                    rp.remote_num_tokens.unwrap_or(0)
                );
                self.base.reject(req_id, num_prompt_tokens, num_computed_tokens, ParamsError::Invalid(why).into())
            }
            KvParams::RemotePrefill(rp) => {
                self.base.heartbeats.track(req_id, rp);
                // State groups: D computes the last prompt token itself, from P's h(N-1).
                let n = self.loaded_tokens(num_prompt_tokens);
                let count = n.saturating_sub(num_computed_tokens);
                tracing::debug!(request_id = %req_id, count, "kvbridge: remote prefill matched");
                if let Some(p) = params {
                    self.reqs.insert(req_id.to_string(), Stage::Matched(Arc::clone(p), n));
                }
                // count == 0: a full local prefix hit. No load, but P must still be told
                // to free its blocks (done in update_state_after_alloc).
                Matched { num_tokens: count, load_async: count > 0 }
            }
        }
    }

    fn update_state_after_alloc_groups(&mut self, req_id: &str, unhashed_block_ids: &[Vec<u32>], num_external_tokens: u64) {
        if let Some(reason) = if self.base.rejected.is_empty() { None } else { self.base.rejected.remove(req_id) } {
            self.reqs.insert(req_id.to_string(), Stage::Consumed);
            self.base.loading.insert(req_id.to_string());
            self.base.push_failed(req_id, reason);
            return;
        }
        let Some(stage) = self.reqs.get_mut(req_id) else { return };
        let Stage::Matched(p, n) = std::mem::replace(stage, Stage::Consumed) else { return };
        let Some(rp) = remote_prefill(&p) else { return };
        // A sliding-window group loads only the blocks inside its window.
        let local = if num_external_tokens > 0 { clip_groups(unhashed_block_ids, &self.clips) } else { vec![Vec::new()] };
        if num_external_tokens > 0 {
            self.base.loading.insert(req_id.to_string());
        }
        self.base.push_recv(Self::recv_req(req_id, rp, n, local, num_external_tokens == 0));
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
        if !self.base.rejected.is_empty() {
            self.base.rejected.remove(req_id);
        }
        if !self.producing.is_empty() {
            self.producing.remove(req_id);
        }
        let host_copied = self.base.take_host_copied(req_id);
        // Staged, P: the KV was copied out when the prefill ended, so vLLM frees its blocks
        // now; the slots are held for the reader instead (or freed, if nothing will read).
        if self.staging.slots(req_id).is_some() && !self.staging.is_leased(req_id) {
            return self.finish_staged(req_id, reason, num_computed_tokens, now_unix);
        }
        let tracked = self.base.heartbeats.stop(req_id);
        let stage = self.reqs.remove(req_id);
        let consumed = matches!(stage, Some(Stage::Consumed));
        // D: aborted before its blocks were allocated. Tell P to free its blocks.
        if let Some(Stage::Matched(p, n)) = stage {
            if let Some(rp) = remote_prefill(&p) {
                self.base.push_recv(Self::recv_req(req_id, rp, n, vec![Vec::new()], true));
            }
            return none;
        }
        // Only two cases below read the params: a D request that never loaded, and P.
        let d_unloaded = tracked && !consumed && self.cfg.role.can_consume();
        if !d_unloaded && !self.cfg.role.can_produce() {
            return none;
        }
        let params = params_kind(params);
        // D: ended before it was ever matched (aborted while queued, or an engine error):
        // P still holds its blocks; tell it now rather than at lease expiry.
        if let Ok(KvParams::RemotePrefill(rp)) = params {
            if tracked && !consumed && self.cfg.role.can_consume() {
                tracing::debug!(request_id = %req_id, "kvbridge: request ended before its load started; releasing P's blocks");
                self.base.push_recv(Self::recv_req(req_id, rp, rp.remote_num_tokens.unwrap_or(0), vec![Vec::new()], true));
            }
            return none;
        }
        let Ok(KvParams::RemoteDecode) = params else { return none };
        if !self.cfg.role.can_produce() || !reason.completed() || block_ids.iter().all(Vec::is_empty) {
            return none;
        }
        if self.cfg.host_buffer && !host_copied {
            tracing::error!(request_id = %req_id, "kvbridge: the prefill's KV was never copied to the host buffer (its completing step was not reported); not offering it for a remote decode");
            return none;
        }
        let Some(port) = self.cfg.advertised_port() else { return none };
        let expiry = now_unix + self.cfg.kv_lease_duration.as_secs_f64();
        self.base.leased.insert(req_id.to_string(), expiry);
        // A sliding-window group offers only the blocks inside its window (vLLM already
        // freed those before it; they are its null block).
        let offered = clip_groups(block_ids, &self.clips);
        let null = self.cfg.null_block_id;
        let held = offered.iter().flatten().filter(|&&b| Some(b) != null).count();
        let num_blocks = u32::try_from(held).unwrap_or(u32::MAX);
        self.base.leased_blocks.insert(req_id.to_string(), num_blocks);
        self.base.push_send(SendLease { req_id: req_id.to_string(), expiry_unix: expiry, expected_readers: 1, num_blocks });
        Finished { delay_free: true, kv_transfer_params: Some(self.params(req_id, &offered, port, num_computed_tokens, expiry, false)) }
    }

    fn build_connector_meta(&mut self) -> ConnectorMetadata {
        self.base.build_connector_meta()
    }

    fn staging_slots(&self) -> u32 {
        self.staging.capacity()
    }

    fn accounting(&self) -> serde_json::Value {
        let mut v = self.base.accounting();
        if let Some(m) = v.as_object_mut() {
            m.insert("staged_requests".into(), json!(self.staging.held_requests()));
            m.insert("staging_free_slots".into(), json!(self.staging.free_slots()));
            m.insert("staging_slots".into(), json!(self.staging.capacity()));
        }
        v
    }

    fn update_connector_output(&mut self, finished_sending: &[String], finished_recving: &[String]) -> Vec<String> {
        if !finished_recving.is_empty() {
            tracing::debug!(requests = ?finished_recving, "kvbridge: loads finished");
        }
        // Staged requests' slots are free again; vLLM freed their blocks long ago.
        let hidden: Vec<String> = finished_sending.iter().filter(|r| self.staging.release(r)).cloned().collect();
        self.base.update_connector_output(finished_sending.iter().map(String::as_str), finished_recving.iter().map(String::as_str));
        hidden
    }

    fn prefill_completing_groups(&mut self, req_id: &str, groups: &[Vec<u32>], _num_tokens: u64) {
        if !self.producing.contains(req_id) {
            return;
        }
        let block_ids: &[u32] = match groups {
            [one] => one,
            _ => return self.prefill_completing_hybrid(req_id, groups),
        };
        let integrity = self.cfg.kv_integrity != IntegrityMode::Off;
        // Host buffer: copy the blocks to their own ids in the host mirror, at the end of
        // this step (the worker's `wait_for_save`), before `request_finished` offers them.
        if self.cfg.host_buffer {
            self.base.order_host_copy(req_id, block_ids);
            if integrity {
                self.base.order_digest(req_id.to_string(), block_ids, block_ids);
            }
            return;
        }
        // Staging: copy the KV out once this step's forward has computed it. Too few free
        // slots: the request keeps its blocks in place (vLLM holds them, as without staging).
        let slots = if self.staging.enabled() { self.staging.reserve(req_id, block_ids.len()) } else { None };
        if self.staging.enabled() && slots.is_none() {
            tracing::debug!(request_id = %req_id, blocks = block_ids.len(), free = self.staging.free_slots(),
                "kvbridge: not staging (too few free slots, or already staged); blocks stay held in place");
        }
        // Integrity: digest the cache's blocks (not the staged copy, so a bad copy shows).
        if integrity {
            self.base.order_digest(req_id.to_string(), block_ids, slots.as_deref().unwrap_or(block_ids));
        }
        if let Some(slots) = slots {
            self.base.push_stage(StageReq { req_id: req_id.to_string(), block_ids: block_ids.to_vec(), slots });
        }
    }

    fn has_pending_block_frees(&self) -> bool {
        self.base.has_pending_block_frees()
    }
}
