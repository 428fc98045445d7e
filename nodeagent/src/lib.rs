//! The node agent: it turns a machine into a node the Master drives, as
//! SlapOS's slapformat, slapgrid and supervisord do together, in one daemon.
//!
//! - [`config`]: what the node is (its id, roots, address ranges, mode).
//! - [`format`]: computer partitions: a Unix user, a directory, a tap device
//!   and addresses each; idempotent.
//! - [`master`]: a SLAP client with failover across replicas and gateways,
//!   and the typed plan read from `getFullComputerInformation`.
//! - [`release`]: the native software-release format and its templates.
//! - [`software`]: installing and removing releases.
//! - [`supervisor`]: the processes of every partition, run as its user.
//! - [`promise`]: health checks (command, TCP connect, HTTP GET).
//! - [`instance`]: deploying, stopping and destroying partitions.
//! - [`usage`]: CPU, memory, disk and network per partition, as TioXML;
//!   [`cgroups`]: the per-partition accounting groups it reads first.
//! - [`agent`]: the loops of `nodeagent run`; [`metrics`]: what they report.
//!
//! The node keeps no state the Master cannot give back: what it deployed is
//! recorded in each partition (`.timestamp`, pid files), so an agent restart
//! re-adopts running processes instead of restarting them.

pub mod agent;
pub mod cgroups;
pub mod config;
pub mod format;
pub mod instance;
pub mod master;
pub mod metrics;
pub mod promise;
pub mod register;
pub mod release;
pub mod software;
pub mod supervisor;
pub mod tunnel;
pub mod usage;
