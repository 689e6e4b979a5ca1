//! The side channel's connections on loopback: requests to a peer that never answers are
//! cancelled with their sockets (no task or socket accumulates), a hung name lookup
//! delays nobody else, a peer's connection is reused, and a restarted peer is reconnected.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvbridge_core::error::HandshakeError;
use kvbridge_core::wire::{self, HandshakePayload, HandshakeRequest, HeartbeatRequest, WIRE_VERSION};
use kvbridge_driver::side_channel::{system_resolver, Identity, Resolver, SideChannel};

fn client() -> SideChannel {
    SideChannel::with_identity(Identity { engine_id: "d".into(), compat_hash: "h".into(), ..Default::default() }).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn req() -> HandshakeRequest {
    HandshakeRequest { version: WIRE_VERSION, from_engine: "d".into(), from_tp_rank: 0 }
}

/// A listener serving a payload whose agent metadata is `tag`.
fn listener(port: u16, tag: u8) -> SideChannel {
    let sc = SideChannel::new().unwrap();
    let p = HandshakePayload { compat_hash: "h".into(), agent_metadata: vec![tag], ..Default::default() };
    sc.serve("127.0.0.1", port, Arc::new(Mutex::new(Some(p)))).unwrap();
    sc
}

fn tag_of(bytes: &[u8]) -> u8 {
    let p: HandshakePayload = wire::decode("p", bytes, 1 << 20).unwrap();
    p.agent_metadata[0]
}

/// This process's TCP connections to `port` that are still open from our side
/// (ESTABLISHED, remote port `port`), from /proc/net/tcp{,6}: what the OS says, not
/// what the side channel believes.
fn established_to(port: u16) -> usize {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() > 3 && c[2].ends_with(&want) && c[3] == "01"
        })
        .count()
}

/// 1,000 heartbeats (20 ms deadline, 100 at a time) to `port`; every one must fail
/// with a timeout.
fn hammer(c: &SideChannel, port: u16) {
    let timeouts = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        let (tx, rx) = mpsc::channel();
        for _ in 0..100 {
            let (tx, timeouts) = (tx.clone(), timeouts.clone());
            let hb = HeartbeatRequest { request_ids: vec!["r".into()], release: false };
            c.heartbeat("127.0.0.1".into(), port, hb, Duration::from_millis(20), move |res| {
                if matches!(res, Err(HandshakeError::Timeout { .. })) {
                    timeouts.fetch_add(1, Ordering::Relaxed);
                }
                let _ = tx.send(());
            });
        }
        drop(tx);
        let n = rx.iter().take(100).count();
        assert_eq!(n, 100, "every request's callback ran");
    }
    assert_eq!(timeouts.load(Ordering::Relaxed), 1000, "every request to a silent peer timed out");
}

fn settle(c: &SideChannel, port: u16, tasks_before: usize) -> (usize, usize, usize) {
    // Cancellation is immediate; the zeromq socket tasks wind down on their next poll.
    let t0 = Instant::now();
    loop {
        let now = (c.tasks_alive(), c.open_connections(), established_to(port));
        if (now.0 <= tasks_before && now.1 == 0 && now.2 == 0) || t0.elapsed() > Duration::from_secs(5) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_peer_that_accepts_and_never_answers_leaks_no_task_or_socket() {
    // Peer 1: a ZMQ ROUTER that takes every request and never replies.
    let port = free_port();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (got_tx, got_rx) = mpsc::channel::<()>();
    rt.block_on(async {
        use zeromq::{Socket, SocketRecv};
        let mut s = zeromq::RouterSocket::new();
        s.bind(&format!("tcp://127.0.0.1:{port}")).await.unwrap();
        tokio::spawn(async move {
            while s.recv().await.is_ok() {
                let _ = got_tx.send(());
            }
        });
    });
    let c = client();
    let tasks_before = c.tasks_alive();
    assert_eq!(established_to(port), 0);
    // While a request waits, its connection is open (so the count below can see one).
    c.heartbeat("127.0.0.1".into(), port, HeartbeatRequest { request_ids: vec![], release: false }, Duration::from_secs(2), |_| {});
    got_rx.recv_timeout(Duration::from_secs(5)).expect("the silent peer got the request");
    assert_eq!(established_to(port), 1, "the socket counter sees an open connection");
    assert_eq!(c.open_connections(), 1);
    std::thread::sleep(Duration::from_millis(2100));
    hammer(&c, port);
    let (tasks, open, os) = settle(&c, port, tasks_before);
    assert!(tasks <= tasks_before, "side-channel tasks grew from {tasks_before} to {tasks} after 1,000 timed-out requests");
    assert_eq!(open, 0, "pooled connections left open to a peer that never answers");
    assert_eq!(os, 0, "TCP connections left open to a peer that never answers");
    // Requests to one peer go one at a time: the first of each batch was sent (then
    // cancelled); the rest timed out waiting for the connection.
    assert!(got_rx.try_iter().count() >= 10, "the requests reached the peer (they were sent, then cancelled)");

    // Peer 2: plain TCP that accepts and never speaks ZMTP (the connect itself hangs).
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port2 = tcp.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            h2.lock().unwrap().push(s);
        }
    });
    hammer(&c, port2);
    let (tasks, open, os) = settle(&c, port2, tasks_before);
    assert!(tasks <= tasks_before, "side-channel tasks grew from {tasks_before} to {tasks} (peer that never greets)");
    assert_eq!((open, os), (0, 0), "connections left open to a peer that never greets");
    assert!(held.lock().unwrap().len() >= 10, "the connections were made (then closed at their deadline)");
}

#[test]
fn a_hung_name_lookup_delays_no_other_peer() {
    let port = free_port();
    let _l = listener(port, 7);
    let sys = system_resolver();
    let hung = Arc::new(AtomicUsize::new(0));
    let h2 = hung.clone();
    let resolver: Resolver = Arc::new(move |host: &str, port: u16| {
        if host.starts_with("hangs-") {
            h2.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(5)); // a DNS server that never answers
            return Err("gave up".into());
        }
        sys(host, port)
    });
    let c =
        SideChannel::with_resolver(Identity { engine_id: "d".into(), compat_hash: "h".into(), ..Default::default() }, resolver).unwrap();
    let (tx, rx) = mpsc::channel();
    for i in 0..3 {
        let tx = tx.clone();
        c.fetch(format!("hangs-{i}.example"), port, req(), Duration::from_secs(10), 0, move |r| {
            let _ = tx.send(r);
        });
    }
    let t0 = Instant::now();
    while hung.load(Ordering::SeqCst) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(2), "the lookups started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Three lookups are hung; a handshake to another peer (by address and by name) goes
    // through at once.
    let t1 = Instant::now();
    assert_eq!(tag_of(&c.fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(3)).unwrap()), 7);
    assert_eq!(tag_of(&c.fetch_blocking("localhost", port, req(), Duration::from_secs(3)).unwrap()), 7);
    let took = t1.elapsed();
    assert!(took < Duration::from_millis(1000), "two handshakes took {took:?} while lookups hung");
    assert!(rx.try_recv().is_err(), "the hung lookups are still waiting");
}

#[test]
fn one_connection_per_peer_is_reused_and_a_restarted_peer_reconnected() {
    let port = free_port();
    let l1 = listener(port, 1);
    let c = client();
    for _ in 0..5 {
        assert_eq!(tag_of(&c.fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(3)).unwrap()), 1);
    }
    // Heartbeats ride the same connection.
    let (tx, rx) = mpsc::channel();
    c.heartbeat("127.0.0.1".into(), port, HeartbeatRequest { request_ids: vec![], release: false }, Duration::from_secs(3), move |r| {
        let _ = tx.send(r.is_err());
    });
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "the listener holds no leases: an error reply, but a reply");
    assert_eq!(c.connections_opened(), 1, "six requests, one connection");
    assert_eq!(c.open_connections(), 1);
    assert_eq!(established_to(port), 1);

    // The peer restarts on the same port with new contents: the next request (no
    // retries) reaches the new incarnation over a new connection.
    drop(l1);
    std::thread::sleep(Duration::from_millis(100));
    let _l2 = listener(port, 2);
    let got = c.fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(3)).unwrap();
    assert_eq!(tag_of(&got), 2, "the restarted peer answered");
    assert_eq!(c.connections_opened(), 2, "the connection was re-established once");
    assert_eq!(c.open_connections(), 1);
    assert_eq!(tag_of(&c.fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(3)).unwrap()), 2);
    assert_eq!(c.connections_opened(), 2, "and reused after");
}
