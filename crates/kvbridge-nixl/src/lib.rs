#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
//! # kvbridge-nixl
//!
//! kvbridge's transport over [NIXL](https://github.com/ai-dynamo/nixl) through `nixl-sys`
//! (feature `stub-api`: the runtime `libnixl_capi.so` is loaded when the program runs).
//!
//! - [`NixlTransport`] implements `kvbridge_core::transport::Transport`: one agent with the
//!   configured backends (UCX by default), KV regions registered as DRAM (CPU tensors) or
//!   VRAM (CUDA tensors, checked through `cudarc`), per-block descriptor lists prepared
//!   once at registration and once per peer (after its first transfer), used when a
//!   request's pieces are whole blocks ([`prepped`]), READ/WRITE with a completion
//!   notification, polled for completion, handles released on drop.
//! - [`runtime::ensure_loaded`] finds the runtime and returns [`NixlError::RuntimeMissing`]
//!   instead of letting nixl-sys abort the process.
//! - The progress thread sleeps `progress_delay_us` between polls (default 100 µs), so an
//!   idle agent does not spin a core.
pub mod agent;
pub mod cuda;
pub mod error;
mod md_check;
pub mod prepped;
pub mod runtime;

pub use agent::{NixlOptions, NixlTransport};
pub use error::NixlError;

/// A worker driver over NIXL: what a Rust engine instantiates per TP rank.
pub type NixlWorker = kvbridge_driver::WorkerDriver<NixlTransport>;

/// Build a NIXL-backed worker from a parsed config. The agent is named
/// `<engine_id>-dp<dp>-tp<rank>-<pid>`, unique per process.
pub fn new_worker(
    cfg: kvbridge_core::ConnectorConfig,
    lib_dir_hint: Option<std::path::PathBuf>,
) -> Result<NixlWorker, kvbridge_core::Error> {
    let opts = NixlOptions {
        backends: cfg.backends.clone(),
        progress_delay_us: cfg.progress_delay_us,
        lib_dir_hint,
        cuda_device: cfg.cuda_device,
    };
    let name = format!("{}-dp{}-pp{}-tp{}-{}", cfg.engine_id, cfg.dp_rank, cfg.pp_rank, cfg.tp_rank, std::process::id());
    let t = NixlTransport::new(&name, &opts)?;
    kvbridge_driver::WorkerDriver::new(cfg, t)
}
