//! The wall clock, read here and passed to the core's state machines as `now`.
use std::time::{SystemTime, UNIX_EPOCH};

/// The current time as Unix seconds (0 if the clock reads before 1970).
pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
