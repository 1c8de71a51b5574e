//! Domain types that are parsed once at the edge, so the rest of the code never re-validates.

mod container;
mod event;
mod request;
mod tenant;
mod token;

pub use container::{ContainerName, NamingStrategy};
pub(crate) use event::now_rfc3339;
#[doc(hidden)]
pub use event::rfc3339;
pub use event::{ReadyEvent, RevokedEvent};
pub use request::{MessageIdentity, ProvisionRequest, Trigger};
pub use tenant::{TenantId, TenantName};
pub use token::{TenantToken, TokenFingerprint};
