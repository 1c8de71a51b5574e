//! Test harness: every test gets its own RabbitMQ vhost and its own Postgres database on the
//! real services (`AMQP_URL` / `DATABASE_URL`, else the local defaults, else testcontainers
//! where a Docker engine exists), and spawns the real worker with one helper.
//!
//! One module per concern; everything a test uses is re-exported here, as `support::NAME`.
//! Each test binary compiles this harness on its own and uses only part of it, hence
//! `dead_code` allowed per module (all but `services`, which every `TestEnv::new` uses).

#[allow(dead_code)]
mod audit;
#[allow(dead_code)]
mod broker;
#[allow(dead_code)]
mod command;
#[allow(dead_code)]
mod env;
#[allow(dead_code)]
mod issuer;
#[allow(dead_code)]
mod private_pg;
#[allow(dead_code)]
mod private_rabbit;
#[allow(dead_code)]
mod proxy;
mod services;
#[allow(dead_code)]
mod tls_certs;
#[allow(dead_code)]
mod users;
#[allow(dead_code)]
mod util;
#[allow(dead_code)]
mod workers;

// Each binary uses only some of these; an unused `pub use` would warn like an unused `use`.
#[allow(unused_imports)]
pub use self::{
    audit::{Audit, audit, tenants_with_events, wait_for_tenants},
    broker::{Collector, Producer, Received},
    command::{CommandOutput, run_cli},
    env::{TestEnv, install_poison_trigger, public_tables},
    issuer::{Issue, MASTER_TOKEN, stub_in_flight, stub_issuer, wiremock_issuer},
    proxy::TcpProxy,
    util::{eventually, fake_jwt, free_local_addr, tenant},
    workers::{ChildWorker, WorkerHandle, test_key, worker_binary},
};

/// Certificates made in the test (`tls_certs`), for the TLS tests.
#[allow(unused_imports)]
pub use self::tls_certs::{CertFiles, TestCa};

/// Private Postgres servers (`private_pg`), for TLS and failover tests.
#[allow(unused_imports)]
pub use self::private_pg::PrivatePg;

/// Private RabbitMQ nodes and clusters (`private_rabbit`), for tests that stop or configure a
/// broker.
#[allow(unused_imports)]
pub use self::private_rabbit::{NodeBuilder, RabbitCluster, RabbitNode};
