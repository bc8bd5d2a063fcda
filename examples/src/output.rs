//! JSON and human-readable renderings of engine results.

use cairn_engine::{BackupStats, SnapshotInfo, VerifyReport};
use serde_json::{json, Value};

pub fn print_json(v: &Value) {
    println!("{v}");
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Warns on stderr about damage a backup met and worked around.
pub fn backup_warnings(s: &BackupStats) {
    if s.parent_pages_damaged > 0 {
        eprintln!(
            "cairn: warning: extent pages of the parent that could not be read: {}; their spans were read again and stored anew. The pool holds damage: run `cairn verify --read-data`, then `cairn repair --packs`",
            s.parent_pages_damaged
        );
    }
}

pub fn backup_json(vm: &str, s: &BackupStats) -> Value {
    json!({
        "snapshot": s.snapshot.to_hex(),
        "vm": vm,
        "mode": s.mode.as_str(),
        "bytes_logical": s.bytes_logical,
        "bytes_read": s.bytes_read,
        "bytes_dirty": s.bytes_dirty,
        "bytes_new": s.bytes_new,
        "bytes_new_raw": s.bytes_new_raw,
        "chunks_total": s.chunks_total,
        "chunks_new": s.chunks_new,
        "packs_written": s.packs_written,
        "pages_new": s.pages_new,
        "bytes_resumed": s.bytes_resumed,
        "parent_pages_damaged": s.parent_pages_damaged,
        "unchanged": s.unchanged,
        "seconds": s.seconds,
    })
}

pub fn snapshot_json(s: &SnapshotInfo) -> Value {
    json!({
        "id": s.id.to_hex(),
        "vm": s.vm,
        "time": humantime::format_rfc3339_seconds(s.time).to_string(),
        "mode": s.mode.as_str(),
        "parent": s.parent.map(|p| p.to_hex()),
        "bytes_logical": s.bytes_logical(),
        "chunking": s.chunking.to_string(),
        "compression": s.compression.to_string(),
        "damaged": s.damaged,
        "disks": s.disks.iter().map(|d| json!({
            "name": d.name,
            "size": d.size,
            "properties": d.properties,
        })).collect::<Vec<_>>(),
    })
}

pub fn verify_json(r: &VerifyReport, read_data: bool) -> Value {
    json!({
        "ok": r.is_ok(),
        "read_data": read_data,
        "snapshots": r.snapshots,
        "packs": r.packs,
        "chunks_referenced": r.chunks_referenced,
        "blobs_read": r.blobs_read,
        "bytes_read": r.bytes_read,
        "damaged_snapshots": r.affected_snapshots()
            .iter().map(|s| s.to_hex()).collect::<Vec<_>>(),
        "damage": r.damage.iter().map(|d| json!({
            "kind": d.kind.to_string(),
            "pack": d.pack.map(|p| p.to_hex()),
            "chunk": d.chunk.map(|c| c.to_hex()),
            "snapshots": d.snapshots.iter().map(|s| s.to_hex()).collect::<Vec<_>>(),
            "ranges": d.ranges.iter().map(|r| json!({
                "snapshot": r.snapshot.to_hex(),
                "disk": r.disk,
                "offset": r.offset,
                "length": r.length,
            })).collect::<Vec<_>>(),
            "detail": d.detail,
        })).collect::<Vec<_>>(),
    })
}

pub fn print_verify(r: &VerifyReport, read_data: bool) {
    println!(
        "verified {} snapshots, {} chunks referenced, {} packs{}",
        r.snapshots,
        r.chunks_referenced,
        r.packs,
        if read_data {
            format!(
                ", {} blobs / {} read and re-hashed",
                r.blobs_read,
                human(r.bytes_read)
            )
        } else {
            String::new()
        }
    );
    if r.is_ok() {
        println!("no damage found");
        return;
    }
    for d in &r.damage {
        println!(
            "DAMAGE {}: pack {} chunk {}: {}",
            d.kind,
            d.pack.map_or("-".into(), |p| p.to_hex()),
            d.chunk.map_or("-".into(), |c| c.to_hex()),
            d.detail
        );
        for s in &d.snapshots {
            println!("  affects snapshot {s}");
            for r in d.ranges.iter().filter(|r| r.snapshot == *s) {
                println!(
                    "    disk {} bytes {}..{} ({})",
                    r.disk,
                    r.offset,
                    r.offset + r.length,
                    human(r.length)
                );
            }
        }
    }
    let affected = r.affected_snapshots();
    println!(
        "{} problems; {} snapshots affected",
        r.damage.len(),
        affected.len()
    );
}
