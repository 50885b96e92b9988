//! The operator's pure core: functions of their inputs, with no Kubernetes client, broker,
//! clock or files (the shells in [`crate::kube`], [`crate::dir`] and [`crate::runtime`] do the
//! IO and pass the time in).
//!
//! - [`compile`]: resources → per-host firewalls, incrementally;
//! - [`publish`]: what to send to whom after a compile;
//! - [`outstanding`]: the requests sent and not yet answered;
//! - [`lifecycle`]: host states from keepalive times, and the safety valve;
//! - [`admission`] and [`intake`]: who may become a host, and each key's message budget;
//! - [`report`]: the statuses and conditions users read;
//! - [`events`]: the Events a person should see;
//! - [`preview`] and [`explain`]: `compile --host` output and which rule decides a packet.
pub mod admission;
pub mod compile;
pub mod events;
pub mod explain;
pub mod intake;
pub mod lifecycle;
pub mod outstanding;
pub mod preview;
pub mod publish;
pub mod report;
