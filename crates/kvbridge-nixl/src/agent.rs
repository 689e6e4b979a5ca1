//! [`NixlTransport`]: the core's `Transport` over a NIXL agent (UCX by default).
//!
//! RAII: transfer requests, remote-agent entries and memory registrations are owned
//! handles, released on drop, and dropped before the agent (field order below).
//!
//! Transfers are made from the plan's pieces. When every piece is whole blocks on both
//! sides, the request is made from indices into per-(region, block) lists prepared once
//! (locally at registration, per peer after its first transfer; see [`crate::prepped`]);
//! otherwise from descriptor lists built for the request (a run of contiguous blocks is one
//! descriptor).
use std::collections::HashMap;
use std::path::Path;

use kvbridge_core::error::TransportError;
use kvbridge_core::layout::{KvLayout, MemKind};
use kvbridge_core::plan::Piece;
use kvbridge_core::transport::{Transport, XferId, XferPoll};
use kvbridge_core::wire::AgentMetadata;
use nixl_sys::{
    Agent, AgentConfig, MemType, MemoryRegion, NixlDescriptor, NotificationMap, OptArgs, RegistrationHandle, ThreadSync, XferDescList,
    XferOp, XferRequest, XferStatus,
};

use crate::error::NixlError;
use crate::md_check;
use crate::prepped::{self, Prepped, Units};
use crate::runtime;

/// Transport settings.
#[derive(Debug, Clone)]
pub struct NixlOptions {
    /// NIXL backends to create, e.g. `["UCX"]`.
    pub backends: Vec<String>,
    /// Progress-thread sleep between polls, in µs. 0 would busy-spin a core, so 0 here
    /// means "no progress thread": transfers then progress only when polled.
    pub progress_delay_us: u64,
    /// Where to look for `libnixl_capi.so` besides the env vars.
    pub lib_dir_hint: Option<std::path::PathBuf>,
    /// The CUDA device whose context is made current before the agent starts (GPU engines).
    pub cuda_device: Option<u32>,
}

impl Default for NixlOptions {
    fn default() -> Self {
        Self { backends: vec!["UCX".into()], progress_delay_us: 100, lib_dir_hint: None, cuda_device: None }
    }
}

/// A memory range to register (a KV region's span).
#[derive(Debug)]
struct Span {
    ptr: u64,
    len: usize,
    mem: MemType,
    dev: u64,
}

/// The regions' spans, overlapping ones merged: views of one buffer (a cache whose K and
/// V parts are separate regions interleaved block by block) register it once.
fn merged_spans(layout: &KvLayout) -> Vec<Span> {
    let mut v: Vec<(MemKind, u64, u64, u64)> =
        layout.regions.iter().map(|r| (r.mem, r.device_id, r.base, r.base.saturating_add(r.span()))).collect();
    v.sort_by_key(|&(m, d, b, _)| (m == MemKind::Vram, d, b));
    let mut out: Vec<(MemKind, u64, u64, u64)> = Vec::with_capacity(v.len());
    for x in v {
        match out.last_mut() {
            Some(l) if l.0 == x.0 && l.1 == x.1 && x.2 < l.3 => l.3 = l.3.max(x.3),
            _ => out.push(x),
        }
    }
    out.into_iter().map(|(m, dev, b, e)| Span { ptr: b, len: (e - b) as usize, mem: mem_type(m), dev }).collect()
}

impl MemoryRegion for Span {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.ptr as usize as *const u8
    }
    fn size(&self) -> usize {
        self.len
    }
}

impl NixlDescriptor for Span {
    fn mem_type(&self) -> MemType {
        self.mem
    }
    fn device_id(&self) -> u64 {
        self.dev
    }
}

struct Remote {
    /// The peer's staging buffer (pull with `kv_staging_blocks`), `[start, end)` ranges:
    /// host memory even when its cache is on a GPU.
    staging: Vec<(u64, u64)>,
    /// The peer's per-block list, prepared when the peer is loaded (or, if our own list
    /// was not ready then, after the first transfer to it). Dropped before the metadata is
    /// invalidated.
    prepped: Option<Prepped>,
    /// The numbering to prepare (None: too many blocks, or already tried).
    to_prep: Option<Units>,
    agent_name: String,
    /// True if this entry loaded the agent's metadata (and must invalidate it).
    owns_md: bool,
    mem: MemType,
}

fn mem_type(m: MemKind) -> MemType {
    match m {
        MemKind::Dram => MemType::Dram,
        MemKind::Vram => MemType::Vram,
    }
}

/// The core's `Transport` over one NIXL agent: this rank's KV regions, the peers loaded
/// from their metadata, and the transfers in flight.
pub struct NixlTransport {
    // Drop order matters: requests, then prepared lists, then registrations, then agent.
    xfers: HashMap<XferId, XferRequest>,
    remotes: HashMap<String, Remote>,
    /// This side's per-block list (None: not registered, or too many blocks).
    local_prepped: Option<Prepped>,
    /// Memory type of the registered regions (None until registered).
    local: Option<MemType>,
    regs: Vec<RegistrationHandle>,
    /// The registration of `scratch` (made on the first warm-up read).
    scratch_reg: Option<RegistrationHandle>,
    /// Transfer requests made from prepared lists (descriptor indices), counted.
    pub made_prepped: u64,
    /// Transfer requests made from descriptor lists built for the request, counted.
    pub made_listed: u64,
    next_xfer: XferId,
    name: String,
    agent: Agent,
    /// The CUDA context made current before the agent started; released after it.
    cuda: Option<std::sync::Arc<cudarc::driver::CudaContext>>,
    /// Host memory the warm-up read lands in (never the KV cache); freed after its
    /// registration and the agent.
    scratch: Vec<u8>,
}

/// Bytes a warm-up read moves at most (one block of the peer's cache, capped).
const WARM_BYTES: usize = 1 << 20;

impl NixlTransport {
    /// Create an agent named `name` with the configured backends. Fails with
    /// [`NixlError::RuntimeMissing`] (never aborts) if the NIXL runtime is absent.
    pub fn new(name: &str, opts: &NixlOptions) -> Result<Self, NixlError> {
        runtime::ensure_loaded(opts.lib_dir_hint.as_deref())?;
        // UCX picks up the current CUDA context when the backend initialises (below).
        let cuda = opts.cuda_device.map(crate::cuda::bind_device).transpose()?;
        // Every call into the agent is serialised by the worker driver's mutex, so NIXL's
        // default sync mode suffices (RW locking measured slower in load_remote_md).
        let cfg = AgentConfig {
            enable_prog_thread: opts.progress_delay_us > 0,
            pthr_delay_us: opts.progress_delay_us,
            thread_sync: ThreadSync::Default,
            ..AgentConfig::default()
        };
        let agent = Agent::new_configured(name, &cfg).map_err(NixlError::nixl("create agent"))?;
        let plugins: Vec<String> = agent
            .get_available_plugins()
            .map_err(NixlError::nixl("list plugins"))?
            .iter()
            .filter_map(|p| p.ok().map(str::to_string))
            .collect();
        for b in &opts.backends {
            if !plugins.iter().any(|p| p == b) {
                return Err(NixlError::BackendUnavailable(b.clone(), plugins));
            }
            let (_mems, params) = agent.get_plugin_params(b).map_err(NixlError::nixl("get plugin params"))?;
            agent.create_backend(b, &params).map_err(NixlError::nixl("create backend"))?;
        }
        tracing::info!(agent = name, backends = ?opts.backends, progress_delay_us = opts.progress_delay_us, "kvbridge: NIXL agent created");
        Ok(Self {
            xfers: HashMap::new(),
            remotes: HashMap::new(),
            local_prepped: None,
            local: None,
            regs: Vec::new(),
            scratch_reg: None,
            made_prepped: 0,
            made_listed: 0,
            next_xfer: 1,
            name: name.to_string(),
            agent,
            cuda,
            scratch: Vec::new(),
        })
    }

    /// The underlying NIXL agent, for calls kvbridge does not wrap (benchmarks use it to
    /// post a hand-made transfer on the same agent). Memory registered or requests made
    /// through it are the caller's to release before this transport is dropped.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The NIXL agent name loaded for `peer` by `add_remote`.
    pub fn remote_agent(&self, peer: &str) -> Option<&str> {
        self.remotes.get(peer).map(|r| r.agent_name.as_str())
    }

    /// Is the runtime loadable here? (Never aborts.)
    pub fn runtime_available(hint: Option<&Path>) -> bool {
        runtime::available(hint)
    }

    fn register_impl(&mut self, layout: &KvLayout) -> Result<(), NixlError> {
        // Re-registration replaces everything.
        self.xfers.clear();
        self.local_prepped = None;
        for r in self.remotes.values_mut() {
            r.prepped = None;
        }
        self.local = None;
        self.regs.clear();
        let mem = layout.regions.first().map(|r| mem_type(r.mem)).unwrap_or(MemType::Dram);
        for r in &layout.regions {
            if r.mem == MemKind::Vram {
                crate::cuda::check_device_pointer(r.base)?;
            }
        }
        for span in merged_spans(layout) {
            let h = self.agent.register_memory(&span, None).map_err(NixlError::nixl("register memory"))?;
            self.regs.push(h);
        }
        self.local = Some(mem);
        // One list per memory kind; regions in another (a GPU engine's host staging buffer,
        // which only peers read) are left to per-request lists.
        let same: Vec<_> = layout.regions.iter().filter(|r| mem_type(r.mem) == mem).cloned().collect();
        self.local_prepped = self.prepare("", &same, mem);
        tracing::info!(
            regions = layout.regions.len(),
            prepared_descs = self.local_prepped.as_ref().map_or(0, |p| p.units.len()),
            "kvbridge: registered KV regions with NIXL"
        );
        Ok(())
    }

    /// Prepare the per-block list of `regions` for `agent` ("": this agent's own memory).
    /// A failure only costs the fast path, so it is logged, not returned.
    fn prepare(&self, agent: &str, regions: &[kvbridge_core::layout::Region], mem: MemType) -> Option<Prepped> {
        let units = Units::new(regions)?;
        Self::prepare_units(&self.agent, agent, units, mem)
    }

    fn prepare_units(nixl: &Agent, agent: &str, units: Units, mem: MemType) -> Option<Prepped> {
        let t0 = std::time::Instant::now();
        let made = units.desc_list(mem).and_then(|l| nixl.prepare_xfer_dlist(agent, &l, None));
        match made {
            Ok(handle) => {
                tracing::debug!(agent, descs = units.len(), ms = t0.elapsed().as_secs_f64() * 1e3, "kvbridge: descriptor list prepared");
                Some(Prepped { units, handle })
            }
            Err(e) => {
                tracing::warn!(agent, error = %e, "kvbridge: cannot prepare a descriptor list; using per-request lists");
                None
            }
        }
    }

    fn add_remote_impl(&mut self, peer: &str, md: &AgentMetadata) -> Result<(), NixlError> {
        if self.remotes.contains_key(peer) {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        // The same agent reached under another key (e.g. another host name): reuse its metadata.
        let loaded = self.remotes.values().any(|r| r.agent_name == md.agent_name);
        let name = if loaded {
            md.agent_name.clone()
        } else {
            // The blob must name the agent the handshake announced before NIXL parses it:
            // nixl-sys panics on a name that is not UTF-8, and a name with a NUL in it would
            // be loaded under one name and reported under another.
            match md_check::checked_agent_name(&md.nixl_md) {
                Ok(n) if n == md.agent_name.as_bytes() => {}
                Ok(n) => {
                    return Err(NixlError::AgentMismatch { want: md.agent_name.clone(), got: String::from_utf8_lossy(n).into_owned() })
                }
                Err(why) => return Err(NixlError::BadMetadata(why)),
            }
            let name = self.agent.load_remote_md(&md.nixl_md).map_err(NixlError::nixl("load remote metadata"))?;
            if name != md.agent_name {
                let _ = self.agent.invalidate_remote_md(&name);
                return Err(NixlError::AgentMismatch { want: md.agent_name.clone(), got: name });
            }
            // Wire the UCX endpoint up now (on the handshake's thread), not inside the first
            // READ's post, where it cost that request ~25 ms here. A failure is not fatal:
            // the first transfer then connects as before.
            let t1 = std::time::Instant::now();
            match self.agent.make_connection(&name, None) {
                Ok(()) => tracing::debug!(peer, ms = t1.elapsed().as_secs_f64() * 1e3, "kvbridge: UCX connection made"),
                Err(e) => tracing::debug!(peer, error = %e, "kvbridge: cannot make the connection ahead; the first transfer will"),
            }
            name
        };
        let mem = md.regions.first().map(|r| mem_type(r.mem)).unwrap_or(MemType::Dram);
        if !loaded {
            self.warm_read(&name, md);
        }
        tracing::debug!(peer, load_ms = t0.elapsed().as_secs_f64() * 1e3, "kvbridge: remote agent loaded");
        // The peer's cache and, when it stages (pull, `kv_staging_blocks`) in the same kind
        // of memory, its staging buffer: reads from either are whole blocks.
        let same_mem = md.staging_regions.iter().all(|r| md.regions.first().is_some_and(|c| c.mem == r.mem));
        let to_prep = if md.staging_regions.is_empty() || !same_mem {
            Units::new(&md.regions)
        } else {
            Units::new(&[md.regions.clone(), md.staging_regions.clone()].concat())
        };
        let staging = md.staging_regions.iter().map(|r| (r.base, r.base.saturating_add(r.span()))).collect();
        // Prepare the peer's per-block list now, on the handshake's thread: every READ,
        // the first included, is then made from indices (a post of ~0.1 ms instead of
        // building thousands of descriptors inside the request's step). With `kv_peers`
        // this happens at start-up, off every request's path.
        let (prepped, to_prep) = match (self.local_prepped.is_some(), to_prep) {
            (true, Some(units)) => (Self::prepare_units(&self.agent, &name, units, mem), None),
            (_, units) => (None, units),
        };
        self.remotes.insert(peer.to_string(), Remote { staging, prepped, to_prep, agent_name: name, owns_md: !loaded, mem });
        Ok(())
    }

    /// Read the start of every one of the peer's regions (host memory on both sides) into
    /// a scratch buffer of ours and wait for it (at most 1 s): UCX sets up each remote
    /// memory region (and picks its protocols) on the first transfer that touches it, which
    /// cost the first request's READ ~20 ms here. Done when the peer is loaded, so no
    /// request pays it. Touches no KV block of ours, and P is not notified. Failures only
    /// cost the warm-up.
    fn warm_read(&mut self, agent_name: &str, md: &AgentMetadata) {
        let regions: Vec<_> = md.regions.iter().filter(|r| r.mem == MemKind::Dram && r.block_len > 0).collect();
        if regions.is_empty() || regions.len() != md.regions.len() || self.local != Some(MemType::Dram) {
            return;
        }
        let slice = (WARM_BYTES / regions.len()).max(1);
        let t0 = std::time::Instant::now();
        if self.scratch_reg.is_none() {
            self.scratch = vec![0u8; WARM_BYTES];
            let span = Span { ptr: self.scratch.as_ptr() as u64, len: WARM_BYTES, mem: MemType::Dram, dev: 0 };
            match self.agent.register_memory(&span, None) {
                Ok(h) => self.scratch_reg = Some(h),
                Err(e) => return tracing::debug!(error = %e, "kvbridge: cannot register the warm-up buffer"),
            }
        }
        let mut bytes = 0;
        let res = (|| -> Result<bool, NixlError> {
            let mut local = XferDescList::new(MemType::Dram).map_err(NixlError::nixl("create descriptor list"))?;
            let mut remote = XferDescList::new(MemType::Dram).map_err(NixlError::nixl("create descriptor list"))?;
            for (i, r) in regions.iter().enumerate() {
                let len = usize::try_from(r.block_len).unwrap_or(slice).min(slice);
                local.add_desc(self.scratch.as_ptr() as usize + i * slice, len, 0);
                remote.add_desc(r.base as usize, len, r.device_id);
                bytes += len;
            }
            let req =
                self.agent.create_xfer_req(XferOp::Read, &local, &remote, agent_name, None).map_err(NixlError::nixl("make transfer"))?;
            self.agent.post_xfer_req(&req, None).map_err(NixlError::nixl("post transfer"))?;
            while t0.elapsed() < std::time::Duration::from_secs(1) {
                if let XferStatus::Success = self.agent.get_xfer_status(&req).map_err(NixlError::nixl("transfer status"))? {
                    return Ok(true);
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            Ok(false)
        })();
        match res {
            Ok(done) => tracing::info!(
                agent_name,
                bytes,
                regions = regions.len(),
                done,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "kvbridge: warm-up read"
            ),
            Err(e) => tracing::debug!(agent_name, error = %e, "kvbridge: warm-up read failed"),
        }
    }

    /// Post a transfer of `pieces` (local ↔ remote), with `notif` (unless empty) delivered
    /// to the peer on completion. NIXL checks every descriptor against the registered memory on both
    /// sides, so a piece outside them is an error, not a stray write.
    fn post(&mut self, op: XferOp, peer: &str, pieces: &[Piece], notif: &[u8]) -> Result<XferId, NixlError> {
        let lmem = self.local.ok_or(NixlError::NotRegistered)?;
        let r = self.remotes.get(peer).ok_or_else(|| NixlError::UnknownRemote(peer.to_string()))?;
        let opt = if notif.is_empty() {
            None
        } else {
            let mut opt = OptArgs::new().map_err(NixlError::nixl("create opt args"))?;
            opt.set_notification_message(notif).map_err(NixlError::nixl("set notification"))?;
            opt.set_has_notification(true).map_err(NixlError::nixl("set notification"))?;
            Some(opt)
        };
        let t_make = std::time::Instant::now();
        let by_index = match (&self.local_prepped, &r.prepped) {
            (Some(l), Some(rp)) => prepped::indices(&l.units, &rp.units, pieces).map(|ix| (l, rp, ix)),
            _ => None,
        };
        let by_index_used = by_index.is_some();
        let req = if let Some((l, rp, (li, ri))) = by_index {
            self.made_prepped += 1;
            self.agent.make_xfer_req(op, &l.handle, &li, &rp.handle, &ri, opt.as_ref()).map_err(NixlError::nixl("make transfer"))?
        } else {
            self.made_listed += 1;
            // Reads from a peer's staging buffer are from its host memory.
            let staged = pieces.first().is_some_and(|p| r.staging.iter().any(|&(a, b)| p.remote >= a && p.remote < b));
            let rmem = if staged { MemType::Dram } else { r.mem };
            let mut local = XferDescList::new(lmem).map_err(NixlError::nixl("create descriptor list"))?;
            let mut remote = XferDescList::new(rmem).map_err(NixlError::nixl("create descriptor list"))?;
            for p in pieces {
                local.add_desc(p.local as usize, p.len as usize, p.local_dev.into());
                remote.add_desc(p.remote as usize, p.len as usize, p.remote_dev.into());
            }
            self.agent.create_xfer_req(op, &local, &remote, &r.agent_name, opt.as_ref()).map_err(NixlError::nixl("make transfer"))?
        };
        let make_us = t_make.elapsed().as_secs_f64() * 1e6;
        self.agent.post_xfer_req(&req, None).map_err(NixlError::nixl("post transfer"))?;
        tracing::debug!(
            descs = pieces.len(),
            prepped = by_index_used,
            make_us,
            total_us = t_make.elapsed().as_secs_f64() * 1e6,
            "kvbridge: NIXL request made and posted"
        );
        let id = self.next_xfer;
        self.next_xfer += 1;
        self.xfers.insert(id, req);
        // First transfer to this peer posted: prepare its list now, while that one moves.
        if self.local_prepped.is_some() {
            if let Some(r) = self.remotes.get_mut(peer) {
                if let Some(units) = r.to_prep.take() {
                    r.prepped = Self::prepare_units(&self.agent, &r.agent_name, units, r.mem);
                }
            }
        }
        Ok(id)
    }

    fn take_notifs_impl(&mut self) -> Result<Vec<Vec<u8>>, NixlError> {
        let mut map = NotificationMap::new().map_err(NixlError::nixl("create notification map"))?;
        self.agent.get_notifications(&mut map, None).map_err(NixlError::nixl("get notifications"))?;
        let mut out = Vec::new();
        let agents: Vec<String> = map.agents().filter_map(|a| a.ok().map(str::to_string)).collect();
        for a in agents {
            let n = map.get_notifications_size(&a).map_err(NixlError::nixl("read notifications"))?;
            for i in 0..n {
                out.push(map.get_notification_bytes(&a, i).map_err(NixlError::nixl("read notification"))?);
            }
        }
        Ok(out)
    }
}

impl Transport for NixlTransport {
    fn agent_name(&self) -> &str {
        &self.name
    }
    fn local_metadata(&mut self) -> Result<Vec<u8>, TransportError> {
        Ok(self.agent.get_local_md().map_err(NixlError::nixl("get local metadata"))?)
    }
    fn register(&mut self, layout: &KvLayout) -> Result<(), TransportError> {
        Ok(self.register_impl(layout)?)
    }
    fn add_remote(&mut self, peer: &str, md: &AgentMetadata) -> Result<(), TransportError> {
        Ok(self.add_remote_impl(peer, md)?)
    }
    fn remove_remote(&mut self, peer: &str) {
        if let Some(mut r) = self.remotes.remove(peer) {
            r.prepped = None; // released before the metadata it refers to
            let still_used = self.remotes.values().any(|o| o.agent_name == r.agent_name);
            if still_used {
                // Hand the metadata's ownership to a remaining entry.
                if r.owns_md {
                    if let Some(o) = self.remotes.values_mut().find(|o| o.agent_name == r.agent_name) {
                        o.owns_md = true;
                    }
                }
                return;
            }
            if let Err(e) = self.agent.invalidate_remote_md(&r.agent_name) {
                tracing::debug!(agent = %r.agent_name, error = %e, "kvbridge: invalidate remote failed");
            }
        }
    }
    fn read(&mut self, peer: &str, pieces: &[Piece], notif: &[u8]) -> Result<XferId, TransportError> {
        Ok(self.post(XferOp::Read, peer, pieces, notif)?)
    }
    fn write(&mut self, peer: &str, pieces: &[Piece], notif: &[u8]) -> Result<XferId, TransportError> {
        Ok(self.post(XferOp::Write, peer, pieces, notif)?)
    }
    fn poll(&mut self, xfer: XferId) -> Result<XferPoll, TransportError> {
        let req = self.xfers.get(&xfer).ok_or(NixlError::UnknownXfer(xfer))?;
        match self.agent.get_xfer_status(req).map_err(NixlError::nixl("transfer status"))? {
            XferStatus::Success => Ok(XferPoll::Done),
            XferStatus::InProgress => Ok(XferPoll::Pending),
        }
    }
    fn release(&mut self, xfer: XferId) {
        self.xfers.remove(&xfer);
    }
    fn notify(&mut self, peer: &str, msg: &[u8]) -> Result<(), TransportError> {
        let r = self.remotes.get(peer).ok_or_else(|| NixlError::UnknownRemote(peer.to_string()))?;
        Ok(self.agent.send_notification(&r.agent_name, msg, None).map_err(NixlError::nixl("send notification"))?)
    }
    fn take_notifs(&mut self) -> Result<Vec<Vec<u8>>, TransportError> {
        Ok(self.take_notifs_impl()?)
    }
    fn copy_device_to_host(&mut self, device_id: u64, copies: &[(u64, u64, u64)], stream: Option<u64>) -> Result<(), TransportError> {
        let ordinal = self.bind_cuda(device_id)?;
        if stream.is_none() {
            // No stream named: the forward may have run on any stream (the legacy stream
            // does not wait for non-blocking ones): wait for the whole context first.
            self.sync_cuda(ordinal)?;
        }
        // On the forward's own stream when named: ordered after its KV writes, and only
        // that stream is waited for (others keep running). Otherwise the legacy stream (0).
        let s = stream.unwrap_or(0) as usize as cudarc::driver::sys::CUstream;
        for &(src, dst, len) in copies {
            // SAFETY: the caller (the staging buffer) checked both ranges: `src..src+len` is
            // in the registered device cache, `dst..dst+len` in its own host allocation, which
            // stays alive and untouched until the synchronise below.
            let host = unsafe { std::slice::from_raw_parts_mut(dst as usize as *mut u8, len as usize) };
            // SAFETY: as above; the context of the cache's device is current and `s` is a
            // stream of it.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(host, src, s) }
                .map_err(|e| NixlError::CudaDevice { ordinal, reason: format!("device→host copy: {e}") })?;
        }
        Ok(sync_stream(s, ordinal)?)
    }
    fn copy_host_to_device(&mut self, device_id: u64, copies: &[(u64, u64, u64)], stream: Option<u64>) -> Result<(), TransportError> {
        let ordinal = self.bind_cuda(device_id)?;
        // The legacy stream (0) when none is named.
        let s = stream.unwrap_or(0) as usize as cudarc::driver::sys::CUstream;
        for &(dst, src, len) in copies {
            // SAFETY: the caller (the host buffer) checked both ranges: `dst..dst+len` is in
            // the registered device cache, `src..src+len` in its own host allocation, which
            // stays untouched until the synchronise below.
            let host = unsafe { std::slice::from_raw_parts(src as usize as *const u8, len as usize) };
            // SAFETY: as above; the context of the cache's device is current.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, s) }
                .map_err(|e| NixlError::CudaDevice { ordinal, reason: format!("host→device copy: {e}") })?;
        }
        // The bytes must be on the device before the engine's next forward reads them: on
        // its stream, wait for that stream only; otherwise for the whole context.
        match stream {
            Some(_) => Ok(sync_stream(s, ordinal)?),
            None => Ok(self.sync_cuda(ordinal)?),
        }
    }
}

/// Wait for the work queued on `stream` (copies included).
fn sync_stream(stream: cudarc::driver::sys::CUstream, ordinal: u32) -> Result<(), NixlError> {
    // SAFETY: `stream` is the engine's stream in the current context.
    unsafe { cudarc::driver::result::stream::synchronize(stream) }
        .map_err(|e| NixlError::CudaDevice { ordinal, reason: format!("synchronize the engine's stream: {e}") })
}

impl NixlTransport {
    /// Wait for everything queued on this agent's CUDA context, on every stream.
    fn sync_cuda(&self, ordinal: u32) -> Result<(), NixlError> {
        let ctx = self.cuda.as_ref().ok_or(NixlError::CudaUnavailable)?;
        ctx.synchronize().map_err(|e| NixlError::CudaDevice { ordinal, reason: format!("synchronize: {e}") })
    }

    /// Make this agent's CUDA context (bound at start-up) current on the calling thread,
    /// checking that it is `device_id`'s. Returns the device ordinal.
    fn bind_cuda(&self, device_id: u64) -> Result<u32, NixlError> {
        let ctx = self.cuda.as_ref().ok_or(NixlError::CudaUnavailable)?;
        let ordinal = ctx.ordinal() as u32;
        if u64::from(ordinal) != device_id {
            return Err(NixlError::CudaDevice {
                ordinal: u32::try_from(device_id).unwrap_or(u32::MAX),
                reason: format!("the cache is on device {device_id}, this agent's context on device {ordinal}"),
            });
        }
        ctx.bind_to_thread().map_err(|e| NixlError::CudaDevice { ordinal, reason: e.to_string() })?;
        Ok(ordinal)
    }
}
