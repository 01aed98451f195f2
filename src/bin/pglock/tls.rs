//! TLS for the command, with libpq's settings and meanings (PostgreSQL 16's libpq):
//! `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, over OpenSSL (`postgres-openssl`).
//!
//! - `sslmode`: `disable` (plain), `allow` and `prefer` (TLS when the server offers it;
//!   `allow` is taken as `prefer`: both accept either), `require` (TLS or nothing),
//!   `verify-ca` (and the server's certificate chains to a trusted root), `verify-full`
//!   (and its name matches the host). Default `prefer`; `verify-full` with
//!   `sslrootcert=system`.
//! - `sslrootcert`: the trusted roots, a PEM file; default `~/.postgresql/root.crt`.
//!   As in libpq, when that file exists the chain is verified in every mode (`prefer`
//!   and `require` too); `verify-ca`/`verify-full` without it are an error, not a
//!   silent fall back to the system's store. `sslrootcert=system` uses the system's
//!   trust store (OpenSSL's default paths, `SSL_CERT_FILE`/`SSL_CERT_DIR`), and then
//!   any `sslmode` but `verify-full` is an error, as in libpq 16.
//! - `sslcert`/`sslkey`: a client certificate and its key, default
//!   `~/.postgresql/postgresql.crt` and `.key`, used when the certificate file exists.
//!   A key that group or others may read is refused, as libpq does.

use std::path::{Path, PathBuf};

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use pglock::postgres::config::SslMode;
use postgres_openssl::MakeTlsConnector;

use crate::fail::Fail;
use crate::libpq::Settings;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(text: &str) -> Option<Mode> {
        Some(match text {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

/// The trusted roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Roots {
    /// None: the server's certificate is not checked.
    Unchecked,
    /// A PEM file.
    File(PathBuf),
    /// The system's trust store (`sslrootcert=system`).
    System,
}

/// How to connect: the mode, the roots, a client certificate.
#[derive(Debug, Clone)]
pub(crate) struct Tls {
    pub(crate) mode: Mode,
    pub(crate) roots: Roots,
    /// The client's certificate and key files.
    pub(crate) client: Option<(PathBuf, PathBuf)>,
}

impl Tls {
    /// Takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of `settings` (the
    /// `postgres` crate knows only three modes, and no files). `home` is where
    /// `~/.postgresql` is.
    pub(crate) fn from_settings(settings: &mut Settings, home: Option<&Path>) -> Result<Tls, Fail> {
        let mode_from = settings.source("sslmode").cloned();
        let mode_text = settings.remove("sslmode");
        let root_text = settings.remove("sslrootcert");
        let cert_text = settings.remove("sslcert");
        let key_text = settings.remove("sslkey");
        let dot = |file: &str| home.map(|h| h.join(".postgresql").join(file));
        let system = root_text.as_deref() == Some("system");
        let mode = match mode_text.as_deref() {
            None if system => Mode::VerifyFull,
            None => Mode::Prefer,
            Some(text) => Mode::parse(text).ok_or_else(|| {
                Fail::usage(format!(
                    "invalid sslmode {text:?} (from {}): use disable, allow, prefer, require, \
                     verify-ca or verify-full",
                    mode_from.map_or("the settings".to_owned(), |f| f.to_string())
                ))
            })?,
        };
        if system && mode != Mode::VerifyFull {
            return Err(Fail::usage(format!(
                "weak sslmode {:?} may not be used with sslrootcert=system (use \
                 \"verify-full\")",
                mode.name()
            )));
        }
        let roots = if system {
            Roots::System
        } else {
            let file = root_text.map(PathBuf::from).or_else(|| dot("root.crt"));
            match file {
                Some(file) if file.is_file() => Roots::File(file),
                file if matches!(mode, Mode::VerifyCa | Mode::VerifyFull) => {
                    return Err(Fail::usage(format!(
                        "root certificate file {} does not exist: sslmode={} verifies the \
                         server's certificate; give the file with sslrootcert (or \
                         PGSSLROOTCERT), use the system's trusted roots with \
                         sslrootcert=system, or choose an sslmode that does not verify",
                        file.map_or("~/.postgresql/root.crt".to_owned(), |f| f
                            .display()
                            .to_string()),
                        mode.name()
                    )))
                }
                _ => Roots::Unchecked,
            }
        };
        let cert = cert_text
            .map(PathBuf::from)
            .or_else(|| dot("postgresql.crt"));
        let client = match cert {
            Some(cert) if cert.is_file() => {
                let key = key_text
                    .map(PathBuf::from)
                    .or_else(|| dot("postgresql.key"))
                    .unwrap_or_default();
                check_key(&key)?;
                Some((cert, key))
            }
            _ => None,
        };
        Ok(Tls {
            mode,
            roots,
            client,
        })
    }

    /// What the `postgres` crate's `Config` is told.
    pub(crate) fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    /// The connector for every connection (and cancel request) of the command.
    pub(crate) fn connector(&self) -> Result<MakeTlsConnector, Fail> {
        let fail = |what: &str, e: openssl::error::ErrorStack| {
            Fail::usage(format!("TLS: cannot {what}: {e}"))
        };
        let mut builder =
            SslConnector::builder(SslMethod::tls_client()).map_err(|e| fail("start", e))?;
        match &self.roots {
            Roots::Unchecked => builder.set_verify(SslVerifyMode::NONE),
            Roots::File(file) => {
                builder
                    .set_ca_file(file)
                    .map_err(|e| fail(&format!("read sslrootcert {}", file.display()), e))?;
                builder.set_verify(SslVerifyMode::PEER);
            }
            Roots::System => {
                builder
                    .set_default_verify_paths()
                    .map_err(|e| fail("load the system's trusted roots", e))?;
                builder.set_verify(SslVerifyMode::PEER);
            }
        }
        if let Some((cert, key)) = &self.client {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| fail(&format!("read sslcert {}", cert.display()), e))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| fail(&format!("read sslkey {}", key.display()), e))?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        // Only verify-full checks the host name.
        let full = self.mode == Mode::VerifyFull;
        connector.set_callback(move |config, _domain| {
            config.set_verify_hostname(full);
            Ok(())
        });
        Ok(connector)
    }

    /// A hint for a failed connection whose message says the certificate was refused.
    pub(crate) fn hint(&self, message: &str) -> Option<String> {
        if !message.contains("certificate verify failed") {
            return None;
        }
        let roots = match &self.roots {
            Roots::File(file) => format!("the roots in {}", file.display()),
            Roots::System => "the system's trusted roots".to_owned(),
            Roots::Unchecked => "no roots".to_owned(),
        };
        Some(format!(
            "sslmode={}: the server's certificate could not be verified against {roots} \
             (sslrootcert, PGSSLROOTCERT){}",
            self.mode.name(),
            if self.mode == Mode::VerifyFull {
                ", or does not name the host"
            } else {
                ""
            }
        ))
    }
}

/// libpq refuses a private key that group or others may read (0600 or less; 0640 when
/// root owns it).
fn check_key(key: &Path) -> Result<(), Fail> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(key).map_err(|e| {
        Fail::usage(format!(
            "cannot read the client certificate's key {} (sslkey): {e}",
            key.display()
        ))
    })?;
    let mode = meta.permissions().mode();
    let allowed = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if mode & allowed != 0 {
        return Err(Fail::usage(format!(
            "private key file {} has group or world access; it must have permissions u=rw \
             (0600) or less if owned by the current user, or u=rw,g=r (0640) or less if \
             owned by root",
            key.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libpq::From;

    fn tls(pairs: &[(&str, &str)], home: Option<&Path>) -> Result<Tls, Fail> {
        let mut s = Settings::default();
        for (k, v) in pairs {
            s.fill(k, v.to_string(), From::ConnString);
        }
        Tls::from_settings(&mut s, home)
    }

    #[test]
    fn modes_and_defaults_are_libpqs() {
        let none = Path::new("/nonexistent-pglock-home");
        let t = tls(&[], Some(none)).unwrap();
        assert_eq!((t.mode, t.ssl_mode()), (Mode::Prefer, SslMode::Prefer));
        assert_eq!(t.roots, Roots::Unchecked);
        let t = tls(&[("sslmode", "allow")], Some(none)).unwrap();
        assert_eq!(t.mode, Mode::Prefer);
        let t = tls(&[("sslmode", "require")], Some(none)).unwrap();
        assert_eq!(t.ssl_mode(), SslMode::Require);
        assert_eq!(
            tls(&[("sslmode", "disable")], None).unwrap().ssl_mode(),
            SslMode::Disable
        );
        let t = tls(&[("sslrootcert", "system")], None).unwrap();
        assert_eq!((t.mode, t.roots), (Mode::VerifyFull, Roots::System));
        for (pairs, needle) in [
            (&[("sslmode", "verify-ca")][..], "does not exist"),
            (
                &[("sslmode", "verify-full"), ("sslrootcert", "/no/such.crt")][..],
                "/no/such.crt",
            ),
            (
                &[("sslmode", "require"), ("sslrootcert", "system")][..],
                "weak sslmode",
            ),
            (&[("sslmode", "sometimes")][..], "invalid sslmode"),
        ] {
            let err = tls(pairs, Some(none)).unwrap_err();
            assert_eq!(err.code, crate::fail::EX_USAGE);
            assert!(err.msg.contains(needle), "{pairs:?}: {}", err.msg);
        }
    }

    #[test]
    fn a_root_file_that_exists_is_checked_in_every_mode() {
        let home = std::env::temp_dir().join(format!("pglock-tls-{}", std::process::id()));
        std::fs::create_dir_all(home.join(".postgresql")).unwrap();
        std::fs::write(home.join(".postgresql/root.crt"), "").unwrap();
        let t = tls(&[("sslmode", "require")], Some(&home)).unwrap();
        assert_eq!(t.roots, Roots::File(home.join(".postgresql/root.crt")));
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn a_client_key_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pglock-tls-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("c.crt"), dir.join("c.key"));
        std::fs::write(&cert, "").unwrap();
        std::fs::write(&key, "").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let pairs = [
            ("sslcert", cert.to_str().unwrap()),
            ("sslkey", key.to_str().unwrap()),
        ];
        let err = tls(&pairs, None).unwrap_err();
        assert!(err.msg.contains("group or world access"), "{}", err.msg);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(tls(&pairs, None).unwrap().client, Some((cert, key)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
