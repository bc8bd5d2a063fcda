//! The virtual tape library behaves as tape hardware does: blocks and
//! filemarks read back in order, a write erases what followed it, the
//! early warning comes before the end and the end refuses writes, spacing
//! moves over filemarks both ways, the robot moves cartridges only between
//! occupied and empty elements, and damaged state files are clear errors.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use cairn_pools::tape::{
    Element, ReadOutcome, TapeDrive, TapeError, TapeLibrary, TapePosition, VirtualTapeLibrary,
    VirtualTapeOptions, WriteOutcome,
};

fn library(dir: &std::path::Path, cartridges: usize, capacity: u64) -> VirtualTapeLibrary {
    VirtualTapeLibrary::create(dir, &VirtualTapeOptions::new(cartridges, capacity)).unwrap()
}

fn read(drive: &mut dyn TapeDrive) -> ReadOutcome {
    let mut buf = vec![0u8; 1 << 20];
    drive.read_block(&mut buf).unwrap()
}

fn read_data(drive: &mut dyn TapeDrive) -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 20];
    match drive.read_block(&mut buf).unwrap() {
        ReadOutcome::Block(n) => buf[..n].to_vec(),
        other => panic!("expected a block, got {other:?}"),
    }
}

fn pos(file: u64, block: u64) -> TapePosition {
    TapePosition { file, block }
}

#[test]
fn a_new_library_holds_blank_cartridges_in_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library(dir.path(), 3, 4 << 20);
    let inv = lib.inventory().unwrap();
    let holding: Vec<(Element, Option<&str>)> = inv
        .iter()
        .map(|e| (e.element, e.barcode.as_deref()))
        .collect();
    assert_eq!(
        holding,
        vec![
            (Element::Drive(0), None),
            (Element::Slot(0), Some("CRN001L9")),
            (Element::Slot(1), Some("CRN002L9")),
            (Element::Slot(2), Some("CRN003L9")),
            (Element::ImportExport(0), None),
            (Element::ImportExport(1), None),
        ]
    );
    // One file per cartridge, empty; a second library there is refused.
    for b in ["CRN001L9", "CRN002L9", "CRN003L9"] {
        let f = dir.path().join("cartridges").join(b);
        assert_eq!(std::fs::metadata(f).unwrap().len(), 0);
    }
    let again = VirtualTapeLibrary::create(dir.path(), &VirtualTapeOptions::new(1, 4 << 20));
    assert!(matches!(again, Err(TapeError::Device { .. })));
    // No drive without a cartridge does anything.
    let mut drive = lib.drive(0).unwrap();
    assert!(matches!(drive.rewind(), Err(TapeError::NoMedium { .. })));
    assert!(matches!(
        drive.write_block(b"x"),
        Err(TapeError::NoMedium { .. })
    ));
}

#[test]
fn blocks_and_filemarks_read_back_and_spacing_moves_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let mut lib = library(dir.path(), 1, 4 << 20);
    lib.move_medium(Element::Slot(0), Element::Drive(0))
        .unwrap();
    let mut drive = lib.virtual_drive(0).unwrap();
    assert_eq!(drive.loaded().as_deref(), Some("CRN001L9"));
    // A blank tape reads end of data at once.
    assert_eq!(read(&mut drive), ReadOutcome::EndOfData);
    // file 0: a, b | file 1: c | file 2: (empty) | file 3: d
    for (what, fm) in [
        (&b"a"[..], false),
        (b"bb", true),
        (b"ccc", true),
        (b"", true),
        (b"dddd", false),
    ] {
        if !what.is_empty() {
            assert_eq!(drive.write_block(what).unwrap(), WriteOutcome::Written);
        }
        if fm {
            drive.write_filemarks(1).unwrap();
        }
    }
    assert_eq!(drive.position().unwrap(), pos(3, 1));
    drive.rewind().unwrap();
    assert_eq!(drive.position().unwrap(), pos(0, 0));
    assert_eq!(read_data(&mut drive), b"a");
    assert_eq!(read_data(&mut drive), b"bb");
    assert_eq!(read(&mut drive), ReadOutcome::Filemark);
    assert_eq!(drive.position().unwrap(), pos(1, 0));
    assert_eq!(read_data(&mut drive), b"ccc");
    assert_eq!(read(&mut drive), ReadOutcome::Filemark);
    assert_eq!(read(&mut drive), ReadOutcome::Filemark);
    assert_eq!(read_data(&mut drive), b"dddd");
    assert_eq!(read(&mut drive), ReadOutcome::EndOfData);
    assert_eq!(read(&mut drive), ReadOutcome::EndOfData);

    // Forward over two filemarks from the start: file 2 (empty), then 3.
    drive.rewind().unwrap();
    drive.space_filemarks(2).unwrap();
    assert_eq!(drive.position().unwrap(), pos(2, 0));
    assert_eq!(read(&mut drive), ReadOutcome::Filemark);
    assert_eq!(read_data(&mut drive), b"dddd");
    // Back over one filemark: just before it (the end of file 2).
    drive.space_filemarks(-1).unwrap();
    assert_eq!(drive.position().unwrap(), pos(2, 0));
    assert_eq!(read(&mut drive), ReadOutcome::Filemark);
    // Back over two: before the filemark ending file 1 (after "ccc").
    drive.space_filemarks(-2).unwrap();
    assert_eq!(drive.position().unwrap(), pos(1, 1));
    // To the start of the current file.
    drive.space_filemarks(0).unwrap();
    assert_eq!(drive.position().unwrap(), pos(1, 0));
    assert_eq!(read_data(&mut drive), b"ccc");
    // Past the beginning, past the end: errors by kind.
    drive.rewind().unwrap();
    assert!(matches!(
        drive.space_filemarks(-1),
        Err(TapeError::BeginningOfMedium { .. })
    ));
    assert!(matches!(
        drive.space_filemarks(4),
        Err(TapeError::BlankCheck { .. })
    ));
    drive.space_to_end_of_data().unwrap();
    assert_eq!(drive.position().unwrap(), pos(3, 1));
    // A block larger than the buffer is refused and not consumed.
    drive.rewind().unwrap();
    drive.space_filemarks(1).unwrap();
    let mut small = [0u8; 2];
    assert!(matches!(
        drive.read_block(&mut small),
        Err(TapeError::BlockTooLarge {
            block: 3,
            buffer: 2,
            ..
        })
    ));
    assert_eq!(read_data(&mut drive), b"ccc");
    // Empty and oversized blocks are not written.
    assert!(matches!(
        drive.write_block(b""),
        Err(TapeError::BadBlockSize { .. })
    ));
    let c = drive.counters();
    assert_eq!((c.loads, c.blocks_written, c.filemarks_written), (1, 4, 3));
    assert!(c.rewinds >= 4 && c.backward_moves == 4, "{c:?}");
}

#[test]
fn writing_in_the_middle_erases_what_followed_also_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let mut lib = library(dir.path(), 1, 4 << 20);
    lib.move_medium(Element::Slot(0), Element::Drive(0))
        .unwrap();
    let mut drive = lib.drive(0).unwrap();
    for b in [&b"first"[..], b"second", b"third"] {
        drive.write_block(b).unwrap();
        drive.write_filemarks(1).unwrap();
    }
    let cartridge = dir.path().join("cartridges/CRN001L9");
    let full = std::fs::metadata(&cartridge).unwrap().len();
    drive.rewind().unwrap();
    drive.space_filemarks(1).unwrap();
    drive.write_block(b"new").unwrap();
    // "second", "third" and their filemarks are gone.
    assert_eq!(read(&mut *drive), ReadOutcome::EndOfData);
    assert!(std::fs::metadata(&cartridge).unwrap().len() < full);
    drive.write_filemarks(1).unwrap();
    drop(drive);
    drop(lib);
    // Opened again: the cartridge is still in the drive, rewound.
    let lib = VirtualTapeLibrary::open(dir.path()).unwrap();
    let mut drive = lib.drive(0).unwrap();
    assert_eq!(drive.position().unwrap(), pos(0, 0));
    assert_eq!(read_data(&mut *drive), b"first");
    assert_eq!(read(&mut *drive), ReadOutcome::Filemark);
    assert_eq!(read_data(&mut *drive), b"new");
    assert_eq!(read(&mut *drive), ReadOutcome::Filemark);
    assert_eq!(read(&mut *drive), ReadOutcome::EndOfData);
}

#[test]
fn early_warning_comes_before_the_end_and_the_end_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = VirtualTapeOptions::new(1, 1 << 20);
    opts.early_warning = 128 << 10;
    let mut lib = VirtualTapeLibrary::create(dir.path(), &opts).unwrap();
    lib.move_medium(Element::Slot(0), Element::Drive(0))
        .unwrap();
    let mut drive = lib.drive(0).unwrap();
    let block = vec![7u8; 64 << 10];
    let framed = block.len() as u64 + 5;
    let mut written = 0u64;
    // Written until the early warning: the zone starts at 896 KiB.
    loop {
        let out = drive.write_block(&block).unwrap();
        written += framed;
        if out == WriteOutcome::EarlyWarning {
            break;
        }
        assert!(!drive.at_early_warning());
    }
    assert!(drive.at_early_warning());
    assert!(written >= (1 << 20) - (128 << 10) && written - framed < (1 << 20) - (128 << 10));
    // Writing on in the zone works until the physical end; then nothing is
    // written and the error names the cartridge.
    let cartridge = dir.path().join("cartridges/CRN001L9");
    loop {
        match drive.write_block(&block) {
            Ok(WriteOutcome::EarlyWarning) => written += framed,
            Ok(WriteOutcome::Written) => panic!("left the early-warning zone"),
            Err(TapeError::EndOfMedium {
                barcode, capacity, ..
            }) => {
                assert_eq!((barcode.as_str(), capacity), ("CRN001L9", 1 << 20));
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(written + framed > 1 << 20);
    assert_eq!(std::fs::metadata(&cartridge).unwrap().len(), written);
    // A small block and a filemark still fit.
    drive.write_block(b"end").unwrap();
    drive.write_filemarks(1).unwrap();
}

#[test]
fn the_robot_moves_cartridges_only_where_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = VirtualTapeOptions::new(2, 4 << 20);
    opts.empty_slots = 1;
    let mut lib = VirtualTapeLibrary::create(dir.path(), &opts).unwrap();
    let empty = lib.move_medium(Element::Slot(2), Element::Drive(0));
    assert!(matches!(
        empty,
        Err(TapeError::ElementEmpty {
            element: Element::Slot(2),
            ..
        })
    ));
    lib.move_medium(Element::Slot(0), Element::Drive(0))
        .unwrap();
    let full = lib.move_medium(Element::Slot(1), Element::Drive(0));
    match full {
        Err(TapeError::ElementFull {
            element, barcode, ..
        }) => {
            assert_eq!((element, barcode.as_str()), (Element::Drive(0), "CRN001L9"))
        }
        other => panic!("{other:?}"),
    }
    let none = lib.move_medium(Element::Slot(1), Element::Drive(5));
    assert!(matches!(
        none,
        Err(TapeError::NoSuchElement {
            element: Element::Drive(5),
            ..
        })
    ));
    // Unloaded into another slot: the drive is empty, the move persisted.
    let mut drive = lib.drive(0).unwrap();
    drive.write_block(b"x").unwrap();
    lib.move_medium(Element::Drive(0), Element::Slot(2))
        .unwrap();
    assert!(matches!(drive.position(), Err(TapeError::NoMedium { .. })));
    assert_eq!(drive.loaded(), None);
    let reopened = VirtualTapeLibrary::open(dir.path()).unwrap();
    let inv = reopened.inventory().unwrap();
    let at = |e: Element| inv.iter().find(|s| s.element == e).unwrap().barcode.clone();
    assert_eq!(at(Element::Slot(2)).as_deref(), Some("CRN001L9"));
    assert_eq!(at(Element::Slot(0)), None);
    // A new cartridge through the mail slot into the free slot.
    lib.insert_blank(0, "NEW001L9").unwrap();
    assert!(lib.insert_blank(0, "NEW002L9").is_err());
    assert!(lib.insert_blank(1, "bad code!").is_err());
    lib.move_medium(Element::ImportExport(0), Element::Slot(0))
        .unwrap();
    lib.move_medium(Element::Slot(0), Element::Drive(0))
        .unwrap();
    assert_eq!(lib.drive(0).unwrap().loaded().as_deref(), Some("NEW001L9"));
}

#[test]
fn damaged_state_and_cartridge_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut lib = library(dir.path(), 2, 4 << 20);
    lib.move_medium(Element::Slot(0), Element::Drive(0))
        .unwrap();
    lib.drive(0).unwrap().write_block(b"data").unwrap();
    drop(lib);
    // A garbled record in the loaded cartridge: opening names the file.
    let cartridge = dir.path().join("cartridges/CRN001L9");
    let mut bytes = std::fs::read(&cartridge).unwrap();
    bytes[0] = b'Z';
    std::fs::write(&cartridge, &bytes).unwrap();
    match VirtualTapeLibrary::open(dir.path()) {
        Err(TapeError::Device { device, reason }) => {
            assert!(
                device.contains("CRN001L9") && reason.contains("tag"),
                "{device}: {reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A zero-length block is no block.
    bytes[0] = b'B';
    bytes[1..5].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&cartridge, &bytes).unwrap();
    assert!(matches!(
        VirtualTapeLibrary::open(dir.path()),
        Err(TapeError::Device { .. })
    ));
    // A block cut short by a crash mid-write: the recorded data ends
    // before it, as on a drive.
    bytes[1..5].copy_from_slice(&4u32.to_le_bytes());
    let mut torn = bytes.clone();
    torn.extend_from_slice(&[b'F', b'B', 200, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&cartridge, &torn).unwrap();
    {
        let lib = VirtualTapeLibrary::open(dir.path()).unwrap();
        let mut drive = lib.drive(0).unwrap();
        assert_eq!(read_data(&mut *drive), b"data");
        assert_eq!(read(&mut *drive), ReadOutcome::Filemark);
        assert_eq!(read(&mut *drive), ReadOutcome::EndOfData);
        assert_eq!(
            std::fs::metadata(&cartridge).unwrap().len(),
            bytes.len() as u64 + 1
        );
    }
    std::fs::write(&cartridge, &bytes).unwrap();
    // The state file: garbled, or one cartridge in two places.
    let state = dir.path().join("library.json");
    let good = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, "{ not json").unwrap();
    assert!(matches!(
        VirtualTapeLibrary::open(dir.path()),
        Err(TapeError::Device { .. })
    ));
    std::fs::write(&state, good.replace("CRN002L9", "CRN001L9")).unwrap();
    match VirtualTapeLibrary::open(dir.path()) {
        Err(TapeError::Device { reason, .. }) => assert!(reason.contains("twice"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // No library at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        VirtualTapeLibrary::open(empty.path()),
        Err(TapeError::Device { .. })
    ));
}
