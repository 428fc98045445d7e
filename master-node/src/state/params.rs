//! [`Params`]: a small string map (an instance's parameters, SLA and
//! connection, a computer's capacity and categories), kept as one sorted
//! vector.
//!
//! Why not a `BTreeMap`: its smallest node holds eleven keys and eleven
//! values, about 540 bytes, even for one pair, and an instance holds three
//! such maps. At a fleet's size (half a million instances) that was more
//! than half of each instance's memory. These maps hold a handful of pairs,
//! so a sorted vector is as fast to search and costs only what it holds.
//!
//! It reads and iterates like the `BTreeMap` it replaces (keys in order,
//! one value per key, the last insert wins) and is written and read as a
//! map by serde, so stored states and log entries are unchanged.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// String keys to string values, in key order.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// An empty map.
    pub const fn new() -> Params {
        Params(Vec::new())
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key`, returning the value it replaced.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    /// How many pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs, in key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    /// The values, in key order.
    pub fn values(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(_, v)| v)
    }

    /// Builds from pairs that may repeat a key (the last one wins), with no
    /// spare capacity.
    fn from_pairs(mut pairs: Vec<(String, String)>) -> Params {
        // Stable: equal keys keep their order, so the last one is kept.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, String)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = v,
                _ => out.push((k, v)),
            }
        }
        out.shrink_to_fit();
        Params(out)
    }
}

/// `params["key"]`, as with a `BTreeMap`: panics when the key is absent
/// (for tests and for keys known to be there; use [`Params::get`] otherwise).
impl std::ops::Index<&str> for Params {
    type Output = String;

    fn index(&self, key: &str) -> &String {
        self.get(key).unwrap_or_else(|| panic!("no parameter {key:?}"))
    }
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Borrowed pairs of a [`Params`], in key order.
pub struct Iter<'a>(std::slice::Iter<'a, (String, String)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a String, &'a String);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Params {
    type Item = (&'a String, &'a String);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for Params {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl FromIterator<(String, String)> for Params {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Params {
        Params::from_pairs(iter.into_iter().collect())
    }
}

impl Extend<(String, String)> for Params {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<const N: usize> From<[(String, String); N]> for Params {
    fn from(pairs: [(String, String); N]) -> Params {
        pairs.into_iter().collect()
    }
}

impl Serialize for Params {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Params, D::Error> {
        struct PairsVisitor;

        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = Params;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Params, A::Error> {
                // A hint from the input is not trusted for more than a little.
                let mut pairs = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = access.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(Params::from_pairs(pairs))
            }
        }

        deserializer.deserialize_map(PairsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn p(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_like_the_btreemap_it_replaces() {
        let mut params = p(&[("b", "2"), ("a", "1"), ("b", "3")]);
        assert_eq!(params.len(), 2, "a repeated key keeps one value");
        assert_eq!(params.get("b").map(String::as_str), Some("3"), "the last one wins");
        assert_eq!(params.insert("c".into(), "4".into()), None);
        assert_eq!(params.insert("a".into(), "0".into()), Some("1".into()));
        assert_eq!(params.remove("b"), Some("3".into()));
        assert!(!params.contains_key("b") && params.contains_key("c"));
        let keys: Vec<&String> = params.keys().collect();
        assert_eq!(keys, ["a", "c"], "keys in order");
    }

    #[test]
    fn stored_bytes_are_those_of_a_btreemap() {
        let map: BTreeMap<String, String> = [("x", "1"), ("a", "2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let params = p(&[("x", "1"), ("a", "2")]);
        let as_map = postcard::to_allocvec(&map).unwrap();
        assert_eq!(postcard::to_allocvec(&params).unwrap(), as_map);
        assert_eq!(postcard::from_bytes::<Params>(&as_map).unwrap(), params);
        let json = serde_json::to_string(&params).unwrap();
        assert_eq!(json, serde_json::to_string(&map).unwrap());
        assert_eq!(serde_json::from_str::<Params>(&json).unwrap(), params);
    }

    #[test]
    fn a_map_of_one_pair_costs_one_pair() {
        let params = p(&[("n", "1")]);
        assert_eq!(params.0.capacity(), 1);
    }
}
