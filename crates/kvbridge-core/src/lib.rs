#![warn(missing_docs)]
//! # kvbridge-core
//!
//! The connector logic of kvbridge, free of NIXL and Python:
//! - [`config`]: roles (`kv_producer`, `kv_consumer`, deprecated `kv_both`) and settings;
//! - [`params`]: the per-request `kv_transfer_params`, validated;
//! - [`wire`]: versioned msgpack types (scheduler→worker metadata, handshake, notifications);
//! - [`layout`] and [`plan`]: KV regions and the per-peer transfer plan;
//! - [`scheduler`] and [`worker`]: sans-IO state machines (base + pull);
//! - [`transport`]: the trait `kvbridge-nixl` implements;
//! - [`side_channel`]: the ZMQ handshake channel (the only module here doing network I/O);
//! - [`testkit`]: synthetic KV caches with known contents, for tests and benchmarks.
pub mod config;
pub mod error;
pub mod layout;
pub mod params;
pub mod plan;
pub mod scheduler;
pub mod side_channel;
pub mod testkit;
pub mod transport;
pub mod wire;
pub mod worker;

pub use config::{ConnectorConfig, EngineInfo, KvRole, TransferMode};
pub use error::{Error, Result};
