//! Test-only fault injection (cargo feature `fault-inject`, which release wheels are built
//! without): corrupts D's landing area just before the `kv_integrity` check, as a bug in a
//! transfer would, so tests can show the check catches it.
//!
//! With `KVBRIDGE_TEST_FAULT_DIR` set, each check looks for a file `next` there holding
//! `<kind> <block index>`; the first check to find it takes it (renames it) and applies it
//! to its load's blocks (index into the load's blocks, in prompt order), then appends
//! `<request> <kind> <index> <blocks>` to `injected`. Kinds:
//! - `garbage`: the block's bytes replaced with pseudo-random ones;
//! - `swap`: the block and the next one exchanged;
//! - `stale`: the block holds a block of an earlier request (the first block of the last
//!   load checked before this one);
//! - `shift`: the blocks from the index on landed one block late (each holds its
//!   predecessor's bytes; the index keeps what it held).
use std::io::Write;

use kvbridge_core::layout::{KvLayout, MemKind};

/// The bytes of an earlier load's first block, for `stale`.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    last: Option<Vec<u8>>,
}

/// The byte ranges of logical block `b` in every region, or None when out of range.
fn ranges(l: &KvLayout, b: u32) -> Option<Vec<(u64, usize)>> {
    let bpl = u64::from(l.blocks_per_logical.max(1));
    let first = u64::from(b) * bpl;
    let mut out = Vec::new();
    for r in &l.regions {
        if r.mem != MemKind::Dram || first + bpl > r.num_blocks {
            return None;
        }
        out.extend((first..first + bpl).map(|k| (r.block_addr(k), r.block_len as usize)));
    }
    Some(out)
}

fn read(l: &KvLayout, b: u32) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    for (a, n) in ranges(l, b)? {
        // SAFETY: a checked DRAM block of the registered cache (see `ranges`).
        v.extend_from_slice(unsafe { std::slice::from_raw_parts(a as usize as *const u8, n) });
    }
    Some(v)
}

fn write(l: &KvLayout, b: u32, bytes: &[u8]) -> Option<()> {
    let mut off = 0;
    for (a, n) in ranges(l, b)? {
        let src = bytes.get(off..off + n)?;
        // SAFETY: a checked DRAM block of the registered cache (see `ranges`); the engine
        // does not touch a loading block until the load is reported.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), a as usize as *mut u8, n) };
        off += n;
    }
    Some(())
}

impl Faults {
    /// Apply the pending fault, if any, to `blocks` (a load of `req`).
    pub(crate) fn inject(&mut self, l: &KvLayout, req: &str, blocks: &[u32]) {
        let Some(dir) = std::env::var_os("KVBRIDGE_TEST_FAULT_DIR").map(std::path::PathBuf::from) else { return };
        let earlier = blocks.first().and_then(|&b| read(l, b));
        let next = dir.join("next");
        let taken = dir.join(format!("taken-{}", std::process::id()));
        if std::fs::rename(&next, &taken).is_ok() {
            let spec = std::fs::read_to_string(&taken).unwrap_or_default();
            let mut it = spec.split_whitespace();
            let (kind, i) = (it.next().unwrap_or(""), it.next().and_then(|s| s.parse::<usize>().ok()).unwrap_or(0));
            let done = self.apply(l, kind, i, blocks);
            tracing::warn!(request_id = %req, kind, index = i, applied = done.is_some(), "kvbridge: TEST FAULT injected into a landed block");
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("injected")) {
                let _ = writeln!(f, "{req} {kind} {i} {} {}", blocks.len(), if done.is_some() { "applied" } else { "skipped" });
            }
        }
        if earlier.is_some() {
            self.last = earlier;
        }
    }

    fn apply(&self, l: &KvLayout, kind: &str, i: usize, blocks: &[u32]) -> Option<()> {
        let b = *blocks.get(i)?;
        match kind {
            "garbage" => {
                let n = read(l, b)?.len();
                let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(b);
                let junk: Vec<u8> = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                write(l, b, &junk)
            }
            "swap" => {
                let c = *blocks.get(i + 1)?;
                let (x, y) = (read(l, b)?, read(l, c)?);
                write(l, b, &y)?;
                write(l, c, &x)
            }
            "stale" => write(l, b, self.last.as_deref()?),
            "shift" => {
                blocks.get(i + 1)?;
                for k in (i + 1..blocks.len()).rev() {
                    let prev = read(l, *blocks.get(k - 1)?)?;
                    write(l, *blocks.get(k)?, &prev)?;
                }
                Some(())
            }
            _ => None,
        }
    }
}
