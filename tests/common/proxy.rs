//! A TCP proxy between the tests' clients and the server that can cut a connection right
//! after forwarding a chosen client message, so its reply is lost: the fault of a reply
//! that never arrives, on command.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use postgres::config::Host;

/// The proxy. Connections through it are plain pass-through until armed.
pub struct FaultProxy {
    port: u16,
    /// Cut the next connection whose client sends bytes containing this, after forwarding
    /// them to the server.
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
}

impl FaultProxy {
    pub fn start() -> FaultProxy {
        let config = super::config();
        let host = match &config.get_hosts()[0] {
            Host::Tcp(host) => host.clone(),
            #[cfg(unix)]
            Host::Unix(_) => panic!("the fault proxy needs a TCP DATABASE_URL"),
        };
        let upstream = (host, config.get_ports().first().copied().unwrap_or(5432));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (armed2, cuts2) = (Arc::clone(&armed), Arc::clone(&cuts));
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream.clone()) else {
                    continue;
                };
                let (armed, cuts) = (Arc::clone(&armed2), Arc::clone(&cuts2));
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let c_kill = client.try_clone().unwrap();
                thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let hit = {
                            let mut armed = armed.lock().unwrap();
                            let hit = armed
                                .as_ref()
                                .is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == &p[..]));
                            if hit {
                                *armed = None;
                            }
                            hit
                        };
                        if hit {
                            // Close the client first, so that no reply can reach it; then
                            // hand the server the message, which it runs before it reads
                            // the end of the stream.
                            let _ = c_kill.shutdown(Shutdown::Both);
                            let _ = s_write.write_all(&buf[..n]);
                            cuts.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(Shutdown::Both);
                });
            }
        });
        FaultProxy { port, armed, cuts }
    }

    /// Cuts the next connection that sends `pattern`, right after forwarding it.
    pub fn cut_after(&self, pattern: &str) {
        *self.armed.lock().unwrap() = Some(pattern.as_bytes().to_vec());
    }

    /// How many connections were cut.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }

    /// A pool of `size` connections through the proxy.
    pub fn pool(&self, size: u32) -> super::Pool {
        super::pool_with(size, self.config())
    }

    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection settings that go through the proxy.
    pub fn config(&self) -> postgres::Config {
        let server = super::config();
        let mut config = postgres::Config::new();
        config.host("127.0.0.1").port(self.port);
        if let Some(user) = server.get_user() {
            config.user(user);
        }
        if let Some(password) = server.get_password() {
            config.password(password);
        }
        if let Some(dbname) = server.get_dbname() {
            config.dbname(dbname);
        }
        config
    }
}
