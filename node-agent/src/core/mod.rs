//! The agent's pure core: what a firewall is as the agent holds it, what the kernel holds as
//! read back, and what to change to go from one to the other. No kernel, broker or clock:
//! [`crate::kernel`] reads and writes, [`crate::apply`] drives the two, [`crate::runtime`]
//! talks to the operator.
//!
//! - [`members`]: a set's members packed, with their hash computed once;
//! - [`firewall`]: a host firewall with packed sets;
//! - [`live`]: dog's part of the kernel as read back, and the cache the next apply plans on;
//! - [`sets`]: planning set changes (create, swap, change members, destroy);
//! - [`rules`]: checking documents and planning the `--noflush` restores of dog's chains;
//! - [`drift`]: how the kernel differs from what was applied.
pub mod drift;
pub mod firewall;
pub mod live;
pub mod members;
pub mod rules;
pub mod sets;
