//! Pack parser (header, trailer, blob table, blob headers), then every blob
//! it lists. Never panics; a pack that parses is encoded again from what was
//! decoded (header, blob headers, bodies, table) to exactly its own bytes.
//! Random bytes rarely carry the table's hash: `pack_fixed` reaches the
//! table checks behind it.
#![no_main]
use libfuzzer_sys::fuzz_target;

mod fixup;

fuzz_target!(|data: &[u8]| fixup::pack_round_trip(data));
