//! The chaos suite: real clusters built from our binaries, real faults
//! (SIGKILL, SIGSTOP, cut cables, cut and slowed links, membership changes,
//! a wiped replica), a workload whose every call is recorded, and checkers
//! that prove from that history that nothing acknowledged was lost and
//! that each instance behaved as one linearizable object.
//!
//! - [`net`]: one network namespace per replica, veth and a bridge;
//! - [`proxy`]: a TCP proxy on every replica link (cut, one-way, delay, loss);
//! - [`cluster`]: master-node replicas, gateways and identities;
//! - [`workload`]: users, readers and a prober; [`simnode`]: simulated nodes;
//! - [`nemesis`]: the faults; [`abuse`]: the bad client among them;
//!   [`restore`] and [`upgrade`]: the operator's drills among them
//!   (backup and restore, a rolling upgrade with version skew);
//!   [`history`]: what was seen;
//! - [`checker`]: what must hold; [`report`]: what a run leaves behind;
//! - [`fleet`]: the fleet simulator (`chaos fleet`), a run of its own;
//! - [`run`]: one run from start to verdict.

pub mod abuse;
pub mod checker;
pub mod cluster;
pub mod fleet;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod proxy;
pub mod report;
pub mod restore;
pub mod run;
pub mod simnode;
pub mod upgrade;
pub mod workload;
