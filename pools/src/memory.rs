//! An in-memory pool: a map from `(kind, name)` to immutable bytes.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use cairn_engine::{
    Error, FileKind, ObjectWriter, PoolDelete, PoolList, PoolRead, PoolWrite, Result,
};
use parking_lot::RwLock;

type Objects = Arc<RwLock<HashMap<(FileKind, String), Bytes>>>;

/// A pool held in memory. Cloning shares the same objects.
#[derive(Debug, Clone, Default)]
pub struct MemoryPool {
    objects: Objects,
}

impl MemoryPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces an object's bytes (tests use this to simulate damage).
    pub fn tamper(&self, kind: FileKind, name: &str, data: Vec<u8>) {
        self.objects
            .write()
            .insert((kind, name.to_string()), Bytes::from(data));
    }
}

fn not_found(kind: FileKind, name: &str) -> Error {
    Error::NotFound {
        kind,
        name: name.to_string(),
    }
}

impl PoolRead for MemoryPool {
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        self.objects
            .read()
            .get(&(kind, name.to_string()))
            .cloned()
            .ok_or_else(|| not_found(kind, name))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        let all = self.read(kind, name)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start.checked_add(len) {
            Some(end) if end <= all.len() => Ok(all.slice(start..end)),
            _ => Err(Error::PoolIo {
                op: "read",
                kind,
                name: name.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("range {offset}+{len} beyond object end {}", all.len()),
                ),
            }),
        }
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        Ok(self.read(kind, name)?.len() as u64)
    }

    fn location(&self) -> String {
        "memory pool".into()
    }
}

struct MemoryWriter {
    objects: Objects,
    kind: FileKind,
    name: String,
    buf: Vec<u8>,
}

impl Write for MemoryWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for MemoryWriter {
    fn commit(self: Box<Self>) -> Result<()> {
        let mut map = self.objects.write();
        let key = (self.kind, self.name);
        if map.contains_key(&key) {
            return Err(Error::AlreadyExists {
                kind: key.0,
                name: key.1,
            });
        }
        map.insert(key, Bytes::from(self.buf));
        Ok(())
    }
}

impl PoolWrite for MemoryPool {
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        if self.objects.read().contains_key(&(kind, name.to_string())) {
            return Err(Error::AlreadyExists {
                kind,
                name: name.to_string(),
            });
        }
        Ok(Box::new(MemoryWriter {
            objects: self.objects.clone(),
            kind,
            name: name.to_string(),
            buf: Vec::new(),
        }))
    }
}

impl PoolList for MemoryPool {
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        Ok(self
            .objects
            .read()
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect())
    }
}

impl PoolDelete for MemoryPool {
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        self.objects
            .write()
            .remove(&(kind, name.to_string()))
            .map(|_| ())
            .ok_or_else(|| not_found(kind, name))
    }
}
