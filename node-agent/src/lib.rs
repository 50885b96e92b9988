//! dog-agent: applies the firewall the operator sends to this node, verifies and repairs it,
//! and reports.
//!
//! - [`core`]: the pure core (firewalls, live state, planning, drift), no IO;
//! - [`kernel`]: the IO shell around the kernel (the [`kernel::Tools`] trait; netlink, the
//!   iptables and ipset tools);
//! - [`apply`]: the applier that drives the tools through a plan and proves the result;
//! - [`runtime`]: the agent's loop: the broker link, requests, reports, drift checks;
//! - [`addresses`] discovers interfaces, [`state`] persists the last applied firewall,
//!   [`netns`] gives tests and benches throwaway namespaces.
pub mod addresses;
pub mod apply;
pub mod broker_user;
pub mod config;
pub mod core;
pub mod kernel;
pub mod metrics;
pub mod netns;
pub mod runtime;
pub mod state;
