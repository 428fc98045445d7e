//! Certificates and keys held as bytes, written as text.
//!
//! The Master keeps a certificate (and its key) for every busy partition:
//! half a million of them at fleet size, the largest part of the state.
//! Held as PEM text a partition's pair cost about 1,000 bytes and its
//! SHA-256 fingerprint, a 64-character hex string, was stored three times
//! (the record, its map key, the partition's index). These types keep the
//! DER bytes and the 32-byte digest instead, and serialize to exactly the
//! text they were made from, so stored states and log entries keep their
//! bytes and older replicas read them unchanged.
//!
//! Part of the state machine: imports nothing.

use std::fmt;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The PEM labels kept as bytes; any other text is kept as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Certificate,
    PrivateKey,
}

impl Label {
    fn as_str(self) -> &'static str {
        match self {
            Label::Certificate => "CERTIFICATE",
            Label::PrivateKey => "PRIVATE KEY",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "CERTIFICATE" => Some(Label::Certificate),
            "PRIVATE KEY" => Some(Label::PrivateKey),
            _ => None,
        }
    }
}

/// One PEM object (a certificate or a PKCS#8 private key).
///
/// Kept as DER when writing it back gives the very text it was read from
/// (64-column base64, `\n` line ends, as rcgen writes them); otherwise the
/// text itself is kept, so nothing is ever rewritten.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    Der(Label, Box<[u8]>),
    Text(Box<str>),
}

impl Pem {
    /// Reads PEM text.
    pub fn from_text(text: &str) -> Self {
        match parse(text) {
            Some((label, der)) => Pem(Repr::Der(label, der.into_boxed_slice())),
            None => Pem(Repr::Text(text.into())),
        }
    }

    /// The PEM text, as it was given.
    pub fn to_text(&self) -> String {
        match &self.0 {
            Repr::Der(label, der) => encode(*label, der),
            Repr::Text(t) => t.to_string(),
        }
    }

    /// The DER bytes, when it is held as DER (as every PEM the Master
    /// writes is).
    pub fn der(&self) -> Option<&[u8]> {
        match &self.0 {
            Repr::Der(_, der) => Some(der),
            Repr::Text(_) => None,
        }
    }

    /// Whether it is held as DER bytes (the compact form).
    pub fn is_der(&self) -> bool {
        matches!(self.0, Repr::Der(..))
    }

    /// Length of the text in bytes, without writing it.
    pub fn text_len(&self) -> usize {
        match &self.0 {
            Repr::Der(label, der) => {
                let b64 = der.len().div_ceil(3) * 4;
                let lines = b64.div_ceil(64);
                let label = label.as_str().len();
                // "-----BEGIN L-----\n", the body's lines, "-----END L-----\n".
                17 + label + b64 + lines + 15 + label
            }
            Repr::Text(t) => t.len(),
        }
    }
}

impl From<String> for Pem {
    fn from(text: String) -> Self {
        Pem::from_text(&text)
    }
}

impl From<&str> for Pem {
    fn from(text: &str) -> Self {
        Pem::from_text(text)
    }
}

impl fmt::Display for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Der(label, der) => write!(f, "Pem({}, {} bytes DER)", label.as_str(), der.len()),
            Repr::Text(t) => write!(f, "Pem({} bytes text)", t.len()),
        }
    }
}

impl Serialize for Pem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_text())
    }
}

impl<'de> Deserialize<'de> for Pem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextVisitor("PEM text", |text: &str| {
            Ok::<_, String>(Pem::from_text(text))
        }))
    }
}

/// Reads a string in place where the format lends it (postcard does),
/// without first copying it into a `String` as `Cow<str>` would: a
/// restored state reads every certificate through here.
struct TextVisitor<F>(&'static str, F);

impl<'de, T, F> serde::de::Visitor<'de> for TextVisitor<F>
where
    F: FnOnce(&str) -> Result<T, String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<T, E> {
        (self.1)(text).map_err(E::custom)
    }
}

/// The label and DER of `text` when [`encode`] would write `text` back
/// byte for byte; `None` otherwise (the text is then kept as it is).
///
/// Checked on the layout rather than by encoding again, since every
/// certificate of a restored state passes here: lines of 64 base64 digits
/// and a last line of 1 to 64, each ended by `\n`, padding only at the very
/// end. The engine refuses non-canonical padding and trailing bits, so what
/// it decodes encodes to the same digits.
fn parse(text: &str) -> Option<(Label, Vec<u8>)> {
    let rest = text.strip_prefix("-----BEGIN ")?;
    let (label, rest) = rest.split_once("-----\n")?;
    let label = Label::parse(label)?;
    let body = rest
        .strip_suffix("-----\n")?
        .strip_suffix(label.as_str())?
        .strip_suffix("-----END ")?;
    let body = body.strip_suffix('\n')?.as_bytes();
    if body.is_empty() {
        return None;
    }
    // Every line but the last is 64 digits and its `\n`: a chunk of 65. The
    // last chunk is the last line; a `\n` left in it fails to decode.
    let mut der = Vec::with_capacity(body.len() / 4 * 3);
    let mut chunks = body.chunks(65).peekable();
    while let Some(chunk) = chunks.next() {
        let digits = match chunks.peek() {
            None => chunk,
            Some(_) if chunk[64] == b'\n' && !chunk[..64].contains(&b'=') => &chunk[..64],
            Some(_) => return None,
        };
        base64::engine::general_purpose::STANDARD
            .decode_vec(digits, &mut der)
            .ok()?;
    }
    Some((label, der))
}

fn encode(label: Label, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let label = label.as_str();
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 34);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// A certificate's SHA-256 digest (of its DER): how a handshake finds its
/// record. Written as 64 lowercase hex digits, which sort as the bytes do.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Reads 64 hex digits; `None` for anything else (an unknown caller).
    pub fn parse(hex_text: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut out).ok()?;
        Some(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextVisitor("a SHA-256 fingerprint in hex", |text: &str| {
            Fingerprint::parse(text).ok_or_else(|| format!("not a SHA-256 fingerprint in hex: {text:?}"))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn rcgen_certificates_and_keys_are_kept_as_der_and_written_back_unchanged() {
        let (cert, key) = issued();
        for text in [cert, key] {
            let pem = Pem::from_text(&text);
            assert!(pem.is_der(), "{text}");
            assert_eq!(pem.to_text(), text);
            assert_eq!(pem.text_len(), text.len());
        }
    }

    #[test]
    fn serde_bytes_are_those_of_the_text() {
        let (cert, _) = issued();
        let pem = Pem::from_text(&cert);
        assert_eq!(
            postcard::to_allocvec(&pem).unwrap(),
            postcard::to_allocvec(&cert).unwrap()
        );
        let back: Pem = postcard::from_bytes(&postcard::to_allocvec(&cert).unwrap()).unwrap();
        assert_eq!(back, pem);
        assert!(back.is_der());
    }

    #[test]
    fn text_that_would_not_come_back_the_same_is_kept_as_text() {
        let (cert, _) = issued();
        let crlf = cert.replace('\n', "\r\n");
        let other_label = cert.replace("CERTIFICATE", "X509 CRL");
        let trailing = format!("{cert}\n");
        let (head, rest) = cert.split_once('\n').unwrap();
        let (body, foot) = rest.trim_end().rsplit_once('\n').unwrap();
        let digits: String = body.lines().collect();
        let rewrap = |width: usize| {
            let lines: Vec<&str> = digits
                .as_bytes()
                .chunks(width)
                .map(|l| std::str::from_utf8(l).unwrap())
                .collect();
            format!("{head}\n{}\n{foot}\n", lines.join("\n"))
        };
        let (wide, one_line) = (rewrap(76), rewrap(digits.len()));
        let blank_line = cert.replacen("\n", "\n\n", 2).replacen("\n\n", "\n", 1);
        // 31 bytes end in one byte and "==": the last digit's low 4 bits are
        // unused, and must be zero; and the padding must be there.
        let short = encode(Label::Certificate, &[0xff; 31]);
        assert!(short.contains("/w==\n"), "{short}");
        let loose_bits = short.replace("/w==\n", "/x==\n");
        let no_padding = short.replace("/w==\n", "/w\n");
        // 46 bytes are 64 digits ending in "==": padding inside the body.
        let padded_line = base64::engine::general_purpose::STANDARD.encode([7u8; 46]);
        let inner_padding = format!("-----BEGIN CERTIFICATE-----\n{padded_line}\nAAAA\n-----END CERTIFICATE-----\n");
        for text in [
            crlf,
            other_label,
            trailing,
            wide,
            one_line,
            blank_line,
            loose_bits,
            no_padding,
            inner_padding,
            "not pem".to_string(),
            String::new(),
        ] {
            let pem = Pem::from_text(&text);
            assert!(!pem.is_der(), "{text:?}");
            assert_eq!(pem.to_text(), text);
            assert_eq!(
                postcard::to_allocvec(&pem).unwrap(),
                postcard::to_allocvec(&text).unwrap()
            );
        }
    }

    #[test]
    fn every_length_of_der_reads_back_as_der() {
        for len in 1..200usize {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let text = encode(Label::Certificate, &der);
            let pem = Pem::from_text(&text);
            assert_eq!(pem, Pem(Repr::Der(Label::Certificate, der.into_boxed_slice())), "{len}");
            assert_eq!(pem.to_text(), text);
        }
    }

    #[test]
    fn fingerprints_read_and_write_hex_and_sort_as_their_text() {
        let a = "00ff".repeat(16);
        let b = "0100".repeat(16);
        let fa = Fingerprint::parse(&a).unwrap();
        let fb = Fingerprint::parse(&b).unwrap();
        assert_eq!(fa.to_string(), a);
        assert!(fa < fb && a < b);
        assert_eq!(postcard::to_allocvec(&fa).unwrap(), postcard::to_allocvec(&a).unwrap());
        for bad in ["", "abc", &"zz".repeat(32), &a.to_uppercase()[..62]] {
            assert!(Fingerprint::parse(bad).is_none(), "{bad}");
        }
        assert!(postcard::from_bytes::<Fingerprint>(&postcard::to_allocvec("nope").unwrap()).is_err());
    }
}
