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
/// (the default keepalive time plus nine probes). Every peer library we know leaves this
/// to its users; most of them never set it.
///
/// `NetworkTimeout::new(within).apply(&mut config)` sets, on the connection settings a
/// pool is built from:
///
/// - on the client socket: TCP keepalives and `tcp_user_timeout`, so that any call on a
///   connection whose network went silent fails within `within` (plus one keepalive
///   interval) instead of blocking, and `connect_timeout` when none is set;
/// - on the server's socket for the session, through the startup `options`
///   (`tcp_keepalives_idle`, `tcp_keepalives_interval`, `tcp_keepalives_count` and
///   `tcp_user_timeout`, settings any role may change): the server ends the session of a
///   client it stopped hearing from within the same bound, which frees its advisory
///   locks for the next waiter. `client_connection_check_interval` (one keepalive
///   interval) makes a backend that is busy (waiting for a lock, running a query) look
///   at its socket too: without it, only an idle session notices a dead connection.
///   That setting needs PostgreSQL 14 or later.
///
/// The keepalives start after `within / 2` of silence and probe every `within / 6` (at
/// least one second); `tcp_user_timeout` is `within`. A keepalive probe is a few bytes,
/// answered by the peer's kernel: an idle holder costs nothing measurable.
///
/// What a caller sees when the network goes silent mid-call (`tests/partition.rs`, which
/// drops one connection's packets with an `nftables` rule):
///
/// - a waiting `lock()` (bounded or not) or a `try_lock()` fails within the bound with
///   [`Error::Database`](crate::Error::Database) (the connection closed), and the
///   connection is discarded, never returned to the pool;
/// - a holder's next call returns within the bound and tells it the lock is gone:
///   [`SessionGuard::is_held`](crate::SessionGuard::is_held) returns `false`,
///   [`SessionGuard::unlock`](crate::SessionGuard::unlock) fails with
///   [`Error::LockLost`](crate::Error::LockLost);
/// - the server frees a partitioned holder's locks within the bound, so a waiter gets
///   the lock then instead of hours later;
/// - a lease holder's own deadline runs out on time either way (it never depends on the
///   network); with this setting, `unlock()` of a partitioned lease also returns within
///   the bound instead of waiting for TCP.
///
/// Behind a pooler (PgBouncer), which refuses the startup `options` parameter unless told
/// to ignore it, use [`client_only`](Self::client_only): the pooler's own
/// `tcp_keepalive` settings cover its link to the server. On a Unix-domain socket, where
/// there is no network, both ends ignore these settings.
///
/// Pick `within` longer than the longest pause your network may take and still recover
/// from (a few seconds for a LAN, 10-30 s across zones): a connection cut for longer is
/// ended, and its locks are lost, even if the network would have come back.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
///
/// use pglock::NetworkTimeout;
/// use r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
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

    /// Connections whose network went silent are given up within `within`, on both ends.
    ///
    /// `within` is rounded up to whole seconds and is at least [`MIN`](Self::MIN) (2 s);
    /// [`within`](Self::within) tells the bound in effect. Nothing is validated against
    /// a server here: the settings take effect as each new connection is made.
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
    /// ```
    pub fn new(within: Duration) -> Self {
        let secs = within
            .as_secs()
            .saturating_add(u64::from(within.subsec_nanos() > 0));
        let secs = secs.clamp(Self::MIN.as_secs(), MAX_SECS);
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
    /// use pglock::NetworkTimeout;
    ///
    /// let mut config: postgres::Config = "postgres://app@pgbouncer/app".parse().unwrap();
    /// NetworkTimeout::new(Duration::from_secs(10)).client_only().apply(&mut config);
    /// assert_eq!(config.get_options(), None);
    /// assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(10)));
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
    /// the server's keepalive settings appended to the startup `options` (after any
    /// already there, so these win).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use pglock::NetworkTimeout;
    ///
    /// let mut config: postgres::Config = "host=db user=app options='-c search_path=app'"
    ///     .parse()
    ///     .unwrap();
    /// NetworkTimeout::new(Duration::from_secs(12)).apply(&mut config);
    /// assert_eq!(config.get_keepalives_idle(), Duration::from_secs(6));
    /// assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(2)));
    /// assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(12)));
    /// assert_eq!(
    ///     config.get_options(),
    ///     Some(
    ///         "-c search_path=app -c tcp_keepalives_idle=6 -c tcp_keepalives_interval=2 \
    ///          -c tcp_keepalives_count=3 -c tcp_user_timeout=12000 \
    ///          -c client_connection_check_interval=2000"
    ///     )
    /// );
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
    ///     "SET tcp_keepalives_idle = 15; SET tcp_keepalives_interval = 5; \
    ///      SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000; \
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

    fn probes(&self) -> Probes {
        let secs = self.within.as_secs();
        Probes {
            idle: secs.div_ceil(2),
            interval: (secs / 6).max(1),
            count: 3,
        }
    }
}

/// PostgreSQL's `tcp_user_timeout` is an `int` of milliseconds.
const MAX_SECS: u64 = i32::MAX as u64 / 1000;

/// Keepalive timing in whole seconds.
struct Probes {
    idle: u64,
    interval: u64,
    count: u32,
}

/// The server's settings, by name. Only integers.
fn server_settings(p: &Probes, within: Duration) -> [(&'static str, u128); 5] {
    [
        ("tcp_keepalives_idle", u128::from(p.idle)),
        ("tcp_keepalives_interval", u128::from(p.interval)),
        ("tcp_keepalives_count", u128::from(p.count)),
        ("tcp_user_timeout", within.as_millis()),
        (
            "client_connection_check_interval",
            u128::from(p.interval) * 1000,
        ),
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
    fn probes_fit_inside_the_bound() {
        for secs in [2, 3, 5, 10, 30, 600] {
            let t = NetworkTimeout::new(Duration::from_secs(secs));
            let p = t.probes();
            assert!(p.idle >= 1 && p.interval >= 1, "{secs}");
            // The first probe goes out by the bound, so that tcp_user_timeout can end the
            // connection at the first probe tick after it.
            assert!(
                p.idle + p.interval <= secs,
                "{secs}: {}+{}",
                p.idle,
                p.interval
            );
        }
    }

    #[test]
    fn the_bound_is_rounded_up_and_clamped() {
        assert_eq!(
            NetworkTimeout::new(Duration::from_millis(2001)).within(),
            Duration::from_secs(3)
        );
        assert_eq!(
            NetworkTimeout::new(Duration::from_secs(1)).within(),
            NetworkTimeout::MIN
        );
        assert_eq!(
            NetworkTimeout::new(Duration::MAX).within(),
            Duration::from_secs(MAX_SECS)
        );
    }

    #[test]
    fn server_options_are_integers_only() {
        let t = NetworkTimeout::new(Duration::from_secs(10));
        assert_eq!(
            server_options(&t.probes(), t.within()),
            "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 \
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
    }
}
