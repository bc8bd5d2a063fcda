//! Resume journal parser: never panics; what it decodes encodes back to a
//! journal that decodes the same. The second half gives the input valid
//! record checksums (random bytes never carry one), so the entry checks
//! behind them are explored: a record decodes exactly when every entry is
//! valid, and then re-encodes to the same bytes.
#![no_main]
use cairn_engine::internals::{decode_journal, encode_record, JOURNAL_MAGIC};
use libfuzzer_sys::fuzz_target;

const ENTRY: usize = 41;

fuzz_target!(|data: &[u8]| {
    // As stored, with the key the input carries.
    let mut key = [0u8; 32];
    if data.len() >= 40 {
        key.copy_from_slice(&data[8..40]);
    }
    let (extents, used) = decode_journal(data, &key);
    assert!(used <= data.len().max(40));
    let mut again = JOURNAL_MAGIC.to_vec();
    again.extend_from_slice(&key);
    for piece in extents.chunks(1 << 16) {
        again.extend_from_slice(&encode_record(piece));
    }
    assert_eq!(decode_journal(&again, &key).0, extents, "round trip");

    // One record of the input's entries with its checksum fixed up.
    let count = (data.len() / ENTRY).min(64);
    if count == 0 {
        return;
    }
    let mut record = (count as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&data[..count * ENTRY]);
    let sum = blake3::hash(&record);
    record.extend_from_slice(&sum.as_bytes()[..16]);
    let mut journal = JOURNAL_MAGIC.to_vec();
    journal.extend_from_slice(&key);
    journal.extend_from_slice(&record);
    let valid = data[..count * ENTRY].chunks_exact(ENTRY).all(|e| {
        let len = u64::from_le_bytes(e[..8].try_into().unwrap());
        len > 0 && match e[8] {
            0 => e[9..].iter().all(|&b| b == 0),
            1 => true,
            _ => false,
        }
    });
    let (got, _) = decode_journal(&journal, &key);
    if valid {
        assert_eq!(got.len(), count);
        assert_eq!(encode_record(&got), record, "record round trip");
    } else {
        assert!(got.is_empty(), "an invalid entry was accepted");
    }
});
