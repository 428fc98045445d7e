//! On-disk record encoding.
//!
//! Every value this crate writes starts with one format-version byte, then a
//! postcard body (or, for the application's records, the application's own
//! bytes). Reading a value checks the byte first, so a data dir written by a
//! newer binary is refused with a message instead of being misread. Keys are
//! plain bytes; log keys are big-endian indexes so RocksDB's order is log order.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

use crate::error::StoreError;

/// The only record format this binary reads and writes.
pub const FORMAT_VERSION: u8 = 1;

/// Key of a log entry: its index, big-endian, so keys sort as indexes do.
pub fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Index of a log key, or a corruption error naming the key.
pub fn log_index(store: &Path, cf: &'static str, key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt {
        store: store.to_path_buf(),
        cf,
        key: show_key(key),
        reason: format!("a log key is 8 bytes, this one is {}", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Serializes `value` behind the format byte.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let out = vec![FORMAT_VERSION];
    // postcard only fails on types serde cannot describe, which would be a bug
    // in this crate's own types, not bad input.
    postcard::to_extend(value, out).expect("postcard encodes every serde type this crate stores")
}

/// Prefixes raw application bytes with the format byte.
pub fn wrap_raw(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 1);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(value);
    out
}

/// Checks the format byte and returns the body behind it.
pub fn unwrap_raw<'a>(store: &Path, cf: &'static str, key: &[u8], value: &'a [u8]) -> Result<&'a [u8], StoreError> {
    match value.first() {
        Some(&FORMAT_VERSION) => Ok(&value[1..]),
        Some(&found) => Err(StoreError::UnknownFormat {
            store: store.to_path_buf(),
            cf,
            key: show_key(key),
            found,
            expected: FORMAT_VERSION,
        }),
        None => Err(StoreError::Corrupt {
            store: store.to_path_buf(),
            cf,
            key: show_key(key),
            reason: "empty value (no format byte)".into(),
        }),
    }
}

/// Checks the format byte and decodes the body.
pub fn decode<T: DeserializeOwned>(store: &Path, cf: &'static str, key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    let body = unwrap_raw(store, cf, key, value)?;
    postcard::from_bytes(body).map_err(|e| StoreError::Corrupt {
        store: store.to_path_buf(),
        cf,
        key: show_key(key),
        reason: e.to_string(),
    })
}

/// A key as a person reads it: text when it is printable, else hex; log keys
/// (8 bytes, not text) also show their index.
pub fn show_key(key: &[u8]) -> String {
    if !key.is_empty() && key.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return String::from_utf8_lossy(key).into_owned();
    }
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    match <[u8; 8]>::try_from(key) {
        Ok(b) => format!("0x{hex} (index {})", u64::from_be_bytes(b)),
        Err(_) => format!("0x{hex}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_like_indexes() {
        let mut keys: Vec<_> = [300u64, 2, 70000, 1].iter().map(|i| log_key(*i)).collect();
        keys.sort();
        let back: Vec<u64> = keys.iter().map(|k| u64::from_be_bytes(*k)).collect();
        assert_eq!(back, vec![1, 2, 300, 70000]);
    }

    #[test]
    fn unknown_version_is_named() {
        let err = decode::<u64>(Path::new("/d"), "meta", b"vote", &[9, 1]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/d") && msg.contains("meta/vote") && msg.contains("version 9"),
            "{msg}"
        );
    }

    #[test]
    fn garbage_body_is_corrupt_not_panic() {
        let err = decode::<(u64, String)>(Path::new("/d"), "log", &log_key(7), &[FORMAT_VERSION, 0xff]).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("index 7"), "{err}");
    }

    #[test]
    fn round_trip() {
        let v = (42u64, "x".to_string());
        assert_eq!(
            decode::<(u64, String)>(Path::new("/d"), "c", b"k", &encode(&v)).unwrap(),
            v
        );
    }
}
