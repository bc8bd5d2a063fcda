//! One encoding per value: for every structure with a checksum, random
//! changes to a valid encoding (with the checksum fixed up, so the parser
//! behind it is reached) either fail to decode or decode to a value that
//! encodes back to exactly the same bytes. Plus the non-canonical cases
//! found by hand: non-zero reserved fields, unused fields, unsorted keys.
#![allow(clippy::unwrap_used)] // test code

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use cairn_engine::bytes::Bytes;
use cairn_engine::cbt::DirtyBitmap;
use cairn_engine::internals::{
    cut_pages, decode_catalog, decode_page, encode_catalog, encode_table, pack_header, parse_pack,
    BlobCodec, BlobHeader, LeaseName, PackEntry, PagePlace, Segment, SegmentBuilder, SweepNotice,
};
use cairn_engine::{
    ChunkId, ChunkingParams, Compression, DiskManifest, IdScheme, PackId, Period, PoolConfig,
    PoolId, RetentionPolicy, Snapshot, SnapshotId, SnapshotMode,
};
use proptest::prelude::*;

/// Recomputes the trailing BLAKE3-256 checksum of `bytes`.
fn fix_checksum(bytes: &mut [u8]) {
    let n = bytes.len() - 32;
    let sum = *blake3_hash(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum);
}

fn blake3_hash(b: &[u8]) -> Box<[u8; 32]> {
    Box::new(ChunkId::of(b).0)
}

fn sample_manifest() -> Vec<u8> {
    let mut disk = DiskManifest::new("vda");
    disk.push(65536, Some(ChunkId::of(b"a")));
    disk.push(65536, None);
    disk.push(1000, Some(ChunkId::of(b"b")));
    disk.properties.insert("k1".into(), "v1".into());
    disk.properties.insert("k2".into(), "v2".into());
    let mut properties = BTreeMap::new();
    properties.insert("p".into(), "q".into());
    Snapshot {
        time: UNIX_EPOCH + Duration::new(1_800_000_000, 7),
        vm: "web".into(),
        mode: SnapshotMode::Full,
        parent: Some(SnapshotId([3; 32])),
        id_scheme: IdScheme::Blake3,
        chunking: ChunkingParams::default(),
        compression: Compression::None,
        properties,
        disks: vec![disk],
    }
    .encode()
}

/// The sample's extents cut into pages on a 64 KiB span: three pages.
fn sample_pages() -> Vec<cairn_engine::internals::SealedPage> {
    cut_pages(
        [
            (65536, Some(ChunkId::of(b"a"))),
            (65536, None),
            (1000, Some(ChunkId::of(b"b"))),
        ],
        65536,
    )
}

/// The sample manifest as version 2: its disk's extents in pages.
fn sample_manifest_v2() -> Vec<u8> {
    let mut s = Snapshot::decode(&sample_manifest()).unwrap();
    s.disks[0].extents.clear();
    s.disks[0].pages = sample_pages().iter().map(|p| p.reference).collect();
    s.encode()
}

fn sample_segment() -> Vec<u8> {
    let mut b = SegmentBuilder::new();
    for p in 0..3u8 {
        let entries: Vec<PackEntry> = (0..5u32)
            .map(|i| PackEntry {
                id: ChunkId::of(&[p, i as u8]),
                offset: 16 + i as u64 * 100,
                length: 100,
                raw_length: 200,
            })
            .collect();
        b.add_entries(PackId([p + 1; 16]), &entries);
    }
    b.encode()
}

fn reencode_segment(bytes: &[u8]) -> Option<Vec<u8>> {
    let seg = Segment::decode(Bytes::copy_from_slice(bytes)).ok()?;
    Some(SegmentBuilder::from_segment(&seg).encode())
}

fn sample_bitmap() -> Vec<u8> {
    let mut b = DirtyBitmap::new(5 << 20, 65536).unwrap();
    b.set_range(100..70_000);
    b.set_range(3 << 20..(3 << 20) + 1);
    b.encode()
}

/// A pack of three blobs (zstd, raw, zstd) as `PackWriter` lays it out.
fn sample_pack() -> Vec<u8> {
    let mut codec = BlobCodec::new(Compression::Zstd { level: 3 });
    let mut pack = pack_header();
    let mut entries = Vec::new();
    for chunk in [vec![7u8; 3000], (0..=255u8).collect(), vec![9u8; 100]] {
        let offset = pack.len() as u64;
        let length = codec.encode_into(&chunk, &mut pack).unwrap() as u32;
        entries.push(PackEntry {
            id: ChunkId::of(&chunk),
            offset,
            length,
            raw_length: chunk.len() as u32,
        });
    }
    let table_offset = pack.len() as u64;
    pack.extend_from_slice(&encode_table(&entries, table_offset));
    pack
}

/// Encodes a pack again from what `parse_pack` decoded: the header, each
/// blob's decoded header followed by its body, the table and trailer.
fn reencode_pack(bytes: &[u8]) -> Option<Vec<u8>> {
    let entries = parse_pack(bytes).ok()?;
    let mut again = pack_header();
    for e in &entries {
        let blob = &bytes[e.offset as usize..(e.offset + e.length as u64) as usize];
        again.extend_from_slice(&BlobHeader::decode(blob).unwrap().encode());
        again.extend_from_slice(&blob[12..]);
    }
    let table_offset = again.len() as u64;
    again.extend_from_slice(&encode_table(&entries, table_offset));
    Some(again)
}

/// Applies `flips` to a copy of a pack (never to the table hash), then
/// recomputes the table hash the trailer holds.
fn mutate_pack(good: &[u8], flips: &[(usize, u8)]) -> Vec<u8> {
    let mut b = good.to_vec();
    let trailer = b.len() - 56;
    let editable: Vec<usize> = (0..trailer + 16).chain(trailer + 48..b.len()).collect();
    for &(at, x) in flips {
        b[editable[at % editable.len()]] ^= x.max(1);
    }
    let table_offset = u64::from_le_bytes(good[trailer..trailer + 8].try_into().unwrap()) as usize;
    let hash = blake3_hash(&b[table_offset..trailer]);
    b[trailer + 16..trailer + 48].copy_from_slice(&*hash);
    b
}

/// Changes bytes of a text structure: with `ascii`, each chosen byte
/// becomes one of `CHARS` (digits, hex and other letters, `.`, space,
/// newline, `-`, `/`), otherwise it is xored with a random byte.
fn mutate_text(good: &str, flips: &[(usize, u8)], ascii: bool) -> Vec<u8> {
    const CHARS: &[u8] = b"0123456789abcdefzAZ. \n-s/";
    let mut b = good.as_bytes().to_vec();
    for &(at, x) in flips {
        let at = at % b.len();
        if ascii {
            b[at] = CHARS[x as usize % CHARS.len()];
        } else {
            b[at] ^= x.max(1);
        }
    }
    b
}

/// Applies `flips` (position, xor) to a copy of `good`, fixing the checksum.
fn mutate(good: &[u8], flips: &[(usize, u8)], checksummed: bool) -> Vec<u8> {
    let mut b = good.to_vec();
    let body = if checksummed { b.len() - 32 } else { b.len() };
    for &(at, x) in flips {
        b[at % body] ^= x.max(1);
    }
    if checksummed {
        fix_checksum(&mut b);
    }
    b
}

/// A catalog of two snapshots (the sample manifest and a second VM's).
fn sample_catalog() -> Vec<u8> {
    let a = Snapshot::decode(&sample_manifest()).unwrap();
    let mut b = a.clone();
    b.vm = "db".into();
    b.parent = None;
    let entries = [a, b].map(|s| (SnapshotId::of_manifest(&s.encode()), s));
    encode_catalog(&entries)
}

fn sample_policy() -> String {
    RetentionPolicy::new()
        .with_keep_last(3)
        .unwrap()
        .with_keep_within(Duration::from_secs(3600))
        .unwrap()
        .with_keep(Period::Daily, 7)
        .unwrap()
        .with_keep(Period::Monthly, 12)
        .unwrap()
        .with_time_zone("Europe/Berlin")
        .unwrap()
        .encode()
}

fn sample_notice() -> String {
    SweepNotice {
        packs: [PackId([0x12; 16]), PackId([0xab; 16]), PackId([0x3c; 16])].into(),
    }
    .encode()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn catalogs_have_one_encoding(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let b = mutate(&sample_catalog(), &flips, true);
        if let Ok(entries) = decode_catalog(&b) {
            prop_assert_eq!(encode_catalog(&entries), b);
        }
    }

    /// Text structures: flips stay in ASCII letters and digits often
    /// enough to reach the parsers (a random byte is mostly not UTF-8).
    #[test]
    fn retention_policies_have_one_encoding(
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..3),
        ascii in any::<bool>(),
    ) {
        let b = mutate_text(&sample_policy(), &flips, ascii);
        if let Ok(p) = RetentionPolicy::decode(&b) {
            prop_assert_eq!(p.encode().into_bytes(), b);
        }
    }

    #[test]
    fn sweep_notices_have_one_encoding(
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..3),
        ascii in any::<bool>(),
    ) {
        let b = mutate_text(&sample_notice(), &flips, ascii);
        if let Ok(n) = SweepNotice::decode(&b) {
            prop_assert_eq!(n.encode().into_bytes(), b);
        }
    }

    #[test]
    fn lease_names_have_one_spelling(
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..3),
        ascii in any::<bool>(),
    ) {
        let good = LeaseName {
            writer: "0123456789abcdef0123456789abcdef".into(),
            heartbeat: 1_800_000_000_123_456_789,
            interval_ms: 30_000,
        }
        .name();
        let b = mutate_text(&good, &flips, ascii);
        if let Some(l) = std::str::from_utf8(&b).ok().and_then(LeaseName::parse) {
            prop_assert_eq!(l.name().into_bytes(), b);
        }
    }

    #[test]
    fn manifests_have_one_encoding(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let b = mutate(&sample_manifest(), &flips, true);
        if let Ok(s) = Snapshot::decode(&b) {
            prop_assert_eq!(s.encode(), b);
        }
    }

    #[test]
    fn version_2_manifests_have_one_encoding(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let good = sample_manifest_v2();
        prop_assert!(good.starts_with(b"CAIRNSN2"));
        let b = mutate(&good, &flips, true);
        if let Ok(s) = Snapshot::decode(&b) {
            prop_assert_eq!(s.encode(), b);
        }
    }

    /// A page that decodes (its reference taken as the page's own counts,
    /// so only the bytes are under test) is what the builder cuts from its
    /// extents, at its place in the disk.
    #[test]
    fn extent_pages_have_one_encoding(
        page in 0usize..3,
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let pages = sample_pages();
        let good = &pages[page];
        let b = mutate(&good.bytes, &flips, false);
        let start: u64 = pages[..page].iter().map(|p| p.reference.length).sum();
        let place = PagePlace { start, span: 65536, last: page == 2, follows_zero: page == 2 };
        if let Ok(extents) = decode_page(&b, &good.reference, place) {
            prop_assert_eq!(extents.first().map(|e| e.offset), Some(start));
            // Re-cut on its own (from offset 0 of a disk shifted by whole
            // spans its place is the same): one page, the same bytes.
            let again = cut_pages(extents.iter().map(|e| (e.length, e.chunk)), 65536);
            if start % 65536 == 0 {
                prop_assert_eq!(again.len(), 1);
                prop_assert_eq!(&again[0].bytes, &b);
            }
        }
    }

    #[test]
    fn segments_have_one_encoding(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let b = mutate(&sample_segment(), &flips, true);
        if let Some(again) = reencode_segment(&b) {
            prop_assert_eq!(again, b);
        }
    }

    #[test]
    fn bitmaps_have_one_encoding(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let b = mutate(&sample_bitmap(), &flips, true);
        if let Ok(bm) = DirtyBitmap::decode(&b) {
            prop_assert_eq!(bm.encode(), b);
        }
    }

    #[test]
    fn packs_have_one_encoding(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let b = mutate_pack(&sample_pack(), &flips);
        if let Some(again) = reencode_pack(&b) {
            prop_assert_eq!(again, b);
        }
    }

    #[test]
    fn blob_headers_have_one_encoding(
        compressed in any::<bool>(),
        flips in prop::collection::vec((0usize..12, any::<u8>()), 1..3),
    ) {
        let good = BlobHeader {
            compression: compressed as u8,
            raw_len: 65536,
            body_len: if compressed { 20_000 } else { 65536 },
        }
        .encode();
        let b = mutate(&good, &flips, false);
        if let Ok(h) = BlobHeader::decode(&b) {
            prop_assert_eq!(h.encode().to_vec(), b);
        }
    }

    #[test]
    fn configs_have_one_encoding(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..3)) {
        let good = PoolConfig::new(PoolId([0xab; 16]), UNIX_EPOCH + Duration::from_secs(1_790_000_000)).encode();
        let b = mutate(good.as_bytes(), &flips, false);
        if let Ok(c) = PoolConfig::decode(&b) {
            prop_assert_eq!(c.encode().into_bytes(), b);
        }
    }
}

#[test]
fn the_non_canonical_cases_found_by_hand_are_refused() {
    // Manifest: reserved header fields (offsets 10..16).
    for at in [10usize, 12, 15] {
        let b = mutate(&sample_manifest(), &[(at, 1)], true);
        assert!(Snapshot::decode(&b).is_err(), "reserved byte {at}");
    }
    // Bitmap: reserved u16 at offset 10 and u32 at 12.
    for at in [10usize, 11, 12, 15] {
        let b = mutate(&sample_bitmap(), &[(at, 1)], true);
        assert!(
            DirtyBitmap::decode(&b).is_err(),
            "bitmap reserved byte {at}"
        );
    }
    // Segment: reserved u16 at 10, reserved u64 at 24.
    for at in [10usize, 24, 31] {
        let b = mutate(&sample_segment(), &[(at, 1)], true);
        assert!(
            Segment::decode(Bytes::from(b)).is_err(),
            "segment reserved byte {at}"
        );
    }
    // Pack: a gap between blobs, a gap before the table, flags and
    // reserved header fields, the reserved trailer field.
    let good = sample_pack();
    assert!(reencode_pack(&good).is_some());
    let trailer = good.len() - 56;
    let entries = parse_pack(&good).unwrap();
    let blob = |e: &PackEntry| &good[e.offset as usize..(e.offset + e.length as u64) as usize];
    // `pad_after[i]` zero bytes follow blob i; the table's offsets are right.
    let with_padding = |pad_after: [usize; 3]| {
        let mut pack = pack_header();
        let mut moved = Vec::new();
        for (e, pad) in entries.iter().zip(pad_after) {
            moved.push(PackEntry {
                offset: pack.len() as u64,
                ..*e
            });
            pack.extend_from_slice(blob(e));
            pack.resize(pack.len() + pad, 0);
        }
        let table_offset = pack.len() as u64;
        pack.extend_from_slice(&encode_table(&moved, table_offset));
        pack
    };
    assert_eq!(with_padding([0, 0, 0]), good);
    assert!(
        parse_pack(&with_padding([1, 0, 0])).is_err(),
        "gap between blobs"
    );
    assert!(
        parse_pack(&with_padding([0, 0, 1])).is_err(),
        "gap before the table"
    );
    for at in [10usize, 12, 15, trailer + 14] {
        let b = mutate_pack(&good, &[(at, 1)]);
        assert!(parse_pack(&b).is_err(), "pack byte {at}");
    }
    // Blob header: reserved byte, encryption, a raw body shorter than its
    // plaintext, a zstd body that did not shrink.
    let raw = BlobHeader {
        compression: 0,
        raw_len: 100,
        body_len: 100,
    }
    .encode();
    let zstd = BlobHeader {
        compression: 1,
        raw_len: 100,
        body_len: 50,
    }
    .encode();
    assert!(BlobHeader::decode(&raw).is_ok() && BlobHeader::decode(&zstd).is_ok());
    for (header, at, value) in [
        (raw, 3, 1u8),
        (raw, 2, 1),
        (raw, 8, 99),
        (zstd, 8, 100),
        (zstd, 8, 200),
    ] {
        let mut b = header;
        b[at] = value;
        assert!(
            BlobHeader::decode(&b).is_err(),
            "blob header byte {at} = {value}"
        );
    }
    // Config: an extra line, a reordered one, a repeated one.
    let good = PoolConfig::new(
        PoolId([1; 16]),
        UNIX_EPOCH + Duration::from_secs(1_790_000_000),
    )
    .encode();
    let lines: Vec<&str> = good.lines().collect();
    for bad in [
        format!("{good}extra 1\n"),
        format!("{}\n{}\n{}\n{}\n", lines[0], lines[2], lines[1], lines[3]),
        format!("{good}{}\n", lines[3]),
    ] {
        assert!(PoolConfig::decode(bad.as_bytes()).is_err(), "{bad:?}");
    }
}

/// A pack of no blob (header and trailer only) is valid; its table reads
/// back empty from a pool, and one byte less is refused.
#[test]
fn an_empty_pack_reads_back_from_a_pool() {
    use cairn_engine::internals::read_pack_table;
    use cairn_engine::{FileKind, PoolWrite};
    let pool = cairn_pools::MemoryPool::new();
    let mut pack = pack_header();
    pack.extend_from_slice(&encode_table(&[], 16));
    let id = PackId::from_hex(&"ab".repeat(16)).unwrap();
    pool.write(FileKind::Pack, &id.to_hex(), &pack).unwrap();
    assert!(read_pack_table(&pool, &id).unwrap().is_empty());
    let short = PackId::from_hex(&"cd".repeat(16)).unwrap();
    pool.write(FileKind::Pack, &short.to_hex(), &pack[..pack.len() - 1])
        .unwrap();
    assert!(read_pack_table(&pool, &short).unwrap_err().is_damage());
}
