//! NBD client against arbitrary server bytes: handshake, then a read, a
//! block-status request, a write and a flush. Never panics, never allocates
//! without bound.
#![no_main]
use std::io::{Cursor, Read, Write};

use cairn_engine::NbdConnection;
use libfuzzer_sys::fuzz_target;

struct Server(Cursor<Vec<u8>>);

impl Read for Server {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Server {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let server = Server(Cursor::new(data.to_vec()));
    if let Ok(mut c) = NbdConnection::over(server, "fuzz", "", &["base:allocation"]) {
        let mut buf = vec![0u8; (c.size().min(1 << 16)) as usize];
        let _ = c.read_at(0, &mut buf);
        let _ = c.block_status("base:allocation", 0, 4096);
        let _ = c.write_at(0, &[7u8; 512]);
        let _ = c.flush();
    }
});
