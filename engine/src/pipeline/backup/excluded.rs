//! What a backup must not reuse although the index holds it: packs a
//! garbage collection condemned or the pool no longer lists, and copies
//! of blobs the backup found damaged while it read its parents' extent
//! pages. A chunk whose copy is excluded is stored again, in a new pack.
//! Lookups of this process find the new copy first (its segment is the
//! newest); another process may find either. A reader of an extent page
//! that finds its copy damaged tries the others (`extents::read_page`),
//! but a backup reads its parents' pages only where its index finds them
//! (`read_page_where_found`), so it never references a damaged copy. A
//! garbage collection keeps an intact copy and leaves the damaged one out
//! of its new segment (`gc::intact_copies`); `repair` moves the damaged
//! pack aside.

use std::collections::HashSet;

use crate::id::{ChunkId, PackId};
use crate::store::index::BlobLocation;

/// Stored copies a backup passes over (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Excluded {
    /// Packs a garbage collection is about to delete, or that the pool
    /// no longer lists: nothing in them is reused, and a segment this
    /// backup writes covers none of them.
    pub(crate) packs: HashSet<PackId>,
    /// Copies read and found damaged (an extent page of a parent), by
    /// chunk and place: the chunk is stored again rather than deduplicated
    /// against that copy (another copy of it may be reused).
    pub(crate) blobs: HashSet<(ChunkId, BlobLocation)>,
}

impl Excluded {
    /// Whether the copy of `id` at `at` may be reused.
    pub(crate) fn reusable(&self, id: &ChunkId, at: &BlobLocation) -> bool {
        !self.packs.contains(&at.pack) && !self.blobs.contains(&(*id, *at))
    }

    /// True when every copy the index holds may be reused.
    pub(crate) fn is_empty(&self) -> bool {
        self.packs.is_empty() && self.blobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_reusable_unless_its_pack_or_itself_is_excluded() {
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let at = |p: u8| BlobLocation {
            pack: PackId([p; 16]),
            offset: 16,
            length: 40,
        };
        let mut excluded = Excluded::default();
        assert!(excluded.is_empty());
        assert!(excluded.reusable(&a, &at(1)));
        excluded.packs.insert(PackId([1; 16]));
        assert!(!excluded.is_empty());
        assert!(!excluded.reusable(&a, &at(1)));
        assert!(excluded.reusable(&a, &at(2)));
        excluded.packs.clear();
        excluded.blobs.insert((b, at(2)));
        assert!(!excluded.is_empty());
        assert!(!excluded.reusable(&b, &at(2)));
        // Another copy of it, and another chunk at that place.
        assert!(excluded.reusable(&b, &at(3)));
        assert!(excluded.reusable(&a, &at(2)));
    }
}
