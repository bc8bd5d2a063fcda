//! criterion benchmarks of the engine's stages (64 MiB of the mix), index
//! lookups, pack writing, and the end-to-end pipelines on a 1 GiB in-memory
//! image (the quick group; the 4 GiB case is the `cairn-bench` binary).

use std::sync::Arc;

use cairn_benches::mixed_data;
use cairn_engine::internals::{BlobCodec, PackEntry, PackWriter, Segment, SegmentBuilder};
use cairn_engine::{
    BackupDisk, BackupOptions, ChunkId, ChunkingParams, Compression, DiskInput, DiskSource,
    DynPool, PackId, Repository, RestoreOptions,
};
use cairn_pools::{LocalPool, MemoryPool};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const SIZE: usize = 64 << 20;
/// Image size of the end-to-end group.
const PIPELINE_SIZE: usize = 1 << 30;

struct MemDisk(Arc<Vec<u8>>);

impl DiskSource for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> cairn_engine::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn describe(&self) -> String {
        "bench image".into()
    }
}

fn stages(c: &mut Criterion) {
    let data = mixed_data(SIZE, 1);
    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    g.bench_function("chunk_fastcdc_default", |b| {
        let p = ChunkingParams::cdc();
        b.iter(|| black_box(p.cut_all(&data).len()))
    });
    g.bench_function("hash_blake3_64k", |b| {
        b.iter(|| {
            for c in data.chunks(64 << 10) {
                black_box(ChunkId::of(c));
            }
        })
    });
    g.bench_function("compress_zstd1_64k", |b| {
        let mut codec = BlobCodec::new(Compression::default());
        let mut out = Vec::with_capacity(SIZE);
        b.iter(|| {
            out.clear();
            for c in data.chunks(64 << 10) {
                codec.encode_into(c, &mut out).ok();
            }
            black_box(out.len())
        })
    });
    // What a restore does per chunk: decode and check the id.
    g.bench_function("decode_verified_64k", |b| {
        let mut codec = BlobCodec::new(Compression::default());
        let blobs: Vec<(Vec<u8>, ChunkId)> = data
            .chunks(64 << 10)
            .map(|c| {
                let mut blob = Vec::new();
                codec.encode_into(c, &mut blob).ok();
                (blob, ChunkId::of(c))
            })
            .collect();
        let mut out = Vec::with_capacity(4 << 20);
        b.iter(|| {
            for (blob, id) in &blobs {
                if out.len() + (64 << 10) > out.capacity() {
                    out.clear();
                }
                codec.decode_verified_append(blob, id, &mut out).ok();
            }
            black_box(out.len())
        })
    });
    g.finish();
}

fn index_lookup(c: &mut Criterion) {
    let n = 1_000_000u32;
    let entries: Vec<PackEntry> = (0..n)
        .map(|i| PackEntry {
            id: ChunkId::of(&i.to_le_bytes()),
            offset: 16 + i as u64 * 100,
            length: 100,
            raw_length: 65536,
        })
        .collect();
    let mut b = SegmentBuilder::new();
    b.add_entries(PackId([1; 16]), &entries);
    let seg = Segment::decode(bytes::Bytes::from(b.encode())).expect("valid segment");
    let misses: Vec<ChunkId> = (0..10_000u32)
        .map(|i| ChunkId::of(&(i + n).to_le_bytes()))
        .collect();
    let mut g = c.benchmark_group("index_1M");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("hits", |bch| {
        bch.iter(|| {
            entries[..10_000]
                .iter()
                .filter(|e| seg.lookup(&e.id).is_some())
                .count()
        })
    });
    g.bench_function("misses", |bch| {
        bch.iter(|| misses.iter().filter(|id| seg.lookup(id).is_some()).count())
    });
    g.finish();
}

fn pipelines(c: &mut Criterion) {
    let data = Arc::new(mixed_data(PIPELINE_SIZE, 2));
    let mut g = c.benchmark_group("pipeline_1GiB");
    g.throughput(Throughput::Bytes(PIPELINE_SIZE as u64));
    g.sample_size(10);
    let disk =
        |d: &Arc<Vec<u8>>| BackupDisk::new("d", DiskInput::Image(Box::new(MemDisk(d.clone()))));
    g.bench_function("backup_full_local_pool", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let pool: DynPool = Arc::new(LocalPool::create(dir.path()).expect("pool"));
                Repository::init(pool.clone()).expect("init");
                (dir, Repository::open(pool).expect("open"))
            },
            |(dir, repo)| {
                repo.backup(vec![disk(&data)], &BackupOptions::new("vm"))
                    .expect("backup");
                dir
            },
            BatchSize::PerIteration,
        )
    });
    let pool: DynPool = Arc::new(MemoryPool::new());
    Repository::init(pool.clone()).expect("init");
    let repo = Repository::open(pool).expect("open");
    let first = repo
        .backup(vec![disk(&data)], &BackupOptions::new("vm"))
        .expect("backup");
    g.bench_function("rebackup_unchanged", |b| {
        b.iter(|| {
            repo.backup(vec![disk(&data)], &BackupOptions::new("vm"))
                .expect("backup")
        })
    });
    g.bench_function("restore_sparse_file", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                repo.restore_to_dir(&first.snapshot, dir.path(), &RestoreOptions::default())
                    .expect("restore");
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn pack_writing(c: &mut Criterion) {
    // 64 MiB of encoded blobs of the mix, appended to packs in a memory pool
    // (framing, table, checksum and commit; no compression in the loop).
    let data = mixed_data(SIZE, 3);
    let mut codec = BlobCodec::new(Compression::default());
    let blobs: Vec<(ChunkId, u32, Vec<u8>)> = data
        .chunks(64 << 10)
        .map(|c| {
            let mut out = Vec::new();
            codec.encode_into(c, &mut out).expect("encode");
            (ChunkId::of(c), c.len() as u32, out)
        })
        .collect();
    let stored: usize = blobs.iter().map(|b| b.2.len()).sum();
    let mut g = c.benchmark_group("pack_writing");
    g.throughput(Throughput::Bytes(stored as u64));
    g.sample_size(20);
    g.bench_function("64MiB_into_memory_pool", |b| {
        b.iter_batched(
            MemoryPool::new,
            |pool| {
                let mut w = PackWriter::create(&pool).expect("pack");
                for (id, raw, blob) in &blobs {
                    w.add(*id, *raw, blob).expect("add");
                }
                w.finish().expect("seal")
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, stages, index_lookup, pack_writing, pipelines);
criterion_main!(benches);
