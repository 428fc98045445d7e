//! The codec against the real serializer: the vectors emitted by
//! `slapos.util.dumps` (slapos.core 1.26.1) and captured slapproxy traffic.

use serde_json::Value as Json;
use slap_proto::form;
use slap_proto::marshal::{dumps, loads, Object, Value};

/// The vectors' tagged JSON (`{"str": ...}`, `{"dict": [[k, v], ...]}`, ...) as a Value.
fn from_json(j: &Json) -> Value {
    let (tag, v) = j.as_object().and_then(|o| o.iter().next()).expect("a tagged value");
    match tag.as_str() {
        "none" => Value::None,
        "bool" => Value::Bool(v.as_bool().unwrap()),
        "int" => Value::Int(v.as_str().unwrap().parse().unwrap()),
        "float" => Value::Float(v.as_str().unwrap().parse().unwrap()),
        "str" => Value::Str(v.as_str().unwrap().to_string()),
        "list" => Value::List(v.as_array().unwrap().iter().map(from_json).collect()),
        "tuple" => Value::Tuple(v.as_array().unwrap().iter().map(from_json).collect()),
        "dict" => Value::Dict(
            v.as_array()
                .unwrap()
                .iter()
                .map(|kv| (from_json(&kv[0]), from_json(&kv[1])))
                .collect(),
        ),
        "object" => Value::Object(Box::new(Object {
            module: v["module"].as_str().unwrap().into(),
            class: v["class"].as_str().unwrap().into(),
            args: v["args"].as_array().unwrap().iter().map(from_json).collect(),
            attrs: v["attrs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|kv| (Value::Str(kv[0].as_str().unwrap().into()), from_json(&kv[1])))
                .collect(),
        })),
        other => panic!("unknown tag {other}"),
    }
}

fn lines(name: &str) -> Vec<Json> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_vector_decodes_to_its_value_and_encodes_byte_for_byte() {
    let vectors = lines("marshal-vectors.jsonl");
    assert_eq!(vectors.len(), 26);
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let xml = v["xml"].as_str().unwrap();
        let value = from_json(&v["value"]);
        assert_eq!(
            loads(xml).unwrap_or_else(|e| panic!("{name}: {e}")),
            value,
            "decode {name}"
        );
        let encoded = dumps(&value).unwrap();
        if xml.contains("<reference") {
            // Rust values have no identity to share: the encoder writes the
            // second occurrence out in full, which decodes to the same value.
            assert_eq!(loads(&encoded).unwrap(), value, "re-encode {name}");
        } else {
            assert_eq!(encoded, xml, "encode {name}");
        }
    }
}

#[test]
fn captured_traffic_decodes_and_reencodes_identically() {
    // Some captured responses were trimmed when the reference was written
    // (shorter than their Content-Length, cut mid-document): those must be
    // refused with an error; every complete document must come back byte
    // for byte.
    let (mut round_trips, mut trimmed) = (0, 0);
    for exchange in lines("slapproxy-traffic.jsonl") {
        let path = exchange["path"].as_str().unwrap();
        let resp = exchange["resp_body"].as_str().unwrap_or("");
        let resp_trimmed = exchange["resp_headers"]["Content-Length"]
            .as_str()
            .and_then(|l| l.parse::<usize>().ok())
            .is_some_and(|l| l > resp.len());
        let mut bodies: Vec<(String, bool)> = Vec::new();
        if resp.starts_with("<marshal>") {
            bodies.push((resp.to_string(), resp_trimmed));
        }
        let req = exchange["req_body"].as_str().unwrap_or("");
        let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
        for part in [req, query] {
            for (_, value) in form::parse(part).unwrap_or_else(|e| panic!("{path}: {e}")) {
                if value.starts_with("<marshal>") {
                    bodies.push((value, false));
                }
            }
        }
        for (body, was_trimmed) in bodies {
            match loads(&body) {
                Ok(value) => {
                    assert_eq!(dumps(&value).unwrap(), body, "{path}: re-encoding differs");
                    round_trips += 1;
                }
                Err(e) => {
                    assert!(was_trimmed, "{path}: a complete document was refused: {e}");
                    trimmed += 1;
                }
            }
        }
    }
    eprintln!("captured traffic: {round_trips} documents round-tripped, {trimmed} trimmed captures refused");
    assert!(
        round_trips >= 5,
        "only {round_trips} complete marshalled bodies round-tripped"
    );
}
