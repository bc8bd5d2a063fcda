//! Extent pages (manifest version 2): a disk's extent list cut into pages,
//! each stored as a chunk (content-addressed, compressed, in packs), so no
//! reader or writer holds a disk's whole extent list.
//!
//! ```text
//! page      magic "CAIRNEP1" | u32 extent count (1..=65 536) | extent*
//!   extent  u8 0 = zero run  | u64 length
//!           u8 1 = chunk     | u32 length (1..=16 MiB) | chunk id [32]
//! ```
//! No offsets and no checksum: a page's offsets follow from its place in the
//! disk (so equal pages are equal bytes wherever they lie), and its chunk id
//! is the BLAKE3 hash of these bytes, checked on every read.
//!
//! **The cut rule** (one encoding per extent list): the disk is divided into
//! spans of [`page_span`] bytes. A page takes extents until one reaches the
//! end of the span its first extent starts in, or until it holds
//! [`PAGE_MAX_EXTENTS`]; that extent is its last. Zero runs are merged (never
//! two in a row, also across pages), so a hole of any size is one extent.
//! Pages thus re-align to span boundaries after a change, and a span whose
//! extents did not change gives the identical page, which dedups.

use crate::chunker::ChunkingParams;
use crate::id::ChunkId;
use crate::store::format::{EXTENT_PAGE_MAGIC_V1, PAGE_MAX_EXTENTS, PAGE_SPAN_CHUNKS};
use crate::store::manifest::{decode_extent, put_extent, Extent, PageRef};
use crate::store::wire::{DecodeError, Decoder, Encoder};

/// The span pages are cut on for `chunking`: 16 384 of its smallest chunks.
pub fn page_span(chunking: ChunkingParams) -> u64 {
    let min = match chunking {
        ChunkingParams::Fixed { size } => size,
        ChunkingParams::FastCdc { min, .. } => min,
    };
    PAGE_SPAN_CHUNKS * u64::from(min.max(1))
}

/// The end of the span `offset` lies in.
fn span_end(offset: u64, span: u64) -> u64 {
    (offset / span).saturating_add(1).saturating_mul(span)
}

/// A page ready to store: its plaintext and its reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedPage {
    /// The page's plaintext (`CAIRNEP1 …`).
    pub bytes: Vec<u8>,
    /// Its reference in the manifest.
    pub reference: PageRef,
}

/// Cuts a stream of extents into pages by the cut rule. Push extents in
/// disk order; sealed pages come back as they close.
#[derive(Debug)]
pub struct PageBuilder {
    span: u64,
    /// Where the open page starts.
    start: u64,
    /// The end of the last finalized extent.
    end: u64,
    /// A zero run not yet finalized (more zeros may follow): its length.
    zero: u64,
    buf: Vec<u8>,
    count: u32,
    chunks: u32,
    data_bytes: u64,
}

impl PageBuilder {
    /// A builder for a disk chunked with `chunking`, starting at offset 0.
    pub fn new(chunking: ChunkingParams) -> Self {
        Self::with_span(page_span(chunking))
    }

    /// A builder cutting on spans of `span` bytes (tests use small ones).
    pub fn with_span(span: u64) -> Self {
        PageBuilder {
            span: span.max(1),
            start: 0,
            end: 0,
            zero: 0,
            buf: Vec::new(),
            count: 0,
            chunks: 0,
            data_bytes: 0,
        }
    }

    /// Appends an extent of `length` bytes (`None`: zeros). Pages that
    /// close are appended to `sealed`.
    pub fn push(&mut self, length: u64, chunk: Option<ChunkId>, sealed: &mut Vec<SealedPage>) {
        if length == 0 {
            return;
        }
        match chunk {
            None => self.zero += length,
            Some(id) => {
                self.finish_zero(sealed);
                self.add(length, Some(id), sealed);
            }
        }
    }

    /// Closes the open page (after a pending zero run) at the disk's end.
    pub fn finish(mut self, sealed: &mut Vec<SealedPage>) {
        self.finish_zero(sealed);
        if self.count > 0 {
            sealed.push(self.seal());
        }
    }

    fn finish_zero(&mut self, sealed: &mut Vec<SealedPage>) {
        if self.zero > 0 {
            let length = std::mem::take(&mut self.zero);
            self.add(length, None, sealed);
        }
    }

    fn add(&mut self, length: u64, chunk: Option<ChunkId>, sealed: &mut Vec<SealedPage>) {
        if self.count == 0 {
            self.start = self.end;
            self.buf.clear();
            self.buf.extend_from_slice(&EXTENT_PAGE_MAGIC_V1);
            self.buf.put_u32(0);
        }
        put_extent(&mut self.buf, length, chunk);
        self.count += 1;
        if chunk.is_some() {
            self.chunks += 1;
            self.data_bytes += length;
        }
        self.end = self.end.saturating_add(length);
        if self.end >= span_end(self.start, self.span) || self.count == PAGE_MAX_EXTENTS {
            sealed.push(self.seal());
        }
    }

    fn seal(&mut self) -> SealedPage {
        let mut bytes = std::mem::take(&mut self.buf);
        bytes[8..12].copy_from_slice(&self.count.to_le_bytes());
        let reference = PageRef {
            id: ChunkId::of(&bytes),
            length: self.end - self.start,
            extents: self.count,
            chunks: self.chunks,
            data_bytes: self.data_bytes,
        };
        self.count = 0;
        self.chunks = 0;
        self.data_bytes = 0;
        SealedPage { bytes, reference }
    }
}

/// Cuts a whole extent list into pages (tests and fuzzing).
#[cfg(any(test, feature = "internals"))]
pub fn cut_pages(
    extents: impl IntoIterator<Item = (u64, Option<ChunkId>)>,
    span: u64,
) -> Vec<SealedPage> {
    let mut b = PageBuilder::with_span(span);
    let mut out = Vec::new();
    for (length, chunk) in extents {
        b.push(length, chunk, &mut out);
    }
    b.finish(&mut out);
    out
}

/// Where a page lies in its disk, for checking it against the cut rule.
#[derive(Clone, Copy, Debug)]
pub struct PagePlace {
    /// The disk offset of its first extent.
    pub start: u64,
    /// The span the disk's pages are cut on.
    pub span: u64,
    /// It is the disk's last page (it ends at the disk's end, not by the rule).
    pub last: bool,
    /// The previous page ended with a zero run.
    pub follows_zero: bool,
}

/// Decodes a page's plaintext into extents at their disk offsets, checking
/// the encoding (tags, lengths, no two zero runs in a row, nothing
/// trailing), its reference's counts, and that it was cut where the rule
/// cuts. Never panics on any input.
pub fn decode_page(
    data: &[u8],
    reference: &PageRef,
    place: PagePlace,
) -> Result<Vec<Extent>, DecodeError> {
    let mut d = Decoder::new(data);
    let magic: [u8; 8] = d.array()?;
    if magic != EXTENT_PAGE_MAGIC_V1 {
        return Err(DecodeError::BadMagic);
    }
    let count = d.u32()?;
    if count == 0 || count > PAGE_MAX_EXTENTS {
        return Err(DecodeError::Invalid(format!(
            "page holds {count} extents (1..={PAGE_MAX_EXTENTS})"
        )));
    }
    if count as usize > d.remaining() / 9 {
        return Err(DecodeError::Invalid(format!(
            "{count} extents cannot fit in the page"
        )));
    }
    let boundary = span_end(place.start, place.span.max(1));
    let mut extents = Vec::with_capacity(count as usize);
    let mut offset = place.start;
    let mut prev_zero = place.follows_zero;
    let (mut chunks, mut data_bytes) = (0u32, 0u64);
    for i in 0..count {
        let (length, chunk) = decode_extent(&mut d, offset)?;
        if chunk.is_none() && prev_zero {
            return Err(DecodeError::Invalid(format!(
                "zero run at {offset} follows a zero run (they are merged)"
            )));
        }
        prev_zero = chunk.is_none();
        if chunk.is_some() {
            chunks += 1;
            data_bytes += length;
        }
        extents.push(Extent {
            offset,
            length,
            chunk,
        });
        offset = offset
            .checked_add(length)
            .ok_or_else(|| DecodeError::Invalid("extents overflow".into()))?;
        let last_in_page = i + 1 == count;
        let reaches = offset >= boundary;
        if reaches && !last_in_page {
            return Err(DecodeError::Invalid(format!(
                "extent at {} reaches the span end {boundary}: the page must end there",
                offset - length
            )));
        }
        if last_in_page && !place.last && !reaches && count < PAGE_MAX_EXTENTS {
            return Err(DecodeError::Invalid(format!(
                "the page ends at {offset}, before its span end {boundary}"
            )));
        }
    }
    d.expect_end()?;
    let got = (offset - place.start, count, chunks, data_bytes);
    let want = (
        reference.length,
        reference.extents,
        reference.chunks,
        reference.data_bytes,
    );
    if got != want {
        return Err(DecodeError::Invalid(format!(
            "page covers {} bytes in {} extents ({} chunks, {} data bytes); \
             its reference says {} bytes in {} ({} chunks, {} data bytes)",
            got.0, got.1, got.2, got.3, want.0, want.1, want.2, want.3
        )));
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::MAX_CHUNK_SIZE;
    use proptest::prelude::*;

    const K4: u64 = 4096;

    fn id(n: u32) -> Option<ChunkId> {
        Some(ChunkId::of(&n.to_le_bytes()))
    }

    /// Decodes every page of `pages` in order and returns the extents.
    fn decode_all(pages: &[SealedPage], span: u64) -> Result<Vec<Extent>, DecodeError> {
        let mut out: Vec<Extent> = Vec::new();
        let mut start = 0;
        for (i, p) in pages.iter().enumerate() {
            let place = PagePlace {
                start,
                span,
                last: i + 1 == pages.len(),
                follows_zero: out.last().is_some_and(|e| e.chunk.is_none()),
            };
            let e = decode_page(&p.bytes, &p.reference, place)?;
            start += p.reference.length;
            out.extend(e);
        }
        Ok(out)
    }

    #[test]
    fn pages_end_at_the_extent_reaching_the_span_end() {
        // Span of 4 chunks; a zero run of 9 chunks crosses two span ends.
        let span = 4 * K4;
        let mut ext: Vec<(u64, Option<ChunkId>)> = (0..6).map(|i| (K4, id(i))).collect();
        ext.push((5 * K4, None));
        ext.push((4 * K4, None));
        ext.extend((6..9).map(|i| (K4, id(i))));
        let pages = cut_pages(ext, span);
        let lens: Vec<u64> = pages.iter().map(|p| p.reference.length / K4).collect();
        // [0,4) | [4,6) + zeros to 15 | [15,16) (reaches 16) | [16,18)
        assert_eq!(lens, vec![4, 11, 1, 2]);
        let counts: Vec<u32> = pages.iter().map(|p| p.reference.extents).collect();
        assert_eq!(counts, vec![4, 3, 1, 2]);
        let refs: Vec<(u32, u64)> = pages
            .iter()
            .map(|p| (p.reference.chunks, p.reference.data_bytes))
            .collect();
        assert_eq!(refs, vec![(4, 4 * K4), (2, 2 * K4), (1, K4), (2, 2 * K4)]);
        let back = decode_all(&pages, span).unwrap();
        assert_eq!(back.len(), 10);
        assert_eq!(back[6].offset, 6 * K4);
        assert_eq!(back[6].length, 9 * K4);
        assert_eq!(back[6].chunk, None);
        assert_eq!(back[9].end(), 18 * K4);
    }

    #[test]
    fn a_page_holds_at_most_the_cap() {
        // One byte chunks on a huge span: only the cap cuts.
        let n = PAGE_MAX_EXTENTS as u64 + 10;
        let pages = cut_pages((0..n).map(|i| (1, id(i as u32))), 1 << 40);
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[0].reference.extents, PAGE_MAX_EXTENTS);
        assert_eq!(pages[1].reference.extents, 10);
        assert_eq!(decode_all(&pages, 1 << 40).unwrap().len() as u64, n);
    }

    /// The golden page: pins the plaintext layout and so every page's id.
    #[test]
    fn golden_page() {
        let pages = cut_pages([(K4, id(1)), (3 * K4, None), (100, id(2))], 1 << 30);
        assert_eq!(pages.len(), 1);
        let b = &pages[0].bytes;
        let mut want = b"CAIRNEP1".to_vec();
        want.extend_from_slice(&3u32.to_le_bytes());
        want.push(1);
        want.extend_from_slice(&4096u32.to_le_bytes());
        want.extend_from_slice(id(1).unwrap().as_bytes());
        want.push(0);
        want.extend_from_slice(&(3 * K4).to_le_bytes());
        want.push(1);
        want.extend_from_slice(&100u32.to_le_bytes());
        want.extend_from_slice(id(2).unwrap().as_bytes());
        assert_eq!(b, &want);
        assert_eq!(
            pages[0].reference,
            PageRef {
                id: ChunkId::of(&want),
                length: 4 * K4 + 100,
                extents: 3,
                chunks: 2,
                data_bytes: K4 + 100,
            }
        );
    }

    #[test]
    fn pages_cut_elsewhere_or_miscounted_are_refused() {
        let span = 4 * K4;
        let pages = cut_pages((0..8).map(|i| (K4, id(i))), span);
        assert_eq!(pages.len(), 2);
        // One page holding all 8: cut too late.
        let all = cut_pages((0..8).map(|i| (K4, id(i))), 1 << 30);
        let place = |last| PagePlace {
            start: 0,
            span,
            last,
            follows_zero: false,
        };
        assert!(decode_page(&all[0].bytes, &all[0].reference, place(true)).is_err());
        // The first page presented as not reaching its span end.
        let short = cut_pages((0..3).map(|i| (K4, id(i))), span);
        let err = decode_page(&short[0].bytes, &short[0].reference, place(false)).unwrap_err();
        assert!(err.to_string().contains("before its span end"), "{err}");
        // As the disk's last page it is fine.
        assert!(decode_page(&short[0].bytes, &short[0].reference, place(true)).is_ok());
        // A reference that miscounts.
        for f in 0..4 {
            let mut r = pages[0].reference;
            match f {
                0 => r.length += 1,
                1 => r.extents += 1,
                2 => r.chunks -= 1,
                _ => r.data_bytes -= 1,
            }
            assert!(decode_page(&pages[0].bytes, &r, place(false)).is_err());
        }
        // No extent, or more than the cap, even with a reference that
        // says so.
        let empty = b"CAIRNEP1\0\0\0\0".to_vec();
        let none = PageRef {
            id: ChunkId::of(&empty),
            length: 0,
            extents: 0,
            chunks: 0,
            data_bytes: 0,
        };
        assert!(decode_page(&empty, &none, place(true)).is_err());
        let n = PAGE_MAX_EXTENTS + 1;
        let mut over = b"CAIRNEP1".to_vec();
        over.extend_from_slice(&n.to_le_bytes());
        for i in 0..n {
            put_extent(&mut over, 1, id(i));
        }
        let too_many = PageRef {
            id: ChunkId::of(&over),
            length: u64::from(n),
            extents: n,
            chunks: n,
            data_bytes: u64::from(n),
        };
        let err = decode_page(&over, &too_many, place(true)).unwrap_err();
        assert!(err.to_string().contains("extents (1..="), "{err}");
        // A chunk extent of the largest chunk size is fine, one byte more
        // is not.
        for (len, ok) in [
            (MAX_CHUNK_SIZE as u64, true),
            (MAX_CHUNK_SIZE as u64 + 1, false),
        ] {
            let page = cut_pages([(len, id(1))], 1 << 40);
            let got = decode_page(&page[0].bytes, &page[0].reference, place(true));
            assert_eq!(got.is_ok(), ok, "{len}: {got:?}");
        }
        // A zero run after a page ending in zeros.
        let z = cut_pages([(K4, None), (K4, id(1))], span);
        let mut p = place(true);
        p.follows_zero = true;
        assert!(decode_page(&z[0].bytes, &z[0].reference, p).is_err());
    }

    #[test]
    fn flipping_any_byte_of_a_page_is_refused_or_changes_it() {
        let span = 1 << 20;
        let pages = cut_pages([(K4, id(1)), (3 * K4, None), (100, id(2))], span);
        let p = &pages[0];
        let place = PagePlace {
            start: 0,
            span,
            last: true,
            follows_zero: false,
        };
        let orig = decode_page(&p.bytes, &p.reference, place).unwrap();
        for i in 0..p.bytes.len() {
            let mut b = p.bytes.clone();
            b[i] ^= 0x40;
            if let Ok(e) = decode_page(&b, &p.reference, place) {
                // Only a chunk id's bytes can change and still decode.
                assert_ne!(e, orig, "byte {i}");
                assert!(e.iter().zip(&orig).all(|(a, b)| a.length == b.length));
            }
        }
        let mut longer = p.bytes.clone();
        longer.push(0);
        assert!(decode_page(&longer, &p.reference, place).is_err());
        for n in 0..p.bytes.len() {
            assert!(decode_page(&p.bytes[..n], &p.reference, place).is_err());
        }
    }

    fn extents_strategy() -> impl Strategy<Value = Vec<(u64, Option<u32>)>> {
        prop::collection::vec(
            prop_oneof![
                (1u64..20_000, Just(None)),
                (1u64..9_000, (0u32..50).prop_map(Some))
            ],
            0..300,
        )
    }

    proptest! {
        /// Round trip; each page re-encodes to its bytes; merged zero runs;
        /// one changed chunk changes only the page holding it.
        #[test]
        fn pages_round_trip_and_dedup(ext in extents_strategy(), span in 1u64..100_000, pick in any::<prop::sample::Index>()) {
            let list: Vec<(u64, Option<ChunkId>)> = ext.iter().map(|&(l, c)| (l, c.and_then(id))).collect();
            let pages = cut_pages(list.clone(), span);
            let back = decode_all(&pages, span).unwrap();
            // Merging the input's zero runs gives the decoded list.
            let mut merged: Vec<(u64, Option<ChunkId>)> = Vec::new();
            for (l, c) in list.iter().copied() {
                match (merged.last_mut(), c) {
                    (Some((ml, None)), None) => *ml += l,
                    _ => merged.push((l, c)),
                }
            }
            let got: Vec<(u64, Option<ChunkId>)> = back.iter().map(|e| (e.length, e.chunk)).collect();
            prop_assert_eq!(&got, &merged);
            // Re-cutting the decoded list gives the same pages.
            prop_assert_eq!(&cut_pages(got, span), &pages);
            // Rewrite one chunk: at most one page differs.
            let chunk_at: Vec<usize> = merged.iter().enumerate().filter(|(_, e)| e.1.is_some()).map(|(i, _)| i).collect();
            if !chunk_at.is_empty() {
                let i = chunk_at[pick.index(chunk_at.len())];
                let mut changed = merged.clone();
                changed[i].1 = Some(ChunkId::of(b"rewritten"));
                let other = cut_pages(changed, span);
                prop_assert_eq!(other.len(), pages.len());
                let differ = other.iter().zip(&pages).filter(|(a, b)| a != b).count();
                prop_assert_eq!(differ, 1);
            }
        }
    }
}
