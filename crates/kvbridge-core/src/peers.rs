//! `kv_peers`: prefill engines a decode engine handshakes with at start-up, so its first
//! request to each finds the peer loaded and posts its READ at once (first contact off the
//! request path). A list of `"host:port"` strings, each a P engine's side-channel host (as
//! P advertises it in `remote_host`) and base port, from `kv_connector_extra_config` or
//! the env var `KVBRIDGE_PEERS` (comma-separated). Absent: every peer is met on demand,
//! as vLLM's NixlConnector does.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
use serde_json::Value;

use crate::error::ConfigError;

/// Most peers accepted.
pub const MAX_PEERS: usize = 1024;

fn bad(reason: String) -> ConfigError {
    ConfigError::InvalidValue { key: "kv_peers".into(), reason }
}

/// One `"host:port"` (IPv6 in brackets: `"[::1]:5600"`).
pub fn parse_peer(s: &str) -> Result<(String, u16), ConfigError> {
    let s = s.trim();
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad(format!("{s:?}: expected \"host:port\"")))?;
    let port: u16 = port.parse().map_err(|_| bad(format!("{s:?}: the port is not a number in 1..=65535")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad(format!("{s:?}: expected \"host:port\"")));
    }
    Ok((host.to_string(), port))
}

/// The `kv_peers` value (a list of strings), else `KVBRIDGE_PEERS` from `env`.
pub fn parse_peers(v: Option<&Value>, env: impl Fn(&str) -> Option<String>) -> Result<Vec<(String, u16)>, ConfigError> {
    let items: Vec<String> = match v {
        None | Some(Value::Null) => env("KVBRIDGE_PEERS")
            .map(|e| e.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect())
            .unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| bad(format!("expected strings, got {x}"))))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(bad(format!("expected a list of \"host:port\" strings, got {other}"))),
    };
    if items.len() > MAX_PEERS {
        return Err(bad(format!("{} peers; at most {MAX_PEERS}", items.len())));
    }
    items.iter().map(|s| parse_peer(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_env_and_errors() {
        let v = serde_json::json!(["127.0.0.1:5600", "[::1]:7000", "p.example:1"]);
        let got = parse_peers(Some(&v), |_| None).unwrap();
        assert_eq!(got, vec![("127.0.0.1".into(), 5600), ("::1".into(), 7000), ("p.example".into(), 1)]);
        let env = |k: &str| (k == "KVBRIDGE_PEERS").then(|| " a:1, b:2 ,".to_string());
        assert_eq!(parse_peers(None, env).unwrap(), vec![("a".into(), 1), ("b".into(), 2)]);
        assert!(parse_peers(None, |_| None).unwrap().is_empty());
        for bad in [
            serde_json::json!("a:1"),
            serde_json::json!([1]),
            serde_json::json!(["a"]),
            serde_json::json!(["a:0"]),
            serde_json::json!([":5"]),
            serde_json::json!(["a:99999"]),
        ] {
            assert!(parse_peers(Some(&bad), |_| None).is_err(), "{bad}");
        }
    }
}
