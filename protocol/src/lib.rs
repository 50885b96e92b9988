pub mod broker;
pub mod duration;
pub mod envelope;
pub mod keys;
pub mod messages;
pub mod names;
pub mod ruleset;
pub mod telemetry;
