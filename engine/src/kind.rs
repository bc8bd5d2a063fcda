//! [`FileKind`]: the namespaces of a pool. A leaf module: the error type and
//! the pool traits both name it.

use std::fmt;

/// The kinds of object the engine stores. Each kind is a separate namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FileKind {
    /// The pool's configuration (one object, named `config`).
    Config,
    /// Pack files: many blobs and a trailing blob table.
    Pack,
    /// Dedup index segments.
    Index,
    /// Snapshot manifests.
    Snapshot,
    /// Protection marks: one small object per protected snapshot, named by
    /// the snapshot's id. Retention never removes a protected snapshot.
    Protection,
    /// Pool settings that change over time (the stored retention policy):
    /// each change is a new object, the newest name wins.
    Setting,
    /// Writer leases: a running backup announces itself (and renews its
    /// lease) so a garbage collection waits for it before deleting.
    Lease,
    /// Sweep notices: the packs a running garbage collection will delete,
    /// which backups starting meanwhile must not reuse.
    Sweep,
    /// Snapshot catalog objects: manifest summaries (no extent lists),
    /// merged on read, rebuildable from the manifests.
    Catalog,
    /// Damaged packs moved aside by `repair --packs` (kept, never read by
    /// backups or restores).
    Quarantine,
    /// Damage marks: one small object per snapshot that `repair --packs`
    /// found unrestorable, named by the snapshot's id; removed when a later
    /// backup has stored every chunk it needs again.
    DamageMark,
}

impl FileKind {
    /// Every kind, in a stable order.
    pub const ALL: [FileKind; 11] = [
        FileKind::Config,
        FileKind::Pack,
        FileKind::Index,
        FileKind::Snapshot,
        FileKind::Protection,
        FileKind::Setting,
        FileKind::Lease,
        FileKind::Sweep,
        FileKind::Catalog,
        FileKind::Quarantine,
        FileKind::DamageMark,
    ];

    /// A short lower-case name, usable as a directory or key prefix.
    pub fn dir_name(self) -> &'static str {
        match self {
            FileKind::Config => "config",
            FileKind::Pack => "packs",
            FileKind::Index => "index",
            FileKind::Snapshot => "snapshots",
            FileKind::Protection => "protected",
            FileKind::Setting => "settings",
            FileKind::Lease => "leases",
            FileKind::Sweep => "sweeps",
            FileKind::Catalog => "catalog",
            FileKind::Quarantine => "quarantine",
            FileKind::DamageMark => "damaged",
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Config => "config",
            FileKind::Pack => "pack",
            FileKind::Index => "index segment",
            FileKind::Snapshot => "snapshot manifest",
            FileKind::Protection => "protection mark",
            FileKind::Setting => "pool setting",
            FileKind::Lease => "writer lease",
            FileKind::Sweep => "sweep notice",
            FileKind::Catalog => "snapshot catalog",
            FileKind::Quarantine => "quarantined pack",
            FileKind::DamageMark => "damage mark",
        })
    }
}
