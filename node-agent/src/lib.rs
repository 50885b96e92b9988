//! dog-agent: applies the firewall the operator sends to this node, verifies and repairs it,
//! and reports.
//!
//! The kernel layer: [`kernel::Kernel`] runs the tools, [`apply`] applies / plans / verifies /
//! removes, [`ipset`] and [`iptables`] are the pure planners and renderers, [`drift`] compares,
//! [`addresses`] discovers interfaces, [`state`] persists the last applied firewall,
//! [`backoff`] paces retries, [`netns`] gives tests and benches throwaway namespaces.
pub mod addresses;
pub mod apply;
pub mod backoff;
pub mod broker_user;
pub mod config;
pub mod drift;
pub mod firewall;
pub mod ipset;
pub mod iptables;
pub mod kernel;
pub mod live;
pub mod members;
pub mod metrics;
pub mod netns;
pub mod runtime;
pub mod state;
