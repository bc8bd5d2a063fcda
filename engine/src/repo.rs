//! A repository: a pool opened with its configuration and its dedup index.
//! Owns pool initialisation, snapshot listing, loading and selection.
//!
//! The pool configuration is the text object `config`:
//! ```text
//! cairn-pool 1
//! id-scheme blake3-256
//! pool-id <32 hex digits>
//! created <RFC 3339 UTC>
//! ```

use std::sync::Arc;
use std::time::SystemTime;

use crate::coding::{hex, DecodeError};
use crate::error::{Error, Result};
use crate::format::CONFIG_VERSION_V1;
use crate::id::{random_16, IdScheme, SnapshotId};
use crate::index::Index;
use crate::manifest::Snapshot;
use crate::pool::{DynPool, FileKind};

const CONFIG_NAME: &str = "config";

/// The pool-wide settings written by `init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub version: u32,
    pub id_scheme: IdScheme,
    pub pool_id: String,
    pub created: String,
}

impl PoolConfig {
    pub fn encode(&self) -> String {
        format!(
            "cairn-pool {}\nid-scheme {}\npool-id {}\ncreated {}\n",
            self.version,
            self.id_scheme.name(),
            self.pool_id,
            self.created
        )
    }

    pub fn decode(text: &[u8]) -> Result<Self, DecodeError> {
        let text = std::str::from_utf8(text)
            .map_err(|_| DecodeError::Invalid("config is not UTF-8 text".into()))?;
        let mut lines = text.lines();
        let version = match lines.next().and_then(|l| l.strip_prefix("cairn-pool ")) {
            Some(v) => v
                .trim()
                .parse::<u32>()
                .map_err(|_| DecodeError::Invalid(format!("bad version {v:?}")))?,
            None => return Err(DecodeError::BadMagic),
        };
        if version != CONFIG_VERSION_V1 {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let (mut scheme, mut pool_id, mut created) = (None, None, None);
        for line in lines {
            match line.split_once(' ') {
                Some(("id-scheme", v)) => {
                    scheme =
                        Some(IdScheme::from_name(v.trim()).ok_or_else(|| {
                            DecodeError::Invalid(format!("unknown id scheme {v:?}"))
                        })?)
                }
                Some(("pool-id", v)) => pool_id = Some(v.trim().to_string()),
                Some(("created", v)) => created = Some(v.trim().to_string()),
                _ if line.trim().is_empty() => {}
                // Unknown keys are allowed: later versions add settings.
                _ => {}
            }
        }
        Ok(PoolConfig {
            version,
            id_scheme: scheme.ok_or_else(|| DecodeError::Invalid("no id-scheme".into()))?,
            pool_id: pool_id.ok_or_else(|| DecodeError::Invalid("no pool-id".into()))?,
            created: created.unwrap_or_default(),
        })
    }
}

/// An open pool: configuration, index, snapshots.
pub struct Repository {
    pool: DynPool,
    config: PoolConfig,
    index: Arc<Index>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.pool.location())
            .field("config", &self.config)
            .finish()
    }
}

impl Repository {
    /// Writes a fresh configuration. Fails if the pool already has one.
    pub fn init(pool: DynPool) -> Result<PoolConfig> {
        let config = PoolConfig {
            version: CONFIG_VERSION_V1,
            id_scheme: IdScheme::Blake3,
            pool_id: hex(&random_16()?),
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        pool.write(FileKind::Config, CONFIG_NAME, config.encode().as_bytes())?;
        Ok(config)
    }

    /// Opens an initialised pool and loads its index.
    pub fn open(pool: DynPool) -> Result<Self> {
        let raw = match pool.read(FileKind::Config, CONFIG_NAME) {
            Ok(raw) => raw,
            Err(e) if e.is_not_found() => {
                return Err(Error::NotInitialized {
                    location: pool.location(),
                })
            }
            Err(e) => return Err(e),
        };
        let config = PoolConfig::decode(&raw)
            .map_err(|e| Error::corrupt(format!("pool config of {}", pool.location()), e))?;
        if config.id_scheme != IdScheme::Blake3 {
            return Err(Error::Unsupported(format!(
                "chunk id scheme {}",
                config.id_scheme.name()
            )));
        }
        let index = Arc::new(Index::load(&*pool)?);
        Ok(Repository {
            pool,
            config,
            index,
        })
    }

    pub fn pool(&self) -> &DynPool {
        &self.pool
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// Ids of every snapshot manifest in the pool (names that are not snapshot
    /// ids are ignored).
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        let mut ids: Vec<SnapshotId> = self
            .pool
            .list(FileKind::Snapshot)?
            .iter()
            .filter_map(|n| SnapshotId::from_hex(n))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Reads, checks (content hash = name) and decodes one manifest.
    pub fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        let bytes = self.pool.read(FileKind::Snapshot, &id.to_hex())?;
        let what = || format!("snapshot manifest {id}");
        let got = SnapshotId::of_manifest(&bytes);
        if &got != id {
            return Err(Error::corrupt(
                what(),
                DecodeError::ChecksumMismatch {
                    expected: id.to_hex(),
                    got: got.to_hex(),
                },
            ));
        }
        Snapshot::decode(&bytes).map_err(|e| Error::corrupt(what(), e))
    }

    /// Every snapshot, oldest first. A damaged manifest is an error naming it.
    pub fn snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>> {
        let mut out = Vec::new();
        for id in self.snapshot_ids()? {
            let s = self.load_snapshot(&id)?;
            out.push((id, s));
        }
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// The newest snapshot of `vm` that holds a disk named `disk`: the parent
    /// of that disk's next incremental. Manifests that fail to load are
    /// passed over (an older parent only makes CBT fall back, never wrong).
    pub fn latest_with_disk(&self, vm: &str, disk: &str) -> Result<Option<(SnapshotId, Snapshot)>> {
        let mut best: Option<(SnapshotId, Snapshot)> = None;
        for id in self.snapshot_ids()? {
            let Ok(s) = self.load_snapshot(&id) else {
                continue;
            };
            if s.vm != vm || !s.disks.iter().any(|d| d.name == disk) {
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(bid, b)| (s.time, id) > (b.time, *bid))
            {
                best = Some((id, s));
            }
        }
        Ok(best)
    }

    /// Resolves a full id, a unique prefix of at least 8 hex digits, or
    /// `latest` (optionally restricted to one VM).
    pub fn resolve_snapshot(&self, selector: &str, vm: Option<&str>) -> Result<SnapshotId> {
        if selector == "latest" {
            let snaps = self.snapshots()?;
            let mut candidates = snaps.iter().filter(|(_, s)| vm.is_none_or(|v| s.vm == v));
            let vms: std::collections::BTreeSet<&str> =
                candidates.clone().map(|(_, s)| s.vm.as_str()).collect();
            if vm.is_none() && vms.len() > 1 {
                return Err(Error::InvalidArgument(format!(
                    "`latest` is ambiguous: the pool holds {} VMs ({}); add --vm NAME",
                    vms.len(),
                    vms.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
            return candidates
                .next_back()
                .map(|(id, _)| *id)
                .ok_or_else(|| Error::SnapshotNotFound(selector.to_string()));
        }
        let sel = selector.to_ascii_lowercase();
        if sel.len() < 8 || !sel.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidArgument(format!(
                "snapshot {selector:?}: give a full id, a prefix of at least 8 hex digits, or `latest`"
            )));
        }
        let matches: Vec<SnapshotId> = self
            .snapshot_ids()?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&sel))
            .collect();
        match matches.len() {
            0 => Err(Error::SnapshotNotFound(selector.to_string())),
            1 => Ok(matches[0]),
            n => Err(Error::AmbiguousSnapshot {
                selector: selector.to_string(),
                matches: n,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trip_and_damage() {
        let c = PoolConfig {
            version: 1,
            id_scheme: IdScheme::Blake3,
            pool_id: "00".repeat(16),
            created: "2026-01-01T00:00:00Z".into(),
        };
        let text = c.encode();
        assert_eq!(PoolConfig::decode(text.as_bytes()).unwrap(), c);
        assert!(PoolConfig::decode(b"").is_err());
        assert!(PoolConfig::decode(b"cairn-pool 9\n").is_err());
        assert!(PoolConfig::decode(b"cairn-pool 1\nid-scheme md5\npool-id x\n").is_err());
        assert!(PoolConfig::decode(&[0xff, 0xfe]).is_err());
    }
}
