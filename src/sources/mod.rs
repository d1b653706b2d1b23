//! Where definitions come from. Each source yields manifests plus the problems it met; the
//! model validates them. Only files for now.

pub mod files;
