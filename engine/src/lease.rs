//! Writer leases and sweep notices: how backups and garbage collection
//! share a pool without a lock (the protocol is in docs/DESIGN.md,
//! "Garbage collection beside running backups").
//!
//! A backup holds a [`WriterLease`] from before it reads the index until
//! after its manifest is published: a small object
//! `leases/<writer id>.<heartbeat>` renewed every
//! [`LEASE_RENEW_INTERVAL`] under a new name (write the new one, then
//! delete the old one). A garbage collection waits for every writer whose
//! lease it saw when it announced its sweep; a lease whose newest heartbeat
//! is older than the expiry belongs to a dead (or frozen) writer and is
//! evicted by deleting it — the writer notices at its next renewal or at
//! its final check and withdraws its manifest.
//!
//! A [`SweepNotice`] (`sweeps/<time>.<random>`) names the packs a garbage
//! collection will delete; a backup that starts while one exists does not
//! reuse chunks from those packs.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::id::{hex, PackId};
use crate::kind::FileKind;
use crate::random::random_16;
use crate::store::pool::DynPool;
use crate::store::wire::DecodeError;

/// How often a running backup renews its lease.
pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(30);

/// First line of a sweep notice.
const SWEEP_MAGIC_LINE: &str = "cairn-sweep 1";

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A lease as listed: whose it is, when it was last renewed, and how often
/// its holder renews it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaseName {
    /// The writer (32 hex digits, random per backup).
    pub writer: String,
    /// The heartbeat: nanoseconds since the Unix epoch.
    pub heartbeat: u128,
    /// The holder's renewal interval in milliseconds.
    pub interval_ms: u64,
}

impl LeaseName {
    /// Parses `<32 hex>.<20 digits>.<interval ms>`; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        let mut parts = name.split('.');
        let (writer, beat, interval) = (parts.next()?, parts.next()?, parts.next()?);
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let ok = parts.next().is_none()
            && writer.len() == 32
            && writer
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && beat.len() == 20
            && digits(beat)
            && digits(interval)
            && interval.len() <= 12;
        // One spelling per lease (an interval of `030000` would name an
        // object its own `name()` does not, and a collection could never
        // delete it).
        ok.then(|| LeaseName {
            writer: writer.to_string(),
            heartbeat: beat.parse().unwrap_or(0),
            interval_ms: interval.parse().unwrap_or(0),
        })
        .filter(|l| l.name() == name)
    }

    /// The object name.
    pub fn name(&self) -> String {
        format!(
            "{}.{:020}.{}",
            self.writer, self.heartbeat, self.interval_ms
        )
    }

    /// How long this lease may go unrenewed before its holder counts as
    /// dead, for a collection configured with `expiry`: never less than
    /// three of the holder's own renewal intervals.
    pub fn grace(&self, expiry: Duration) -> Duration {
        expiry.max(Duration::from_millis(self.interval_ms.saturating_mul(3)))
    }

    /// Time since the heartbeat (zero if it lies in the future).
    pub fn age(&self) -> Duration {
        let now = now_nanos();
        Duration::from_nanos(now.saturating_sub(self.heartbeat).min(u64::MAX as u128) as u64)
    }
}

/// Every lease in the pool, parsed (foreign names skipped).
pub fn list_leases(pool: &DynPool) -> Result<Vec<LeaseName>> {
    let mut out: Vec<LeaseName> = pool
        .list(FileKind::Lease)?
        .iter()
        .filter_map(|n| LeaseName::parse(n))
        .collect();
    out.sort();
    Ok(out)
}

struct LeaseState {
    current: LeaseName,
    /// Set when a renewal found its previous lease deleted by someone else
    /// (a garbage collection evicted this writer as dead).
    lost: bool,
}

/// A running backup's lease. Renewed by a background thread; released on
/// drop. [`finish`](Self::finish) tells whether it was held throughout.
pub struct WriterLease {
    pool: DynPool,
    state: Arc<Mutex<LeaseState>>,
    stop: Option<mpsc::Sender<()>>,
    renewer: Option<JoinHandle<()>>,
    released: AtomicBool,
}

impl std::fmt::Debug for WriterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLease")
            .field("lease", &self.state.lock().current.name())
            .finish_non_exhaustive()
    }
}

impl WriterLease {
    /// Writes a new lease and starts renewing it every `interval`.
    pub fn acquire(pool: &DynPool, interval: Duration) -> Result<Self> {
        let current = LeaseName {
            writer: hex(&random_16()?),
            heartbeat: now_nanos(),
            interval_ms: interval.as_millis().min(u64::MAX as u128) as u64,
        };
        write_lease(pool, &current)?;
        let first_name = current.name();
        let state = Arc::new(Mutex::new(LeaseState {
            current,
            lost: false,
        }));
        let (stop, stopped) = mpsc::channel::<()>();
        let outer_pool = pool.clone();
        let renewer = {
            let (pool, state) = (pool.clone(), state.clone());
            std::thread::Builder::new()
                .name("cairn-lease".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval)
                    {
                        if !renew(&pool, &state) {
                            break;
                        }
                    }
                })
                .map_err(|e| {
                    let _ = outer_pool.delete(FileKind::Lease, &first_name);
                    Error::io("starting the lease renewal thread", e)
                })?
        };
        Ok(WriterLease {
            pool: pool.clone(),
            state,
            stop: Some(stop),
            renewer: Some(renewer),
            released: AtomicBool::new(false),
        })
    }

    /// The lease's current object name.
    pub fn name(&self) -> String {
        self.state.lock().current.name()
    }

    /// The writer id the lease is held under.
    pub fn writer(&self) -> String {
        self.state.lock().current.writer.clone()
    }

    fn stop_renewing(&mut self) {
        self.stop.take();
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
    }

    /// `Err(LeaseLost)` unless the lease is still held: never evicted and
    /// still in the pool. Checked before each segment and manifest write.
    pub fn ensure_held(&self) -> Result<()> {
        let (lost, name) = {
            let s = self.state.lock();
            (s.lost, s.current.name())
        };
        if lost {
            return Err(Error::LeaseLost { lease: name });
        }
        match self.pool.size(FileKind::Lease, &name) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Err(Error::LeaseLost { lease: name }),
            Err(e) => Err(e),
        }
    }

    /// Stops renewing and checks that the lease was held the whole time:
    /// never evicted, and still in the pool now. Call it after the
    /// manifest is published; `Ok(false)` means a garbage collection may
    /// have swept chunks the manifest needs, so the caller withdraws it.
    pub fn finish(mut self) -> Result<bool> {
        self.stop_renewing();
        let (lost, name) = {
            let s = self.state.lock();
            (s.lost, s.current.name())
        };
        if lost {
            return Ok(false);
        }
        match self.pool.size(FileKind::Lease, &name) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => {
                self.released.store(true, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        self.stop_renewing();
        if !self.released.load(Ordering::Relaxed) {
            let (name, writer) = {
                let s = self.state.lock();
                (s.current.name(), s.current.writer.clone())
            };
            // Leftovers of a renewal whose delete failed: best effort.
            if let Ok(all) = list_leases(&self.pool) {
                for l in all
                    .iter()
                    .filter(|l| l.writer == writer && l.name() != name)
                {
                    let _ = self.pool.delete(FileKind::Lease, &l.name());
                }
            }
            // A lease left behind makes the next collection wait for its
            // expiry: worth a second try after a transient error.
            delete_retrying(&self.pool, FileKind::Lease, &name);
        }
    }
}

/// Deletes an object, trying up to three times after errors other than
/// "not found" (best effort: for clean-ups that must not be left behind
/// by one transient failure).
pub(crate) fn delete_retrying(pool: &DynPool, kind: FileKind, name: &str) {
    for _ in 0..3 {
        match pool.delete(kind, name) {
            Err(e) if !e.is_not_found() => continue,
            _ => break,
        }
    }
}

fn write_lease(pool: &DynPool, lease: &LeaseName) -> Result<()> {
    let name = lease.name();
    pool.write(FileKind::Lease, &name, format!("{name}\n").as_bytes())
}

/// One renewal: write the next lease, then delete the previous one. If the
/// previous one is gone, someone evicted this writer: mark the lease lost
/// (the new one is removed again) and stop renewing.
fn renew(pool: &DynPool, state: &Mutex<LeaseState>) -> bool {
    let mut s = state.lock();
    let next = LeaseName {
        writer: s.current.writer.clone(),
        heartbeat: now_nanos().max(s.current.heartbeat + 1),
        interval_ms: s.current.interval_ms,
    };
    if write_lease(pool, &next).is_err() {
        // Try again at the next interval; the old lease still stands.
        return true;
    }
    match pool.delete(FileKind::Lease, &s.current.name()) {
        Err(e) if e.is_not_found() => {
            s.lost = true;
            let _ = pool.delete(FileKind::Lease, &next.name());
            false
        }
        _ => {
            s.current = next;
            true
        }
    }
}

/// A sweep notice: the packs a garbage collection is about to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepNotice {
    /// The packs condemned, sorted.
    pub packs: BTreeSet<PackId>,
}

impl SweepNotice {
    /// The notice's text: the magic line, then one pack id per line, sorted.
    pub fn encode(&self) -> String {
        let mut s = format!("{SWEEP_MAGIC_LINE}\n");
        for p in &self.packs {
            s += &p.to_hex();
            s.push('\n');
        }
        s
    }

    /// Parses [`encode`](Self::encode)'s output, refusing anything else.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, DecodeError> {
        let bad = |why: &str| DecodeError::Invalid(why.to_string());
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
        let mut lines = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("does not end with a newline"))?
            .split('\n');
        if lines.next() != Some(SWEEP_MAGIC_LINE) {
            return Err(bad("bad first line"));
        }
        let mut packs = BTreeSet::new();
        for l in lines {
            let p = PackId::from_hex(l).ok_or_else(|| bad("a line is not a pack id"))?;
            packs.insert(p);
        }
        let notice = SweepNotice { packs };
        if notice.encode().as_bytes() != bytes {
            return Err(bad("pack ids unsorted, repeated or not lower-case"));
        }
        Ok(notice)
    }

    /// A fresh, time-ordered object name for a notice of the collection
    /// holding lease `writer`: `<nanoseconds>.<writer>`.
    pub fn new_name(writer: &str) -> String {
        format!("{:020}.{writer}", now_nanos())
    }

    /// The writer (lease holder) a notice name belongs to.
    pub fn writer_of(name: &str) -> Option<&str> {
        name.split_once('.').map(|(_, w)| w)
    }
}

/// Every pack that a sweep notice in the pool condemns. A notice that
/// cannot be read is an error: a backup must not guess what it may reuse.
pub fn condemned_packs(pool: &DynPool) -> Result<BTreeSet<PackId>> {
    let mut out = BTreeSet::new();
    for name in pool.list(FileKind::Sweep)? {
        let bytes = match pool.read(FileKind::Sweep, &name) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue, // the sweep finished
            Err(e) => return Err(e),
        };
        let notice = SweepNotice::decode(&bytes)
            .map_err(|e| Error::corrupt(format!("sweep notice {name}"), e))?;
        out.extend(notice.packs);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lease_names_parse_back() {
        let l = LeaseName {
            writer: "0123456789abcdef0123456789abcdef".into(),
            heartbeat: 1_800_000_000_123_456_789,
            interval_ms: 30_000,
        };
        assert_eq!(LeaseName::parse(&l.name()), Some(l));
        for bad in [
            "x.1",
            "0123456789abcdef0123456789ABCDEF.01800000000123456789.30000",
            "0123456789abcdef0123456789abcdef.1.30000",
            "0123456789abcdef0123456789abcdef.01800000000123456789",
            "0123456789abcdef0123456789abcdef.01800000000123456789.",
            // A second spelling of the interval.
            "0123456789abcdef0123456789abcdef.01800000000123456789.030000",
        ] {
            assert_eq!(LeaseName::parse(bad), None, "{bad}");
        }
        assert!(
            LeaseName::parse("0123456789abcdef0123456789abcdef.01800000000123456789.0").is_some()
        );
    }

    #[test]
    fn sweep_notices_have_one_encoding() {
        let n = SweepNotice {
            packs: BTreeSet::from([PackId([0xcd; 16]), PackId([0xab; 16])]),
        };
        let text = n.encode();
        assert_eq!(SweepNotice::decode(text.as_bytes()).unwrap(), n);
        let lines: Vec<&str> = text.lines().collect();
        for bad in [
            format!("{}\n{}\n{}\n", lines[0], lines[2], lines[1]),
            format!("{}\n{}\n{}\n", lines[0], lines[1], lines[1]),
            format!("{}\n{}\n", lines[0], lines[1].to_uppercase()),
            text.trim_end().to_string(),
        ] {
            assert!(SweepNotice::decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
