//! A network partition on loopback, like a pulled cable: an `nftables` rule drops every
//! packet of one TCP connection (matched by both its ports), or of every connection to a
//! listening port, both ways, without closing anything. Needs root (CAP_NET_ADMIN) and the `nft` command;
//! `ci/with-postgres` installs Debian's nftables package when run as root.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use postgres::Client;

/// A cut connection; the cable is plugged back in on drop.
#[derive(Debug)]
pub struct Partition {
    table: String,
    port: u16,
    /// The client port reserved for the cut's length.
    reserved: Option<u16>,
}

/// The two ports of `client`'s TCP connection, as the server sees them: (the client's,
/// the server's).
pub fn ports(client: &mut Client) -> (u16, u16) {
    let row = client
        .query_one("SELECT inet_client_port(), inet_server_port()", &[])
        .expect("inet_client_port()");
    let port = |i| {
        let port: Option<i32> = row.try_get(i).expect("a port");
        let port =
            port.expect("the connection is not over TCP (a Unix-domain socket cannot be cut)");
        u16::try_from(port).expect("a TCP port")
    };
    (port(0), port(1))
}

/// The ports (this process's, `port`) of this process's one TCP connection to the
/// loopback port `port`, read from `/proc` (for a connection the server cannot name, such
/// as one to a pooler). Panics unless there is exactly one.
pub fn own_connection_to(port: u16) -> (u16, u16) {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let hex_port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap(), 16).unwrap();
    // A set: /proc/net/tcp is made in pages while sockets come and go, and may list one
    // twice.
    let mine: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, inode) = (f[1], f[2], f[9]);
            (hex_port(remote) == port && inodes.contains(inode)).then(|| hex_port(local))
        })
        .collect::<std::collections::BTreeSet<u16>>()
        .into_iter()
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "connections of this process to port {port}: {mine:?}"
    );
    (mine[0], port)
}

impl Partition {
    /// Drops every packet of the one TCP connection between the client port and the
    /// server port of `ports` (on loopback), both ways.
    ///
    /// The client port is reserved (`ip_local_reserved_ports`) while the cut lasts: once
    /// the cut connection dies its port is free at once (no TIME_WAIT after a timeout),
    /// and another test's new connection to the same server could get it and be cut too.
    pub fn cut((client, server): (u16, u16)) -> Partition {
        reserved_ports(|ports| {
            ports.insert(client);
        });
        let mut cut = Partition::with_rules(
            client,
            &format!(
                "tcp sport {client} tcp dport {server} drop\n  \
                 tcp sport {server} tcp dport {client} drop"
            ),
        );
        cut.reserved = Some(client);
        cut
    }

    /// Drops every packet to and from the listening port `port`, both ways: every
    /// connection to it, open or new, as if its host vanished.
    pub fn cut_listener(port: u16) -> Partition {
        Partition::with_rules(
            port,
            &format!("tcp sport {port} drop\n  tcp dport {port} drop"),
        )
    }

    fn with_rules(port: u16, rules: &str) -> Partition {
        // Named after this process (so that ci/with-postgres can remove the rules of a
        // process that died), the port, and a count (one port may be cut twice).
        static CUTS: AtomicU64 = AtomicU64::new(0);
        let n = CUTS.fetch_add(1, Ordering::Relaxed);
        let table = format!("pglock_partition_{}_{port}_{n}", std::process::id());
        let rules = format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n  \
             {rules}\n }}\n}}\n"
        );
        if let Err(e) = nft(&["-f", "-"], Some(&rules)) {
            panic!("{e}");
        }
        Partition {
            table,
            port,
            reserved: None,
        }
    }

    /// The port the rules name.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Never panic here: a test that already failed is unwinding.
        if let Err(e) = nft(&["delete", "table", "inet", &self.table], None) {
            eprintln!("could not remove the partition: {e}");
        }
        if let Some(port) = self.reserved {
            reserved_ports(|ports| {
                ports.remove(&port);
            });
        }
    }
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let how = "\n\ntests that cut the network drop packets with nftables: they need root (or \
               CAP_NET_ADMIN) and the nft command (Debian: apt-get install nftables; \
               ci/with-postgres installs it when run as root):\n\n    \
               ci/with-postgres cargo nextest run --features cli\n\n";
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not run nft: {e}{how}"))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .map_err(|e| format!("could not write to nft: {e}"))?;
    }
    drop(child.stdin.take());
    let out = child
        .wait_with_output()
        .map_err(|e| format!("nft did not finish: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft {args:?} failed: {}{how}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Changes the kernel's reserved local ports (ports no new connection is given), under a
/// file lock shared by every test process. Failures are reported, never panicked on (it
/// runs in `Drop` too).
fn reserved_ports(change: impl FnOnce(&mut std::collections::BTreeSet<u16>)) {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("pglock-reserved-ports.lock"));
    let lock = match lock {
        Ok(file) => file,
        Err(e) => return eprintln!("could not open the reserved ports' lock file: {e}"),
    };
    if let Err(e) = lock.lock() {
        return eprintln!("could not lock the reserved ports' lock file: {e}");
    }
    // In one read: this file gives its list to the first read only, and read_to_string
    // (which probes with 32 bytes first) would get it truncated.
    let mut buf = vec![0u8; 1 << 16];
    let n = std::fs::File::open(RESERVED)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut buf))
        .unwrap_or(0);
    let current = String::from_utf8_lossy(&buf[..n]).into_owned();
    let mut ports = std::collections::BTreeSet::new();
    for part in current.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
            ports.extend(a..=b);
        }
    }
    change(&mut ports);
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // An empty list is written as a newline.
    if let Err(e) = std::fs::write(RESERVED, format!("{list}\n")) {
        eprintln!("could not write {RESERVED}: {e}");
    }
}
