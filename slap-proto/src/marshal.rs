//! The xml_marshaller wire format of SLAP (reference section 1.2).
//!
//! Every complex SLAP payload is a Python value serialized by
//! `xml_marshaller` (`slapos.util.dumps`): `<marshal>` around one value, an
//! element per Python type, ids on lists, dicts, sets and objects, and
//! references to containers already seen. Two details make or break
//! compatibility with the real client:
//!
//! - strings are escaped **twice**: `saxutils.escape` first (`&`, `<`, `>`),
//!   then XML escaping, so `a<b` travels as `a&amp;lt;b`; decoding XML-decodes
//!   and then un-escapes those three entities once more;
//! - output is ASCII: every other character is a numeric reference, and `\r`
//!   is written `&#13;`.
//!
//! The encoder reproduces `slapos.util.dumps` byte for byte (dict keys sorted,
//! ids from `i2` in document order, floats as Python's `repr`), except that it
//! never emits references: a Rust value has no object identity to share. The
//! decoder accepts references (and `<unicode>`, `<long>`), refuses cycles,
//! objects of classes outside SLAP's allow-list, and anything malformed, with
//! an error, never a panic.

use std::collections::HashMap;
use std::fmt::Write as _;

use quick_xml::events::Event;
use quick_xml::Reader;

/// A Python value as xml_marshaller carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Entries in the order given; the encoder sorts them by key.
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    /// An object of an allowed class: `Class(*args)`, then `setattr` of each attribute.
    Object(Box<Object>),
}

/// A marshalled Python object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub module: String,
    pub class: String,
    pub args: Vec<Value>,
    pub attrs: Vec<(Value, Value)>,
}

/// The classes `slapos.util.loads` accepts (module `slapos.slap.slap`).
pub const ALLOWED_CLASSES: &[&str] = &["Computer", "ComputerPartition", "SoftwareRelease", "SoftwareInstance"];
/// The only module objects may come from.
pub const SLAP_MODULE: &str = "slapos.slap.slap";
/// Deepest nesting accepted (a guard against stack exhaustion).
const MAX_DEPTH: usize = 128;

/// Why a document could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("xml_marshaller: {0}")]
pub struct MarshalError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, MarshalError> {
    Err(MarshalError(msg.into()))
}

impl Value {
    /// A string value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// A dict of string keys.
    pub fn str_dict<'a>(entries: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
        Value::Dict(entries.into_iter().map(|(k, v)| (Value::str(k), v)).collect())
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Rank and comparison used to sort dict keys (strings sort by code point,
    /// as Python sorts them).
    fn sort_key(&self) -> (u8, String) {
        match self {
            Value::None => (0, String::new()),
            Value::Bool(b) => (1, (*b as u8).to_string()),
            Value::Int(i) => (2, format!("{:+040}", i)),
            Value::Float(f) => (3, format!("{f:e}")),
            Value::Str(s) => (4, s.clone()),
            other => (5, other.canonical()),
        }
    }

    /// A text that depends only on the value, not on the order of its dict or
    /// set entries (the encoder reorders those, so a key's rank must not
    /// depend on it, or decoding our own output could sort differently).
    fn canonical(&self) -> String {
        let sorted = |items: Vec<String>| {
            let mut items = items;
            items.sort();
            items.join(",")
        };
        match self {
            Value::Tuple(v) => format!("t({})", v.iter().map(Value::canonical).collect::<Vec<_>>().join(",")),
            Value::List(v) => format!("l({})", v.iter().map(Value::canonical).collect::<Vec<_>>().join(",")),
            Value::Set(v) => format!("s({})", sorted(v.iter().map(Value::canonical).collect())),
            Value::Dict(e) => format!(
                "d({})",
                sorted(
                    e.iter()
                        .map(|(k, v)| format!("{}:{}", k.canonical(), v.canonical()))
                        .collect()
                )
            ),
            Value::Object(o) => format!(
                "o({}.{},{},{})",
                o.module,
                o.class,
                o.args.iter().map(Value::canonical).collect::<Vec<_>>().join(","),
                sorted(
                    o.attrs
                        .iter()
                        .map(|(k, v)| format!("{}:{}", k.canonical(), v.canonical()))
                        .collect()
                )
            ),
            scalar => format!("{scalar:?}"),
        }
    }
}

// ----- encoding ---------------------------------------------------------------

/// Serializes `value` as `slapos.util.dumps` does.
pub fn dumps(value: &Value) -> Result<String, MarshalError> {
    let mut enc = Encoder {
        out: String::from("<marshal>"),
        next_id: 2,
    };
    enc.value(value, 0)?;
    enc.out.push_str("</marshal>");
    Ok(enc.out)
}

struct Encoder {
    out: String,
    next_id: u32,
}

impl Encoder {
    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn container(&mut self, tag: &str, items: &[&Value], depth: usize) -> Result<(), MarshalError> {
        let id = self.id();
        if items.is_empty() {
            let _ = write!(self.out, "<{tag} id=\"i{id}\"/>");
            return Ok(());
        }
        let _ = write!(self.out, "<{tag} id=\"i{id}\">");
        for item in items {
            self.value(item, depth + 1)?;
        }
        let _ = write!(self.out, "</{tag}>");
        Ok(())
    }

    fn dict(&mut self, entries: &[(Value, Value)], depth: usize) -> Result<(), MarshalError> {
        let mut sorted: Vec<&(Value, Value)> = entries.iter().collect();
        sorted.sort_by_key(|(k, _)| k.sort_key());
        let flat: Vec<&Value> = sorted.iter().flat_map(|(k, v)| [k, v]).collect();
        self.container("dictionary", &flat, depth)
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), MarshalError> {
        if depth > MAX_DEPTH {
            return err(format!("value nested deeper than {MAX_DEPTH} levels"));
        }
        match v {
            Value::None => self.out.push_str("<none/>"),
            Value::Bool(b) => {
                let _ = write!(self.out, "<bool>{}</bool>", *b as u8);
            }
            Value::Int(i) => {
                let tag = if i.unsigned_abs() > 10u128.pow(24) {
                    "long"
                } else {
                    "int"
                };
                let _ = write!(self.out, "<{tag}>{i}</{tag}>");
            }
            Value::Float(f) => {
                let _ = write!(self.out, "<float>{}</float>", python_float_repr(*f));
            }
            Value::Str(s) => {
                self.out.push_str("<string>");
                escape_text(&sax_escape(s), &mut self.out)?;
                self.out.push_str("</string>");
            }
            Value::Tuple(items) if items.is_empty() => self.out.push_str("<tuple/>"),
            Value::Tuple(items) => {
                self.out.push_str("<tuple>");
                for item in items {
                    self.value(item, depth + 1)?;
                }
                self.out.push_str("</tuple>");
            }
            Value::List(items) => self.container("list", &items.iter().collect::<Vec<_>>(), depth)?,
            Value::Set(items) => {
                let mut sorted: Vec<&Value> = items.iter().collect();
                sorted.sort_by_key(|v| v.sort_key());
                self.container("set", &sorted, depth)?
            }
            Value::Dict(entries) => self.dict(entries, depth)?,
            Value::Object(o) => {
                if o.module != SLAP_MODULE || !ALLOWED_CLASSES.contains(&o.class.as_str()) {
                    return err(format!("class {}.{} may not be marshalled", o.module, o.class));
                }
                let id = self.id();
                let _ = write!(self.out, "<object id=\"i{id}\" module=\"");
                escape_text(&o.module, &mut self.out)?;
                self.out.push_str("\" class=\"");
                escape_text(&o.class, &mut self.out)?;
                self.out.push_str("\">");
                self.value(&Value::Tuple(o.args.clone()), depth + 1)?;
                self.dict(&o.attrs, depth + 1)?;
                self.out.push_str("</object>");
            }
        }
        Ok(())
    }
}

/// `xml.sax.saxutils.escape`: `&`, `<`, `>` only.
fn sax_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `saxutils.unescape`: `&lt;`, `&gt;`, then `&amp;`.
fn sax_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

/// Whether XML 1.0 can carry `c` at all.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// lxml's text escaping with ASCII output: `&`, `<`, `>`, `"` in attributes,
/// `\r`, and every non-ASCII character as a numeric reference.
fn escape_text(s: &str, out: &mut String) -> Result<(), MarshalError> {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            c if !xml_char(c) => {
                return err(format!("character U+{:04X} cannot be carried by XML 1.0", c as u32));
            }
            c if c.is_ascii() => out.push(c),
            c => {
                let _ = write!(out, "&#{};", c as u32);
            }
        }
    }
    Ok(())
}

/// Python's `repr(float)`: the shortest string that reads back as the same
/// float, in fixed notation when the exponent is in [-4, 16), else scientific.
pub fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // Rust's `{:e}` is the shortest round-trip form: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            let (int_part, frac) = if digits.len() > int_len {
                (digits[..int_len].to_string(), digits[int_len..].to_string())
            } else {
                (
                    format!("{digits}{}", "0".repeat(int_len - digits.len())),
                    "0".to_string(),
                )
            };
            format!("{sign}{int_part}.{frac}")
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

// ----- decoding ---------------------------------------------------------------

/// An element of the document, its text already XML-decoded.
#[derive(Debug)]
enum Node {
    Elem {
        name: String,
        attrs: Vec<(String, String)>,
        children: Vec<Node>,
    },
    Text(String),
}

/// Reads a document written by `slapos.util.dumps` (or by [`dumps`]).
pub fn loads(xml: &str) -> Result<Value, MarshalError> {
    let root = parse_tree(xml)?;
    let Node::Elem { name, children, .. } = root else {
        return err("no root element");
    };
    if name != "marshal" {
        return err(format!("root element is <{name}>, expected <marshal>"));
    }
    let mut elems = elements(&children)?;
    let (Some(value), None) = (elems.next(), elems.next()) else {
        return err("<marshal> must hold exactly one value");
    };
    let mut dec = Decoder {
        seen: HashMap::new(),
        produced: 0,
    };
    dec.value(value, 0)
}

fn parse_tree(xml: &str) -> Result<Node, MarshalError> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let push_text = |stack: &mut Vec<Node>, text: &str| -> Result<(), MarshalError> {
        match stack.last_mut() {
            Some(Node::Elem { children, .. }) => {
                match children.last_mut() {
                    Some(Node::Text(t)) => t.push_str(text),
                    _ => children.push(Node::Text(text.to_string())),
                }
                Ok(())
            }
            _ if text.trim().is_empty() => Ok(()),
            _ => err("text outside the root element"),
        }
    };
    loop {
        let event = reader
            .read_event()
            .map_err(|e| MarshalError(format!("malformed XML at byte {}: {e}", reader.buffer_position())))?;
        let empty = matches!(event, Event::Empty(_));
        match event {
            Event::Start(e) | Event::Empty(e) => {
                if stack.len() >= MAX_DEPTH {
                    return err(format!("document nested deeper than {MAX_DEPTH} levels"));
                }
                if root.is_some() {
                    return err("content after the root element");
                }
                let name = String::from_utf8(e.name().as_ref().to_vec())
                    .map_err(|_| MarshalError("element name is not UTF-8".into()))?;
                let mut attrs = Vec::new();
                for a in e.attributes() {
                    let a = a.map_err(|e| MarshalError(format!("bad attribute in <{name}>: {e}")))?;
                    let key = String::from_utf8(a.key.as_ref().to_vec())
                        .map_err(|_| MarshalError("attribute name is not UTF-8".into()))?;
                    let value = a
                        .unescape_value()
                        .map_err(|e| MarshalError(format!("bad attribute value in <{name}>: {e}")))?
                        .into_owned();
                    attrs.push((key, value));
                }
                let node = Node::Elem {
                    name,
                    attrs,
                    children: Vec::new(),
                };
                if empty {
                    close(&mut stack, &mut root, node);
                } else {
                    stack.push(node);
                }
            }
            Event::End(_) => {
                let node = stack.pop().ok_or_else(|| MarshalError("unbalanced end tag".into()))?;
                close(&mut stack, &mut root, node);
            }
            Event::Text(t) => {
                let text = t
                    .decode()
                    .map_err(|e| MarshalError(format!("text is not UTF-8: {e}")))?;
                push_text(&mut stack, &text)?;
            }
            Event::CData(c) => {
                let text = c
                    .decode()
                    .map_err(|e| MarshalError(format!("CDATA is not UTF-8: {e}")))?;
                push_text(&mut stack, &text)?;
            }
            Event::GeneralRef(r) => {
                let c = crate::xml_text::resolve_reference(&r).map_err(MarshalError)?;
                push_text(&mut stack, c.encode_utf8(&mut [0u8; 4]))?;
            }
            Event::Eof => break,
            // Declarations, comments, processing instructions, doctypes: skipped.
            _ => {}
        }
    }
    if !stack.is_empty() {
        return err("document ends inside an element");
    }
    root.ok_or_else(|| MarshalError("empty document".into()))
}

fn close(stack: &mut [Node], root: &mut Option<Node>, node: Node) {
    match stack.last_mut() {
        Some(Node::Elem { children, .. }) => children.push(node),
        _ => *root = Some(node),
    }
}

/// The element children of a node, refusing non-blank text between them.
fn elements(children: &[Node]) -> Result<impl Iterator<Item = &Node>, MarshalError> {
    for c in children {
        if let Node::Text(t) = c {
            if !t.trim().is_empty() {
                return err(format!("unexpected text {:?} between values", truncate(t)));
            }
        }
    }
    Ok(children.iter().filter(|c| matches!(c, Node::Elem { .. })))
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

fn text_of(children: &[Node]) -> Result<String, MarshalError> {
    let mut out = String::new();
    for c in children {
        match c {
            Node::Text(t) => out.push_str(t),
            Node::Elem { name, .. } => return err(format!("unexpected <{name}> inside a scalar")),
        }
    }
    Ok(out)
}

/// Most values one document may decode to: references can repeat a
/// container many times over (each list referring twice to the previous one
/// doubles the document's size), so the expansion is bounded.
const MAX_VALUES: usize = 4_000_000;

struct Decoder<'n> {
    /// Completed containers by id: their elements, decoded again when
    /// referenced. (Keeping decoded copies instead cost a copy of every
    /// container per level of nesting: 25 MB for a 300-partition computer.)
    seen: HashMap<&'n str, &'n Node>,
    /// Values decoded so far, against [`MAX_VALUES`].
    produced: usize,
}

fn attr<'a>(attrs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

impl<'n> Decoder<'n> {
    fn values(&mut self, children: &'n [Node], depth: usize) -> Result<Vec<Value>, MarshalError> {
        elements(children)?.map(|c| self.value(c, depth + 1)).collect()
    }

    fn pairs(&mut self, children: &'n [Node], depth: usize) -> Result<Vec<(Value, Value)>, MarshalError> {
        let flat = self.values(children, depth)?;
        if flat.len() % 2 != 0 {
            return err("a dictionary holds an odd number of values");
        }
        let mut it = flat.into_iter();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    fn remember(&mut self, attrs: &'n [(String, String)], node: &'n Node) {
        if let Some(id) = attr(attrs, "id") {
            self.seen.insert(id, node);
        }
    }

    fn value(&mut self, node: &'n Node, depth: usize) -> Result<Value, MarshalError> {
        if depth > MAX_DEPTH {
            return err(format!("value nested deeper than {MAX_DEPTH} levels"));
        }
        self.produced += 1;
        if self.produced > MAX_VALUES {
            return err(format!("the document expands to more than {MAX_VALUES} values"));
        }
        let Node::Elem { name, attrs, children } = node else {
            return err("expected a value element");
        };
        let v = match name.as_str() {
            "none" => {
                text_of(children)?;
                Value::None
            }
            "bool" => match text_of(children)?.trim() {
                "1" | "True" => Value::Bool(true),
                "0" | "False" => Value::Bool(false),
                other => return err(format!("<bool> holds {:?}", truncate(other))),
            },
            "int" | "long" => {
                let t = text_of(children)?;
                Value::Int(
                    t.trim()
                        .trim_end_matches('L')
                        .parse()
                        .map_err(|_| MarshalError(format!("<{name}> holds {:?}", truncate(&t))))?,
                )
            }
            "float" => {
                let t = text_of(children)?;
                Value::Float(
                    t.trim()
                        .parse()
                        .map_err(|_| MarshalError(format!("<float> holds {:?}", truncate(&t))))?,
                )
            }
            "string" | "unicode" => Value::Str(sax_unescape(&text_of(children)?)),
            "tuple" => Value::Tuple(self.values(children, depth)?),
            "list" => {
                let v = Value::List(self.values(children, depth)?);
                self.remember(attrs, node);
                v
            }
            "set" => {
                let v = Value::Set(self.values(children, depth)?);
                self.remember(attrs, node);
                v
            }
            "dictionary" => {
                let v = Value::Dict(self.pairs(children, depth)?);
                self.remember(attrs, node);
                v
            }
            "object" => {
                let module = attr(attrs, "module").unwrap_or_default().to_string();
                let class = attr(attrs, "class").unwrap_or_default().to_string();
                if module != SLAP_MODULE || !ALLOWED_CLASSES.contains(&class.as_str()) {
                    return err(format!("objects of class {module}.{class} are not accepted"));
                }
                let mut parts = elements(children)?;
                let args = match parts.next() {
                    Some(Node::Elem { name, children, .. }) if name == "tuple" => self.values(children, depth + 1)?,
                    _ => return err(format!("object {class} lacks its init-args <tuple>")),
                };
                let attrs_v = match parts.next() {
                    None => Vec::new(),
                    Some(d @ Node::Elem { name, .. }) if name == "dictionary" || name == "reference" => {
                        match self.value(d, depth + 1)? {
                            Value::Dict(entries) => entries,
                            _ => return err(format!("object {class}: its state is not a dictionary")),
                        }
                    }
                    Some(_) => return err(format!("object {class}: expected its attribute <dictionary>")),
                };
                if parts.next().is_some() {
                    return err(format!("object {class} has more than init-args and attributes"));
                }
                let v = Value::Object(Box::new(Object {
                    module,
                    class,
                    args,
                    attrs: attrs_v,
                }));
                self.remember(attrs, node);
                v
            }
            "reference" => {
                let id = attr(attrs, "id").ok_or_else(|| MarshalError("<reference> without an id".into()))?;
                match self.seen.get(id).copied() {
                    Some(target) => self.value(target, depth + 1)?,
                    None => {
                        return err(format!(
                            "reference to {id}, which is not a completed value before it (cycles are not supported)"
                        ))
                    }
                }
            }
            other => return err(format!("unknown element <{other}>")),
        };
        Ok(v)
    }
}
