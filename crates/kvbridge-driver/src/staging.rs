//! P-side staging (pull mode, `kv_staging_blocks`): connector-owned DRAM with the KV
//! cache's geometry, into which a finished prefill's blocks are copied at the end of the
//! step that computed them. vLLM then frees P's own blocks at once (no `delay_free`), so
//! P's engine goes idle instead of stepping until D has read; D reads the slots instead.
//!
//! The buffer mirrors the cache region by region: each region gets a staging region with
//! the same block length, stride and intra-block layout (so D's transfer plan for it is the
//! one it builds for the cache), holding `slots + 1` logical blocks (slot 0 is never used).
//! Views of one buffer interleaved block by block (vLLM's CPU K and V parts) share one
//! staging buffer and are copied together, one range per block.
//!
//! The same buffer, made with [`StagingBuffer::mirror`], is the host buffer of
//! `kv_buffer_device="cpu"` (`ConnectorConfig::host_buffer`): one slot per cache block, slot
//! = block id, registered with NIXL *instead of* the cache. P copies a finished prefill's
//! blocks into it ([`copies`](StagingBuffer::copies)); D reads into its own and copies the
//! blocks it read back into its cache (the same [`copies`](StagingBuffer::copies), the other way).
//!
//! The staging memory is always host DRAM. DRAM caches are copied with `memcpy`; GPU caches
//! (VRAM, one device) are copied device→host by the transport
//! (`Transport::copy_device_to_host`), and D then reads host memory (UCX
//! moves it into D's VRAM itself).
use std::alloc::Layout;

use kvbridge_core::error::Error;
use kvbridge_core::layout::{block_groups, KvLayout, MemKind, Region};
use kvbridge_core::wire::StageReq;

/// Staging memory alignment (pages; NIXL and memcpy both like it).
const ALIGN: usize = 4096;

/// Zeroed, page-aligned heap memory, freed on drop.
pub(crate) struct Buf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: plain heap memory owned by this value; every access goes through raw copies
// whose ranges are checked against `layout.size()` (see `StagingBuffer::copy`).
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    pub(crate) fn new(len: usize) -> Result<Self, Error> {
        let layout = Layout::from_size_align(len.max(1), ALIGN).map_err(|e| Error::Other(format!("staging buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::Other(format!("cannot allocate a {len}-byte staging buffer (kv_staging_blocks too large?)")));
        }
        Ok(Self { ptr, layout })
    }
}

impl Buf {
    /// Address of the first byte.
    pub(crate) fn addr(&self) -> u64 {
        self.ptr as u64
    }
    /// Bytes held.
    pub(crate) fn len(&self) -> u64 {
        self.layout.size() as u64
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Cache regions that share a buffer, copied as one range per kernel block.
struct Group {
    /// The lowest region base (the copy's source start for kernel block 0).
    base: u64,
    stride: u64,
    /// Bytes copied per kernel block: from `base` to the furthest region's block end.
    footprint: u64,
    /// Kernel blocks in the cache.
    blocks: u64,
    buf: Buf,
}

/// The staging memory of one worker.
pub struct StagingBuffer {
    /// Where the cache lives (the copies' source): DRAM, or VRAM of `device`.
    pub source: MemKind,
    /// The cache's device id: the CUDA device when `source` is VRAM.
    pub device: u64,
    groups: Vec<Group>,
    /// One per cache region, in the cache layout's order (advertised as `staging_regions`).
    pub regions: Vec<Region>,
    slots: u32,
    /// The lowest slot handed out: 1 for staging (slot 0 unused), 0 for a mirror.
    first_slot: u32,
    blocks_per_logical: u64,
}

impl std::fmt::Debug for StagingBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingBuffer").field("slots", &self.slots).field("bytes", &self.bytes()).finish()
    }
}

impl StagingBuffer {
    /// Staging for `slots` logical blocks of `layout` (DRAM caches, one KV cache group).
    pub fn new(layout: &KvLayout, slots: u32) -> Result<Self, Error> {
        Self::with_slots(layout, slots, 1, "kv_staging_blocks")
    }

    /// A host mirror of the whole cache (the host buffer of `kv_buffer_device="cpu"`): block
    /// `b` of the cache is slot `b` of the mirror, block 0 included.
    pub fn mirror(layout: &KvLayout) -> Result<Self, Error> {
        let logical = layout.regions.iter().map(|r| r.num_blocks).min().unwrap_or(0) / u64::from(layout.blocks_per_logical.max(1));
        let slots = u32::try_from(logical.saturating_sub(1))
            .map_err(|_| Error::Other(format!("host buffer: {logical} blocks exceed the block id range")))?;
        Self::with_slots(layout, slots, 0, "the host buffer (kv_buffer_device=cpu)")
    }

    /// `what` names the feature in errors.
    fn with_slots(layout: &KvLayout, slots: u32, first_slot: u32, what: &str) -> Result<Self, Error> {
        let (mem, device) = layout.regions.first().map(|r| (r.mem, r.device_id)).unwrap_or((MemKind::Dram, 0));
        if let Some(r) = layout.regions.iter().find(|r| r.mem != mem || r.device_id != device) {
            return Err(Error::Other(format!(
                "{what} needs every KV cache region in one memory (DRAM, or VRAM of one device); region {} is {:?} on device {}",
                r.name, r.mem, r.device_id
            )));
        }
        if let Some(r) = layout.regions.iter().find(|r| r.group != 0) {
            return Err(Error::Other(format!(
                "{what} supports one KV cache group; region {} is in group {} (turn it off)",
                r.name, r.group
            )));
        }
        let bpl = u64::from(layout.blocks_per_logical.max(1));
        let kernel_blocks = (u64::from(slots) + 1) * bpl;
        // Views of one buffer interleaved within each block share a staging buffer.
        let (spans, group_of) = block_groups(&layout.regions)
            .ok_or_else(|| Error::Other(format!("{what}: a region's block length is 0 or exceeds its stride")))?;
        let mut groups = Vec::with_capacity(spans.len());
        for g in spans {
            let len =
                (kernel_blocks - 1).checked_mul(g.stride).and_then(|x| x.checked_add(g.footprint)).and_then(|x| usize::try_from(x).ok());
            let len = len.ok_or_else(|| Error::Other(format!("{what}: buffer size overflows")))?;
            groups.push(Group { base: g.base, stride: g.stride, footprint: g.footprint, blocks: g.num_blocks, buf: Buf::new(len)? });
        }
        let regions = layout
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let g = &groups[group_of[i]];
                // Host memory whatever the cache's: device id 0 is NIXL's for DRAM.
                Region {
                    base: g.buf.ptr as u64 + (r.base - g.base),
                    num_blocks: kernel_blocks,
                    mem: MemKind::Dram,
                    device_id: 0,
                    ..r.clone()
                }
            })
            .collect();
        Ok(Self { source: mem, device, groups, regions, slots, first_slot, blocks_per_logical: bpl })
    }

    /// Total staging bytes.
    pub fn bytes(&self) -> u64 {
        self.groups.iter().map(|g| g.buf.layout.size() as u64).sum()
    }

    /// The highest slot id: slots `1..=slots` for staging, `0..=slots` for a mirror.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The copies that stage `s` (`s.block_ids[i]` into slot `s.slots[i]`, every region), as
    /// `(cache address, staging address, bytes)`, checked first.
    ///
    /// The cache memory is the engine's, registered by it and live while it is; block ids
    /// and slots are checked against both sides' sizes, so an id out of range is an error,
    /// never a stray copy.
    pub fn copies(&self, s: &StageReq) -> Result<Vec<(u64, u64, u64)>, Error> {
        if s.block_ids.len() != s.slots.len() {
            return Err(Error::Other(format!("request {}: {} blocks for {} staging slots", s.req_id, s.block_ids.len(), s.slots.len())));
        }
        let bpl = self.blocks_per_logical;
        for (&b, &slot) in s.block_ids.iter().zip(&s.slots) {
            if slot < self.first_slot || slot > self.slots {
                return Err(Error::Other(format!("request {}: staging slot {slot} out of {}..={}", s.req_id, self.first_slot, self.slots)));
            }
            if let Some(g) = self.groups.iter().find(|g| (u64::from(b) + 1) * bpl > g.blocks) {
                return Err(Error::Other(format!("request {}: block {b} out of range ({} kernel blocks)", s.req_id, g.blocks)));
            }
        }
        let mut out = Vec::with_capacity(self.groups.len() * s.block_ids.len());
        for g in &self.groups {
            let len = (bpl - 1) * g.stride + g.footprint;
            for (&b, &slot) in s.block_ids.iter().zip(&s.slots) {
                let dst_off = u64::from(slot) * bpl * g.stride;
                debug_assert!(dst_off + len <= g.buf.layout.size() as u64);
                out.push((g.base + u64::from(b) * bpl * g.stride, g.buf.ptr as u64 + dst_off, len));
            }
        }
        Ok(out)
    }

    /// Stage a DRAM cache's blocks with `memcpy`. Returns the bytes copied. (A VRAM cache's
    /// [`copies`](Self::copies) go to the transport instead.)
    pub fn copy(&self, s: &StageReq) -> Result<u64, Error> {
        self.memcpy(s, false)
    }

    /// Copy slots back into a DRAM cache's blocks with `memcpy` (D's host buffer, after a
    /// read). Returns the bytes copied.
    pub fn restore(&self, s: &StageReq) -> Result<u64, Error> {
        self.memcpy(s, true)
    }

    fn memcpy(&self, s: &StageReq, back: bool) -> Result<u64, Error> {
        if self.source != MemKind::Dram {
            return Err(Error::Other("a GPU cache is copied to and from host memory by the transport (CUDA)".into()));
        }
        let mut bytes = 0;
        for (cache, staging, len) in self.copies(s)? {
            let (src, dst) = if back { (staging, cache) } else { (cache, staging) };
            // SAFETY: `copies` checked both ranges: the cache range lies in the registered
            // cache (block < blocks, footprint within the regions' block ends), the staging
            // range in this buffer (slot <= slots); the two never overlap.
            unsafe { std::ptr::copy_nonoverlapping(src as usize as *const u8, dst as usize as *mut u8, len as usize) };
            bytes += len;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvbridge_core::testkit::{Cache, CacheLayout, Spec};

    fn spec(layout: CacheLayout) -> Spec {
        Spec::dense(2, 2, 16, 4, 8, layout)
    }

    #[test]
    fn staged_blocks_hold_the_cache_bytes_at_the_mirrored_addresses() {
        for layout in [CacheLayout::Hnd, CacheLayout::KvSplitNhd, CacheLayout::CpuVec] {
            let mut cache = Cache::new(spec(layout));
            let blocks = vec![vec![5, 2, 7]];
            cache.fill(&blocks, 10);
            let kv = cache.layout();
            let st = StagingBuffer::new(&kv, 4).expect("staging");
            assert_eq!(st.regions.len(), kv.regions.len());
            st.copy(&StageReq { req_id: "r".into(), block_ids: vec![5, 2, 7], slots: vec![3, 1, 4] }).expect("copy");
            for (r, s) in kv.regions.iter().zip(&st.regions) {
                assert_eq!((s.block_len, s.block_stride, s.num_blocks), (r.block_len, r.block_stride, 5));
                for (b, slot) in [(5u64, 3u64), (2, 1), (7, 4)] {
                    // SAFETY: both ranges are inside live buffers (the cache and the staging).
                    let (a, z) = unsafe {
                        (
                            std::slice::from_raw_parts(r.block_addr(b) as usize as *const u8, r.block_len as usize),
                            std::slice::from_raw_parts(s.block_addr(slot) as usize as *const u8, s.block_len as usize),
                        )
                    };
                    assert_eq!(a, z, "{layout:?} region {} block {b} → slot {slot}", r.name);
                }
            }
        }
    }

    #[test]
    fn a_mirror_round_trips_blocks_at_their_own_ids() {
        for layout in [CacheLayout::Hnd, CacheLayout::KvSplitNhd, CacheLayout::CpuVec] {
            let mut cache = Cache::new(spec(layout));
            let blocks = vec![vec![0, 3, 7]];
            cache.fill(&blocks, 10);
            let kv = cache.layout();
            let m = StagingBuffer::mirror(&kv).expect("mirror");
            for (r, s) in kv.regions.iter().zip(&m.regions) {
                assert_eq!((s.num_blocks, s.block_len, s.block_stride), (r.num_blocks, r.block_len, r.block_stride), "{layout:?}");
            }
            let req = StageReq { req_id: "r".into(), block_ids: vec![0, 3, 7], slots: vec![0, 3, 7] };
            m.copy(&req).expect("to the mirror");
            cache.reset(); // the cache forgets; the mirror keeps the copy
            assert!(cache.check(&blocks, 10).is_err());
            m.restore(&req).expect("back to the cache");
            cache.check(&blocks, 10).unwrap_or_else(|e| panic!("{layout:?}: {e}"));
            let past = StageReq { req_id: "r".into(), block_ids: vec![8], slots: vec![8] };
            assert!(m.restore(&past).is_err(), "a block past the cache is an error");
        }
    }

    #[test]
    fn bad_ids_are_errors_not_copies() {
        let cache = Cache::new(spec(CacheLayout::Hnd));
        let st = StagingBuffer::new(&cache.layout(), 2).expect("staging");
        let req = |b: Vec<u32>, s: Vec<u32>| StageReq { req_id: "r".into(), block_ids: b, slots: s };
        assert!(st.copy(&req(vec![8], vec![1])).is_err(), "block past the cache");
        assert!(st.copy(&req(vec![1], vec![0])).is_err(), "slot 0");
        assert!(st.copy(&req(vec![1], vec![3])).is_err(), "slot past the pool");
        assert!(st.copy(&req(vec![1, 2], vec![1])).is_err(), "length mismatch");
        assert!(st.copy(&req(vec![1], vec![2])).is_ok());
    }

    #[test]
    fn gpu_caches_stage_to_host_through_planned_copies() {
        // A VRAM cache (addresses only: nothing is copied here) gets host staging regions
        // and a list of device→host copies; a cache split over two devices is refused.
        let cache = Cache::new(spec(CacheLayout::KvSplitNhd));
        let mut kv = cache.layout();
        for r in &mut kv.regions {
            r.mem = MemKind::Vram;
            r.device_id = 1;
        }
        let st = StagingBuffer::new(&kv, 3).expect("staging for a GPU cache");
        assert_eq!((st.source, st.device), (MemKind::Vram, 1));
        assert!(st.regions.iter().all(|r| r.mem == MemKind::Dram && r.device_id == 0), "staging is host memory");
        let req = StageReq { req_id: "r".into(), block_ids: vec![6, 1], slots: vec![2, 3] };
        let copies = st.copies(&req).expect("copies");
        assert_eq!(copies.len(), kv.regions.len() * 2, "one range per region (K and V apart) and block");
        for (r, s) in kv.regions.iter().zip(&st.regions) {
            assert!(copies.contains(&(r.block_addr(6), s.block_addr(2), r.block_len)));
            assert!(copies.contains(&(r.block_addr(1), s.block_addr(3), r.block_len)));
        }
        assert!(st.copy(&req).is_err(), "no memcpy from device memory");
        kv.regions[0].device_id = 0;
        assert!(StagingBuffer::new(&kv, 3).is_err(), "two devices");
    }
}
