//! tenant-tokens: one webtask tenant token per tenant, provisioned from RabbitMQ events.
//!
//! The data path, top to bottom: a delivery is [decoded](decode) into a
//! [`ProvisionRequest`](domain::ProvisionRequest); the [provisioning step](provision) answers
//! it from the [store] or calls the [issuer] and stores the token, deciding the
//! [ready event](event) in the same transaction; [`handle`] publishes the event with a
//! confirm and acks. [`worker`] runs that in batches over one broker connection and keeps it
//! alive; [`cli`] is the command line.

pub mod bench;
pub mod broker;
pub mod cli;
pub mod configuration;
pub mod crypto;
pub mod decode;
pub mod demo;
pub mod dlq;
pub mod domain;
pub mod event;
pub mod handle;
pub mod health;
pub mod issuer;
pub mod ops;
pub mod provision;
pub mod store;
pub mod stub_issuer;
pub mod telemetry;
pub mod worker;
