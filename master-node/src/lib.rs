//! The replicated SlapOS Master.

pub mod state;
