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

/// One `<movement>`: a quantity of a resource a partition used.
#[derive(Debug, Clone, PartialEq)]
pub struct Movement {
    pub resource: String,
    pub title: Option<String>,
    /// The partition, as slapgrid fills it in.
    pub reference: Option<String>,
    pub quantity: f64,
    pub price: f64,
    pub vat: String,
    pub categories: Vec<String>,
}

/// One `<transaction>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    pub kind: String,
    pub title: Option<String>,
    pub start_date: String,
    pub stop_date: String,
    /// The computer the journal is from.
    pub reference: String,
    pub currency: String,
    pub movements: Vec<Movement>,
}

fn text_of(group: &[&Element]) -> Option<String> {
    group.first().map(|e| e.text.trim().to_string())
}

fn movement(m: &Element) -> Result<Movement, String> {
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
    let number = |idx: usize, what: &str| -> Result<f64, String> {
        let text = g[idx][0].text.trim();
        let v = text
            .parse::<f64>()
            .map_err(|_| format!("<movement> <{what}> must be a number, not {text:?}"))?;
        if !v.is_finite() {
            return Err(format!("<movement> <{what}> must be a finite number, not {text:?}"));
        }
        Ok(v)
    };
    let resource = g[0][0].text.trim().to_string();
    if resource.is_empty() {
        return Err("<movement> <resource> is empty".into());
    }
    Ok(Movement {
        resource,
        title: text_of(&g[1]),
        reference: text_of(&g[2]).filter(|r| !r.is_empty()),
        quantity: number(3, "quantity")?,
        price: number(4, "price")?,
        vat: g[5][0].text.trim().to_string(),
        categories: g[6]
            .iter()
            .map(|c| c.text.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect(),
    })
}

/// Parses a computer journal, checking it against the shape of
/// `computer_consumption.xsd`.
pub fn parse_journal(xml: &str) -> Result<Vec<Transaction>, String> {
    let root = parse(xml)?;
    if root.name != "journal" {
        return Err(format!("the root element must be <journal>, not <{}>", root.name));
    }
    let transactions = &sequence(&root, &[("transaction", 1, usize::MAX)])?[0];
    let mut out = Vec::new();
    for t in transactions {
        let kind = attr(t, "type").ok_or("<transaction> needs a type attribute")?;
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
        out.push(Transaction {
            kind: kind.to_string(),
            title: text_of(&g[0]),
            start_date: text_of(&g[1]).unwrap_or_default(),
            stop_date: text_of(&g[2]).unwrap_or_default(),
            reference: text_of(&g[3]).unwrap_or_default(),
            currency: text_of(&g[4]).unwrap_or_default(),
            movements: g[8].iter().map(|m| movement(m)).collect::<Result<_, _>>()?,
        });
    }
    Ok(out)
}

/// Checks a computer journal; returns how many movements it holds.
pub fn validate(xml: &str) -> Result<usize, String> {
    Ok(parse_journal(xml)?.iter().map(|t| t.movements.len()).sum())
}

/// slapgrid's stop date (`YYYY-MM-DD at HH:MM:SS`, or `YYYY-MM-DD
/// HH:MM:SS`, taken as UTC) in microseconds since 1970, if it is one.
pub fn parse_stop_date(text: &str) -> Option<u64> {
    let t = text.trim().replace(" at ", " ");
    let (date, clock) = t.split_once(' ').unwrap_or((t.as_str(), "00:00:00"));
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut c = clock.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (
        c.next()??,
        c.next().flatten().unwrap_or(0),
        c.next().flatten().unwrap_or(0),
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + hh * 3600 + mm * 60 + ss;
    (secs >= 0).then(|| secs as u64 * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::validate;

    /// The journal captured from `slapos node report` (reference section 7).
    const CAPTURED: &str = r#"<?xml version="1.0"?><journal><transaction type="Sale Packing List"><title>Resource consumptions</title><start_date></start_date><stop_date>2026-11-25 at 15:02:03</stop_date><reference>slaprunner</reference><currency></currency><payment_mode></payment_mode><category></category><arrow type="Administration"><source></source><destination></destination></arrow><movement><resource>CPU Consumption</resource><title>CPU consumption of the partition</title><reference>slappart0</reference><quantity>42.5</quantity><price>0.0</price><VAT>None</VAT><category>cpu</category></movement></transaction></journal>"#;

    #[test]
    fn accepts_the_captured_journal() {
        assert_eq!(validate(CAPTURED), Ok(1));
        let t = &super::parse_journal(CAPTURED).unwrap()[0];
        assert_eq!(t.reference, "slaprunner");
        assert_eq!(t.movements[0].reference.as_deref(), Some("slappart0"));
        assert_eq!(t.movements[0].quantity, 42.5);
        assert_eq!(t.movements[0].categories, ["cpu"]);
        assert_eq!(
            super::parse_stop_date(&t.stop_date),
            Some(1_795_618_923 * 1_000_000),
            "2026-11-25 15:02:03 UTC"
        );
        assert_eq!(super::parse_stop_date("2026-13-01 at 00:00:00"), None);
        assert_eq!(super::parse_stop_date(""), None);
        assert_eq!(super::parse_stop_date("1970-01-01"), Some(0));
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
            (
                CAPTURED.replace("<quantity>42.5</quantity>", "<quantity>NaN</quantity>"),
                "finite",
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
