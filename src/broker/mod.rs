//! Everything that talks AMQP: the topology of the contract, the consumer side and the
//! confirmed publisher.

pub mod topology;
