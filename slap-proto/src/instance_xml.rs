//! Instance XML (reference section 1.3): how SlapOS masters store instance
//! parameters, connection parameters and SLA filters, and what
//! `slapos.util.dict2xml` / `xml2dict` read and write.
//!
//! ```text
//! <?xml version='1.0' encoding='utf-8'?>
//! <instance>
//!   <parameter id="key">value</parameter>
//! </instance>
//! ```
//!
//! Keys are sorted, text is escaped once, output is UTF-8 (what lxml writes
//! for `dict2xml`). Reading gives a flat map of
//! strings, where a repeated id joins its values with a space and an element
//! without text reads as `None`: a value published as the empty string comes
//! back as `None` (a behaviour clients have come to rely on).

use std::collections::BTreeMap;

use quick_xml::events::Event;
use quick_xml::Reader;

/// Why an instance XML document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("instance XML: {0}")]
pub struct InstanceXmlError(pub String);

/// lxml's escaping with UTF-8 output: `&`, `<`, `>` and `\r` in text; in an
/// attribute also `"`, tab and newline. Other characters are written as is.
fn escape(s: &str, attribute: bool, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            '"' if attribute => out.push_str("&quot;"),
            '\t' if attribute => out.push_str("&#9;"),
            '\n' if attribute => out.push_str("&#10;"),
            c => out.push(c),
        }
    }
}

/// `dict2xml`: the document for `params` (a map's pairs, keys sorted).
pub fn to_xml<'a>(params: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut out = String::from("<?xml version='1.0' encoding='utf-8'?>\n");
    let mut params = params.into_iter().peekable();
    if params.peek().is_none() {
        out.push_str("<instance/>\n");
        return out;
    }
    out.push_str("<instance>\n");
    for (k, v) in params {
        out.push_str("  <parameter id=\"");
        escape(k, true, &mut out);
        out.push_str("\">");
        escape(v, false, &mut out);
        out.push_str("</parameter>\n");
    }
    out.push_str("</instance>\n");
    out
}

/// `xml2dict`: the parameters of a document; `None` for an element with no text.
pub fn from_xml(xml: &str) -> Result<BTreeMap<String, Option<String>>, InstanceXmlError> {
    let bad = |m: String| InstanceXmlError(m);
    let mut reader = Reader::from_str(xml);
    let mut out: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut depth = 0usize;
    let mut root_seen = false;
    // The parameter being read: its id and text so far.
    let mut current: Option<(String, String)> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| bad(format!("malformed XML at byte {}: {e}", reader.buffer_position())))?;
        let empty = matches!(event, Event::Empty(_));
        match event {
            Event::Start(e) | Event::Empty(e) => {
                let name = e.name();
                match (depth, name.as_ref()) {
                    (0, b"instance") if !root_seen => root_seen = true,
                    (0, other) => {
                        return Err(bad(format!(
                            "root is <{}>, expected <instance>",
                            String::from_utf8_lossy(other)
                        )))
                    }
                    (1, b"parameter") => {
                        let mut id = None;
                        for a in e.attributes() {
                            let a = a.map_err(|e| bad(format!("bad attribute: {e}")))?;
                            if a.key.as_ref() == b"id" {
                                id = Some(
                                    a.unescape_value()
                                        .map_err(|e| bad(format!("bad id: {e}")))?
                                        .into_owned(),
                                );
                            }
                        }
                        let id = id.ok_or_else(|| bad("a <parameter> has no id".into()))?;
                        if empty {
                            out.entry(id).or_insert(None);
                        } else {
                            current = Some((id, String::new()));
                        }
                    }
                    (_, other) => return Err(bad(format!("unexpected <{}>", String::from_utf8_lossy(other)))),
                }
                if !empty {
                    depth += 1;
                }
            }
            Event::End(_) => {
                if depth == 2 {
                    if let Some((id, text)) = current.take() {
                        let value = if text.is_empty() { None } else { Some(text) };
                        match (out.get_mut(&id), value) {
                            (Some(Some(prev)), Some(v)) => {
                                prev.push(' ');
                                prev.push_str(&v);
                            }
                            (Some(slot @ None), v) => *slot = v,
                            (Some(Some(_)), None) => {}
                            (None, v) => {
                                out.insert(id, v);
                            }
                        }
                    }
                }
                depth = depth.saturating_sub(1);
            }
            Event::Text(t) => {
                let text = t.decode().map_err(|e| bad(format!("text is not UTF-8: {e}")))?;
                match current.as_mut() {
                    Some((_, buf)) => buf.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => {
                        return Err(bad(format!(
                            "text outside a parameter: {:?}",
                            text.chars().take(40).collect::<String>()
                        )))
                    }
                }
            }
            Event::GeneralRef(r) => {
                let c = crate::xml_text::resolve_reference(&r).map_err(InstanceXmlError)?;
                match current.as_mut() {
                    Some((_, buf)) => buf.push(c),
                    None => return Err(bad("character outside a parameter".into())),
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !root_seen {
        return Err(bad("no <instance> element".into()));
    }
    if depth != 0 {
        return Err(bad("document ends inside an element".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Expected bytes produced by lxml 6.1 running slapos.core 1.26.1's
    /// `dict2xml` on the same dict.
    #[test]
    fn writes_what_dict2xml_writes() {
        let params = map(&[
            ("b", "x<y&z \"q\" 's' é 中 😀 \r\n\tend"),
            ("a", "1"),
            ("k\"<&>\t\n\r", "v"),
            ("e", ""),
        ]);
        assert_eq!(
            to_xml(&params),
            "<?xml version='1.0' encoding='utf-8'?>\n<instance>\n  <parameter id=\"a\">1</parameter>\n  \
             <parameter id=\"b\">x&lt;y&amp;z \"q\" 's' é 中 😀 &#13;\n\tend</parameter>\n  \
             <parameter id=\"e\"></parameter>\n  \
             <parameter id=\"k&quot;&lt;&amp;&gt;&#9;&#10;&#13;\">v</parameter>\n</instance>\n"
        );
        assert_eq!(
            to_xml(&BTreeMap::new()),
            "<?xml version='1.0' encoding='utf-8'?>\n<instance/>\n"
        );
    }

    #[test]
    fn reads_back_with_the_empty_string_as_none() {
        let params = map(&[("a", "1"), ("b", "x<y&z é"), ("empty", "")]);
        let back = from_xml(&to_xml(&params)).unwrap();
        assert_eq!(back["a"].as_deref(), Some("1"));
        assert_eq!(back["b"].as_deref(), Some("x<y&z é"));
        assert_eq!(back["empty"], None, "xml2dict turns an empty value into None");
    }

    #[test]
    fn repeated_ids_join_with_a_space() {
        let xml = "<instance><parameter id=\"k\">a</parameter><parameter id=\"k\">b</parameter></instance>";
        assert_eq!(from_xml(xml).unwrap()["k"].as_deref(), Some("a b"));
    }

    #[test]
    fn refuses_malformed_documents() {
        for bad in [
            "",
            "<other/>",
            "<instance><parameter>x</parameter></instance>",
            "<instance><parameter id=\"a\">x</instance>",
            "<instance><foo/></instance>",
            "<instance>text</instance>",
        ] {
            assert!(from_xml(bad).is_err(), "{bad:?}");
        }
    }
}
