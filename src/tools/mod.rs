//! Tools around the worker, for operators and developers; none of them is on the data path.

pub(crate) mod demo;
pub mod dlq;
pub(crate) mod healthcheck;
mod progress;
pub(crate) mod rekey;
mod rotate;
pub mod stub_issuer;
mod stub_tls;
pub(crate) mod token;
