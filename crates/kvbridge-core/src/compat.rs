//! The compatibility check both sides of a handshake make first: a hash of the facts P
//! and D must share ([`compat_hash`]), and, when it differs, which facts do
//! ([`describe_mismatch`]).
use sha2::{Digest, Sha256};

use crate::config::{CompatInfo, TransferMode};
use crate::wire::{KVBRIDGE_VERSION, WIRE_VERSION};

/// Compatibility hash: sha256 over the wire version, kvbridge version, transfer mode and
/// the model/cache facts. Compared before anything else in a handshake.
pub fn compat_hash(info: &CompatInfo, mode: TransferMode) -> String {
    let mut h = Sha256::new();
    h.update(format!("kvbridge/{KVBRIDGE_VERSION}/wire{WIRE_VERSION}/{}\n", mode.as_str()));
    // Block sizes may differ between P and D (the transfer plan maps them), so they are
    // not part of the hash. serde_json of a struct is field-ordered, so this is canonical.
    let info = CompatInfo { block_size: 0, ..info.clone() };
    h.update(serde_json::to_vec(&info).unwrap_or_default());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Fields that differ between two engines' compatibility facts (block size excluded:
/// the plan maps different block sizes), as `field: local vs remote`.
pub fn compat_diff(local: &CompatInfo, remote: &CompatInfo) -> Vec<String> {
    let a = serde_json::to_value(CompatInfo { block_size: 0, ..local.clone() }).unwrap_or_default();
    let b = serde_json::to_value(CompatInfo { block_size: 0, ..remote.clone() }).unwrap_or_default();
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return Vec::new() };
    a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).map(|(k, v)| format!("{k}: {v} vs {}", b.get(k).cloned().unwrap_or_default())).collect()
}

/// Explain a hash mismatch: the differing compat fields, kvbridge versions and modes.
pub fn describe_mismatch(
    local: &CompatInfo,
    local_mode: &str,
    remote: Option<&CompatInfo>,
    remote_version: &str,
    remote_mode: &str,
) -> String {
    let mut d = Vec::new();
    if !remote_version.is_empty() && remote_version != KVBRIDGE_VERSION {
        d.push(format!("kvbridge_version: {KVBRIDGE_VERSION:?} vs {remote_version:?}"));
    }
    if !remote_mode.is_empty() && remote_mode != local_mode {
        d.push(format!("transfer_mode: {local_mode:?} vs {remote_mode:?}"));
    }
    match remote {
        Some(r) => d.extend(compat_diff(local, r)),
        None => d.push("the peer did not say which fields (older kvbridge?)".into()),
    }
    if d.is_empty() {
        d.push("wire version".into());
    }
    format!("differing fields (local vs remote): {}", d.join("; "))
}
