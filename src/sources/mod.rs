//! Where definitions come from. Each source yields manifests plus the problems it met; the
//! model validates them. Files are watched and reloaded on change.

pub mod files;
pub mod objects;
pub mod watch;
