//! Scheduler side (vLLM role SCHEDULER): pure state machines, no I/O.
//!
//! [`SchedulerBase`] keeps the ledgers every transfer mode shares: leases on P, loads in
//! flight on D, requests already known to have failed, and the per-step lists that
//! become the [`ConnectorMetadata`] shipped to workers. [`pull::PullScheduler`] adds the
//! pull decisions (D reads from P). A push variant will sit beside it.
use std::collections::{HashMap, HashSet};

use crate::config::ConnectorConfig;
use crate::wire::{ConnectorMetadata, FailedReq, PushRecv, PushSend, RecvReq, SendLease, WIRE_VERSION};

pub mod pull;
pub mod push;

pub use pull::PullScheduler;
pub use push::PushScheduler;

/// How a request finished, as vLLM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit max_tokens (the normal end of a P request with max_tokens=1).
    LengthCapped,
    /// Hit a stop condition.
    Stopped,
    /// Aborted by the client or the engine.
    Aborted,
    /// Ended with an error.
    Error,
}

impl FinishReason {
    pub fn parse(s: &str) -> Self {
        match s {
            "length" | "FINISHED_LENGTH_CAPPED" => Self::LengthCapped,
            "stop" | "FINISHED_STOPPED" => Self::Stopped,
            "abort" | "FINISHED_ABORTED" => Self::Aborted,
            _ => Self::Error,
        }
    }
    pub fn completed(self) -> bool {
        matches!(self, Self::LengthCapped | Self::Stopped)
    }
}

/// The answer to `get_num_new_matched_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    /// Tokens the connector will provide beyond those computed locally.
    pub num_tokens: u64,
    /// True: they arrive asynchronously (the request waits in WAITING_FOR_REMOTE_KVS).
    pub load_async: bool,
}

impl Matched {
    pub const NONE: Matched = Matched { num_tokens: 0, load_async: false };
}

/// What `request_finished` decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// True: keep the blocks until the workers report `finished_sending`.
    pub delay_free: bool,
    /// Returned to the client as `kv_transfer_params`.
    pub kv_transfer_params: Option<serde_json::Value>,
}

/// Ledgers shared by every scheduler variant.
#[derive(Debug, Default)]
pub struct SchedulerBase {
    /// P: requests whose blocks are held for a remote reader, with lease expiry.
    pub leased: HashMap<String, f64>,
    /// D: requests with a load in flight (parked in WAITING_FOR_REMOTE_KVS).
    pub loading: HashSet<String>,
    /// Requests rejected at matching time; failed when their blocks are allocated.
    pub rejected: HashMap<String, String>,
    step_recv: Vec<RecvReq>,
    step_send: Vec<SendLease>,
    step_failed: Vec<FailedReq>,
    step_push_finished: Vec<PushSend>,
    step_push_saves: Vec<PushSend>,
    step_push_register: Vec<PushRecv>,
    step_push_aborted: Vec<String>,
}

impl SchedulerBase {
    pub fn push_recv(&mut self, r: RecvReq) {
        self.step_recv.push(r);
    }
    pub fn push_send(&mut self, s: SendLease) {
        self.step_send.push(s);
    }
    pub fn push_failed(&mut self, req_id: &str, reason: String) {
        self.step_failed.push(FailedReq { req_id: req_id.to_string(), reason });
    }

    /// Refuse a request at matching time. With tokens left to compute it is parked as an
    /// async load that its worker reports failed, so vLLM ends it with an error (or
    /// recomputes it, under kv_load_failure_policy=recompute); with none, it just runs.
    pub fn reject(&mut self, req_id: &str, num_prompt_tokens: u64, num_computed_tokens: u64, err: crate::error::Error) -> Matched {
        let reason = err.to_string();
        tracing::error!(request_id = %req_id, error = %reason, "kvbridge: rejecting request");
        let count = num_prompt_tokens.saturating_sub(num_computed_tokens);
        if count == 0 {
            return Matched::NONE;
        }
        self.rejected.insert(req_id.to_string(), reason);
        Matched { num_tokens: count, load_async: true }
    }

    pub fn push_push_finished(&mut self, s: PushSend) {
        self.step_push_finished.push(s);
    }
    pub fn push_push_save(&mut self, s: PushSend) {
        self.step_push_saves.push(s);
    }
    pub fn push_push_register(&mut self, r: PushRecv) {
        self.step_push_register.push(r);
    }
    pub fn push_push_aborted(&mut self, req_id: &str) {
        self.step_push_aborted.push(req_id.to_string());
    }

    /// Build this step's metadata and reset the per-step lists.
    pub fn build_connector_meta(&mut self) -> ConnectorMetadata {
        ConnectorMetadata {
            version: WIRE_VERSION,
            reqs_to_recv: std::mem::take(&mut self.step_recv),
            reqs_to_send: std::mem::take(&mut self.step_send),
            reqs_failed: std::mem::take(&mut self.step_failed),
            push_finished: std::mem::take(&mut self.step_push_finished),
            push_saves: std::mem::take(&mut self.step_push_saves),
            push_register: std::mem::take(&mut self.step_push_register),
            push_aborted: std::mem::take(&mut self.step_push_aborted),
        }
    }

    /// Workers reported these requests done: drop their ledger entries.
    pub fn update_connector_output<'a>(
        &mut self,
        finished_sending: impl IntoIterator<Item = &'a str>,
        finished_recving: impl IntoIterator<Item = &'a str>,
    ) {
        for r in finished_sending {
            self.leased.remove(r);
        }
        for r in finished_recving {
            self.loading.remove(r);
        }
    }

    pub fn has_pending_block_frees(&self) -> bool {
        !self.leased.is_empty()
    }
}

/// Everything a scheduler-side connector must answer, whatever the transfer mode.
pub trait SchedulerSide {
    fn config(&self) -> &ConnectorConfig;
    fn get_num_new_matched_tokens(
        &mut self,
        req_id: &str,
        num_prompt_tokens: u64,
        num_computed_tokens: u64,
        kv_transfer_params: Option<&str>,
    ) -> Matched;
    fn update_state_after_alloc(&mut self, req_id: &str, unhashed_block_ids: &[u32], num_external_tokens: u64);
    fn request_finished(
        &mut self,
        req_id: &str,
        block_ids: &[u32],
        reason: FinishReason,
        num_computed_tokens: u64,
        kv_transfer_params: Option<&str>,
        now_unix: f64,
    ) -> Finished;
    /// Push, P: a producing request's prefill completes in the step being built, with
    /// these blocks (layer-wise push writes each layer as it is computed). Other modes
    /// ignore it.
    fn prefill_completing(&mut self, _req_id: &str, _block_ids: &[u32], _num_tokens: u64) {}
    fn build_connector_meta(&mut self) -> ConnectorMetadata;
    fn update_connector_output(&mut self, finished_sending: &[String], finished_recving: &[String]);
    fn has_pending_block_frees(&self) -> bool;
}
