//! `kvbridge._native`: thin pyo3 classes over the core state machines and the NIXL
//! worker. Every call that can wait releases the GIL. Errors map to one exception
//! hierarchy rooted at `KvbridgeError`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod pyjson;
mod pylog;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvbridge_core::config::{ConnectorConfig, EngineInfo};
use kvbridge_core::error::Error;
use kvbridge_core::layout::{MemKind, RegionKind, TensorInfo};
use kvbridge_core::params::{KvParams, ReqParams};
use kvbridge_core::scheduler::{FinishReason, SchedulerSide};
use kvbridge_driver::clock::now_unix;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(_native, KvbridgeError, PyException, "Base class of every kvbridge error.");
create_exception!(_native, ConfigError, KvbridgeError, "Invalid local configuration.");
create_exception!(_native, ParamsError, KvbridgeError, "Malformed kv_transfer_params.");
create_exception!(_native, RoleError, KvbridgeError, "A request contradicts the engine's kv_role.");
create_exception!(_native, WireError, KvbridgeError, "Undecodable bytes from a peer or the scheduler.");
create_exception!(_native, HandshakeError, KvbridgeError, "The handshake with a remote engine failed.");
create_exception!(_native, PlanError, KvbridgeError, "The transfer plan cannot be built or applied.");
create_exception!(_native, PushError, KvbridgeError, "A push-mode registration was refused.");
create_exception!(_native, TransportError, KvbridgeError, "The transport (NIXL) failed.");
create_exception!(_native, NixlRuntimeMissing, TransportError, "libnixl_capi.so could not be loaded.");

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Config(_) => ConfigError::new_err(msg),
        Error::Params(_) => ParamsError::new_err(msg),
        Error::Role(_) => RoleError::new_err(msg),
        Error::Wire(_) => WireError::new_err(msg),
        Error::Handshake(_) => HandshakeError::new_err(msg),
        Error::Plan(_) => PlanError::new_err(msg),
        Error::Push(_) => PushError::new_err(msg),
        Error::Transport(t) if t.kind == "runtime_missing" => NixlRuntimeMissing::new_err(msg),
        Error::Transport(_) => TransportError::new_err(msg),
        Error::Other(_) => KvbridgeError::new_err(msg),
    }
}

fn parse_config(kv_transfer_config: &str, engine_info: &str) -> PyResult<ConnectorConfig> {
    let info: EngineInfo =
        serde_json::from_str(engine_info).map_err(|e| ConfigError::new_err(format!("engine info is not valid JSON: {e}")))?;
    ConnectorConfig::from_json(kv_transfer_config, info, |k| std::env::var(k).ok()).map_err(|e| to_py(e.into()))
}

/// Scheduler-side connector (vLLM role SCHEDULER).
#[pyclass(module = "kvbridge._native")]
struct Scheduler {
    inner: Box<dyn SchedulerSide + Send + Sync>,
    /// Per request: the params object last decoded and the result. vLLM hands the same
    /// dict to every call for a request, so it is decoded once (a miss on another object
    /// decodes again). Dropped at `request_finished`; bounded.
    params: std::collections::HashMap<String, (Py<PyAny>, Arc<ReqParams>)>,
}

/// Requests whose converted params are kept at once (past this the cache starts over).
const MAX_CACHED_PARAMS: usize = 65_536;

impl Scheduler {
    /// `obj` decoded, for request `req_id` (see `params`; None or Python None: no params).
    fn params(&mut self, req_id: &str, obj: Option<&Bound<'_, PyAny>>) -> Option<Arc<ReqParams>> {
        let obj = obj.filter(|o| !o.is_none())?;
        if let Some((cached, p)) = self.params.get(req_id) {
            if cached.is(obj) {
                return Some(Arc::clone(p));
            }
        }
        let p = Arc::new(pyjson::req_params(obj));
        if self.params.len() >= MAX_CACHED_PARAMS {
            self.params.clear();
        }
        self.params.insert(req_id.to_string(), (obj.clone().unbind(), Arc::clone(&p)));
        Some(p)
    }

    /// `obj` decoded for request `req_id`, which ends: its cache entry is dropped.
    fn take_params(&mut self, req_id: &str, obj: Option<&Bound<'_, PyAny>>) -> Option<Arc<ReqParams>> {
        let cached = self.params.remove(req_id);
        let obj = obj.filter(|o| !o.is_none())?;
        match cached {
            Some((c, p)) if c.is(obj) => Some(p),
            _ => Some(Arc::new(pyjson::req_params(obj))),
        }
    }
}

#[pymethods]
impl Scheduler {
    #[new]
    fn new(kv_transfer_config: &str, engine_info: &str) -> PyResult<Self> {
        let cfg = parse_config(kv_transfer_config, engine_info)?;
        let inner = kvbridge_core::scheduler::new_scheduler(cfg);
        Ok(Self { inner, params: std::collections::HashMap::new() })
    }

    /// "pull" or "push".
    #[getter]
    fn transfer_mode(&self) -> &'static str {
        self.inner.config().mode.as_str()
    }

    /// P: requests whose prefill completes in the step being built, as
    /// `(req_id, block_ids per KV-cache group, num_tokens)`: layer-wise push writes them
    /// as they compute; staging and the host buffer copy them out after the forward.
    fn prefill_completing(&mut self, reqs: Vec<(String, Vec<Vec<u32>>, u64)>) {
        for (r, blocks, n) in reqs {
            self.inner.prefill_completing_groups(&r, &blocks, n);
        }
    }

    #[getter]
    fn engine_id(&self) -> String {
        self.inner.config().engine_id.clone()
    }

    #[getter]
    fn role(&self) -> &'static str {
        self.inner.config().role.as_str()
    }

    /// Returns `(num_tokens, load_async)`. `kv_transfer_params`: the request's dict (or
    /// JSON text).
    #[pyo3(signature = (req_id, num_prompt_tokens, num_computed_tokens, kv_transfer_params=None))]
    fn get_num_new_matched_tokens(
        &mut self,
        req_id: &str,
        num_prompt_tokens: u64,
        num_computed_tokens: u64,
        kv_transfer_params: Option<&Bound<'_, PyAny>>,
    ) -> (u64, bool) {
        let params = self.params(req_id, kv_transfer_params);
        let m = self.inner.get_num_new_matched_tokens_parsed(req_id, num_prompt_tokens, num_computed_tokens, params.as_ref());
        (m.num_tokens, m.load_async)
    }

    fn update_state_after_alloc(&mut self, req_id: &str, unhashed_block_ids: Vec<u32>, num_external_tokens: u64) {
        self.inner.update_state_after_alloc(req_id, &unhashed_block_ids, num_external_tokens);
    }

    /// [`update_state_after_alloc`] with the unhashed blocks of each KV-cache group.
    fn update_state_after_alloc_groups(&mut self, req_id: &str, unhashed_block_ids: Vec<Vec<u32>>, num_external_tokens: u64) {
        self.inner.update_state_after_alloc_groups(req_id, &unhashed_block_ids, num_external_tokens);
    }

    /// This step's metadata for the workers (with any lease heartbeats now due), as
    /// opaque bytes.
    fn build_connector_meta<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        self.inner.tick(now_unix());
        let b = self.inner.build_connector_meta().to_bytes().map_err(|e| to_py(e.into()))?;
        Ok(PyBytes::new(py, &b))
    }

    /// A request entered the engine (vLLM's `on_new_request`): D starts renewing P's
    /// lease on its blocks while it waits.
    #[pyo3(signature = (req_id, kv_transfer_params=None))]
    fn on_new_request(&mut self, req_id: &str, kv_transfer_params: Option<&Bound<'_, PyAny>>) {
        let params = self.params(req_id, kv_transfer_params);
        self.inner.on_new_request_parsed(req_id, params.as_ref());
    }

    /// The scheduler's accounting (held/loading requests and blocks) as JSON text.
    fn accounting(&self) -> String {
        self.inner.accounting().to_string()
    }

    /// Returns `(delay_free_blocks, kv_transfer_params as a dict or None)`. `block_ids`:
    /// one KV-cache group's ids, or (vLLM's `request_finished_all_groups`) a list per group.
    #[pyo3(signature = (req_id, block_ids, finish_reason, num_computed_tokens, kv_transfer_params=None))]
    fn request_finished(
        &mut self,
        py: Python<'_>,
        req_id: &str,
        block_ids: &Bound<'_, PyAny>,
        finish_reason: &str,
        num_computed_tokens: u64,
        kv_transfer_params: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(bool, PyObject)> {
        let groups: Vec<Vec<u32>> = match block_ids.extract::<Vec<u32>>() {
            Ok(one) => vec![one],
            Err(_) => block_ids.extract()?,
        };
        let params = self.take_params(req_id, kv_transfer_params);
        let f = self.inner.request_finished_groups(
            req_id,
            &groups,
            FinishReason::parse(finish_reason),
            num_computed_tokens,
            params.as_ref(),
            now_unix(),
        );
        let out = match &f.kv_transfer_params {
            Some(v) => pyjson::to_py(py, v)?,
            None => py.None(),
        };
        Ok((f.delay_free, out))
    }

    /// Returns the ids of `finished_sending` vLLM must not see (staged requests, whose
    /// blocks it already freed). Both: any iterable of str (vLLM's sets, lists).
    fn update_connector_output(
        &mut self,
        finished_sending: &Bound<'_, PyAny>,
        finished_recving: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<String>> {
        let (sending, recving) = (pyjson::strings(finished_sending)?, pyjson::strings(finished_recving)?);
        Ok(self.inner.update_connector_output(&sending, &recving))
    }

    /// Staging slots (`kv_staging_blocks` on a pull-mode producer; 0: off).
    #[getter]
    fn staging_slots(&self) -> u32 {
        self.inner.staging_slots()
    }

    /// `kv_integrity`: "off", "sampled" or "full". P reports every prefill's completing
    /// step unless "off".
    #[getter]
    fn kv_integrity(&self) -> &'static str {
        self.inner.config().kv_integrity.as_str()
    }

    /// Host-buffer transfers (`kv_buffer_device="cpu"` on a GPU engine, or
    /// `kv_host_buffer`): P must report every prefill's completing step.
    #[getter]
    fn host_buffer(&self) -> bool {
        self.inner.config().host_buffer
    }

    fn has_pending_block_frees(&self) -> bool {
        self.inner.has_pending_block_frees()
    }
}

/// Worker-side connector (vLLM role WORKER), over a NIXL agent.
#[pyclass(module = "kvbridge._native", frozen)]
struct Worker {
    inner: kvbridge_nixl::NixlWorker,
    invalid_blocks: Mutex<Vec<u32>>,
}

/// `(name, data_ptr, shape, stride, itemsize, device type, device index, geometry)`:
/// geometry is JSON `{"axes": [...], "kind": ..., "group": n, "window": n, "total_heads": n,
/// "kv_part": "k" | "v"}`
/// (all optional; see `kvbridge_core::layout::TensorInfo`).
type TensorTuple = (String, u64, Vec<u64>, Vec<u64>, u64, String, u64, Option<String>);

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Geometry {
    #[serde(default)]
    axes: Vec<kvbridge_core::layout::Axis>,
    #[serde(default)]
    kind: Option<kvbridge_core::layout::RegionKind>,
    #[serde(default)]
    group: u32,
    #[serde(default)]
    window: u32,
    #[serde(default)]
    total_heads: u32,
    #[serde(default)]
    kv_part: Option<KvPart>,
}

#[derive(serde::Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum KvPart {
    K,
    V,
}

#[pymethods]
impl Worker {
    #[new]
    #[pyo3(signature = (kv_transfer_config, engine_info, nixl_lib_dir=None))]
    fn new(py: Python<'_>, kv_transfer_config: &str, engine_info: &str, nixl_lib_dir: Option<String>) -> PyResult<Self> {
        let cfg = parse_config(kv_transfer_config, engine_info)?;
        let inner = py.allow_threads(|| kvbridge_nixl::new_worker(cfg, nixl_lib_dir.map(PathBuf::from))).map_err(to_py)?;
        Ok(Self { inner, invalid_blocks: Mutex::new(Vec::new()) })
    }

    /// Push mode with layer-wise writes: `save_kv_layer` posts during the forward.
    #[getter]
    fn layerwise_push(&self) -> bool {
        let c = self.inner.config();
        c.mode == kvbridge_core::config::TransferMode::Push && c.push_layerwise
    }

    /// `tensors`: `(name, data_ptr, shape, stride, itemsize, device_type, device_index)`.
    fn register_kv_caches(&self, py: Python<'_>, tensors: Vec<TensorTuple>, num_blocks: u64) -> PyResult<()> {
        let infos = tensors
            .into_iter()
            .map(|(name, ptr, shape, stride, itemsize, dev, idx, geo)| {
                let mem = match dev.as_str() {
                    "cpu" => Ok(MemKind::Dram),
                    "cuda" => Ok(MemKind::Vram),
                    other => Err(ConfigError::new_err(format!("tensor {name}: device {other:?} is not supported (cpu or cuda)"))),
                }?;
                let g: Geometry = match geo.as_deref() {
                    None | Some("") => Geometry::default(),
                    Some(j) => {
                        serde_json::from_str(j).map_err(|e| ConfigError::new_err(format!("tensor {name}: bad geometry {j}: {e}")))?
                    }
                };
                let kind = g.kind.unwrap_or(if g.axes.is_empty() { RegionKind::Opaque } else { RegionKind::Attention });
                Ok(TensorInfo {
                    name,
                    ptr,
                    shape,
                    stride,
                    itemsize,
                    mem,
                    device_id: idx,
                    axes: g.axes,
                    kind,
                    group: g.group,
                    window: g.window,
                    total_heads: g.total_heads,
                    kv_part: g.kv_part.map(|p| match p {
                        KvPart::K => 0,
                        KvPart::V => 1,
                    }),
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        py.allow_threads(|| self.inner.register(&infos, num_blocks)).map(|_| ()).map_err(to_py)
    }

    /// Bind one step's metadata and start loads. Never blocks on the network. `stream`:
    /// the forward's CUDA stream (GPU caches): this step's staging and host-buffer copies
    /// are queued on it and wait for it alone, not the whole device.
    #[pyo3(signature = (metadata, stream=None))]
    fn start_load_kv(&self, py: Python<'_>, metadata: &[u8], stream: Option<u64>) -> PyResult<()> {
        self.inner.set_stream(stream);
        let md = metadata.to_vec();
        py.allow_threads(|| self.inner.start_load(&md)).map_err(to_py)
    }

    /// Returns `(finished_sending, finished_recving, failed_recving)`. With `idle=True`
    /// (a step with no forward pass) it may wait up to `idle_wait_us` for a completion.
    #[pyo3(signature = (idle=false))]
    fn get_finished(&self, py: Python<'_>, idle: bool) -> (Vec<String>, Vec<String>, Vec<String>) {
        let wait = if idle { std::time::Duration::from_micros(self.inner.config().idle_wait_us) } else { std::time::Duration::ZERO };
        let f = py.allow_threads(|| self.inner.get_finished_wait(wait));
        if !f.invalid_block_ids.is_empty() {
            if let Ok(mut v) = self.invalid_blocks.lock() {
                v.extend_from_slice(&f.invalid_block_ids);
            }
        }
        (f.sending, f.recving, f.failed_recving)
    }

    /// Push, P: layer `layer_name` is computed (queues its WRITEs; never blocks). `stream`:
    /// the forward's CUDA stream (GPU caches): the WRITEs wait for an event recorded on it
    /// now, after the layer's KV write.
    #[pyo3(signature = (layer_name, stream=None))]
    fn save_kv_layer(&self, layer_name: &str, stream: Option<u64>) -> PyResult<()> {
        // A channel send, a read lock and (GPU) an event record: never waits, so the GIL stays.
        self.inner.save_layer_fenced(layer_name, || fence(stream)).map_err(|e| to_py(Error::from(e)))
    }

    /// The forward ended. Push, P: its WRITEs complete on the writer thread. Pull, P with
    /// staging: the step's finished prefills are copied into staging slots, with the GIL
    /// released (only then: other steps keep it, the call is a few atomics).
    #[pyo3(signature = (stream=None))]
    fn wait_for_save(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<()> {
        // GPU caches, a layer-wise push forward: the end-of-forward WRITEs wait for an
        // event after the forward's last KV write.
        let f = if self.inner.layerwise_now() { fence(stream).map_err(|e| to_py(Error::from(e)))? } else { None };
        if self.inner.has_staging_work() {
            py.allow_threads(|| self.inner.wait_for_save_fenced(f));
        } else {
            self.inner.wait_for_save_fenced(f);
        }
        Ok(())
    }

    fn get_block_ids_with_load_errors(&self) -> Vec<u32> {
        self.invalid_blocks.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }

    /// The engine is shutting down: D tells each P engine which leases it will never
    /// read, so P frees them now (waits up to `timeout` seconds for the answers). Returns
    /// how many leases the P ranks reported released.
    #[pyo3(signature = (timeout=2.0))]
    fn shutdown(&self, py: Python<'_>, timeout: f64) -> usize {
        let t = std::time::Duration::from_secs_f64(timeout.clamp(0.0, 60.0));
        py.allow_threads(|| self.inner.shutdown(t))
    }

    /// This rank's side-channel address: `(dp_rank, pp_rank, tp_rank, host, port)`, what
    /// the engine's ranks exchange at start-up to build their rank table.
    fn rank_addr(&self) -> (u32, u32, u32, String, u16) {
        let c = self.inner.config();
        (c.dp_rank, c.pp_rank, c.tp_rank, c.local_host().to_string(), c.local_listener_port().unwrap_or(0))
    }

    /// The table of this engine's ranks served in handshakes: `(pp_rank, tp_rank, host, port)`.
    fn rank_table(&self) -> Vec<(u32, u32, String, u16)> {
        self.inner.rank_table().into_iter().map(|a| (a.pp_rank, a.tp_rank, a.host, a.port)).collect()
    }

    /// Replace the rank table served in handshakes (the addresses every rank of this
    /// engine reported, on whichever node it runs).
    fn set_rank_table(&self, table: Vec<(u32, u32, String, u16)>) {
        let t = table.into_iter().map(|(pp_rank, tp_rank, host, port)| kvbridge_core::ranks::RankAddr { pp_rank, tp_rank, host, port });
        self.inner.set_rank_table(t.collect());
    }

    /// Pipeline parallel: every stage's layer names (index = PP rank), so a P rank read by
    /// several of this engine's stages expects a notification from each.
    fn set_stage_layers(&self, layers: Vec<Vec<String>>) {
        self.inner.set_stage_layers(layers);
    }

    /// Blocks this rank holds for remote peers and loads in flight, with counters, as
    /// JSON text (the same view `kvbridge.inspect` gets over the side channel).
    fn accounting(&self, py: Python<'_>) -> String {
        // The state lock may be held for a moment by the side-channel thread: wait
        // without the GIL (as every native call that can wait does).
        py.allow_threads(|| self.inner.accounting().to_string())
    }

    /// vLLM's per-interval transfer stats since the last call (the keys of vLLM's
    /// `NixlKVConnectorStats`, plus `handshake_duration` and `held_blocks`) as JSON, or
    /// None when nothing was observed.
    fn take_xfer_stats(&self, py: Python<'_>) -> Option<String> {
        py.allow_threads(|| self.inner.take_xfer_stats().and_then(|s| serde_json::to_string(&s).ok()))
    }

    /// Counters as a JSON object.
    fn stats(&self, py: Python<'_>) -> String {
        py.allow_threads(|| self.stats_json())
    }
}

impl Worker {
    fn stats_json(&self) -> String {
        let s = self.inner.stats();
        let p = self.inner.push_stats();
        let (held, waiting) = self.inner.push_pending();
        serde_json::json!({
            "reads_ok": s.reads_ok, "reads_failed": s.reads_failed, "bytes_read": s.bytes_read,
            "read_secs_total": s.read_secs_total, "last_read_secs": s.last_read_secs,
            "last_read_bytes": s.last_read_bytes, "handshakes_ok": s.handshakes_ok,
            "handshakes_failed": s.handshakes_failed, "descriptors": s.descriptors, "last_descriptors": s.last_descriptors,
            "descriptors_uncoalesced": s.descriptors_uncoalesced,
            "held_requests": self.inner.held_requests(), "in_flight": self.inner.in_flight(),
            "push": {
                "writes_ok": p.writes_ok, "writes_failed": p.writes_failed, "write_posts": p.write_posts,
                "bytes_written": p.bytes_written, "last_write_secs": p.last_write_secs,
                "registrations_sent": p.registrations_sent, "registrations_accepted": p.registrations_accepted,
                "registrations_refused": p.registrations_refused, "recv_ok": p.recv_ok, "recv_failed": p.recv_failed,
                "held": held, "waiting": waiting,
            },
        })
        .to_string()
    }
}

/// Validate a request's `kv_transfer_params` (JSON text, or the dict as the scheduler
/// gets it). Returns "none", "remote_decode", "remote_prefill" or "push_prefill"; raises
/// `ParamsError` if malformed.
/// A CUDA fence on `stream`, or none (DRAM caches).
fn fence(stream: Option<u64>) -> Result<Option<Box<dyn kvbridge_driver::worker::Fence>>, kvbridge_nixl::NixlError> {
    match stream {
        None => Ok(None),
        Some(s) => Ok(Some(Box::new(kvbridge_nixl::cuda::CudaFence::record(s)?))),
    }
}

#[pyfunction]
fn validate_kv_transfer_params(params: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    let parsed = if let Ok(text) = params.downcast::<pyo3::types::PyString>() {
        KvParams::parse_json(Some(&text.to_cow()?))
    } else if params.downcast::<pyo3::types::PyDict>().is_ok() {
        pyjson::req_params(params).kind
    } else {
        return Err(pyo3::exceptions::PyTypeError::new_err("kv_transfer_params must be JSON text (str) or a dict"));
    };
    match parsed.map_err(|e| to_py(e.into()))? {
        KvParams::None => Ok("none"),
        KvParams::RemoteDecode => Ok("remote_decode"),
        KvParams::RemotePrefill(_) => Ok("remote_prefill"),
        KvParams::PushPrefill(_) => Ok("push_prefill"),
    }
}

/// The accounting view (JSON text) of the worker whose side channel listens at
/// `host:port` (P: blocks held for remote readers; D: loads in flight). For operators and
/// tests: "nothing leaked" is `held_blocks == 0 and loading_blocks == 0`.
#[pyfunction]
#[pyo3(signature = (host, port, timeout=2.0))]
fn inspect(py: Python<'_>, host: String, port: u16, timeout: f64) -> PyResult<String> {
    let timeout = std::time::Duration::try_from_secs_f64(timeout)
        .ok()
        .filter(|t| !t.is_zero() && t.as_secs() <= 86_400)
        .ok_or_else(|| ConfigError::new_err(format!("timeout must be > 0 and <= 86400 s, got {timeout}")))?;
    py.allow_threads(|| {
        let side = kvbridge_driver::side_channel::SideChannel::new().map_err(|e| Error::Other(e.to_string()))?;
        side.inspect_blocking(&host, port, timeout).map_err(Error::from)
    })
    .map_err(to_py)
}

/// True if the NIXL runtime can be loaded (never aborts).
#[pyfunction]
#[pyo3(signature = (lib_dir=None))]
fn nixl_runtime_available(lib_dir: Option<String>) -> bool {
    kvbridge_nixl::NixlTransport::runtime_available(lib_dir.as_deref().map(std::path::Path::new))
}

/// Route `tracing` logs: to Python's `logging.getLogger("kvbridge")` (`to_python`, the
/// default: in vLLM that logger uses vLLM's handlers), or to stderr. Level from `level`,
/// else `KVBRIDGE_LOG`, else "info" (an `EnvFilter` directive such as
/// "info,kvbridge_core=debug"). The first call wins; later calls change nothing.
#[pyfunction]
#[pyo3(signature = (level=None, to_python=true))]
fn init_logging(level: Option<String>, to_python: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = level.or_else(|| std::env::var("KVBRIDGE_LOG").ok()).unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if to_python {
        if let Ok(layer) = pylog::layer() {
            let _ = registry.with(layer).try_init();
            return;
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .with_target(false);
    let _ = registry.with(fmt).try_init();
}

/// Stop handing Rust log lines to Python (called at interpreter exit); returns how many
/// lines were dropped because the logging queue was full.
#[pyfunction]
fn stop_logging() -> u64 {
    pylog::STOPPED.store(true, std::sync::atomic::Ordering::Relaxed);
    pylog::DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Scheduler>()?;
    m.add_class::<Worker>()?;
    m.add_function(wrap_pyfunction!(validate_kv_transfer_params, m)?)?;
    m.add_function(wrap_pyfunction!(nixl_runtime_available, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(stop_logging, m)?)?;
    m.add("KvbridgeError", py.get_type::<KvbridgeError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ParamsError", py.get_type::<ParamsError>())?;
    m.add("RoleError", py.get_type::<RoleError>())?;
    m.add("WireError", py.get_type::<WireError>())?;
    m.add("HandshakeError", py.get_type::<HandshakeError>())?;
    m.add("PlanError", py.get_type::<PlanError>())?;
    m.add("PushError", py.get_type::<PushError>())?;
    m.add("TransportError", py.get_type::<TransportError>())?;
    m.add("NixlRuntimeMissing", py.get_type::<NixlRuntimeMissing>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // True only in test builds (feature `fault-inject`): `KVBRIDGE_TEST_FAULT_DIR` is honoured.
    m.add("FAULT_INJECTION", cfg!(feature = "fault-inject"))?;
    Ok(())
}
