//! Pieces of XML reading shared by the codecs.

use quick_xml::events::BytesRef;

/// The character an entity or character reference stands for: one of XML's
/// five predefined entities or a numeric reference. Any other entity is an
/// error, since neither format declares entities of its own.
pub(crate) fn resolve_reference(r: &BytesRef<'_>) -> Result<char, String> {
    match r.resolve_char_ref() {
        Ok(Some(c)) => Ok(c),
        Ok(None) => match r.as_ref() {
            b"amp" => Ok('&'),
            b"lt" => Ok('<'),
            b"gt" => Ok('>'),
            b"quot" => Ok('"'),
            b"apos" => Ok('\''),
            other => Err(format!("unknown entity &{};", String::from_utf8_lossy(other))),
        },
        Err(e) => Err(format!("bad character reference: {e}")),
    }
}
