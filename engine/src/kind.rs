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
}

impl FileKind {
    /// Every kind, in a stable order.
    pub const ALL: [FileKind; 4] = [
        FileKind::Config,
        FileKind::Pack,
        FileKind::Index,
        FileKind::Snapshot,
    ];

    /// A short lower-case name, usable as a directory or key prefix.
    pub fn dir_name(self) -> &'static str {
        match self {
            FileKind::Config => "config",
            FileKind::Pack => "packs",
            FileKind::Index => "index",
            FileKind::Snapshot => "snapshots",
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
        })
    }
}
