//! `kv_transfer_params`: the per-request dict the proxy passes through vLLM's OpenAI API.
//! Everything here is user/peer controlled, so every field is checked and a bad one is a
//! typed [`ParamsError`], never a panic.
// Peer and user data is decoded here: no indexing that could panic on it.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ParamsError;

/// Where a decode engine finds a request's prefilled KV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemotePrefill {
    /// The prefill engine's id.
    pub remote_engine_id: String,
    /// P's id for the request (its blocks are held under it).
    pub remote_request_id: String,
    /// P's block ids (or staging slots, with `remote_staged`), per KV-cache group: a
    /// full-attention group's cover the whole prompt, a sliding-window group's its last
    /// blocks (those inside the window).
    pub remote_block_ids: Vec<Vec<u32>>,
    /// The prefill engine's side-channel host.
    pub remote_host: String,
    /// P's base side-channel port; rank q listens at `remote_port + q`.
    pub remote_port: u16,
    /// The prefill engine's TP size (default 1).
    pub tp_size: u32,
    /// Tokens the prefill engine computed; informational.
    pub remote_num_tokens: Option<u64>,
    /// The prefill engine's incarnation (`remote_epoch`; 0: not sent).
    pub remote_epoch: u64,
    /// P's lease expiry on P's clock (`remote_blocks_expiry_time`; 0: not sent).
    pub remote_expiry_unix: f64,
    /// `remote_block_ids` name slots of P's staging buffer (`remote_staged`), not blocks
    /// of its KV cache: P copied the KV there and already freed its own blocks.
    pub remote_staged: bool,
}

/// Push mode, sent to D: the prefill engine to register D's blocks with. D learns it up
/// front (from the proxy), so registration and prefill overlap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushPrefill {
    /// The prefill engine's id.
    pub remote_engine_id: String,
    /// The prefill engine's side-channel host.
    pub remote_host: String,
    /// P's base side-channel port (its TP rank 0).
    pub remote_port: u16,
    /// The prefill engine's TP size (default 1).
    pub tp_size: u32,
    /// Shared by the proxy's P and D legs; empty: match on the base request id.
    pub transfer_id: String,
}

/// Longest transfer id accepted.
pub const MAX_TRANSFER_ID: usize = 256;

/// What a request asks of the connector.
#[derive(Debug, Clone, PartialEq)]
pub enum KvParams {
    /// No P/D: an ordinary request.
    None,
    /// Sent to P: compute the prefill and hold the KV for a remote decode.
    RemoteDecode,
    /// Sent to D: load the KV from a remote prefill.
    RemotePrefill(RemotePrefill),
    /// Sent to D (`"transfer_mode": "push"`): register blocks with P, which writes them.
    PushPrefill(PushPrefill),
}

/// The `kv_transfer_params` keys the parser reads (each at most once per parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `do_remote_prefill`.
    DoRemotePrefill,
    /// `do_remote_decode`.
    DoRemoteDecode,
    /// `transfer_mode`.
    TransferMode,
    /// `remote_engine_id`.
    RemoteEngineId,
    /// `remote_request_id`.
    RemoteRequestId,
    /// `remote_block_ids`.
    RemoteBlockIds,
    /// `remote_host`.
    RemoteHost,
    /// `remote_port`.
    RemotePort,
    /// `tp_size`.
    TpSize,
    /// `remote_num_tokens`.
    RemoteNumTokens,
    /// `remote_epoch`.
    RemoteEpoch,
    /// `remote_blocks_expiry_time`.
    RemoteBlocksExpiryTime,
    /// `remote_staged`.
    RemoteStaged,
    /// `transfer_id`.
    TransferId,
}

impl Field {
    /// Every field, in declaration order (`ALL[f as usize] == f`).
    pub const ALL: [Field; 14] = [
        Self::DoRemotePrefill,
        Self::DoRemoteDecode,
        Self::TransferMode,
        Self::RemoteEngineId,
        Self::RemoteRequestId,
        Self::RemoteBlockIds,
        Self::RemoteHost,
        Self::RemotePort,
        Self::TpSize,
        Self::RemoteNumTokens,
        Self::RemoteEpoch,
        Self::RemoteBlocksExpiryTime,
        Self::RemoteStaged,
        Self::TransferId,
    ];

    /// The key's name in the params object.
    pub const fn name(self) -> &'static str {
        match self {
            Self::DoRemotePrefill => "do_remote_prefill",
            Self::DoRemoteDecode => "do_remote_decode",
            Self::TransferMode => "transfer_mode",
            Self::RemoteEngineId => "remote_engine_id",
            Self::RemoteRequestId => "remote_request_id",
            Self::RemoteBlockIds => "remote_block_ids",
            Self::RemoteHost => "remote_host",
            Self::RemotePort => "remote_port",
            Self::TpSize => "tp_size",
            Self::RemoteNumTokens => "remote_num_tokens",
            Self::RemoteEpoch => "remote_epoch",
            Self::RemoteBlocksExpiryTime => "remote_blocks_expiry_time",
            Self::RemoteStaged => "remote_staged",
            Self::TransferId => "transfer_id",
        }
    }
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn flag(v: Option<Value>, field: &'static str) -> Result<bool, ParamsError> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(v) => Err(ParamsError::WrongType { field, expected: "a boolean", got: type_name(&v) }),
    }
}

fn req(v: Option<Value>, field: &'static str) -> Result<Value, ParamsError> {
    match v {
        None | Some(Value::Null) => Err(ParamsError::MissingField(field)),
        Some(v) => Ok(v),
    }
}

fn string(v: Option<Value>, field: &'static str) -> Result<String, ParamsError> {
    match req(v, field)? {
        Value::String(s) if !s.is_empty() => Ok(s),
        Value::String(_) => Err(ParamsError::WrongType { field, expected: "a non-empty string", got: "\"\"".into() }),
        v => Err(ParamsError::WrongType { field, expected: "a string", got: type_name(&v) }),
    }
}

fn uint(v: &Value, field: &'static str, max: u64) -> Result<u64, ParamsError> {
    match v.as_u64() {
        Some(n) if n <= max => Ok(n),
        _ => Err(ParamsError::WrongType { field, expected: "a non-negative integer in range", got: type_name(v) }),
    }
}

/// KV-cache groups a request may name (vLLM's hybrid allocator makes a few).
pub const MAX_KV_GROUPS: usize = 16;

/// Block ids per KV-cache group (vLLM's list of lists), or a flat list (one group).
fn block_ids(v: &Value) -> Result<Vec<Vec<u32>>, ParamsError> {
    const F: &str = "remote_block_ids";
    let arr = v.as_array().ok_or_else(|| ParamsError::WrongType { field: F, expected: "a list of block ids", got: type_name(v) })?;
    let ids = |flat: &Vec<Value>| flat.iter().map(|b| uint(b, F, u64::from(u32::MAX)).map(|n| n as u32)).collect::<Result<Vec<u32>, _>>();
    match arr.first() {
        Some(Value::Array(_)) => {
            if arr.len() > MAX_KV_GROUPS {
                return Err(ParamsError::Invalid(format!("remote_block_ids has {} KV cache groups; at most {MAX_KV_GROUPS}", arr.len())));
            }
            arr.iter()
                .map(|g| match g {
                    Value::Array(flat) => ids(flat),
                    other => {
                        Err(ParamsError::WrongType { field: F, expected: "a list of block ids per KV cache group", got: type_name(other) })
                    }
                })
                .collect()
        }
        _ => Ok(vec![ids(arr)?]),
    }
}

/// P's side-channel address and TP size: `remote_host`, `remote_port`, `tp_size` (default 1).
fn peer(get: &mut impl FnMut(Field) -> Option<Value>) -> Result<(String, u16, u32), ParamsError> {
    let remote_host = string(get(Field::RemoteHost), "remote_host")?;
    if !valid_host(&remote_host) {
        return Err(ParamsError::BadHost(remote_host));
    }
    let remote_port = uint(&req(get(Field::RemotePort), "remote_port")?, "remote_port", 65535)? as u16;
    if remote_port == 0 {
        return Err(ParamsError::Invalid("remote_port must be 1..=65535".into()));
    }
    let tp_size = match get(Field::TpSize) {
        None | Some(Value::Null) => 1,
        Some(v) => uint(&v, "tp_size", 4096)? as u32,
    };
    if tp_size == 0 {
        return Err(ParamsError::Invalid("tp_size must be >= 1".into()));
    }
    Ok((remote_host, remote_port, tp_size))
}

fn transfer_id_field(v: Option<Value>) -> Result<Option<String>, ParamsError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_TRANSFER_ID => Ok(Some(s)),
        Some(Value::String(s)) => {
            Err(ParamsError::Invalid(format!("transfer_id is {} bytes long; at most {MAX_TRANSFER_ID} allowed", s.len())))
        }
        Some(other) => Err(ParamsError::WrongType { field: "transfer_id", expected: "a string", got: type_name(&other) }),
    }
}

/// A host name or IP literal: non-empty, at most 253 chars, only `[A-Za-z0-9.-:_]` (plus
/// brackets for IPv6). Reachability is the handshake's job.
pub fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && !h.starts_with('-')
        && h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_' | '[' | ']'))
}

fn invalid_json(e: &serde_json::Error) -> ParamsError {
    ParamsError::NotAnObject(format!("invalid JSON: {e}"))
}

impl KvParams {
    /// Parse the JSON text of a request's `kv_transfer_params` (`None`/`null` = no P/D).
    pub fn parse_json(text: Option<&str>) -> Result<Self, ParamsError> {
        match text {
            None => Ok(Self::None),
            Some(t) => match serde_json::from_str(t).map_err(|e| invalid_json(&e))? {
                Value::Object(mut m) => Self::parse_fields(|f| m.remove(f.name())),
                v => Self::parse(&v),
            },
        }
    }

    /// The optional `transfer_id` of a request's params (push mode matches P's and D's
    /// legs on it). Absent or null: `None`.
    pub fn transfer_id(text: Option<&str>) -> Result<Option<String>, ParamsError> {
        let Some(t) = text else { return Ok(None) };
        match serde_json::from_str(t).map_err(|e| invalid_json(&e))? {
            Value::Object(mut m) => transfer_id_field(m.remove("transfer_id")),
            _ => Ok(None),
        }
    }

    /// Parse an already-decoded `kv_transfer_params` value (`null` = no P/D).
    pub fn parse(v: &Value) -> Result<Self, ParamsError> {
        match v {
            Value::Null => Ok(Self::None),
            Value::Object(m) => Self::parse_fields(|f| m.get(f.name()).cloned()),
            other => Err(ParamsError::NotAnObject(type_name(other))),
        }
    }

    /// Parse a `kv_transfer_params` object given field by field: `get(field)` is that key's
    /// value (`None` if absent; absent and `null` mean the same). Each key is asked for at
    /// most once, so `get` may move the value out of its source. [`parse`](Self::parse)
    /// reads a JSON object this way; the Python binding reads a dict's few known keys
    /// straight from the dict, with the same checks and errors.
    pub fn parse_fields(mut get: impl FnMut(Field) -> Option<Value>) -> Result<Self, ParamsError> {
        let prefill = flag(get(Field::DoRemotePrefill), "do_remote_prefill")?;
        let decode = flag(get(Field::DoRemoteDecode), "do_remote_decode")?;
        let push = match get(Field::TransferMode) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) if s == "pull" => false,
            Some(Value::String(s)) if s == "push" => true,
            Some(other) => {
                return Err(ParamsError::WrongType { field: "transfer_mode", expected: "\"pull\" or \"push\"", got: type_name(&other) })
            }
        };
        match (prefill, decode) {
            (false, false) => Ok(Self::None),
            (true, true) => Err(ParamsError::Invalid("do_remote_prefill and do_remote_decode are both true".into())),
            (false, true) => Ok(Self::RemoteDecode),
            (true, false) if push => {
                let remote_engine_id = string(get(Field::RemoteEngineId), "remote_engine_id")?;
                let (remote_host, remote_port, tp_size) = peer(&mut get)?;
                let transfer_id = transfer_id_field(get(Field::TransferId))?.unwrap_or_default();
                Ok(Self::PushPrefill(PushPrefill { remote_engine_id, remote_host, remote_port, tp_size, transfer_id }))
            }
            (true, false) => {
                let remote_engine_id = string(get(Field::RemoteEngineId), "remote_engine_id")?;
                let remote_request_id = string(get(Field::RemoteRequestId), "remote_request_id")?;
                let remote_block_ids = block_ids(&req(get(Field::RemoteBlockIds), "remote_block_ids")?)?;
                let (remote_host, remote_port, tp_size) = peer(&mut get)?;
                let remote_num_tokens = match get(Field::RemoteNumTokens) {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(uint(&v, "remote_num_tokens", u64::MAX)?),
                };
                let remote_epoch = match get(Field::RemoteEpoch) {
                    None | Some(Value::Null) => 0,
                    Some(v) => uint(&v, "remote_epoch", u64::MAX)?,
                };
                let remote_expiry_unix = match get(Field::RemoteBlocksExpiryTime) {
                    None | Some(Value::Null) => 0.0,
                    Some(v) => v.as_f64().filter(|x| x.is_finite() && *x >= 0.0).ok_or_else(|| ParamsError::WrongType {
                        field: "remote_blocks_expiry_time",
                        expected: "a non-negative number (Unix seconds)",
                        got: type_name(&v),
                    })?,
                };
                let remote_staged = match get(Field::RemoteStaged) {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => b,
                    Some(v) => return Err(ParamsError::WrongType { field: "remote_staged", expected: "a boolean", got: type_name(&v) }),
                };
                Ok(Self::RemotePrefill(RemotePrefill {
                    remote_engine_id,
                    remote_request_id,
                    remote_block_ids,
                    remote_host,
                    remote_port,
                    tp_size,
                    remote_num_tokens,
                    remote_epoch,
                    remote_expiry_unix,
                    remote_staged,
                }))
            }
        }
    }
}

/// A request's `kv_transfer_params`, decoded once for every scheduler call that reads
/// them (the scheduler's `*_parsed` methods take it; the text methods decode it first).
#[derive(Debug, Clone, PartialEq)]
pub struct ReqParams {
    /// What the params ask for, or why they are malformed ([`KvParams::parse_json`]).
    pub kind: Result<KvParams, ParamsError>,
    /// With [`KvParams::RemoteDecode`] params, their `transfer_id`
    /// ([`KvParams::transfer_id`]; push mode's P matches D's leg on it). `Ok(None)` for
    /// any other params (push params carry theirs in [`PushPrefill::transfer_id`]).
    pub transfer_id: Result<Option<String>, ParamsError>,
}

impl ReqParams {
    /// Decode the JSON text of a request's `kv_transfer_params`.
    pub fn from_json(text: &str) -> Self {
        match serde_json::from_str(text) {
            Err(e) => Self { kind: Err(invalid_json(&e)), transfer_id: Err(invalid_json(&e)) },
            Ok(Value::Object(mut m)) => Self::from_fields(|f| m.remove(f.name())),
            Ok(v) => Self { kind: KvParams::parse(&v), transfer_id: Ok(None) },
        }
    }

    /// Decode an object given field by field (see [`KvParams::parse_fields`]; each key is
    /// asked for at most once).
    pub fn from_fields(mut get: impl FnMut(Field) -> Option<Value>) -> Self {
        let kind = KvParams::parse_fields(&mut get);
        let transfer_id = match &kind {
            Ok(KvParams::RemoteDecode) => transfer_id_field(get(Field::TransferId)),
            _ => Ok(None),
        };
        Self { kind, transfer_id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({"do_remote_prefill": true, "do_remote_decode": false, "remote_engine_id": "p0",
               "remote_request_id": "cmpl-1", "remote_block_ids": [[3, 4, 5]], "remote_host": "127.0.0.1",
               "remote_port": 5600, "tp_size": 1, "remote_num_tokens": 300})
    }

    #[test]
    fn parses_good_params() {
        match KvParams::parse(&good()).unwrap() {
            KvParams::RemotePrefill(r) => {
                assert_eq!(r.remote_block_ids, vec![vec![3, 4, 5]]);
                assert_eq!(r.remote_port, 5600);
                assert_eq!(r.remote_num_tokens, Some(300));
            }
            other => panic!("{other:?}"),
        }
        let mut flat = good();
        flat["remote_block_ids"] = json!([7, 8]);
        assert!(matches!(KvParams::parse(&flat), Ok(KvParams::RemotePrefill(r)) if r.remote_block_ids == vec![vec![7, 8]]));
        let mut groups = good();
        groups["remote_block_ids"] = json!([[1, 2], [0, 2], []]);
        assert!(
            matches!(KvParams::parse(&groups), Ok(KvParams::RemotePrefill(r)) if r.remote_block_ids == vec![vec![1, 2], vec![0, 2], vec![]])
        );
        assert_eq!(KvParams::parse(&json!({"do_remote_decode": true})).unwrap(), KvParams::RemoteDecode);
        assert_eq!(KvParams::parse(&Value::Null).unwrap(), KvParams::None);
        assert_eq!(KvParams::parse_json(None).unwrap(), KvParams::None);
        assert_eq!(KvParams::parse(&json!({})).unwrap(), KvParams::None);
    }

    #[test]
    fn parses_push_params() {
        let v = json!({"do_remote_prefill": true, "transfer_mode": "push", "remote_engine_id": "p0",
                       "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 2, "transfer_id": "t-1"});
        let KvParams::PushPrefill(p) = KvParams::parse(&v).unwrap() else { panic!("not push") };
        assert_eq!((p.remote_port, p.tp_size, p.transfer_id.as_str()), (5600, 2, "t-1"));
        let mut no_id = v.clone();
        no_id.as_object_mut().unwrap().remove("transfer_id");
        assert!(matches!(KvParams::parse(&no_id), Ok(KvParams::PushPrefill(p)) if p.transfer_id.is_empty()));
        for (bad, want) in [
            (json!({"transfer_mode": 3}), "transfer_mode"),
            (json!({"transfer_mode": "sideways"}), "transfer_mode"),
            (json!({"transfer_id": 5}), "transfer_id"),
            (json!({"transfer_id": "x".repeat(300)}), "transfer_id"),
            (json!({"remote_port": 0}), "remote_port"),
            (json!({"remote_host": "a b"}), "remote_host"),
        ] {
            let mut p = v.clone();
            for (k, x) in bad.as_object().unwrap() {
                p[k] = x.clone();
            }
            let e = KvParams::parse(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert_eq!(KvParams::transfer_id(Some(r#"{"do_remote_decode":true,"transfer_id":"abc"}"#)).unwrap().as_deref(), Some("abc"));
        assert_eq!(KvParams::transfer_id(Some(r#"{"do_remote_decode":true}"#)).unwrap(), None);
    }

    #[test]
    fn rejects_malformed_params() {
        let cases: Vec<(Value, &str)> = vec![
            (json!([1]), "must be a JSON object"),
            (json!({"do_remote_prefill": "yes"}), "must be a boolean"),
            (json!({"do_remote_prefill": true}), "missing field \"remote_engine_id\""),
            (
                {
                    let mut g = good();
                    g.as_object_mut().unwrap().remove("remote_block_ids");
                    g
                },
                "missing field \"remote_block_ids\"",
            ),
            (
                {
                    let mut g = good();
                    g["remote_block_ids"] = json!("1,2");
                    g
                },
                "remote_block_ids",
            ),
            (
                {
                    let mut g = good();
                    g["remote_block_ids"] = json!([-1]);
                    g
                },
                "remote_block_ids",
            ),
            (
                {
                    let mut g = good();
                    g["remote_block_ids"] = json!(vec![vec![1]; 17]);
                    g
                },
                "KV cache groups",
            ),
            (
                {
                    let mut g = good();
                    g["remote_block_ids"] = json!([[1], 2]);
                    g
                },
                "per KV cache group",
            ),
            (
                {
                    let mut g = good();
                    g["remote_port"] = json!("5600");
                    g
                },
                "remote_port",
            ),
            (
                {
                    let mut g = good();
                    g["remote_port"] = json!(70000);
                    g
                },
                "remote_port",
            ),
            (
                {
                    let mut g = good();
                    g["remote_host"] = json!("bad host!");
                    g
                },
                "invalid remote_host",
            ),
            (
                {
                    let mut g = good();
                    g["remote_host"] = json!(42);
                    g
                },
                "remote_host",
            ),
            (
                {
                    let mut g = good();
                    g["remote_engine_id"] = json!("");
                    g
                },
                "non-empty",
            ),
            (
                {
                    let mut g = good();
                    g["do_remote_decode"] = json!(true);
                    g
                },
                "both true",
            ),
            (
                {
                    let mut g = good();
                    g["tp_size"] = json!(0);
                    g
                },
                "tp_size",
            ),
        ];
        for (v, want) in cases {
            let e = KvParams::parse(&v).expect_err(&v.to_string()).to_string();
            assert!(e.contains(want), "{v} -> {e} (wanted {want})");
        }
        assert!(KvParams::parse_json(Some("{not json")).is_err());
    }
}
