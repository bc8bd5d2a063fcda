//! Typed identifiers: [`ChunkId`] (content hash), [`PackId`] and [`SegmentId`]
//! (random names chosen by their writer), [`SnapshotId`] (hash of a manifest).

use std::fmt;
use std::str::FromStr;

use crate::coding::{hex, parse_hex};

/// How chunk ids are derived. Recorded in the pool config and every manifest so
/// that a keyed scheme (for encrypted pools) can follow without ambiguity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdScheme {
    /// BLAKE3-256 of the chunk's plaintext.
    Blake3 = 1,
}

impl IdScheme {
    pub fn code(self) -> u8 {
        self as u8
    }
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(IdScheme::Blake3),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            IdScheme::Blake3 => "blake3-256",
        }
    }
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "blake3-256" => Some(IdScheme::Blake3),
            _ => None,
        }
    }
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub const LEN: usize = $len;
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                hex(&self.0)
            }
            /// Parses the full-length hex form.
            pub fn from_hex(s: &str) -> Option<Self> {
                parse_hex::<$len>(s).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::from_hex(s).ok_or_else(|| {
                    format!("{:?} is not a {}-character hex {}", s, $len * 2, stringify!($name))
                })
            }
        }
    };
}

hex_id!(
    /// Identity of a chunk: BLAKE3-256 of its plaintext (scheme [`IdScheme::Blake3`]).
    ChunkId, 32
);
hex_id!(
    /// Name of a pack file: 128 random bits chosen by the writer, never reused.
    PackId, 16
);
hex_id!(
    /// Name of an index segment: 128 random bits chosen by the writer.
    SegmentId, 16
);
hex_id!(
    /// Identity of a snapshot: BLAKE3-256 of its encoded manifest.
    SnapshotId, 32
);

impl ChunkId {
    /// The id of `data` under [`IdScheme::Blake3`].
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }
}

impl SnapshotId {
    pub fn of_manifest(bytes: &[u8]) -> Self {
        SnapshotId(*blake3::hash(bytes).as_bytes())
    }
}

/// 16 bytes from the operating system's random source.
pub(crate) fn random_16() -> crate::Result<[u8; 16]> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| crate::Error::Random(e.to_string()))?;
    Ok(b)
}

impl PackId {
    pub fn random() -> crate::Result<Self> {
        random_16().map(PackId)
    }
}

impl SegmentId {
    pub fn random() -> crate::Result<Self> {
        random_16().map(SegmentId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_is_blake3_golden() {
        // BLAKE3("abc"), from the BLAKE3 reference test vectors.
        assert_eq!(
            ChunkId::of(b"abc").to_hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn parse_rejects_wrong_length() {
        assert!("abcd".parse::<PackId>().is_err());
        let p = PackId([7; 16]);
        assert_eq!(p.to_hex().parse::<PackId>().unwrap(), p);
    }
}
