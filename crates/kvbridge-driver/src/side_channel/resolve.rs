//! Host names to zeromq endpoints, without blocking the side channel's runtime.
//!
//! A host comes from `kv_transfer_params` (a peer's word), so a name whose lookup hangs must
//! not stall every other handshake and heartbeat: literal addresses never reach the
//! resolver, and names are looked up on tokio's blocking pool under the request's deadline.
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// Looks a host name up (blocking; run on the blocking pool): the addresses of
/// `host:port`, or why there are none. Replaceable for tests.
pub type Resolver = Arc<dyn Fn(&str, u16) -> Result<Vec<SocketAddr>, String> + Send + Sync>;

/// The system resolver (`getaddrinfo` through `ToSocketAddrs`).
pub fn system_resolver() -> Resolver {
    Arc::new(|host: &str, port: u16| {
        (host, port).to_socket_addrs().map(Iterator::collect).map_err(|e| format!("cannot resolve {host:?}: {e}"))
    })
}

/// `host` as a literal IP address (brackets around IPv6 allowed), if it is one.
pub fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// A zeromq TCP endpoint for `ip:port`.
pub fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V6(v6) => format!("tcp://[{v6}]:{port}"),
        IpAddr::V4(v4) => format!("tcp://{v4}:{port}"),
    }
}

/// The endpoint for the first of `addrs`, preferring IPv4 (as `localhost` → `127.0.0.1`).
fn pick(host: &str, port: u16, addrs: &[SocketAddr]) -> Result<String, String> {
    let a = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).ok_or_else(|| format!("{host:?} resolves to nothing"))?;
    Ok(endpoint(a.ip(), port))
}

/// Resolve a host name to a literal-IP zeromq endpoint, blocking the caller (binding a
/// listener at start-up; tools).
pub fn resolve_host(host: &str, port: u16) -> Result<String, String> {
    match literal(host) {
        Some(ip) => Ok(endpoint(ip, port)),
        None => pick(host, port, &system_resolver()(host.trim_start_matches('[').trim_end_matches(']'), port)?),
    }
}

/// Resolve `host` without blocking the runtime: literals at once, names with `resolver`
/// on the blocking pool. The caller's deadline bounds the wait (a lookup that hangs keeps
/// one blocking thread until the system gives up; nothing else waits for it).
pub async fn resolve_async(resolver: &Resolver, host: &str, port: u16) -> Result<String, String> {
    if let Some(ip) = literal(host) {
        return Ok(endpoint(ip, port));
    }
    let (r, h) = (resolver.clone(), host.to_string());
    let addrs = tokio::task::spawn_blocking(move || r(&h, port)).await.map_err(|e| format!("resolver task failed: {e}"))??;
    pick(host, port, &addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_names() {
        assert_eq!(resolve_host("127.0.0.1", 5).as_deref(), Ok("tcp://127.0.0.1:5"));
        assert_eq!(resolve_host("[::1]", 5).as_deref(), Ok("tcp://[::1]:5"));
        assert_eq!(resolve_host("localhost", 7).as_deref(), Ok("tcp://127.0.0.1:7"));
        assert!(resolve_host("no-such-host.invalid", 7).is_err());
    }
}
