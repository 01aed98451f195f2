//! The `metrics` feature's hooks (the series are listed in the crate docs' Metrics):
//! empty and inlined away without the feature.

use std::time::Duration;

use crate::LockKey;

#[cfg(feature = "metrics")]
fn label(key: &LockKey) -> String {
    match (key.name(), key.as_i64(), key.as_pair()) {
        (Some(name), _, _) => match key.namespace() {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_owned(),
        },
        (None, Some(k), _) => k.to_string(),
        (None, None, Some((a, b))) => format!("{a},{b}"),
        _ => String::new(),
    }
}

macro_rules! count {
    ($name:literal, $kind:expr, $key:expr) => {{
        #[cfg(feature = "metrics")]
        ::metrics::counter!($name, "kind" => $kind, "lock" => label($key)).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = ($kind, $key);
    }};
}

macro_rules! record {
    ($name:literal, $kind:expr, $key:expr, $value:expr) => {{
        #[cfg(feature = "metrics")]
        ::metrics::histogram!($name, "kind" => $kind, "lock" => label($key))
            .record($value.as_secs_f64());
        #[cfg(not(feature = "metrics"))]
        let _ = ($kind, $key, $value);
    }};
}

#[inline]
pub(crate) fn locked(kind: &'static str, key: &LockKey, waited: Duration) {
    count!("pglock_acquisitions_total", kind, key);
    record!("pglock_wait_seconds", kind, key, waited);
}

#[inline]
pub(crate) fn busy(kind: &'static str, key: &LockKey) {
    count!("pglock_busy_total", kind, key);
}

#[inline]
pub(crate) fn timed_out(kind: &'static str, key: &LockKey) {
    count!("pglock_timeouts_total", kind, key);
}

#[inline]
pub(crate) fn cancelled(kind: &'static str, key: &LockKey) {
    count!("pglock_cancellations_total", kind, key);
}

#[inline]
pub(crate) fn lost(kind: &'static str, key: &LockKey) {
    count!("pglock_losses_total", kind, key);
}

#[inline]
pub(crate) fn released(kind: &'static str, key: &LockKey, held: Duration) {
    record!("pglock_hold_seconds", kind, key, held);
}
