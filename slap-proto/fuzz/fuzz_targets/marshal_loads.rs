//! Any input: the decoder answers a value or an error, never a panic; a value
//! it accepts encodes, and reads back to the same encoding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slap_proto::marshal::{dumps, loads};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(value) = loads(text) else { return };
    // Some decodable values cannot be written (characters XML 1.0 forbids).
    let Ok(xml) = dumps(&value) else { return };
    let again = loads(&xml).expect("our own output must decode");
    assert_eq!(dumps(&again).expect("and encode again"), xml);
});
