//! A pre-parse check of a peer's NIXL agent metadata blob, so that NIXL never sees bytes it
//! would crash on or mishandle (found by `tests/metadata_fuzz.rs`).

/// Reads a peer's NIXL 1.5.1 agent metadata (`nixlSerDes|`, then fields: tag, native-endian
/// u64 length, value, `|`) and returns the agent name it carries. Refuses, before NIXL sees
/// it, what NIXL would crash on or mishandle: broken framing; a memory type other than DRAM
/// or VRAM (NIXL indexes an array with it unchecked: a segfault in
/// `nixlMemSection::emplace`); an empty descriptor list (NIXL refuses it only after loading
/// the peer's connection, which it then keeps, so the agent could never be loaded again).
/// The backend's bytes (UCX worker address, rkeys) stay opaque. Found by
/// `tests/metadata_fuzz.rs`.
pub(crate) fn checked_agent_name(md: &[u8]) -> Result<&[u8], &'static str> {
    struct Fields<'a>(&'a [u8]);
    impl<'a> Fields<'a> {
        fn next(&mut self, tag: &[u8]) -> Result<&'a [u8], &'static str> {
            let rest = self.0.strip_prefix(tag).ok_or("unexpected field")?;
            let len = rest.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes).ok_or("truncated")?;
            let end = usize::try_from(len).ok().and_then(|l| l.checked_add(8)).ok_or("bad length")?;
            if rest.get(end) != Some(&b'|') {
                return Err("bad length");
            }
            self.0 = &rest[end + 1..];
            Ok(&rest[8..end])
        }
        fn count(&mut self, tag: &[u8]) -> Result<u64, &'static str> {
            self.next(tag)?.try_into().map(u64::from_ne_bytes).map_err(|_| "bad count")
        }
    }
    let mut f = Fields(md.strip_prefix(b"nixlSerDes|").ok_or("not NIXL metadata")?);
    let name = f.next(b"Agent")?;
    // Each loop below consumes bytes, so a huge count ends at the end of the blob.
    for _ in 0..f.count(b"Conns")? {
        f.next(b"t")?;
        f.next(b"c")?;
    }
    if f.next(b"")? != b"MemSection" {
        return Err("no memory section");
    }
    for _ in 0..f.count(b"nixlSecElms")? {
        f.next(b"bknd")?;
        if f.next(b"nixlDList")? != b"nixlSDList" {
            return Err("bad descriptor list");
        }
        let mem = f.next(b"t")?.try_into().map(u32::from_ne_bytes).map_err(|_| "bad memory type")?;
        if mem > 1 {
            return Err("memory type neither DRAM nor VRAM");
        }
        let descs = f.count(b"n")?;
        if descs == 0 {
            return Err("empty descriptor list");
        }
        for _ in 0..descs {
            f.next(b"")?;
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::checked_agent_name;

    fn field(out: &mut Vec<u8>, tag: &[u8], v: &[u8]) {
        out.extend_from_slice(tag);
        out.extend_from_slice(&(v.len() as u64).to_ne_bytes());
        out.extend_from_slice(v);
        out.push(b'|');
    }

    /// A blob in NIXL 1.5.1's layout: one connection, one section of `descs` descriptors
    /// of memory type `mem`.
    fn blob(name: &[u8], mem: u32, descs: u64) -> Vec<u8> {
        let mut b = b"nixlSerDes|".to_vec();
        field(&mut b, b"Agent", name);
        field(&mut b, b"Conns", &1u64.to_ne_bytes());
        field(&mut b, b"t", b"UCX");
        field(&mut b, b"c", b"opaque worker address");
        field(&mut b, b"", b"MemSection");
        field(&mut b, b"nixlSecElms", &1u64.to_ne_bytes());
        field(&mut b, b"bknd", b"UCX");
        field(&mut b, b"nixlDList", b"nixlSDList");
        field(&mut b, b"t", &mem.to_ne_bytes());
        field(&mut b, b"n", &descs.to_ne_bytes());
        for _ in 0..descs {
            field(&mut b, b"", b"addr len dev rkey");
        }
        b
    }

    #[test]
    fn a_well_formed_blob_gives_its_agent_name() {
        assert_eq!(checked_agent_name(&blob(b"p0", 0, 2)), Ok(&b"p0"[..]));
        assert_eq!(checked_agent_name(&blob(b"p\xff", 1, 1)), Ok(&b"p\xff"[..]));
    }

    #[test]
    fn what_nixl_would_crash_on_is_refused() {
        assert_eq!(checked_agent_name(&blob(b"p0", 2, 1)), Err("memory type neither DRAM nor VRAM"));
        assert_eq!(checked_agent_name(&blob(b"p0", 0, 0)), Err("empty descriptor list"));
        assert_eq!(checked_agent_name(b"garbage"), Err("not NIXL metadata"));
        let good = blob(b"p0", 0, 2);
        for cut in 11..good.len() {
            assert!(checked_agent_name(&good[..cut]).is_err(), "truncated at {cut} must be refused");
        }
        let mut huge = good.clone();
        // Inflate the agent name's length past the end of the blob.
        huge[16..24].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(checked_agent_name(&huge), Err("bad length"));
    }
}
