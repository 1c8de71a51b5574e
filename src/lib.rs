//! tenant-tokens: one webtask tenant token per tenant, provisioned from RabbitMQ events.
//!
//! # Layout
//!
//! The data path reads top to bottom: a delivery → [`pipeline::decode`] → a
//! [`ProvisionRequest`](domain::ProvisionRequest) → [`pipeline::provision`] (store → issuer →
//! store, one transaction per batch) → [`pipeline::disposition`] (what becomes of each
//! message) → [`pipeline::handle`] (publish the event or the copy, then ack) →
//! [`pipeline::worker`] (consumer, batches, reconnection, shutdown). Rotations and deletions
//! take the same path to the provisioning step, which hands them to `pipeline::lifecycle`;
//! the revoker (`pipeline::revoker`) works off the revocation queue beside the consumer.
//!
//! - [`domain`]: values parsed once at the edge (tenant id and name, container names, tokens,
//!   message identity, the ready event), so nothing downstream re-validates.
//! - [`pipeline`]: the unit of work and its policy; it talks to the outside only through
//!   the adapters.
//! - Adapters, one per outside system: [`store`] (Postgres), [`issuer`] (the webtask HTTP
//!   API), [`crypto`] (AES-256-GCM), [`broker`] (RabbitMQ topology, message headers,
//!   confirmed publishing, TLS).
//! - The process around them: [`configuration`] (flags and environment), [`telemetry`]
//!   (logs, metrics, redaction, OTLP traces), [`ops`] (`/healthz`, `/readyz`, `/metrics`, and
//!   the dead-letter console `/dlq`, which drives the `dlq` commands' code), [`shutdown`]
//!   (signals), [`cli`] (the command line).
//! - [`tools`]: the `dlq` commands, the demo, the stub issuer, the `token` commands, `rekey`
//!   and `healthcheck` — users of the library, not part of the worker. The benchmark is a
//!   workspace member of its own (`bench/`), the fuzz targets another (`fuzz/`, outside the
//!   workspace).

pub mod broker;
pub mod cli;
pub mod configuration;
pub mod crypto;
pub mod domain;
pub mod issuer;
pub mod ops;
pub mod pipeline;
pub(crate) mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tools;
