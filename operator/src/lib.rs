//! dog-operator: compiles dog's custom resources into per-host firewalls and publishes them.
//!
//! - [`core`]: the pure core: compiling, the publish plan, lifecycle, admission, status
//!   computation, previews. No Kubernetes client, broker, clock or files.
//! - [`runtime`]: the loop both modes run around the core: agent messages, publishing,
//!   statuses, ticks; it talks to the outside through the traits in [`runtime::sinks`].
//! - [`kube`]: Kubernetes mode, the shell that feeds the loop from watches and writes status,
//!   Events, Hosts and the Lease through the API server.
//! - [`dir`]: `--from-dir` mode, the shell that feeds the loop from YAML files and writes a
//!   status file.
//! - [`crd`] and [`crdgen`]: the resources and their generated schemas; [`config`]: the flags;
//!   [`metrics`]: what the operator exports.
pub mod config;
pub mod core;
pub mod crd;
pub mod crdgen;
pub mod dir;
pub mod kube;
pub mod metrics;
pub mod runtime;
