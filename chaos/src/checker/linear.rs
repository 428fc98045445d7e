//! Linearizability of each instance's history (Wing & Gong's search, with
//! Lowe's memoization of visited configurations).
//!
//! An instance key is a small object: absent, or present with an id, the
//! parameter `v`, the connection parameter `c` and whether it is requested
//! destroyed. A history is linearizable when its operations can be put in
//! one order, each at some point between its invocation and its answer,
//! such that applying them to that object in that order gives every answer
//! that was seen. Keys are independent (P-compositionality), so each is
//! checked alone.
//!
//! Refused operations took no effect and are left out. An operation with
//! no answer may take effect at any point after its invocation, or never;
//! a read with no answer constrains nothing and is left out.

use std::collections::HashSet;

use crate::history::{Call, Op, Outcome, Seen};

/// The model of one instance key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum State {
    Absent,
    Present {
        /// `None` until an answer shows it (after a request with no answer).
        id: Option<String>,
        v: u64,
        c: Option<String>,
        destroyed: bool,
    },
}

fn same_id(known: &Option<String>, seen: &str) -> bool {
    known.as_deref().is_none_or(|k| k == seen)
}

/// The state after `op` is applied to `s`, or `None` if `op`'s answer
/// cannot have come from `s`.
pub fn step(s: &State, op: &Op) -> Option<State> {
    let seen = match &op.outcome {
        Outcome::Ok { seen, .. } => Some(seen.as_ref()),
        Outcome::Unknown { .. } => None,
        Outcome::Fail { .. } => return Some(s.clone()),
    };
    let no_effect = matches!(op.outcome, Outcome::Ok { no_effect: true, .. });
    match (&op.call, s) {
        (Call::Request { v }, State::Absent) => {
            let id = match seen {
                Some(Some(r)) => Some(r.id.clone()),
                Some(None) => return None,
                None => None,
            };
            let next = State::Present {
                id,
                v: *v,
                c: None,
                destroyed: false,
            };
            check_seen(&next, seen.flatten()).then_some(next)
        }
        (Call::Request { v }, State::Present { id, c, destroyed, .. }) => {
            let id = match seen {
                Some(Some(r)) if same_id(id, &r.id) => Some(r.id.clone()),
                Some(_) => return None,
                None => id.clone(),
            };
            let next = State::Present {
                id,
                v: *v,
                c: c.clone(),
                destroyed: *destroyed,
            };
            check_seen(&next, seen.flatten()).then_some(next)
        }
        // A destroy of nothing is refused: with no answer, it changed nothing.
        (Call::Destroy, State::Absent) => seen.is_none().then(|| s.clone()),
        (Call::Destroy, State::Present { id, v, c, .. }) => Some(State::Present {
            id: id.clone(),
            v: *v,
            c: c.clone(),
            destroyed: true,
        }),
        (Call::Publish { id: target, c: new }, State::Present { id, v, destroyed, .. }) if same_id(id, target) => {
            Some(State::Present {
                id: Some(target.clone()),
                v: *v,
                c: Some(new.clone()),
                destroyed: *destroyed,
            })
        }
        // A publication for an instance that is not there is refused.
        (Call::Publish { .. }, _) => seen.is_none().then(|| s.clone()),
        (Call::Freed { id: target }, State::Present { id, destroyed, .. }) if same_id(id, target) => {
            match (destroyed, no_effect) {
                (true, false) => Some(State::Absent),
                // The node's report came before the destroy: nothing freed.
                (false, true) => Some(s.clone()),
                (false, false) if seen.is_none() => Some(s.clone()),
                _ => None,
            }
        }
        (Call::Freed { .. }, _) => seen.is_none().then(|| s.clone()),
        (Call::Read, _) => match seen {
            Some(r) => read_matches(s, r).then(|| adopt_id(s, r)),
            None => Some(s.clone()),
        },
        (Call::Other { .. }, _) => Some(s.clone()),
    }
}

/// Whether an answer shows state `s` (no answer: nothing to compare).
fn check_seen(s: &State, seen: Option<&Seen>) -> bool {
    match (s, seen) {
        (_, None) => true,
        (State::Absent, Some(_)) => false,
        (State::Present { id, v, c, destroyed }, Some(r)) => {
            same_id(id, &r.id) && r.v == Some(*v) && &r.c == c && r.destroyed == *destroyed
        }
    }
}

/// A read that found nothing must find the key absent.
fn read_matches(s: &State, seen: Option<&Seen>) -> bool {
    match seen {
        None => matches!(s, State::Absent),
        Some(_) => check_seen(s, seen),
    }
}

fn adopt_id(s: &State, seen: Option<&Seen>) -> State {
    match (s, seen) {
        (
            State::Present {
                id: None,
                v,
                c,
                destroyed,
            },
            Some(r),
        ) => State::Present {
            id: Some(r.id.clone()),
            v: *v,
            c: c.clone(),
            destroyed: *destroyed,
        },
        _ => s.clone(),
    }
}

/// Why a key's history is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the answers; the longest order found, as the
    /// operations' indexes in the input.
    Violation {
        longest_prefix: Vec<usize>,
    },
    /// The search gave up after this many configurations.
    Inconclusive {
        explored: usize,
    },
}

/// Checks one key's operations (any order; refused ones are skipped).
pub fn check(ops: &[Op], max_configurations: usize) -> Verdict {
    let events: Vec<(usize, &Op)> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| !matches!(o.outcome, Outcome::Fail { .. }))
        .filter(|(_, o)| !(matches!(o.call, Call::Read) && o.is_unknown()))
        .filter(|(_, o)| !matches!(o.call, Call::Other { .. }))
        .collect();
    let n = events.len();
    let inv: Vec<u64> = events.iter().map(|(_, o)| o.invoked).collect();
    let ret: Vec<u64> = events.iter().map(|(_, o)| o.completed.unwrap_or(u64::MAX)).collect();
    let required: Vec<bool> = events.iter().map(|(_, o)| !o.is_unknown()).collect();
    let remaining_required = required.iter().filter(|r| **r).count();

    let words = n.div_ceil(64).max(1);
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut best: Vec<usize> = Vec::new();
    // Depth-first: (done bitset, state, order so far, required left).
    let mut stack: Vec<(Vec<u64>, State, Vec<usize>, usize)> =
        vec![(vec![0; words], State::Absent, vec![], remaining_required)];
    let mut explored = 0usize;
    while let Some((done, state, order, left)) = stack.pop() {
        if left == 0 {
            return Verdict::Linearizable;
        }
        explored += 1;
        if explored > max_configurations {
            return Verdict::Inconclusive { explored };
        }
        if order.len() > best.len() {
            best = order.clone();
        }
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // An operation may go next only if it was invoked before every
        // pending operation's answer.
        let horizon = (0..n)
            .filter(|&i| !is_done(i))
            .map(|i| ret[i])
            .min()
            .unwrap_or(u64::MAX);
        for i in (0..n).rev() {
            if is_done(i) || inv[i] > horizon {
                continue;
            }
            let Some(next) = step(&state, events[i].1) else {
                continue;
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            if !seen.insert((d.clone(), next.clone())) {
                continue;
            }
            let mut o = order.clone();
            o.push(events[i].0);
            stack.push((d, next, o, left - usize::from(required[i])));
        }
    }
    Verdict::Violation { longest_prefix: best }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Key, Seen};

    fn op(call: Call, invoked: u64, completed: Option<u64>, outcome: Outcome) -> Op {
        Op {
            process: "t".into(),
            key: Some(Key {
                user: "u".into(),
                title: "k".into(),
            }),
            call,
            invoked,
            completed,
            outcome,
            via: String::new(),
        }
    }

    fn seen(v: u64, c: Option<&str>, destroyed: bool) -> Option<Seen> {
        Some(Seen {
            id: "I1".into(),
            v: Some(v),
            c: c.map(String::from),
            destroyed,
            partition: None,
        })
    }

    fn ok(s: Option<Seen>) -> Outcome {
        Outcome::Ok {
            seen: s,
            no_effect: false,
        }
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            error: "timeout".into(),
        }
    }

    const MAX: usize = 1_000_000;

    #[test]
    fn a_sequential_life_is_linearizable() {
        let h = vec![
            op(Call::Request { v: 1 }, 0, Some(10), ok(seen(1, None, false))),
            op(Call::Read, 11, Some(12), ok(seen(1, None, false))),
            op(
                Call::Publish {
                    id: "I1".into(),
                    c: "c1".into(),
                },
                13,
                Some(14),
                ok(None),
            ),
            op(Call::Request { v: 2 }, 15, Some(20), ok(seen(2, Some("c1"), false))),
            op(Call::Destroy, 21, Some(22), ok(None)),
            op(Call::Read, 23, Some(24), ok(seen(2, Some("c1"), true))),
            op(Call::Freed { id: "I1".into() }, 25, Some(26), ok(None)),
            op(Call::Read, 27, Some(28), ok(None)),
        ];
        assert_eq!(check(&h, MAX), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_is_caught() {
        let h = vec![
            op(Call::Request { v: 1 }, 0, Some(10), ok(seen(1, None, false))),
            op(Call::Request { v: 2 }, 20, Some(30), ok(seen(2, None, false))),
            // Invoked after v=2 was acknowledged, yet shows v=1.
            op(Call::Read, 40, Some(50), ok(seen(1, None, false))),
        ];
        assert!(matches!(check(&h, MAX), Verdict::Violation { .. }));
    }

    #[test]
    fn a_read_concurrent_with_a_write_may_see_either() {
        for v in [1, 2] {
            let h = vec![
                op(Call::Request { v: 1 }, 0, Some(10), ok(seen(1, None, false))),
                op(Call::Request { v: 2 }, 20, Some(40), ok(seen(2, None, false))),
                op(Call::Read, 25, Some(35), ok(seen(v, None, false))),
            ];
            assert_eq!(check(&h, MAX), Verdict::Linearizable, "v={v}");
        }
    }

    #[test]
    fn a_write_with_no_answer_may_land_or_not() {
        let base = || {
            vec![
                op(Call::Request { v: 1 }, 0, Some(10), ok(seen(1, None, false))),
                op(Call::Request { v: 2 }, 20, None, unknown()),
            ]
        };
        for v in [1, 2] {
            let mut h = base();
            h.push(op(Call::Read, 100, Some(110), ok(seen(v, None, false))));
            assert_eq!(check(&h, MAX), Verdict::Linearizable, "v={v}");
        }
        // But once seen, it cannot be unseen.
        let mut h = base();
        h.push(op(Call::Read, 100, Some(110), ok(seen(2, None, false))));
        h.push(op(Call::Read, 120, Some(130), ok(seen(1, None, false))));
        assert!(matches!(check(&h, MAX), Verdict::Violation { .. }));
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let h = vec![
            op(Call::Request { v: 1 }, 0, Some(10), ok(seen(1, None, false))),
            op(
                Call::Publish {
                    id: "I1".into(),
                    c: "c1".into(),
                },
                20,
                Some(30),
                ok(None),
            ),
            op(Call::Read, 40, Some(50), ok(seen(1, None, false))),
        ];
        assert!(matches!(check(&h, MAX), Verdict::Violation { .. }));
    }

    #[test]
    fn an_instance_that_comes_back_after_being_freed_is_caught() {
        let h = vec![
            op(Call::Request { v: 1 }, 0, Some(10), ok(seen(1, None, false))),
            op(Call::Destroy, 11, Some(12), ok(None)),
            op(Call::Freed { id: "I1".into() }, 13, Some(14), ok(None)),
            op(Call::Read, 20, Some(21), ok(seen(1, None, true))),
        ];
        assert!(matches!(check(&h, MAX), Verdict::Violation { .. }));
    }

    #[test]
    fn refused_calls_change_nothing() {
        let h = vec![
            op(
                Call::Destroy,
                0,
                Some(1),
                Outcome::Fail {
                    error: "not found".into(),
                },
            ),
            op(Call::Read, 2, Some(3), ok(None)),
        ];
        assert_eq!(check(&h, MAX), Verdict::Linearizable);
    }
}
