//! The writer thread's own types: its work queue, D ranks as P sees them, and WRITE jobs.
use std::collections::HashMap;

use kvbridge_core::error::Error;
use kvbridge_core::plan::{Piece, TransferPlan};
use kvbridge_core::transport::XferId;
use kvbridge_core::wire::{AgentMetadata, PushRegistration};
use kvbridge_core::worker::push::PushAction;
use kvbridge_core::worker::push_plan::Geometry;

/// A point in the engine's GPU work (a CUDA event recorded on the forward's stream):
/// a layer's WRITEs are posted only once it has passed, so that NIXL never reads a layer
/// a kernel is still writing. `kvbridge-nixl` implements it over the CUDA driver; DRAM
/// caches have none (the forward has finished writing when the engine calls us).
pub trait Fence: Send + std::fmt::Debug {
    /// Block until the GPU work before the fence is done, or say why it cannot be known.
    fn wait(&self) -> Result<(), String>;
}

/// Work for P's writer thread, sent over a channel (never behind a lock the engine
/// thread might wait on).
#[derive(Debug)]
pub(crate) enum Work {
    /// The caches are registered: what the writer needs to plan.
    Registered(Box<Geometry>),
    /// A D rank registered: load it now, so the handshake overlaps P's prefill.
    Connect(PushRegistration),
    /// A sender decision. `layerwise`: write layer by layer as the forward computes them.
    Action { action: PushAction, layerwise: bool },
    /// A forward with layer-wise requests starts.
    ForwardStart,
    /// Layer `i` of the running forward is computed (on the GPU once `fence` has passed).
    Layer(usize, Option<Box<dyn Fence>>),
    /// The forward ended: every layer is computed (on the GPU once `fence` has passed);
    /// `computing` lists its requests.
    ForwardDone { computing: Vec<String>, fence: Option<Box<dyn Fence>> },
    /// D rank `key` answered its handshake (checked), with the write plan or why there is
    /// none; or it could not be reached or checked.
    PeerDone { key: String, res: Result<(Result<Box<TransferPlan>, Error>, AgentMetadata), Error> },
}

/// A D rank as P sees it.
#[derive(Debug)]
pub(crate) enum DPeer {
    Handshaking { pending: Vec<(PushAction, bool)> },
    Ready { plan: Box<TransferPlan> },
}

/// One WRITE job: P request → one D rank.
#[derive(Debug)]
pub(crate) struct Job {
    pub p_req: String,
    pub key: String,
    /// Pieces per layer (one entry when not layer-wise).
    pub layers: Vec<Vec<Piece>>,
    pub posted: Vec<bool>,
    pub layerwise: bool,
    pub notif_ok: Vec<u8>,
    pub notif_fail: Vec<u8>,
    pub in_flight: usize,
    pub failed: bool,
    pub bytes: u64,
    pub started: f64,
    /// Time spent in the WRITE post calls so far (for the post-time stat).
    pub post_secs: f64,
}

/// The writer thread's own state.
#[derive(Debug, Default)]
pub(crate) struct WriterState {
    pub geo: Geometry,
    pub d_peers: HashMap<String, DPeer>,
    pub jobs: HashMap<u64, Job>,
    pub next_job: u64,
    pub wxfers: HashMap<XferId, u64>,
    /// Layers computed so far in the running layer-wise forward (`None`: no such
    /// forward is running, every layer is available).
    pub layers_done: Option<Vec<bool>>,
    /// Fences waited on, and fences that failed (their layers were never posted).
    pub fences_waited: u64,
    pub fences_failed: u64,
}
