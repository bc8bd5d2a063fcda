//! Test helpers for the store's unit tests (the engine cannot use the
//! pools crate in its own unit tests: that crate depends on this one).

use std::sync::Arc;

use crate::error::Result;
use crate::kind::FileKind;
use crate::store::pool::{ObjectWriter, PoolWrite};

/// A pool that keeps only the last object committed.
#[derive(Default)]
pub struct LastObject(Arc<parking_lot::Mutex<Vec<u8>>>);

impl LastObject {
    /// The bytes of the last object committed.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().clone()
    }
}

struct LastObjectWriter(Arc<parking_lot::Mutex<Vec<u8>>>, Vec<u8>);

impl std::io::Write for LastObjectWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for LastObjectWriter {
    fn commit(self: Box<Self>) -> Result<()> {
        *self.0.lock() = self.1;
        Ok(())
    }
}

impl PoolWrite for LastObject {
    fn create(&self, _: FileKind, _: &str) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(LastObjectWriter(self.0.clone(), Vec::new())))
    }
}
