//! tenant-tokens: one webtask tenant token per tenant, provisioned from RabbitMQ events.

pub mod broker;
