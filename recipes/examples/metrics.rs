//! Serving pglock's metrics to Prometheus: the `metrics` feature feeds the `metrics`
//! facade; this program installs the Prometheus exporter's recorder (rendering only, no
//! HTTP stack), takes some locks, and serves `/metrics` over a plain `TcpListener`.
//! Run: `ci/with-postgres cargo run -p pglock-recipes --example metrics`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use pglock::r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
use pglock::{
    r2d2, AdvisorySemaphore, LeaseLock, LeaseTable, LockKey, LockOptions, LockSet, SessionLock,
    TxLock,
};

#[path = "../../examples/common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let url = common::database_url("cargo run -p pglock-recipes --example metrics");
    let pool = r2d2::Pool::new(PostgresConnectionManager::new(url.parse()?, NoTls))?;
    LeaseTable::default().create(&mut *pool.get()?)?;

    // Some traffic: uncontended locks of each kind, then a timeout under contention.
    SessionLock::new(&pool, "metrics-demo/report")?.with_lock(|_| Ok::<_, pglock::Error>(()))?;
    TxLock::new(&pool, "metrics-demo/migrate")?.with_lock(|_| Ok::<_, pglock::Error>(()))?;
    LeaseLock::new(&pool, "metrics-demo/export")?.with_lock(|_| Ok::<_, pglock::Error>(()))?;
    AdvisorySemaphore::new(&pool, "metrics-demo/workers", 2)?
        .with_lock(|_| Ok::<_, pglock::Error>(()))?;
    let keys = [
        LockKey::from_name("metrics-demo/a"),
        LockKey::from_name("metrics-demo/b"),
    ];
    LockSet::new(&pool, keys)?.with_lock(|_| Ok::<_, pglock::Error>(()))?;
    let mut holder = SessionLock::new(&pool, "metrics-demo/busy")?;
    let _held = holder.lock()?;
    let bounded = LockOptions::new().lock_timeout(Duration::from_millis(50));
    let timed_out = SessionLock::with_options(&pool, "metrics-demo/busy", bounded)?.lock_owned();
    assert!(matches!(timed_out, Err(pglock::Error::Timeout { .. })));

    // Serve one scrape, and be the scraper.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let scraper = std::thread::spawn(move || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(address)?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    });
    let (mut stream, _) = listener.accept()?;
    let mut request = [0u8; 1024];
    let _ = stream.read(&mut request)?;
    let body = metrics.render();
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    drop(stream);
    let scraped = scraper.join().expect("scraper panicked")?;
    for series in [
        r#"pglock_acquisitions_total{kind="session",lock="metrics-demo/report"} 1"#,
        r#"pglock_acquisitions_total{kind="transaction",lock="metrics-demo/migrate"} 1"#,
        r#"pglock_acquisitions_total{kind="lease",lock="metrics-demo/export"} 1"#,
        r#"pglock_timeouts_total{kind="session",lock="metrics-demo/busy"} 1"#,
        r#"pglock_acquisitions_total{kind="semaphore",lock="metrics-demo/workers"} 1"#,
        r#"pglock_acquisitions_total{kind="lock_set","#,
        "pglock_hold_seconds",
        "pglock_wait_seconds",
    ] {
        assert!(scraped.contains(series), "missing {series} in:\n{scraped}");
    }
    println!(
        "{}",
        scraped
            .lines()
            .filter(|l| l.starts_with("pglock_") && !l.contains("quantile"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
