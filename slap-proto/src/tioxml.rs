//! TioXML usage journals (reference section 7): the document `useComputer`
//! carries. Checked against the shape of `computer_consumption.xsd`, element
//! by element and in order, so a malformed report is refused with the reason
//! before anything is stored.

use quick_xml::events::Event;
use quick_xml::Reader;

/// A parsed element: name, attributes, children, text.
#[derive(Debug, Default)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Element>,
    text: String,
}

/// Deepest nesting accepted; a journal is four levels deep.
const MAX_DEPTH: usize = 16;

fn parse(xml: &str) -> Result<Element, String> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    loop {
        let event = reader.read_event().map_err(|e| format!("not well-formed XML: {e}"))?;
        match event {
            Event::Start(e) | Event::Empty(e) if root.is_some() => {
                return Err(format!(
                    "content after the root element: <{}>",
                    String::from_utf8_lossy(e.name().as_ref())
                ))
            }
            Event::Start(e) => {
                if stack.len() >= MAX_DEPTH {
                    return Err("elements nested too deeply".into());
                }
                stack.push(element(&e)?);
            }
            Event::Empty(e) => {
                let el = element(&e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let el = stack.pop().ok_or("unbalanced end tag")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let text = t.decode().map_err(|e| format!("bad text: {e}"))?;
                    let text = quick_xml::escape::unescape(&text).map_err(|e| format!("bad text: {e}"))?;
                    top.text.push_str(&text);
                }
            }
            Event::GeneralRef(r) => {
                if let Some(top) = stack.last_mut() {
                    let name = String::from_utf8_lossy(r.as_ref()).into_owned();
                    let entity = format!("&{name};");
                    let text = quick_xml::escape::unescape(&entity).map_err(|e| format!("bad entity: {e}"))?;
                    top.text.push_str(&text);
                }
            }
            Event::CData(c) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&c));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err("unclosed element".into());
    }
    root.ok_or_else(|| "empty document".into())
}

fn element(e: &quick_xml::events::BytesStart) -> Result<Element, String> {
    let mut el = Element {
        name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
        ..Default::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|e| format!("bad attribute: {e}"))?;
        let value = a.unescape_value().map_err(|e| format!("bad attribute: {e}"))?;
        el.attrs
            .push((String::from_utf8_lossy(a.key.as_ref()).into_owned(), value.into_owned()));
    }
    Ok(el)
}

/// Children of `el` matched in order against `(name, min, max)`.
fn sequence<'a>(el: &'a Element, spec: &[(&str, usize, usize)]) -> Result<Vec<Vec<&'a Element>>, String> {
    let mut groups = Vec::new();
    let mut i = 0;
    for (name, min, max) in spec {
        let mut group = Vec::new();
        while i < el.children.len() && el.children[i].name == *name && group.len() < *max {
            group.push(&el.children[i]);
            i += 1;
        }
        if group.len() < *min {
            let found = el
                .children
                .get(i)
                .map(|c| format!("<{}>", c.name))
                .unwrap_or("the end".into());
            return Err(format!("<{}> needs <{name}> here, found {found}", el.name));
        }
        groups.push(group);
    }
    if let Some(extra) = el.children.get(i) {
        return Err(format!("<{}> does not allow <{}> here", el.name, extra.name));
    }
    Ok(groups)
}

fn attr<'a>(el: &'a Element, name: &str) -> Option<&'a str> {
    el.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn movement(m: &Element) -> Result<(), String> {
    let g = sequence(
        m,
        &[
            ("resource", 1, 1),
            ("title", 0, 1),
            ("reference", 0, 1),
            ("quantity", 1, 1),
            ("price", 1, 1),
            ("VAT", 1, 1),
            ("category", 0, usize::MAX),
        ],
    )?;
    for (idx, what) in [(3, "quantity"), (4, "price")] {
        let text = g[idx][0].text.trim();
        text.parse::<f64>()
            .map_err(|_| format!("<movement> <{what}> must be a number, not {text:?}"))?;
    }
    Ok(())
}

/// Checks a computer journal; returns how many movements it holds.
pub fn validate(xml: &str) -> Result<usize, String> {
    let root = parse(xml)?;
    if root.name != "journal" {
        return Err(format!("the root element must be <journal>, not <{}>", root.name));
    }
    let transactions = &sequence(&root, &[("transaction", 1, usize::MAX)])?[0];
    let mut movements = 0;
    for t in transactions {
        attr(t, "type").ok_or("<transaction> needs a type attribute")?;
        let g = sequence(
            t,
            &[
                ("title", 0, 1),
                ("start_date", 1, 1),
                ("stop_date", 1, 1),
                ("reference", 1, 1),
                ("currency", 1, 1),
                ("payment_mode", 1, 1),
                ("category", 0, usize::MAX),
                ("arrow", 1, usize::MAX),
                ("movement", 1, usize::MAX),
            ],
        )?;
        for arrow in &g[7] {
            attr(arrow, "type").ok_or("<arrow> needs a type attribute")?;
            sequence(arrow, &[("source", 0, 1), ("destination", 0, 1)])?;
        }
        for m in &g[8] {
            movement(m)?;
        }
        movements += g[8].len();
    }
    Ok(movements)
}

#[cfg(test)]
mod tests {
    use super::validate;

    /// The journal captured from `slapos node report` (reference section 7).
    const CAPTURED: &str = r#"<?xml version="1.0"?><journal><transaction type="Sale Packing List"><title>Resource consumptions</title><start_date></start_date><stop_date>2026-11-25 at 15:02:03</stop_date><reference>slaprunner</reference><currency></currency><payment_mode></payment_mode><category></category><arrow type="Administration"><source></source><destination></destination></arrow><movement><resource>CPU Consumption</resource><title>CPU consumption of the partition</title><reference>slappart0</reference><quantity>42.5</quantity><price>0.0</price><VAT>None</VAT><category>cpu</category></movement></transaction></journal>"#;

    #[test]
    fn accepts_the_captured_journal() {
        assert_eq!(validate(CAPTURED), Ok(1));
    }

    #[test]
    fn refuses_what_the_schema_refuses() {
        let cases = [
            (
                CAPTURED
                    .replace("<journal>", "<journey>")
                    .replace("</journal>", "</journey>"),
                "root",
            ),
            (
                CAPTURED.replace("<quantity>42.5</quantity>", "<quantity>lots</quantity>"),
                "number",
            ),
            (CAPTURED.replace("<price>0.0</price>", ""), "price"),
            (CAPTURED.replace(" type=\"Sale Packing List\"", ""), "type"),
            (CAPTURED.replace("<reference>slaprunner</reference>", ""), "reference"),
            (CAPTURED.replace("</journal>", ""), "unclosed"),
            (
                CAPTURED.replace("<VAT>None</VAT>", "<VAT>None</VAT><surprise/>"),
                "surprise",
            ),
            ("".to_string(), "empty"),
        ];
        for (xml, why) in cases {
            let err = validate(&xml).expect_err(why);
            assert!(!err.is_empty(), "{why}");
        }
    }
}
