//! Lock keys: the two advisory-lock key spaces, and names hashed into them.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The identity of an advisory lock on the server.
///
/// PostgreSQL has two disjoint key spaces for advisory locks: one 64-bit integer
/// (`pg_advisory_lock(bigint)`) or a pair of 32-bit integers (`pg_advisory_lock(int, int)`).
/// The key `42` and the pair `(0, 42)` are different locks.
///
/// A key can also be made from a name. The name maps to the 64-bit key that PostgreSQL's
/// `hashtextextended(name, 0)` returns for the name's UTF-8 bytes, computed here without a
/// round trip, so that a shell script or a program in any other language takes the same lock:
///
/// ```sql
/// SELECT pg_advisory_lock(hashtextextended('nightly-report', 0));
/// ```
///
/// The name is kept as a label for logs and error messages. Two keys are equal when they
/// name the same server lock, whatever their labels.
///
/// # The hash
///
/// `hashtextextended` is Bob Jenkins' lookup3 hash as PostgreSQL implements it
/// (`hash_bytes_extended`). PostgreSQL keeps it stable across major versions because hash
/// partitioning depends on it. It hashes the text's bytes in the database encoding, so the
/// SQL form above takes the same lock only on a `UTF8` database; and PostgreSQL computes it
/// in native byte order, so a big-endian server (s390x) returns different values. pglock
/// always computes the little-endian value, the one every x86-64 and ARM64 server returns.
/// The hash is 64 bits wide: two distinct names share a key with probability about
/// `n² / 2⁶⁵` for `n` names (about one in 37 million for a million names).
///
/// # Coordinates in `pg_locks`
///
/// An advisory lock shows in `pg_locks` with `locktype = 'advisory'` and three columns,
/// which [`classid`](LockKey::classid), [`objid`](LockKey::objid) and
/// [`objsubid`](LockKey::objsubid) return: for a 64-bit key the high and low 32 bits and
/// `1`; for a pair, the two integers (as unsigned oids) and `2`. `Display` shows them.
///
/// # Examples
///
/// ```
/// use pglock::LockKey;
///
/// let key = LockKey::from_name("nightly-report");
/// assert_eq!(key.as_i64(), Some(-1761082894366742330));
/// assert_eq!(key.name(), Some("nightly-report"));
///
/// let pair = LockKey::pair(7, -1);
/// assert_eq!((pair.classid(), pair.objid(), pair.objsubid()), (7, 4294967295, 2));
/// assert_ne!(LockKey::new(42), LockKey::pair(0, 42));
///
/// assert_eq!(
///     LockKey::new(42).to_string(),
///     "42 (pg_locks classid=0 objid=42 objsubid=1)"
/// );
/// ```
#[derive(Clone)]
pub struct LockKey {
    id: KeyId,
    name: Option<Arc<str>>,
    /// For a lease: its table, as written in SQL. The key then names a row, not an
    /// advisory lock, and says so when displayed.
    lease_table: Option<Arc<str>>,
    /// The namespace of [`LockKey::from_name_in`].
    namespace: Option<Arc<str>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum KeyId {
    Single(i64),
    Pair(i32, i32),
}

impl LockKey {
    /// A key in the 64-bit key space: `pg_advisory_lock(key)`.
    pub const fn new(key: i64) -> Self {
        LockKey {
            id: KeyId::Single(key),
            name: None,
            lease_table: None,
            namespace: None,
        }
    }

    /// A key in the two-integer key space: `pg_advisory_lock(key1, key2)`.
    pub const fn pair(key1: i32, key2: i32) -> Self {
        LockKey {
            id: KeyId::Pair(key1, key2),
            name: None,
            lease_table: None,
            namespace: None,
        }
    }

    /// A key in the 64-bit key space made from a name: the value of PostgreSQL's
    /// `hashtextextended(name, 0)` for the name's UTF-8 bytes.
    ///
    /// The name must be valid PostgreSQL text: a name containing a NUL character is
    /// rejected with [`Error::InvalidArgument`](crate::Error::InvalidArgument) when a lock
    /// is made with it, because no SQL client could take the same lock.
    pub fn from_name(name: &str) -> Self {
        LockKey {
            id: KeyId::Single(hash_text(name.as_bytes())),
            name: Some(Arc::from(name)),
            lease_table: None,
            namespace: None,
        }
    }

    /// A key for `name` within an application `namespace` (a schema, a tenant, a
    /// migration table...), so that two applications on one database that use the same
    /// names do not take each other's locks: `hashtextextended(name, seed)` with the
    /// namespace's own hash as the seed, in the same 64-bit key space as
    /// [`from_name`](LockKey::from_name). Other programs take the same lock with
    ///
    /// ```sql
    /// SELECT pg_advisory_lock(hashtextextended('migrations', hashtextextended('tenant-42', 0)));
    /// ```
    ///
    /// A namespaced key can still equal another key by chance (a 64-bit hash), as any
    /// two names can; and keys made with [`new`](LockKey::new) or
    /// [`pair`](LockKey::pair) by hand share the spaces too. For leases, use a
    /// [`LeaseTable`](crate::LeaseTable) per namespace instead.
    ///
    /// As with [`from_name`](LockKey::from_name), neither may contain a NUL character.
    ///
    /// # Examples
    ///
    /// ```
    /// use pglock::LockKey;
    ///
    /// let a = LockKey::from_name_in("tenant-1", "migrations");
    /// let b = LockKey::from_name_in("tenant-2", "migrations");
    /// assert_ne!(a, b);
    /// assert_ne!(a, LockKey::from_name("migrations"));
    /// assert_eq!(a.namespace(), Some("tenant-1"));
    /// ```
    pub fn from_name_in(namespace: &str, name: &str) -> Self {
        let seed = hash_text(namespace.as_bytes()) as u64;
        LockKey {
            id: KeyId::Single(hash_bytes_extended(name.as_bytes(), seed) as i64),
            name: Some(Arc::from(name)),
            lease_table: None,
            namespace: Some(Arc::from(namespace)),
        }
    }

    /// The namespace of a key made with [`from_name_in`](LockKey::from_name_in).
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The 64-bit key, or `None` for a pair.
    pub fn as_i64(&self) -> Option<i64> {
        match self.id {
            KeyId::Single(key) => Some(key),
            KeyId::Pair(..) => None,
        }
    }

    /// The two integers of a pair, or `None` for a 64-bit key.
    pub fn as_pair(&self) -> Option<(i32, i32)> {
        match self.id {
            KeyId::Single(_) => None,
            KeyId::Pair(a, b) => Some((a, b)),
        }
    }

    /// The name this key was made from, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The `classid` column of this lock's row in `pg_locks`.
    pub fn classid(&self) -> u32 {
        match self.id {
            KeyId::Single(key) => ((key as u64) >> 32) as u32,
            KeyId::Pair(a, _) => a as u32,
        }
    }

    /// The `objid` column of this lock's row in `pg_locks`.
    pub fn objid(&self) -> u32 {
        match self.id {
            KeyId::Single(key) => key as u64 as u32,
            KeyId::Pair(_, b) => b as u32,
        }
    }

    /// The `objsubid` column of this lock's row in `pg_locks`: `1` for a 64-bit key,
    /// `2` for a pair.
    pub fn objsubid(&self) -> i16 {
        match self.id {
            KeyId::Single(_) => 1,
            KeyId::Pair(..) => 2,
        }
    }

    /// The argument list of the advisory-lock functions for this key, as SQL: `42` or
    /// `1, 2`. Integers only, so it is safe to inline in a simple-protocol query.
    /// The key of the lease `name` in `table` (as written in SQL): displayed as a lease,
    /// compared and hashed like [`LockKey::from_name`].
    pub(crate) fn lease(table: &str, name: &str) -> Self {
        LockKey {
            lease_table: Some(Arc::from(table)),
            ..LockKey::from_name(name)
        }
    }

    /// The same key with `label` as its name, for logs and errors: a semaphore's slot
    /// key labelled with the semaphore's name, a lock set's first key labelled as the set.
    pub(crate) fn labelled(mut self, label: &str) -> Self {
        self.name = Some(Arc::from(label));
        self
    }

    pub(crate) fn sql_args(&self) -> String {
        match self.id {
            KeyId::Single(key) => key.to_string(),
            KeyId::Pair(a, b) => format!("{a}, {b}"),
        }
    }
}

impl PartialEq for LockKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for LockKey {}

impl Hash for LockKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.lease_table, &self.name) {
            (Some(table), Some(name)) if name.is_empty() => {
                return write!(f, "lease table {table}")
            }
            (Some(table), Some(name)) => return write!(f, "{name:?} (lease in {table})"),
            _ => {}
        }
        match (&self.name, self.id) {
            (Some(name), KeyId::Single(key)) => match &self.namespace {
                Some(ns) => write!(f, "{name:?} in namespace {ns:?} (key {key}, ")?,
                None => write!(f, "{name:?} (key {key}, ")?,
            },
            (None, KeyId::Single(key)) => write!(f, "{key} (")?,
            (Some(name), KeyId::Pair(a, b)) => write!(f, "{name:?} (pair ({a}, {b}), ")?,
            (None, KeyId::Pair(a, b)) => write!(f, "({a}, {b}) (")?,
        }
        write!(
            f,
            "pg_locks classid={} objid={} objsubid={})",
            self.classid(),
            self.objid(),
            self.objsubid()
        )
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("LockKey");
        match self.id {
            KeyId::Single(key) => s.field("key", &key),
            KeyId::Pair(a, b) => s.field("pair", &(a, b)),
        };
        if let Some(name) = &self.name {
            s.field("name", name);
        }
        if let Some(ns) = &self.namespace {
            s.field("namespace", ns);
        }
        s.finish()
    }
}

impl From<i64> for LockKey {
    fn from(key: i64) -> Self {
        LockKey::new(key)
    }
}

impl From<(i32, i32)> for LockKey {
    fn from((key1, key2): (i32, i32)) -> Self {
        LockKey::pair(key1, key2)
    }
}

impl From<&str> for LockKey {
    fn from(name: &str) -> Self {
        LockKey::from_name(name)
    }
}

impl From<&String> for LockKey {
    fn from(name: &String) -> Self {
        LockKey::from_name(name)
    }
}

impl From<String> for LockKey {
    fn from(name: String) -> Self {
        LockKey::from_name(&name)
    }
}

impl From<&LockKey> for LockKey {
    fn from(key: &LockKey) -> Self {
        key.clone()
    }
}

/// `hashtextextended(text, 0)` of these bytes, as a little-endian PostgreSQL server
/// computes it.
fn hash_text(bytes: &[u8]) -> i64 {
    hash_bytes_extended(bytes, 0) as i64
}

/// PostgreSQL's `hash_bytes_extended` (src/common/hashfn.c), little-endian variant.
///
/// On a little-endian server the aligned and unaligned code paths read the same words,
/// so one byte-wise implementation matches both.
fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    // PostgreSQL passes the length as an int; text is at most 1 GB, so it fits.
    let len = key.len() as u32;
    let mut a = 0x9e37_79b9_u32.wrapping_add(len).wrapping_add(3_923_095);
    let mut b = a;
    let mut c = a;

    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }

    let mut chunks = key.chunks_exact(12);
    for chunk in &mut chunks {
        a = a.wrapping_add(word(&chunk[0..4]));
        b = b.wrapping_add(word(&chunk[4..8]));
        c = c.wrapping_add(word(&chunk[8..12]));
        mix(&mut a, &mut b, &mut c);
    }

    // The last 0..=11 bytes: a takes bytes 0..4, b bytes 4..8, and c bytes 8..11 shifted
    // up one byte (its lowest byte is reserved for the length in the original design).
    let tail = chunks.remainder();
    for (i, &byte) in tail.iter().enumerate() {
        let byte = u32::from(byte);
        match i {
            0..=3 => a = a.wrapping_add(byte << (8 * i)),
            4..=7 => b = b.wrapping_add(byte << (8 * (i - 4))),
            _ => c = c.wrapping_add(byte << (8 * (i - 7))),
        }
    }

    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

fn word(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values from `SELECT hashtextextended(name, seed)` on PostgreSQL 15
    /// (x86-64, UTF8 database). `tests/keys.rs` checks these and more against the live
    /// server; these pin the algorithm without one.
    const GOLDEN: &[(&str, i64, i64)] = &[
        ("", 0, -6939563903564495251),
        ("nightly-report", 0, -1761082894366742330),
    ];

    #[test]
    fn golden_values() {
        for &(name, seed, want) in GOLDEN {
            assert_eq!(
                hash_bytes_extended(name.as_bytes(), seed as u64) as i64,
                want,
                "hashtextextended({name:?}, {seed})"
            );
        }
    }

    #[test]
    fn every_tail_length_reads_distinct_bytes() {
        // A byte at each position of a 0..=24-byte input must change the hash: this pins
        // the tail handling, where an off-by-one drops or double-counts a byte.
        for len in 1..=24 {
            let base = vec![b'x'; len];
            let h0 = hash_bytes_extended(&base, 0);
            for i in 0..len {
                let mut changed = base.clone();
                changed[i] = b'y';
                assert_ne!(hash_bytes_extended(&changed, 0), h0, "len {len} pos {i}");
            }
        }
    }

    #[test]
    fn pg_locks_coordinates() {
        let k = LockKey::new(-2);
        assert_eq!(
            (k.classid(), k.objid(), k.objsubid()),
            (u32::MAX, u32::MAX - 1, 1)
        );
        let k = LockKey::new(4294967297);
        assert_eq!((k.classid(), k.objid(), k.objsubid()), (1, 1, 1));
        let k = LockKey::pair(-1, -2);
        assert_eq!(
            (k.classid(), k.objid(), k.objsubid()),
            (u32::MAX, u32::MAX - 1, 2)
        );
    }

    #[test]
    fn equality_ignores_the_label() {
        let named = LockKey::from_name("x");
        let bare = LockKey::new(named.as_i64().unwrap());
        assert_eq!(named, bare);
        assert_ne!(LockKey::new(1), LockKey::pair(0, 1));
    }

    #[test]
    fn display_names_the_lock_and_its_coordinates() {
        assert_eq!(
            LockKey::from_name("nightly-report").to_string(),
            "\"nightly-report\" (key -1761082894366742330, pg_locks classid=3884933232 \
             objid=759228614 objsubid=1)"
        );
        assert_eq!(
            LockKey::pair(1, -1).to_string(),
            "(1, -1) (pg_locks classid=1 objid=4294967295 objsubid=2)"
        );
    }

    #[test]
    fn sql_args_are_plain_integers() {
        assert_eq!(LockKey::new(i64::MIN).sql_args(), "-9223372036854775808");
        assert_eq!(LockKey::pair(i32::MIN, 0).sql_args(), "-2147483648, 0");
    }
}
