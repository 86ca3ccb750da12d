//! The customer domain of the `versioning` example: the `customer.registered` event went
//! through three schema versions, and events stored at every one of them still load.
//!
//! * v1 stored the whole name as one string: [`RegisteredV1`].
//! * v2 split it into first and last name: [`RegisteredV2`].
//! * v3 (current) added an optional e-mail address: [`Registered`].
//!
//! Each older version is its own type with a `From` impl to the next one; `#[derive(Event)]`
//! decodes a stored payload as the type of its version and walks the chain
//! `RegisteredV1 -> RegisteredV2 -> Registered`.
//!
//! Two more changes every long-lived store sees:
//! * a rename: `customer.email_changed` was stored as `customer.email_updated` before
//!   (`renamed_from`);
//! * a split: an early release stored `customer.signed_up` (name and e-mail in one event); the
//!   current code reads it as a `Registered` followed by an `EmailChanged` (`split`).
//!
//! And the [`loan`] module: an upcast that reads the stored envelope (a due date that v1 did not
//! store is computed from when the event was recorded).

use factum::{Aggregate, BoxError, Command, Event, Stored, Upcast};
use serde::{Deserialize, Serialize};

pub mod loan;

/// `customer.registered` at schema version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredV1 {
    /// The full name, e.g. `"Ada Lovelace"`.
    pub name: String,
}

/// `customer.registered` at schema version 2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredV2 {
    /// The first name.
    pub first_name: String,
    /// The last name.
    pub last_name: String,
}

/// `customer.registered` at schema version 3, the current one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The first name.
    pub first_name: String,
    /// The last name.
    pub last_name: String,
    /// The e-mail address, unknown for customers registered before v3.
    pub email: Option<String>,
}

impl From<RegisteredV1> for RegisteredV2 {
    /// v1 → v2: split the full name at its last space.
    fn from(v1: RegisteredV1) -> Self {
        let (first_name, last_name) = match v1.name.rsplit_once(' ') {
            Some((first, last)) => (first.to_owned(), last.to_owned()),
            None => (v1.name, String::new()),
        };
        Self {
            first_name,
            last_name,
        }
    }
}

impl From<RegisteredV2> for Registered {
    /// v2 → v3: no e-mail address was recorded.
    fn from(v2: RegisteredV2) -> Self {
        Self {
            first_name: v2.first_name,
            last_name: v2.last_name,
            email: None,
        }
    }
}

/// `customer.signed_up` (version 1), stored by an early release: registration and e-mail in one
/// event. The current code splits it into [`CustomerEvent::Registered`] and
/// [`CustomerEvent::EmailChanged`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedUpV1 {
    /// The full name.
    pub name: String,
    /// The e-mail address.
    pub email: String,
}

impl Upcast<SignedUpV1> for Vec<CustomerEvent> {
    /// One stored sign-up is a registration (the v1 name rules apply) and an e-mail change.
    fn upcast(v1: SignedUpV1, stored: &Stored<'_>) -> Result<Self, BoxError> {
        let registered = RegisteredV2::from(RegisteredV1 { name: v1.name });
        let registered = Registered::upcast(registered, stored)?;
        Ok(vec![
            CustomerEvent::Registered(registered),
            CustomerEvent::EmailChanged { email: v1.email },
        ])
    }
}

/// What happened to a customer.
#[derive(Clone, Debug, PartialEq, Eq, Event)]
#[event(prefix = "customer")]
#[event(split(name = "customer.signed_up", version = 1, from = SignedUpV1))]
pub enum CustomerEvent {
    /// `customer.registered`, at version 3; versions 1 and 2 are upcast on read.
    #[event(version = 3, upcast_from(RegisteredV1 = 1, RegisteredV2 = 2))]
    Registered(Registered),
    /// `customer.email_changed`; stored as `customer.email_updated` before it was renamed.
    #[event(renamed_from("customer.email_updated"))]
    EmailChanged {
        /// The new address.
        email: String,
    },
}

/// What can be asked of a customer.
#[derive(Clone, Debug, PartialEq, Eq, Command)]
#[command(id = customer)]
pub enum CustomerCommand {
    /// Register a new customer.
    Register {
        /// The customer's id.
        customer: String,
        /// The first name.
        first_name: String,
        /// The last name.
        last_name: String,
        /// The e-mail address, if known.
        email: Option<String>,
    },
    /// Change the e-mail address.
    ChangeEmail {
        /// The customer's id.
        customer: String,
        /// The new address.
        email: String,
    },
}

/// Why a customer refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CustomerError {
    /// `Register` twice.
    #[error("the customer is already registered")]
    AlreadyRegistered,
    /// Anything but `Register` before registering.
    #[error("the customer is not registered")]
    NotRegistered,
}

/// A customer's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "customer", command = CustomerCommand, event = CustomerEvent, error = CustomerError)]
pub struct Customer {
    /// Whether the customer registered.
    pub registered: bool,
    /// `"{first} {last}"`.
    pub name: String,
    /// The e-mail address, if known.
    pub email: Option<String>,
}

impl Customer {
    fn decide(&self, command: &CustomerCommand) -> Result<Vec<CustomerEvent>, CustomerError> {
        match command {
            CustomerCommand::Register { .. } if self.registered => {
                Err(CustomerError::AlreadyRegistered)
            }
            CustomerCommand::Register {
                first_name,
                last_name,
                email,
                ..
            } => Ok(vec![CustomerEvent::Registered(Registered {
                first_name: first_name.clone(),
                last_name: last_name.clone(),
                email: email.clone(),
            })]),
            CustomerCommand::ChangeEmail { .. } if !self.registered => {
                Err(CustomerError::NotRegistered)
            }
            CustomerCommand::ChangeEmail { email, .. } => Ok(vec![CustomerEvent::EmailChanged {
                email: email.clone(),
            }]),
        }
    }

    fn evolve(&mut self, event: &CustomerEvent) {
        match event {
            CustomerEvent::Registered(e) => {
                self.registered = true;
                self.name = format!("{} {}", e.first_name, e.last_name);
                self.email.clone_from(&e.email);
            }
            CustomerEvent::EmailChanged { email } => self.email = Some(email.clone()),
        }
    }
}
