//! `qemu-img info --output=json` parsing on arbitrary text: never panics.
#![no_main]
use cairn_cas::qemu::ImageInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(info) = ImageInfo::parse(text) {
            for b in &info.bitmaps {
                let _ = b.problem();
            }
        }
    }
});
