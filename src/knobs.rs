//! Reading one environment knob: the lookup (the process environment, or a
//! test's map) and the number rules every knob shares. Below every layer;
//! `tunables.rs` reads them all once at start.

use std::time::Duration;

/// Looks up one environment variable (`std::env::var` or a test's map).
pub type Lookup = dyn Fn(&str) -> Option<String>;

/// A positive integer knob; anything else is logged and ignored.
pub fn positive(get: &Lookup, name: &str) -> Option<u64> {
    let v = get(name)?;
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            log::warn!("ignoring {name}={v:?}: not a positive number");
            None
        }
    }
}

/// A positive number of milliseconds; anything else is logged and ignored.
pub fn positive_ms(get: &Lookup, name: &str) -> Option<Duration> {
    positive(get, name).map(Duration::from_millis)
}
