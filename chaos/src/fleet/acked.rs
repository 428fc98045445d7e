//! What each user was told, to find lost writes at the end of a fleet run.
//!
//! Every acknowledged request is recorded with the instance its answer
//! showed (the `n` parameter the users vary, and whether it is destroyed).
//! A user's requests of one title never overlap (titles are split between a
//! user's lanes while requesting, and one loop changes them afterwards), so
//! the last answer per title is what the final state must show: the
//! instance with that parameter, or, when the answer said destroyed, the
//! instance destroyed or gone (a node wiped it).

use std::collections::HashMap;
use std::sync::Mutex;

use slap_proto::master as pb;

/// The parameter the fleet's users set and change.
const PARAMETER: &str = "n";

/// The last answer a user had for each of its titles.
#[derive(Default)]
pub struct Acked(Mutex<HashMap<String, Told>>);

/// What one answer told.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Told {
    parameter: Option<String>,
    destroyed: bool,
}

impl Told {
    fn of(instance: &pb::Instance) -> Told {
        Told {
            parameter: instance.parameters.get(PARAMETER).cloned(),
            destroyed: instance.requested_state == "destroyed",
        }
    }
}

impl Acked {
    /// Records the answer to a request of `title`.
    pub fn record(&self, title: &str, answer: &pb::Instance) {
        self.0.lock().unwrap().insert(title.to_string(), Told::of(answer));
    }

    /// How many titles were acknowledged.
    pub fn titles(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// What in `listed` (the user's instances in the final state) contradicts
    /// an acknowledged answer; empty when nothing was lost.
    pub fn lost(&self, user: &str, listed: &[pb::Instance]) -> Vec<String> {
        let by_title: HashMap<&str, &pb::Instance> = listed.iter().map(|i| (i.title.as_str(), i)).collect();
        let told = self.0.lock().unwrap();
        let mut lost = Vec::new();
        for (title, was) in told.iter() {
            match by_title.get(title.as_str()) {
                None if was.destroyed => {}
                None => lost.push(format!(
                    "{user}/{title}: acknowledged {was:?}, absent from the final state"
                )),
                Some(now) => {
                    let now = Told::of(now);
                    let fine = if was.destroyed { now.destroyed } else { now == *was };
                    if !fine {
                        lost.push(format!(
                            "{user}/{title}: acknowledged {was:?}, the final state has {now:?}"
                        ));
                    }
                }
            }
        }
        lost.sort();
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(title: &str, n: &str, state: &str) -> pb::Instance {
        pb::Instance {
            title: title.into(),
            parameters: [(PARAMETER.to_string(), n.to_string())].into_iter().collect(),
            requested_state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_last_answer_per_title_is_what_must_remain() {
        let acked = Acked::default();
        acked.record("i1", &instance("i1", "1", "started"));
        acked.record("i1", &instance("i1", "changed-4", "started"));
        acked.record("i2", &instance("i2", "2", "destroyed"));
        // i2 destroyed and wiped: gone is fine; i1 with its last parameter.
        assert!(acked.lost("u", &[instance("i1", "changed-4", "started")]).is_empty());
        // i2 still listed as destroyed is fine too.
        let both = [instance("i1", "changed-4", "started"), instance("i2", "x", "destroyed")];
        assert!(acked.lost("u", &both).is_empty());
    }

    #[test]
    fn an_older_value_or_a_missing_instance_is_a_lost_write() {
        let acked = Acked::default();
        acked.record("i1", &instance("i1", "changed-4", "started"));
        acked.record("i3", &instance("i3", "3", "started"));
        acked.record("i2", &instance("i2", "2", "destroyed"));
        let lost = acked.lost("u", &[instance("i1", "1", "started"), instance("i2", "2", "started")]);
        assert_eq!(lost.len(), 3, "{lost:?}");
        assert!(lost[0].starts_with("u/i1"), "{lost:?}");
        assert!(lost[1].starts_with("u/i2"), "a destroy that did not hold: {lost:?}");
        assert!(lost[2].contains("absent"), "{lost:?}");
    }
}
