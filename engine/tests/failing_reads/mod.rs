//! Pool wrappers whose pack reads fail: every one with a chosen I/O error
//! kind (shared by the restore and damage tests: a short read is damage,
//! a permission error is not), or those of one blob, counted.
#![allow(dead_code)] // each test file uses a subset

use std::sync::atomic::{AtomicUsize, Ordering};

use cairn_engine::bytes::Bytes;
use cairn_engine::{DynPool, Error, FileKind, Pool, PoolWrapper};

/// Fails pack reads with a chosen I/O error kind.
pub struct FailingReads {
    pub inner: DynPool,
    pub kind: std::io::ErrorKind,
}

impl PoolWrapper for FailingReads {
    fn inner(&self) -> &dyn Pool {
        &*self.inner
    }
    fn read_range(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        len: usize,
    ) -> cairn_engine::Result<Bytes> {
        if kind == FileKind::Pack {
            return Err(Error::PoolIo {
                op: "read",
                kind,
                name: name.to_string(),
                source: std::io::Error::new(self.kind, "injected"),
            });
        }
        self.inner.read_range(kind, name, offset, len)
    }
}

/// The error a failed read of pack `name` gets.
pub type Failure = fn(&str) -> Error;

/// Permission denied: an I/O error, not damage.
pub fn denied(name: &str) -> Error {
    Error::PoolIo {
        op: "read",
        kind: FileKind::Pack,
        name: name.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "injected"),
    }
}

/// The pack is gone (deleted since it was listed).
pub fn gone(name: &str) -> Error {
    Error::NotFound {
        kind: FileKind::Pack,
        name: name.to_string(),
    }
}

/// The pool found the bytes damaged.
pub fn corrupt(name: &str) -> Error {
    Error::corrupt(
        format!("pack {name}"),
        cairn_engine::DecodeError::Invalid("injected".into()),
    )
}

/// Counts the reads of one blob (pack `pack` at `offset`), and fails each
/// with `fail`'s error if given.
pub struct BlobReads {
    pub inner: DynPool,
    pub pack: String,
    pub offset: u64,
    pub fail: Option<Failure>,
    pub count: AtomicUsize,
}

impl BlobReads {
    pub fn reads(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl PoolWrapper for BlobReads {
    fn inner(&self) -> &dyn Pool {
        &*self.inner
    }
    fn read_range(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        len: usize,
    ) -> cairn_engine::Result<Bytes> {
        if kind == FileKind::Pack && name == self.pack && offset == self.offset {
            self.count.fetch_add(1, Ordering::SeqCst);
            if let Some(fail) = self.fail {
                return Err(fail(name));
            }
        }
        self.inner.read_range(kind, name, offset, len)
    }
}
