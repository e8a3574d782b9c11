//! The policies an agent enforces, each a small type with a narrow interface.

pub mod authorization;
