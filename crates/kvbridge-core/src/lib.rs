#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
//! # kvbridge-core
//!
//! The connector logic of kvbridge, free of NIXL and Python:
//! - [`config`]: roles (`kv_producer`, `kv_consumer`, deprecated `kv_both`) and settings;
//! - [`params`]: the per-request `kv_transfer_params`, validated;
//! - [`groups`]: KV-cache groups (hybrid models) and sliding-window clipping;
//! - [`wire`]: versioned msgpack types (scheduler→worker metadata, handshake, notifications);
//! - [`layout`] and [`plan`]: KV regions and the per-peer transfer plan;
//! - [`scheduler`] and [`worker`]: sans-IO state machines (base + pull);
//! - [`transport`]: the trait `kvbridge-nixl` implements;
//!
//! No I/O, threads or clock reads here: time is passed in (`now`), and each machine says
//! when it next needs to be woken (`poll_timeout`). `kvbridge-driver` runs them.
//! - [`side`]: the side channel's messages and what a listener answers (the sockets are
//!   `kvbridge-driver`'s);
//! - [`testkit`]: synthetic KV caches with known contents, for tests and benchmarks.
pub mod compat;
pub mod config;
pub mod error;
pub mod groups;
pub mod integrity;
pub mod layout;
pub mod params;
pub mod peers;
pub mod plan;
pub mod ranks;
pub mod scheduler;
pub mod side;
pub mod staged;
pub mod testkit;
pub mod transport;
pub mod wire;
pub mod worker;

pub use config::{ConnectorConfig, EngineInfo, KvRole, TransferMode};
pub use error::{Error, Result};
