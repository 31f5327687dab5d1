//! The time scale: how much longer every wait is, and how much smaller every load test, where the tests run
//! slower than on this machine (`cargo xtask vm`'s emulated CPU).

use std::time::Duration;

/// How long a test connection may take before it counts as failed (on this machine; see [`patient`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// `CAPTURE_TEST_TIME_SCALE`: how many times slower than this machine the tests run, e.g. in the emulated
/// CPU of `cargo xtask vm` (which sets it). Every wait is that much longer and load tests smaller; unset, 1.
pub const TIME_SCALE_ENV: &str = "CAPTURE_TEST_TIME_SCALE";

/// The time scale ([`TIME_SCALE_ENV`]), at least 1.
pub fn time_scale() -> u32 {
    std::env::var(TIME_SCALE_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// A wait sized for this machine, stretched by [`time_scale`].
pub fn patient(wait: Duration) -> Duration {
    wait * time_scale()
}

/// [`CONNECT_TIMEOUT`], stretched by [`time_scale`].
pub fn connect_timeout() -> Duration {
    patient(CONNECT_TIMEOUT)
}
