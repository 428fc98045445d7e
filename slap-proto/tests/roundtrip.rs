//! Property tests: any value survives dumps then loads; malformed input is an
//! error, never a panic.

use proptest::prelude::*;
use slap_proto::form;
use slap_proto::marshal::{dumps, loads, python_float_repr, Value};

/// Strings the way SLAP parameters look, with the dangerous parts mixed in.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{0,8}",
        "[<>&\"' ]{0,6}",
        "(&lt;|&amp;|&#233;|<b>|\\]\\]>){0,3}",
        "\\PC{0,12}",
        Just(String::new()),
        "[\t\n\r a-z]{0,6}",
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| Value::Int(i as i128)),
        any::<f64>()
            .prop_filter("nan never equals itself", |f| !f.is_nan())
            .prop_map(Value::Float),
        text().prop_map(Value::Str),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::List),
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Tuple),
            // Dict keys are unique strings, as in SLAP documents.
            prop::collection::btree_map(text(), inner, 0..5)
                .prop_map(|m| Value::Dict(m.into_iter().map(|(k, v)| (Value::Str(k), v)).collect())),
        ]
    })
}

/// What the encoder does to a value: dicts come back sorted by key.
fn normalized(v: &Value) -> Value {
    match v {
        Value::List(items) => Value::List(items.iter().map(normalized).collect()),
        Value::Tuple(items) => Value::Tuple(items.iter().map(normalized).collect()),
        Value::Dict(entries) => {
            let mut e: Vec<(Value, Value)> = entries.iter().map(|(k, v)| (normalized(k), normalized(v))).collect();
            e.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
            Value::Dict(e)
        }
        other => other.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn dumps_then_loads_is_identity(v in value()) {
        let xml = dumps(&v).unwrap();
        prop_assert!(xml.is_ascii(), "output must be ASCII: {xml}");
        prop_assert_eq!(loads(&xml).unwrap(), normalized(&v));
    }

    #[test]
    fn float_repr_reads_back_exactly(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
        prop_assert_eq!(python_float_repr(f).parse::<f64>().unwrap(), f);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic(s in "\\PC{0,200}") {
        let _ = loads(&s);
        let _ = form::parse(&s);
    }

    #[test]
    fn mangled_documents_are_errors_not_panics(v in value(), cut in any::<prop::sample::Index>(), junk in "[<>&/=\"a-z#;0-9]{1,5}") {
        let xml = dumps(&v).unwrap();
        let at = cut.index(xml.len() + 1);
        let (a, b) = xml.split_at(at.min(xml.len()));
        let _ = loads(&format!("{a}{junk}{b}"));
        let _ = loads(a);
    }
}

#[test]
fn python_float_repr_matches_python() {
    for (f, py) in [
        (1795618682.5756655, "1795618682.5756655"),
        (1.0, "1.0"),
        (0.1, "0.1"),
        (1e16, "1e+16"),
        (1e22, "1e+22"),
        (123456789012345680.0, "1.2345678901234568e+17"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-5, "1.5e-05"),
        (-0.0, "-0.0"),
        (-2.5, "-2.5"),
        (999999999999999.9, "999999999999999.9"),
        (f64::INFINITY, "inf"),
    ] {
        assert_eq!(python_float_repr(f), py, "{f}");
    }
}

#[test]
fn refusals() {
    for (xml, why) in [
        (
            "<marshal><object id=\"i2\" module=\"os\" class=\"system\"><tuple/></object></marshal>",
            "not accepted",
        ),
        (
            "<marshal><list id=\"i2\"><reference id=\"i2\"/></list></marshal>",
            "cycles",
        ),
        (
            "<marshal><dictionary id=\"i2\"><string>k</string></dictionary></marshal>",
            "odd",
        ),
        ("<marshal><int>x</int></marshal>", "<int>"),
        ("<marshal><string>a</string><string>b</string></marshal>", "exactly one"),
        ("<other/>", "expected <marshal>"),
        ("<marshal><string>&foo;</string></marshal>", "unknown entity"),
        ("<marshal><string>a", "ends inside"),
    ] {
        let e = loads(xml).unwrap_err().to_string();
        assert!(e.contains(why), "{xml}: {e}");
    }
    let deep = format!("<marshal>{}{}</marshal>", "<tuple>".repeat(500), "</tuple>".repeat(500));
    assert!(loads(&deep).unwrap_err().to_string().contains("deeper"));
    assert!(
        dumps(&Value::Str("bell\u{7}".into())).is_err(),
        "XML 1.0 cannot carry U+0007"
    );
}

#[test]
fn references_decode_to_copies_and_expansion_is_bounded() {
    let shared = "<marshal><list id=\"i2\"><dictionary id=\"i3\"><string>k</string><string>v</string></dictionary><reference id=\"i3\"/></list></marshal>";
    let Value::List(items) = loads(shared).unwrap() else {
        panic!("not a list")
    };
    assert_eq!(items.len(), 2);
    assert_eq!(items[0], items[1]);
    // 40 lists, each referring twice to the one before: 2^40 values.
    let mut xml = String::from("<marshal><list><list id=\"i1\"><string>x</string></list>");
    for n in 2..=40 {
        xml.push_str(&format!(
            "<list id=\"i{n}\"><reference id=\"i{}\"/><reference id=\"i{}\"/></list>",
            n - 1,
            n - 1
        ));
    }
    xml.push_str("</list></marshal>");
    let e = loads(&xml).unwrap_err();
    assert!(e.0.contains("expands"), "{e}");
}

/// Found by the fuzzer: dict keys that are themselves dicts ranked by a text
/// that depended on their entries' order, which encoding changes.
#[test]
fn container_keys_sort_the_same_after_a_round_trip() {
    let xml = "<marshal><dictionary><dictionary><string>f</string><string>x</string></dictionary><string>a</string><dictionary><string>f</string><string>y</string><string>4</string><string>5</string></dictionary><string>b</string></dictionary></marshal>";
    let once = dumps(&loads(xml).unwrap()).unwrap();
    let twice = dumps(&loads(&once).unwrap()).unwrap();
    assert_eq!(once, twice);
}
