//! Typed identifiers: [`ChunkId`] (content hash), [`PackId`] and [`SegmentId`]
//! (random names chosen by their writer), [`SnapshotId`] (hash of a manifest).

use std::fmt;
use std::str::FromStr;

/// How chunk ids are derived. Recorded in the pool config and every manifest so
/// that a keyed scheme (for encrypted pools) can follow without ambiguity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdScheme {
    /// BLAKE3-256 of the chunk's plaintext.
    Blake3 = 1,
}

impl IdScheme {
    /// The code stored in manifests.
    pub fn code(self) -> u8 {
        self as u8
    }
    /// The scheme stored as `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(IdScheme::Blake3),
            _ => None,
        }
    }
    /// The name stored in the pool configuration.
    pub fn name(self) -> &'static str {
        match self {
            IdScheme::Blake3 => "blake3-256",
        }
    }
    /// The scheme named `name`.
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
            /// Length in bytes.
            pub const LEN: usize = $len;
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
            /// Lower-case hex, as used in object names.
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

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::from_hex(s).ok_or_else(|| {
                    format!(
                        "{:?} is not a {}-character lower-case hex {}",
                        s,
                        $len * 2,
                        stringify!($name)
                    )
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
hex_id!(
    /// Identity of a pool: 128 random bits chosen when it was initialised.
    PoolId, 16
);

impl ChunkId {
    /// The id of `data` under [`IdScheme::Blake3`].
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }
}

impl SnapshotId {
    /// The id of the encoded manifest `bytes`.
    pub fn of_manifest(bytes: &[u8]) -> Self {
        SnapshotId(*blake3::hash(bytes).as_bytes())
    }
}

/// Lower-case hex of a byte slice.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses lower-case hex (the one spelling ids are written in: object
/// names, notices) into exactly `N` bytes. Input typed by people is
/// lower-cased before (see `SnapshotSelector`).
pub fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
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
    fn hex_round_trip() {
        let v = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&v), "0001abff");
        assert_eq!(parse_hex::<4>("0001abff"), Some(v));
        // One spelling: upper case is not an id's name.
        assert_eq!(parse_hex::<4>("0001ABff"), None);
        assert_eq!(parse_hex::<4>("0001abfF"), None);
        assert_eq!(parse_hex::<4>("0001abf"), None);
        assert_eq!(parse_hex::<4>("0001abfg"), None);
    }

    #[test]
    fn parse_rejects_wrong_length() {
        assert!("abcd".parse::<PackId>().is_err());
        let p = PackId([7; 16]);
        assert_eq!(p.to_hex().parse::<PackId>().unwrap(), p);
    }
}
