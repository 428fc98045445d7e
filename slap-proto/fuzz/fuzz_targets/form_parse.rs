//! Any input: the form parser answers fields or an error, never a panic;
//! accepted fields encode and parse back to themselves.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slap_proto::form;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(fields) = form::parse(text) else { return };
    let encoded: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}={}", form::encode(k), form::encode(v)))
        .collect();
    let back = form::parse(&encoded.join("&")).expect("our own encoding must parse");
    assert_eq!(back, fields);
});
