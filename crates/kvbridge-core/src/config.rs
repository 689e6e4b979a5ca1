//! Roles and configuration, parsed from vLLM's `kv_transfer_config` plus a few engine facts.
//!
//! Every key and env var is listed in `docs/configuration.md`; keep the two in step.
use std::time::Duration;

/// The longest duration any `*_timeout`/`*_duration`/`*_ttl` key may take (one year).
pub const MAX_DURATION_SECS: f64 = 365.0 * 86_400.0;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ConfigError;
use crate::integrity::{IntegrityMode, DEFAULT_SAMPLE_EVERY};

/// The documented guide for moving off `kv_both`: how to read it from an installed wheel,
/// and where it is in the source.
pub const KV_BOTH_MIGRATION_DOC: &str = "`python -m kvbridge.docs migration` (docs/migration-kv-both.md in the source)";
/// Set to `1`/`true` (or `reject_kv_both: true` in `kv_connector_extra_config`) to refuse
/// `kv_role: "kv_both"` at start-up now, as a later release will.
pub const REJECT_KV_BOTH_ENV: &str = "KVBRIDGE_REJECT_KV_BOTH";

/// What an engine does in a P/D pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvRole {
    /// Prefill engine: computes KV and holds it for a remote decode.
    Producer,
    /// Decode engine: loads KV computed by a remote prefill.
    Consumer,
    /// Deprecated: both at once. Still accepted, with one warning.
    Both,
}

impl KvRole {
    /// Parse a `kv_role` value (`"kv_producer"`, `"kv_consumer"`, `"kv_both"`, or the
    /// same without the `kv_` prefix).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "kv_producer" | "producer" => Ok(Self::Producer),
            "kv_consumer" | "consumer" => Ok(Self::Consumer),
            "kv_both" | "both" => Ok(Self::Both),
            other => Err(ConfigError::InvalidRole(other.to_string())),
        }
    }
    /// True for roles that prefill and hold KV for a remote decode (producer, both).
    pub fn can_produce(self) -> bool {
        matches!(self, Self::Producer | Self::Both)
    }
    /// True for roles that load KV from a remote prefill (consumer, both).
    pub fn can_consume(self) -> bool {
        matches!(self, Self::Consumer | Self::Both)
    }
    /// The canonical `kv_role` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Producer => "kv_producer",
            Self::Consumer => "kv_consumer",
            Self::Both => "kv_both",
        }
    }
}

/// Who posts the transfer: D READs from P (pull), or P WRITEs into blocks D registered
/// with it (push).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferMode {
    /// D READs the KV from P's blocks (the default).
    Pull,
    /// P WRITEs the KV into blocks D registered with it.
    Push,
}

impl TransferMode {
    /// Parse a `transfer_mode` value (`"pull"` or `"push"`).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "pull" => Ok(Self::Pull),
            "push" => Ok(Self::Push),
            other => Err(ConfigError::InvalidMode(other.to_string())),
        }
    }
    /// The config spelling (`"pull"` or `"push"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "push",
        }
    }
}

/// What to do when loading remote KV fails (vLLM's `kv_load_failure_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadFailurePolicy {
    /// Fail the request with an error.
    Fail,
    /// Report the blocks as invalid so vLLM recomputes them locally.
    Recompute,
}

/// Facts about the model and cache that both sides must agree on; hashed into the
/// compatibility hash that is compared before anything else in a handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CompatInfo {
    /// vLLM's version string.
    pub vllm_version: String,
    /// The model name or path vLLM loaded.
    pub model: String,
    /// The model's dtype (e.g. `torch.bfloat16`).
    pub dtype: String,
    /// The KV cache's dtype (vLLM's `cache_dtype`, e.g. `auto`, `fp8`).
    pub cache_dtype: String,
    /// Layers the engine holds KV for.
    pub num_layers: u32,
    /// The model's KV heads in all (before the TP split).
    pub num_kv_heads: u32,
    /// Size of one attention head (elements).
    pub head_size: u32,
    /// Logical block size in tokens; left out of the hash (the plan maps block sizes).
    pub block_size: u32,
    /// The attention backend's name (empty: not reported).
    pub attn_backend: String,
    /// The KV-cache groups, in vLLM's order (empty: one full-attention group, or not
    /// reported). Each group's blocks travel as their own list of block ids.
    #[serde(default)]
    pub kv_groups: Vec<crate::groups::KvGroupSpec>,
    /// The speculative-decoding setup whose KV the transfer carries (method, draft layers,
    /// speculative tokens; empty: none). P and D must agree (vLLM #49230).
    #[serde(default)]
    pub spec_decode: String,
}

/// The engine facts the Python layer (or a Rust engine) hands us, next to vLLM's
/// `kv_transfer_config` dict.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct EngineInfo {
    /// Tensor-parallel size (0 is taken as 1).
    #[serde(default)]
    pub tp_size: u32,
    /// This worker's TP rank (0 on the scheduler).
    #[serde(default)]
    pub tp_rank: u32,
    /// This engine's data-parallel rank.
    #[serde(default)]
    pub dp_rank: u32,
    /// Pipeline-parallel size (0 is taken as 1).
    #[serde(default)]
    pub pp_size: u32,
    /// This worker's pipeline-parallel rank (its stage).
    #[serde(default)]
    pub pp_rank: u32,
    /// Model and cache facts the peer must match.
    #[serde(default)]
    pub compat: CompatInfo,
    /// The CUDA device this worker's KV caches live on (None: a CPU engine). Its context is
    /// made current before the NIXL agent starts, so UCX sees CUDA.
    #[serde(default)]
    pub cuda_device: Option<u32>,
}

/// Parsed, validated connector configuration.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// This engine's id (`engine_id`); P returns it to D as `remote_engine_id`.
    pub engine_id: String,
    /// The engine's role (`kv_role`).
    pub role: KvRole,
    /// Who posts the transfer (`transfer_mode`).
    pub mode: TransferMode,
    /// NIXL backends to create (`backends`, default `["UCX"]`).
    pub backends: Vec<String>,
    /// Host the handshake listener binds and P advertises as `remote_host`.
    pub side_channel_host: String,
    /// Per-rank hosts (`side_channel_hosts`, indexed by `pp_rank * tp_size + tp_rank`): an
    /// engine whose ranks run on several nodes, described in one config. Empty: every rank
    /// uses `side_channel_host` (on a multi-node engine, each node's own
    /// `VLLM_NIXL_SIDE_CHANNEL_HOST`).
    pub side_channel_hosts: Vec<String>,
    /// Base port of the handshake listeners (see [`Self::local_listener_port`]).
    pub side_channel_port: u16,
    /// Tensor-parallel size (at least 1).
    pub tp_size: u32,
    /// This worker's TP rank.
    pub tp_rank: u32,
    /// This engine's data-parallel rank.
    pub dp_rank: u32,
    /// Pipeline-parallel size (at least 1).
    pub pp_size: u32,
    /// This worker's pipeline-parallel rank.
    pub pp_rank: u32,
    /// How long P holds a finished request's blocks for D (`kv_lease_duration`), unless D
    /// renews the lease with heartbeats.
    pub kv_lease_duration: Duration,
    /// Deadline for one side-channel request, connect plus reply (`handshake_timeout`).
    pub handshake_timeout: Duration,
    /// Extra handshake attempts after a timeout or connection error (backoff doubles from
    /// 100 ms).
    pub handshake_retries: u32,
    /// Forget a remote engine (its NIXL agent and plan) after this long with no
    /// handshake, READ or heartbeat; it is re-handshaken on its next request.
    pub engine_ttl: Duration,
    /// NIXL progress-thread sleep between polls, in µs (0: no progress thread).
    pub progress_delay_us: u64,
    /// Longest a no-forward step waits for a notification or READ completion (µs).
    pub idle_wait_us: u64,
    /// What D does when a load fails (`kv_load_failure_policy`).
    pub load_failure_policy: LoadFailurePolicy,
    /// Refuse peers whose compatibility hash differs (`enforce_handshake_compat`, default
    /// true).
    pub enforce_handshake_compat: bool,
    /// Merge reads of contiguous blocks into one descriptor (default true).
    pub coalesce_descriptors: bool,
    /// The engine's null block id, never transferred (vLLM: 0; `null` for none).
    pub null_block_id: Option<u32>,
    /// Push: write each layer as soon as it is computed when D's registration is already
    /// known (default true).
    pub push_layerwise: bool,
    /// Push, D side: fail a registered request no prefill write reached in this long.
    pub push_registration_timeout: Duration,
    /// Pull, P side: logical blocks of connector-owned DRAM a finished prefill's KV is
    /// copied into, so vLLM frees P's own blocks at once (0: off, the KV is read in place).
    pub kv_staging_blocks: u32,
    /// Pull, D side: MiB of DRAM a READ that would be fragmented (many small descriptors
    /// per block, e.g. vLLM-CPU's dim-major K across a block-size change) reads P's whole
    /// blocks into before laying them out locally (`kv_recv_staging_mib`, default 64; 0:
    /// off). DRAM caches only.
    pub kv_recv_staging_mib: u32,
    /// End-to-end KV checks (`kv_integrity`: `off`, `sampled`, `full`; see
    /// [`crate::integrity`]).
    pub kv_integrity: IntegrityMode,
    /// `sampled` digests one block in this many per request (`kv_integrity_sample_every`).
    pub kv_integrity_sample_every: u32,
    /// From [`EngineInfo::cuda_device`].
    pub cuda_device: Option<u32>,
    /// Host-buffer transfers (vLLM's `kv_buffer_device="cpu"` on a GPU engine): NIXL moves
    /// a host-DRAM mirror of the KV cache, P copies a finished prefill's blocks into it and D
    /// copies what it read back to its cache. On by `kv_buffer_device="cpu"` with a CUDA
    /// device, or by `kv_host_buffer` (which also forces it on a CPU engine, for tests).
    pub host_buffer: bool,
    /// Model and cache facts for the compatibility hash (from [`EngineInfo::compat`]).
    pub compat: CompatInfo,
    /// D: prefill engines (`host`, base side-channel `port`) handshaken at start-up
    /// (`kv_peers` or `KVBRIDGE_PEERS`; see [`crate::peers`]).
    pub peers: Vec<(String, u16)>,
}

/// Keys accepted in `kv_connector_extra_config`.
pub const EXTRA_KEYS: &[&str] = &[
    "backends",
    "transfer_mode",
    "kv_lease_duration",
    "handshake_timeout",
    "handshake_retries",
    "engine_ttl",
    "progress_delay_us",
    "idle_wait_us",
    "side_channel_host",
    "side_channel_hosts",
    "side_channel_port",
    "enforce_handshake_compat",
    "reject_kv_both",
    "num_threads",
    "coalesce_descriptors",
    "null_block_id",
    "push_layerwise",
    "push_registration_timeout",
    "kv_staging_blocks",
    "kv_host_buffer",
    "kv_peers",
    "kv_cache_layout",
    "kv_recv_staging_mib",
    "kv_integrity",
    "kv_integrity_sample_every",
];

/// Default `kv_integrity`.
pub const DEFAULT_INTEGRITY: IntegrityMode = IntegrityMode::Sampled;

/// The `kv_cache_layout` values kvbridge may ask vLLM for: vLLM 0.32's `KVCacheLayout`
/// names and the legacy aliases (`NHD` = `LBNHC`, `HND` = `LBHNC`).
pub const KV_CACHE_LAYOUTS: &[&str] = &["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC", "NHD", "HND"];

/// Default `kv_recv_staging_mib`: D's receive staging for fragmented READs.
pub const DEFAULT_RECV_STAGING_MIB: u32 = 64;

/// Most staging blocks accepted (slot ids are u32, and each costs a block of DRAM).
pub const MAX_STAGING_BLOCKS: u64 = 1 << 20;

/// Default `side_channel_host` when neither the key nor `VLLM_NIXL_SIDE_CHANNEL_HOST` is set.
pub const DEFAULT_SIDE_CHANNEL_HOST: &str = "localhost";
/// Default base `side_channel_port` when neither the key nor `VLLM_NIXL_SIDE_CHANNEL_PORT`
/// is set.
pub const DEFAULT_SIDE_CHANNEL_PORT: u16 = 5600;
/// Default `kv_lease_duration`, in seconds.
pub const DEFAULT_LEASE_SECS: f64 = 30.0;
/// Default `push_registration_timeout`, in seconds.
pub const DEFAULT_PUSH_REGISTRATION_SECS: f64 = 120.0;
/// Default `engine_ttl`, in seconds.
pub const DEFAULT_ENGINE_TTL_SECS: f64 = 3600.0;
/// Default `handshake_retries`.
pub const DEFAULT_HANDSHAKE_RETRIES: u32 = 2;
/// Default `handshake_timeout`, in seconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: f64 = 5.0;
/// Default `progress_delay_us`, in µs.
pub const DEFAULT_PROGRESS_DELAY_US: u64 = 100;
/// Default `idle_wait_us`, in µs.
pub const DEFAULT_IDLE_WAIT_US: u64 = 2000;

fn num(v: &Value, key: &str) -> Result<f64, ConfigError> {
    v.as_f64().ok_or_else(|| ConfigError::InvalidValue { key: key.into(), reason: format!("expected a number, got {v}") })
}

impl ConnectorConfig {
    /// Parse vLLM's `kv_transfer_config` (as JSON) plus engine facts. `env` looks up
    /// environment variables (pass `|k| std::env::var(k).ok()` in production).
    pub fn from_json(kv_transfer_config: &str, engine: EngineInfo, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let v: Value = serde_json::from_str(kv_transfer_config).map_err(|e| ConfigError::Json(e.to_string()))?;
        let obj = v.as_object().ok_or_else(|| ConfigError::Json("expected an object".into()))?;
        let role_s = obj.get("kv_role").and_then(Value::as_str).ok_or_else(|| ConfigError::InvalidRole("<missing>".into()))?;
        let role = KvRole::parse(role_s)?;
        let engine_id = obj
            .get("engine_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ConfigError::InvalidValue { key: "engine_id".into(), reason: "missing or empty".into() })?;
        let load_failure_policy = match obj.get("kv_load_failure_policy").and_then(Value::as_str) {
            None | Some("fail") => LoadFailurePolicy::Fail,
            Some("recompute") => LoadFailurePolicy::Recompute,
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    key: "kv_load_failure_policy".into(),
                    reason: format!("{other:?}: expected \"fail\" or \"recompute\""),
                })
            }
        };
        let empty = serde_json::Map::new();
        let extra = match obj.get("kv_connector_extra_config") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    key: "kv_connector_extra_config".into(),
                    reason: format!("expected an object, got {other}"),
                })
            }
        };
        for k in extra.keys() {
            if !EXTRA_KEYS.contains(&k.as_str()) {
                tracing::warn!(key = %k, "kvbridge: ignoring unknown kv_connector_extra_config key");
            }
        }
        let backends = match extra.get("backends") {
            None => vec!["UCX".to_string()],
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|b| {
                    b.as_str().map(str::to_string).ok_or_else(|| ConfigError::InvalidValue {
                        key: "backends".into(),
                        reason: format!("expected a list of strings, got {b}"),
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    key: "backends".into(),
                    reason: format!("expected a non-empty list of backend names, got {other}"),
                })
            }
        };
        let mode = match extra.get("transfer_mode") {
            None => TransferMode::Pull,
            Some(Value::String(s)) => TransferMode::parse(s)?,
            Some(other) => return Err(ConfigError::InvalidMode(other.to_string())),
        };
        let secs = |key: &str, default: f64| -> Result<Duration, ConfigError> {
            let s = match extra.get(key) {
                None => default,
                Some(v) => num(v, key)?,
            };
            // Bounded above too: durations are added to clocks, and `from_secs_f64` panics on
            // values past `Duration::MAX` (found by the fuzz).
            if !(s.is_finite() && s > 0.0 && s <= MAX_DURATION_SECS) {
                return Err(ConfigError::InvalidValue {
                    key: key.into(),
                    reason: format!("must be > 0 and <= {MAX_DURATION_SECS} s, got {s}"),
                });
            }
            Ok(Duration::from_secs_f64(s)) // finite, positive and bounded: cannot panic
        };
        let kv_lease_duration = secs("kv_lease_duration", DEFAULT_LEASE_SECS)?;
        let handshake_timeout = secs("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT_SECS)?;
        let engine_ttl = secs("engine_ttl", DEFAULT_ENGINE_TTL_SECS)?;
        let peers = crate::peers::parse_peers(extra.get("kv_peers"), &env)?;
        let handshake_retries = match extra.get("handshake_retries") {
            None => DEFAULT_HANDSHAKE_RETRIES,
            Some(v) => v.as_u64().filter(|n| *n <= 10).map(|n| n as u32).ok_or_else(|| ConfigError::InvalidValue {
                key: "handshake_retries".into(),
                reason: format!("expected an integer in 0..=10, got {v}"),
            })?,
        };
        let progress_delay_us = match extra.get("progress_delay_us") {
            None => DEFAULT_PROGRESS_DELAY_US,
            Some(v) => v.as_u64().ok_or_else(|| ConfigError::InvalidValue {
                key: "progress_delay_us".into(),
                reason: format!("expected a non-negative integer, got {v}"),
            })?,
        };
        let idle_wait_us = match extra.get("idle_wait_us") {
            None => DEFAULT_IDLE_WAIT_US,
            Some(v) => v.as_u64().filter(|n| *n <= 1_000_000).ok_or_else(|| ConfigError::InvalidValue {
                key: "idle_wait_us".into(),
                reason: format!("expected an integer in 0..=1000000, got {v}"),
            })?,
        };
        let flag = |key: &str, default: bool| match extra.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(ConfigError::InvalidValue { key: key.into(), reason: format!("expected a boolean, got {other}") }),
        };
        let enforce_handshake_compat = flag("enforce_handshake_compat", true)?;
        let env_reject = env(REJECT_KV_BOTH_ENV).is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
        if role == KvRole::Both && (flag("reject_kv_both", false)? || env_reject) {
            return Err(ConfigError::InvalidValue {
                key: "kv_role".into(),
                reason: format!(
                    "\"kv_both\" is refused here (reject_kv_both / {REJECT_KV_BOTH_ENV}): run the prefill engine with \
                     \"kv_producer\" and the decode engine with \"kv_consumer\"; see {KV_BOTH_MIGRATION_DOC}"
                ),
            });
        }
        let coalesce_descriptors = flag("coalesce_descriptors", true)?;
        let push_registration_timeout = secs("push_registration_timeout", DEFAULT_PUSH_REGISTRATION_SECS)?;
        let kv_staging_blocks = match extra.get("kv_staging_blocks") {
            None => 0,
            Some(v) => v.as_u64().filter(|n| *n <= MAX_STAGING_BLOCKS).map(|n| n as u32).ok_or_else(|| ConfigError::InvalidValue {
                key: "kv_staging_blocks".into(),
                reason: format!("expected an integer in 0..={MAX_STAGING_BLOCKS}, got {v}"),
            })?,
        };
        let kv_recv_staging_mib = match extra.get("kv_recv_staging_mib") {
            None => DEFAULT_RECV_STAGING_MIB,
            Some(v) => v.as_u64().filter(|n| *n <= 1 << 16).map(|n| n as u32).ok_or_else(|| ConfigError::InvalidValue {
                key: "kv_recv_staging_mib".into(),
                reason: format!("expected an integer in 0..=65536, got {v}"),
            })?,
        };
        let kv_integrity = match extra.get("kv_integrity") {
            None | Some(Value::Null) => DEFAULT_INTEGRITY,
            Some(v) => v.as_str().and_then(IntegrityMode::parse).ok_or_else(|| ConfigError::InvalidValue {
                key: "kv_integrity".into(),
                reason: format!("expected \"off\", \"sampled\" or \"full\", got {v}"),
            })?,
        };
        let kv_integrity_sample_every = match extra.get("kv_integrity_sample_every") {
            None => DEFAULT_SAMPLE_EVERY,
            Some(v) => v.as_u64().filter(|n| (1..=1 << 20).contains(n)).map(|n| n as u32).ok_or_else(|| ConfigError::InvalidValue {
                key: "kv_integrity_sample_every".into(),
                reason: format!("expected an integer in 1..=1048576, got {v}"),
            })?,
        };
        // The cache layout the connector asks vLLM for (vLLM reads it on the Python side;
        // checked here so that a typo is a ConfigError, not a silently ignored preference).
        match extra.get("kv_cache_layout") {
            None | Some(Value::Null) => {}
            Some(Value::String(l)) if KV_CACHE_LAYOUTS.contains(&l.as_str()) => {}
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    key: "kv_cache_layout".into(),
                    reason: format!("expected one of {KV_CACHE_LAYOUTS:?}, got {other}"),
                })
            }
        }
        // vLLM's kv_buffer_device: where the KV that NIXL moves lives ("cuda" by default).
        let kv_buffer_device = match obj.get("kv_buffer_device") {
            None | Some(Value::Null) => "cuda",
            Some(Value::String(d)) if d == "cuda" || d == "cpu" => d.as_str(),
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    key: "kv_buffer_device".into(),
                    reason: format!("expected \"cuda\" or \"cpu\", got {other}"),
                })
            }
        };
        let host_buffer = flag("kv_host_buffer", kv_buffer_device == "cpu" && engine.cuda_device.is_some())?;
        // A host buffer holds a layer only after the forward's copy: no layer-wise writes.
        let push_layerwise = flag("push_layerwise", true)? && !host_buffer;
        if host_buffer && kv_staging_blocks > 0 && role.can_produce() {
            return Err(ConfigError::InvalidValue {
                key: "kv_staging_blocks".into(),
                reason: "staging and host-buffer transfers (kv_buffer_device=\"cpu\") both copy the KV to host memory: use one".into(),
            });
        }
        let null_block_id = match extra.get("null_block_id") {
            None => Some(0),
            Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| ConfigError::InvalidValue {
                key: "null_block_id".into(),
                reason: format!("expected a block id or null, got {v}"),
            })?),
        };
        let side_channel_host = match extra.get("side_channel_host").and_then(Value::as_str) {
            Some(h) => h.to_string(),
            None => env("VLLM_NIXL_SIDE_CHANNEL_HOST").unwrap_or_else(|| DEFAULT_SIDE_CHANNEL_HOST.into()),
        };
        if engine.pp_size > 1 && mode == TransferMode::Push {
            // Pull reads each D stage's layers from the P stage(s) holding them; push would
            // need P's stages to register every D stage: not built, so refuse up front.
            return Err(ConfigError::InvalidValue {
                key: "pipeline_parallel_size".into(),
                reason: format!(
                    "{} with transfer_mode \"push\" is not supported: use transfer_mode \"pull\" (the default) with pipeline parallelism",
                    engine.pp_size
                ),
            });
        }
        let side_channel_hosts = match extra.get("side_channel_hosts") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) if a.len() <= crate::ranks::MAX_RANKS && a.iter().all(|h| h.as_str().is_some_and(|h| !h.is_empty())) => {
                a.iter().filter_map(Value::as_str).map(str::to_string).collect()
            }
            Some(v) => {
                return Err(ConfigError::InvalidValue {
                    key: "side_channel_hosts".into(),
                    reason: format!("expected a list of host names, one per rank (pp_rank * tp_size + tp_rank), got {v}"),
                })
            }
        };
        let side_channel_port = match extra.get("side_channel_port") {
            Some(v) => v
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| ConfigError::InvalidValue { key: "side_channel_port".into(), reason: format!("not a port: {v}") })?,
            None => match env("VLLM_NIXL_SIDE_CHANNEL_PORT") {
                Some(p) => p.trim().parse::<u16>().map_err(|_| ConfigError::InvalidValue {
                    key: "VLLM_NIXL_SIDE_CHANNEL_PORT".into(),
                    reason: format!("not a port: {p:?}"),
                })?,
                None => DEFAULT_SIDE_CHANNEL_PORT,
            },
        };
        Ok(Self {
            engine_id,
            role,
            mode,
            backends,
            side_channel_host,
            side_channel_hosts,
            side_channel_port,
            tp_size: engine.tp_size.max(1),
            tp_rank: engine.tp_rank,
            dp_rank: engine.dp_rank,
            pp_size: engine.pp_size.max(1),
            pp_rank: engine.pp_rank,
            kv_lease_duration,
            handshake_timeout,
            handshake_retries,
            engine_ttl,
            peers,
            progress_delay_us,
            idle_wait_us,
            load_failure_policy,
            enforce_handshake_compat,
            coalesce_descriptors,
            kv_staging_blocks,
            kv_recv_staging_mib,
            kv_integrity,
            kv_integrity_sample_every,
            null_block_id,
            push_layerwise,
            push_registration_timeout,
            cuda_device: engine.cuda_device,
            host_buffer,
            compat: engine.compat,
        })
    }

    /// Staging slots this engine uses: `kv_staging_blocks` on a pull-mode producer, else 0.
    pub fn staging_blocks(&self) -> u32 {
        if self.mode == TransferMode::Pull && self.role.can_produce() {
            self.kv_staging_blocks
        } else {
            0
        }
    }

    /// Log role-related start-up facts: the role, and (`side == "scheduler"`, one per
    /// engine: its workers stay quiet) the `kv_both` deprecation warning.
    pub fn log_startup(&self, side: &str) {
        tracing::info!(engine_id = %self.engine_id, role = self.role.as_str(), mode = self.mode.as_str(),
            side, "kvbridge connector starting");
        if let Some(w) = self.deprecation(side) {
            tracing::warn!("{w}");
        }
    }

    /// The `kv_both` deprecation warning `side` logs at start-up: the scheduler's (one per
    /// engine), never a worker's.
    pub fn deprecation(&self, side: &str) -> Option<String> {
        (self.role == KvRole::Both && side == "scheduler").then(|| {
            format!(
                "kv_role=\"kv_both\" is deprecated in kvbridge: run the prefill engine with kv_role=\"kv_producer\" and the \
                 decode engine with kv_role=\"kv_consumer\". Migration guide: {KV_BOTH_MIGRATION_DOC}. To refuse kv_both \
                 now, set {REJECT_KV_BOTH_ENV}=1 or reject_kv_both: true."
            )
        })
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
