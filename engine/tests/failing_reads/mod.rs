//! A pool wrapper whose pack reads fail with a chosen I/O error kind
//! (shared by the restore and damage tests: a short read is damage, a
//! permission error is not).

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
