//! Bounds on how long a silent network can stall a call or keep a lock held.

use std::time::Duration;

/// Connection settings that bound how long a lost network can stall a call, on the
/// client, and keep a vanished client's locks held, on the server.
///
/// PostgreSQL enforces a lock's bound (`lock_timeout`) on the server. When the network
/// between client and server stops carrying packets (a pulled cable, a host that froze,
/// a firewall or NAT that forgot the connection), the server's answer never arrives: a
/// waiting call blocks in the client until TCP gives up, which with Linux defaults is
/// about 15 minutes for unacknowledged data and never for a connection that is only
/// waiting for an answer. The server, for its part, keeps the session of a client it
/// no longer hears from, and that session's advisory locks, for 2 hours and 11 minutes
/// (the default keepalive time plus nine probes).
///
/// `NetworkTimeout::new(within).apply(&mut config)` sets, on the connection settings a
/// pool is built from:
///
/// - on the client socket: TCP keepalives and `tcp_user_timeout` (and `connect_timeout`
///   when none is set), so that a connection that hears nothing from the server for
///   `within` is given up, and the call on it fails instead of blocking;
/// - on the server's socket for the session, through the startup `options`: TCP
///   keepalives and `tcp_user_timeout` (`tcp_keepalives_idle`, `tcp_keepalives_interval`,
///   `tcp_keepalives_count`, `tcp_user_timeout`: settings any role may change), so that
///   the server ends the session of a client it heard nothing from for `within`, which
///   frees its advisory locks for the next waiter;
///   and `client_connection_check_interval`, so that a backend that is busy (waiting for
///   a lock, running a query) looks at its socket too: without it, only an idle session
///   notices a dead connection. That setting needs PostgreSQL 14 or later on a platform
///   that has it (not Windows): elsewhere use [`client_only`](Self::client_only).
///
/// Keepalive probes go out every `within / 6` (at least one second) of silence, so an
/// idle connection is never more than that far from its last sign of life: a cut of up
/// to `within` minus one probe interval is ridden out by both ends, and a cut of `within`
/// plus one probe interval never is. A call in flight during the cut rides out less:
/// unacknowledged data is not probed but sent again with exponential backoff (on
/// loopback 0.2, 0.6, 1.4, 3.0, 6.2, 12.6, 25.4 s after the first send), and the
/// connection ends at `within` unless a resend after the cut got through, so about half
/// of `within` is safe (a 4 s cut under 10 s: `tests/partition.rs`). A probe is a few
/// bytes, answered by the peer's kernel. Keepalives alone are not enough: TCP does not probe a connection with data in
/// flight, and a cut that comes while a reply (or the acknowledgement of one) is on its
/// way leaves the sender retransmitting for about 15 minutes (Linux's `tcp_retries2`);
/// `tcp_user_timeout` bounds that too. Its cost: Linux also ends a connection whose peer
/// keeps its receive window closed for longer than `within`, so a critical section that
/// stops reading a large result half-way for longer than that loses its session (and its
/// locks) although the network is fine; read results through, or pick a larger bound.
///
/// What a caller sees when the network goes silent mid-call (`tests/partition.rs`, which
/// drops one connection's packets with an `nftables` rule):
///
/// - the call's connection fails within `within` (plus a probe interval). A lock made from
///   a pool then tries once more on a fresh connection, within what is left of the call's
///   bound (a try gets one more try): when only that connection was cut, the call goes on
///   as if nothing happened; when the network is still down, the checkout fails with
///   [`Error::Pool`](crate::Error::Pool) within the pool's `connection_timeout` (or what
///   is left of the bound). A connection never goes back to the pool dead;
/// - a holder's next call returns within the bound and tells it the lock is gone:
///   [`SessionGuard::is_held`](crate::SessionGuard::is_held) returns `false`,
///   [`SessionGuard::unlock`](crate::SessionGuard::unlock) fails with
///   [`Error::LockLost`](crate::Error::LockLost);
/// - the server frees a partitioned holder's locks within the bound, so a waiter gets
///   them then instead of hours later. Not when the cut catches the server in the middle
///   of sending a reply: then TCP's retransmission limit applies (about 15 minutes with
///   Linux's default `tcp_retries2`);
/// - a lease holder's own deadline runs out on time either way (it never depends on the
///   network); with this setting, its heartbeat and `unlock()` also return within the
///   bound instead of waiting for TCP.
///
/// Behind a pooler (PgBouncer), which refuses the startup `options` parameter unless told
/// to ignore it, use [`client_only`](Self::client_only). The client's calls are then
/// bounded, but only the pooler can notice that a client went silent and end the server
/// session (and roll back a [`TxLock`](crate::TxLock)'s transaction, which frees its lock):
/// give PgBouncer the same bound in `pgbouncer.ini` (`tcp_keepalive = 1`, `tcp_keepidle`,
/// `tcp_keepintvl`, `tcp_keepcnt`, `tcp_user_timeout`), or `idle_transaction_timeout`.
/// Without them a cut-off `TxLock` holder's lock stays held for hours. On a Unix-domain socket, where
/// there is no network, both ends ignore these settings.
///
/// Pick `within` longer than the longest pause your network may take and still recover
/// from (a few seconds for a LAN, 10-30 s across zones): a connection silent for longer is
/// ended, and its locks are lost, even if the network would have come back.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
///
/// use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
/// use pglock::{postgres, r2d2, NetworkTimeout};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut config: postgres::Config = "postgres://app@db.internal/app".parse()?;
/// NetworkTimeout::new(Duration::from_secs(10)).apply(&mut config);
/// let pool = r2d2::Pool::new(PostgresConnectionManager::new(config, NoTls))?;
/// # let _ = pool;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkTimeout {
    within: Duration,
    server: bool,
}

impl NetworkTimeout {
    /// The shortest bound: TCP keepalives count in whole seconds.
    pub const MIN: Duration = Duration::from_secs(2);

    /// The longest bound: one day (Linux takes keepalive times up to about 9 hours).
    pub const MAX: Duration = Duration::from_secs(86_400);

    /// Connections whose network went silent are given up within `within`, on both ends.
    ///
    /// `within` is rounded up to whole seconds and kept between [`MIN`](Self::MIN) (2 s)
    /// and [`MAX`](Self::MAX) (1 day); [`within`](Self::within) tells the bound in effect.
    /// Nothing is validated against a server here: the settings take effect as each new
    /// connection is made.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use pglock::NetworkTimeout;
    ///
    /// let bound = NetworkTimeout::new(Duration::from_millis(7500));
    /// assert_eq!(bound.within(), Duration::from_secs(8));
    /// assert_eq!(NetworkTimeout::new(Duration::ZERO).within(), NetworkTimeout::MIN);
    /// assert_eq!(NetworkTimeout::new(Duration::MAX).within(), NetworkTimeout::MAX);
    /// ```
    pub fn new(within: Duration) -> Self {
        let secs = within
            .as_secs()
            .saturating_add(u64::from(within.subsec_nanos() > 0));
        let secs = secs.clamp(Self::MIN.as_secs(), Self::MAX.as_secs());
        NetworkTimeout {
            within: Duration::from_secs(secs),
            server: true,
        }
    }

    /// Sets only the client's socket, not the server's (no startup `options`): for a
    /// connection through a pooler that refuses them.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use pglock::{postgres, NetworkTimeout};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut config: postgres::Config = "postgres://app@pgbouncer/app".parse()?;
    /// NetworkTimeout::new(Duration::from_secs(10)).client_only().apply(&mut config);
    /// assert_eq!(config.get_options(), None);
    /// assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(10)));
    /// # Ok(())
    /// # }
    /// ```
    pub fn client_only(mut self) -> Self {
        self.server = false;
        self
    }

    /// The bound in effect: how long a silent connection lasts at most, give or take one
    /// keepalive interval.
    pub fn within(&self) -> Duration {
        self.within
    }

    /// Applies the settings to `config`: keepalives, `tcp_user_timeout` and (when none is
    /// set) `connect_timeout` for the client, and, unless [`client_only`](Self::client_only),
    /// the server's keepalives and `client_connection_check_interval` appended to the
    /// startup `options` (after any already there, so these win).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use pglock::{postgres, NetworkTimeout};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut config: postgres::Config = "host=db user=app options='-c search_path=app'".parse()?;
    /// NetworkTimeout::new(Duration::from_secs(12)).apply(&mut config);
    /// assert_eq!(config.get_keepalives_idle(), Duration::from_secs(2));
    /// assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(2)));
    /// assert_eq!(config.get_keepalives_retries(), Some(5));
    /// assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(12)));
    /// assert_eq!(
    ///     config.get_options(),
    ///     Some(
    ///         "-c search_path=app -c tcp_keepalives_idle=2 -c tcp_keepalives_interval=2 \
    ///          -c tcp_keepalives_count=5 -c tcp_user_timeout=12000 \
    ///          -c client_connection_check_interval=2000"
    ///     )
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply<'a>(&self, config: &'a mut postgres::Config) -> &'a mut postgres::Config {
        let p = self.probes();
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(p.idle))
            .keepalives_interval(Duration::from_secs(p.interval))
            .keepalives_retries(p.count)
            .tcp_user_timeout(self.within);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.within);
        }
        if self.server {
            let ours = server_options(&p, self.within);
            let options = match config.get_options() {
                Some(existing) if !existing.trim().is_empty() => format!("{existing} {ours}"),
                _ => ours,
            };
            config.options(&options);
        }
        config
    }

    /// The server's half for a session that is already open, as SQL: `SET` statements
    /// for the same settings the startup `options` carry. For a connection that cannot
    /// carry startup options but reaches the server directly (pglock's command-line
    /// tool checks for a pooler first, then sends these). `client_connection_check_interval`
    /// needs PostgreSQL 14: an older server refuses the batch as a whole.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use pglock::NetworkTimeout;
    ///
    /// assert_eq!(
    ///     NetworkTimeout::new(Duration::from_secs(30)).server_sql(),
    ///     "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 5; \
    ///      SET tcp_keepalives_count = 5; SET tcp_user_timeout = 30000; \
    ///      SET client_connection_check_interval = 5000"
    /// );
    /// ```
    pub fn server_sql(&self) -> String {
        server_settings(&self.probes(), self.within)
            .iter()
            .map(|(name, value)| format!("SET {name} = {value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Probes every `within / 6` of silence (at least 1 s), as many as fit in the rest of
    /// the bound: the last sign of life is never more than one interval old when a cut
    /// starts, and the silence that ends a connection is `idle + count × interval`,
    /// `within` (give or take a second of rounding).
    fn probes(&self) -> Probes {
        let secs = self.within.as_secs();
        let interval = (secs / 6).max(1);
        let count = ((secs - interval) / interval).clamp(1, 127);
        Probes {
            idle: interval,
            interval,
            count: count as u32,
        }
    }
}

/// Keepalive timing in whole seconds.
struct Probes {
    idle: u64,
    interval: u64,
    count: u32,
}

/// The server's settings, by name. Only integers.
fn server_settings(p: &Probes, within: Duration) -> [(&'static str, u64); 5] {
    [
        ("tcp_keepalives_idle", p.idle),
        ("tcp_keepalives_interval", p.interval),
        ("tcp_keepalives_count", u64::from(p.count)),
        ("tcp_user_timeout", within.as_secs() * 1000),
        ("client_connection_check_interval", p.interval * 1000),
    ]
}

/// The server's settings as startup options.
fn server_options(p: &Probes, within: Duration) -> String {
    server_settings(p, within)
        .iter()
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_fill_the_bound() {
        for secs in [2, 3, 4, 5, 10, 30, 600, 86_400] {
            let p = NetworkTimeout::new(Duration::from_secs(secs)).probes();
            assert!(p.idle >= 1 && p.interval >= 1 && p.count >= 1, "{secs}");
            // Linux's limits: idle and interval up to 32767 s, at most 127 probes.
            assert!(
                p.idle <= 32_767 && p.interval <= 32_767 && p.count <= 127,
                "{secs}"
            );
            // The silence that ends a connection is the bound, give or take rounding.
            let silence = p.idle + u64::from(p.count) * p.interval;
            assert!(
                silence <= secs && silence + p.interval > secs,
                "{secs}: {silence}"
            );
        }
    }

    #[test]
    fn the_bound_is_rounded_up_and_clamped() {
        let t = |d| NetworkTimeout::new(d).within();
        assert_eq!(t(Duration::from_millis(2001)), Duration::from_secs(3));
        assert_eq!(t(Duration::from_secs(1)), NetworkTimeout::MIN);
        assert_eq!(t(Duration::from_secs(10_000_000)), NetworkTimeout::MAX);
    }

    #[test]
    fn server_options_are_integers_only() {
        let t = NetworkTimeout::new(Duration::from_secs(10));
        assert_eq!(
            server_options(&t.probes(), t.within()),
            "-c tcp_keepalives_idle=1 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=9 \
             -c tcp_user_timeout=10000 -c client_connection_check_interval=1000"
        );
    }

    #[test]
    fn client_only_leaves_the_options_alone() {
        let mut config = postgres::Config::new();
        config.options("-c search_path=app");
        NetworkTimeout::new(Duration::from_secs(4))
            .client_only()
            .apply(&mut config);
        assert_eq!(config.get_options(), Some("-c search_path=app"));
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(4)));
    }
}
