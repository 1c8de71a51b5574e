//! The data path, top to bottom: a delivery is [decoded](decode) into a
//! [`ProvisionRequest`](crate::domain::ProvisionRequest), [provisioned](provision) (store →
//! issuer → store), its fate decided by the [disposition table](disposition) and carried out
//! by [`handle`]; the [`worker`] feeds batches to `handle` and keeps the broker session alive;
//! the [`breaker`] pauses it all while the issuer refuses us.

pub mod breaker;
pub mod decode;
pub(crate) mod disposition;
pub(crate) mod handle;
mod lifecycle;
pub mod provision;
pub(crate) mod revoker;
mod trace;
pub mod worker;
