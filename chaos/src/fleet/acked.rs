//! What each user was told, to find lost writes at the end of a fleet run.
//!
//! Every acknowledged request is recorded with the instance its answer
//! showed (the `n` parameter the users vary, and whether it is destroyed).
//! A user's requests of one title never overlap (titles are split between a
//! user's lanes while requesting, and one loop changes them afterwards), so
//! the last answer per title is what the final state must show: the
//! instance with that parameter, or, when the answer said destroyed, the
//! instance destroyed or gone (a node wiped it).
//!
//! A request that failed (a transport error while the leader changed) may
//! still have been committed: its outcome is unknown. Such requests made
//! after the last answer are kept beside it, and the final state may show
//! any one of them instead (a destroy that took effect without its answer
//! is not a lost write). A request with no answer at all never counts.

use std::collections::HashMap;
use std::sync::Mutex;

use slap_proto::master as pb;

/// The parameter the fleet's users set and change.
const PARAMETER: &str = "n";

/// The last answer a user had for each of its titles.
#[derive(Default)]
pub struct Acked(Mutex<HashMap<String, Title>>);

/// What is known of one title.
#[derive(Default)]
struct Title {
    /// The last answer, once there was one.
    last: Option<Told>,
    /// Requests sent after it whose answer never came.
    unknown: Vec<Told>,
}

/// What one answer told, or what one request asked for.
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

    fn asked(request: &pb::RequestInstanceRequest) -> Told {
        Told {
            parameter: request.parameters.get(PARAMETER).cloned(),
            destroyed: request.state == "destroyed",
        }
    }

    /// Whether `now` (the final state's instance, or `None` if gone) shows
    /// this outcome.
    fn shown_by(&self, now: Option<&Told>) -> bool {
        match now {
            None => self.destroyed,
            Some(now) if self.destroyed => now.destroyed,
            Some(now) => now == self,
        }
    }
}

impl Acked {
    /// Records the answer to a request of `title`.
    pub fn record(&self, title: &str, answer: &pb::Instance) {
        let mut titles = self.0.lock().unwrap();
        let t = titles.entry(title.to_string()).or_default();
        t.last = Some(Told::of(answer));
        t.unknown.clear();
    }

    /// Records a request that got no answer: it may or may not have taken
    /// effect.
    pub fn unanswered(&self, request: &pb::RequestInstanceRequest) {
        let mut titles = self.0.lock().unwrap();
        let t = titles.entry(request.title.clone()).or_default();
        t.unknown.push(Told::asked(request));
    }

    /// How many titles were acknowledged.
    pub fn titles(&self) -> usize {
        self.0.lock().unwrap().values().filter(|t| t.last.is_some()).count()
    }

    /// What in `listed` (the user's instances in the final state) contradicts
    /// an acknowledged answer; empty when nothing was lost.
    pub fn lost(&self, user: &str, listed: &[pb::Instance]) -> Vec<String> {
        let by_title: HashMap<&str, Told> = listed.iter().map(|i| (i.title.as_str(), Told::of(i))).collect();
        let titles = self.0.lock().unwrap();
        let mut lost = Vec::new();
        for (title, t) in titles.iter() {
            let Some(was) = &t.last else { continue };
            let now = by_title.get(title.as_str());
            if was.shown_by(now) || t.unknown.iter().any(|u| u.shown_by(now)) {
                continue;
            }
            let unknown = if t.unknown.is_empty() {
                String::new()
            } else {
                format!(" (and later unanswered {:?})", t.unknown)
            };
            lost.push(match now {
                None => format!("{user}/{title}: acknowledged {was:?}{unknown}, absent from the final state"),
                Some(now) => format!("{user}/{title}: acknowledged {was:?}{unknown}, the final state has {now:?}"),
            });
        }
        lost.sort();
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The users' parameter set to `n`.
    fn n_is(n: &str) -> HashMap<String, String> {
        [(PARAMETER.to_string(), n.to_string())].into_iter().collect()
    }

    fn instance(title: &str, n: &str, state: &str) -> pb::Instance {
        pb::Instance {
            title: title.into(),
            parameters: n_is(n),
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

    fn asked(title: &str, n: &str, state: &str) -> pb::RequestInstanceRequest {
        pb::RequestInstanceRequest {
            title: title.into(),
            parameters: n_is(n),
            state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_unanswered_request_may_or_may_not_have_taken_effect() {
        let acked = Acked::default();
        acked.record("i1", &instance("i1", "1", "started"));
        acked.unanswered(&asked("i1", "changed-9", "destroyed"));
        acked.record("i2", &instance("i2", "2", "started"));
        acked.unanswered(&asked("i2", "changed-3", ""));
        // Gone (the destroy held) or unchanged (it did not): both fine; the
        // change took effect or not: both fine.
        assert!(acked.lost("u", &[instance("i2", "changed-3", "started")]).is_empty());
        assert!(acked
            .lost("u", &[instance("i1", "1", "started"), instance("i2", "2", "started")])
            .is_empty());
        // Anything else is still a lost write.
        let lost = acked.lost("u", &[instance("i2", "other", "started")]);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("u/i2") && lost[0].contains("unanswered"), "{lost:?}");
        // A later answer supersedes the unanswered requests before it.
        acked.record("i1", &instance("i1", "changed-10", "started"));
        let lost = acked.lost("u", &[instance("i2", "2", "started")]);
        assert!(lost.len() == 1 && lost[0].contains("u/i1"), "{lost:?}");
        // A title never answered is not checked.
        acked.unanswered(&asked("i3", "3", ""));
        assert_eq!(acked.titles(), 2);
    }
}
