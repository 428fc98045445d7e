//! `application/x-www-form-urlencoded` bodies and query strings, as the SLAP
//! client sends them (Python `requests`): `k=v&k2=v2`, `+` for space,
//! `%XX` for other bytes, UTF-8.

/// Why a form could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("form: {0}")]
pub struct FormError(pub String);

/// Field names and values in order (a name may repeat).
pub fn parse(body: &str) -> Result<Vec<(String, String)>, FormError> {
    body.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// The value of the first field called `name`.
pub fn get<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one name or value.
pub fn decode(s: &str) -> Result<String, FormError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let pair = bytes
                    .get(i + 1)
                    .copied()
                    .and_then(hex)
                    .zip(bytes.get(i + 2).copied().and_then(hex));
                let Some((hi, lo)) = pair else {
                    return Err(FormError(format!("bad percent escape at byte {i}")));
                };
                out.push(hi * 16 + lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError("a field is not UTF-8 once decoded".into()))
}

/// Encodes one name or value the way `requests` does.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A whole form body (`application/x-www-form-urlencoded`) from its
/// fields, in order: what [`parse`] reads back.
pub fn encode_fields(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_fields_parse_back() {
        let fields = [
            ("url", "https://a.example/x y"),
            ("xml", "<marshal>&é</marshal>"),
            ("empty", ""),
        ];
        let body = encode_fields(&fields);
        let back = parse(&body).unwrap();
        let back: Vec<(&str, &str)> = back.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(back, fields);
    }

    #[test]
    fn parses_fields() {
        let f = parse("computer_id=COMP-1&state=started&xml=%3Cmarshal%3E+x%3C%2Fmarshal%3E&empty=&flag").unwrap();
        assert_eq!(get(&f, "computer_id"), Some("COMP-1"));
        assert_eq!(get(&f, "xml"), Some("<marshal> x</marshal>"));
        assert_eq!(get(&f, "empty"), Some(""));
        assert_eq!(get(&f, "flag"), Some(""));
    }

    #[test]
    fn rejects_bad_escapes_and_non_utf8() {
        assert!(parse("a=%4").is_err());
        assert!(parse("a=%zz").is_err());
        assert!(parse("a=%ff%fe").is_err());
    }

    #[test]
    fn round_trips() {
        let s = "a<b & c=d é+%";
        assert_eq!(decode(&encode(s)).unwrap(), s);
    }
}
