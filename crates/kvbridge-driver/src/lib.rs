#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
//! # kvbridge-driver
//!
//! The I/O around `kvbridge-core`'s sans-IO state machines:
//! - [`side_channel`]: the ZeroMQ side channel on a one-thread tokio runtime (listener,
//!   one reused connection per peer, deadlines that cancel, non-blocking name lookups);
//! - [`worker`]: [`WorkerDriver`], which runs a worker's actions against a
//!   [`kvbridge_core::transport::Transport`] (`kvbridge-nixl`'s NIXL transport) and the
//!   side channel, with P's push writer thread;
//! - [`staging`]: connector-owned host memory (P-side staging, the host buffer) and its
//!   copies;
//! - `recv`: D's receive staging, for READs a block-size change would fragment;
//! - [`clock`]: the one place the wall clock is read.
pub mod clock;
mod recv;
pub mod side_channel;
pub mod staging;
pub mod worker;

pub use worker::WorkerDriver;
