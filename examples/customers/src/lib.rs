//! The customer domain of the `customers` example: a customer's name and email are personal
//! data (`#[personal(subject = customer_id)]`), encrypted with the customer's own key and
//! forgotten on request; the plan is not. [`Directory`] is a PostgreSQL read model that copies
//! the personal fields and erases its copies on [`SubjectForgotten`].

use factum::personal::{SUBJECT_FORGOTTEN, SubjectForgotten};
use factum::{
    Aggregate, BoxError, Command, DecodeError, Decoded, EncodeError, Envelope, Event, RawValue,
    Snapshot, Stored,
};
use factum_postgres::projection::{PgProjection, ProjectionTx};
use serde::{Deserialize, Serialize};

/// What can be asked of a customer.
#[derive(Clone, Debug, PartialEq, Eq, Command)]
#[command(id = customer_id)]
pub enum CustomerCommand {
    /// Register a new customer.
    Register {
        /// The customer's id: the data subject of their personal fields.
        customer_id: String,
        /// Their name.
        name: String,
        /// Their email address.
        email: String,
        /// Their plan.
        plan: String,
    },
    /// Change the email address.
    ChangeEmail {
        /// The customer's id.
        customer_id: String,
        /// The new address.
        email: String,
    },
    /// Change the plan.
    ChangePlan {
        /// The customer's id.
        customer_id: String,
        /// The new plan.
        plan: String,
    },
}

/// What happened to a customer.
#[derive(Clone, Debug, PartialEq, Eq, Event)]
#[event(prefix = "customer")]
pub enum CustomerEvent {
    /// A customer registered.
    Registered {
        /// The customer's id (stored in the clear: it finds the key).
        customer_id: String,
        /// Personal: encrypted with the customer's key.
        #[personal(subject = customer_id)]
        name: String,
        /// Personal: encrypted with the customer's key.
        #[personal(subject = customer_id)]
        email: String,
        /// Not personal.
        plan: String,
    },
    /// The email address changed.
    EmailChanged {
        /// The customer's id.
        customer_id: String,
        /// Personal.
        #[personal(subject = customer_id)]
        email: String,
    },
    /// The plan changed.
    PlanChanged {
        /// The new plan.
        plan: String,
    },
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CustomerError {
    /// `Register` on a registered customer.
    #[error("the customer is already registered")]
    AlreadyRegistered,
    /// Anything but `Register` on a customer that is not registered.
    #[error("no such customer")]
    NotRegistered,
}

/// A customer, rebuilt from events (and snapshotted: its state holds the personal fields too).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Aggregate)]
#[aggregate(type = "customer", command = CustomerCommand, event = CustomerEvent, error = CustomerError)]
pub struct Customer {
    /// Whether registered.
    pub registered: bool,
    /// The name (`"[forgotten]"` once the customer is forgotten).
    pub name: String,
    /// The email address (`"[forgotten]"` once the customer is forgotten).
    pub email: String,
    /// The plan.
    pub plan: String,
}

impl Snapshot for Customer {
    const SNAPSHOT_VERSION: u32 = 1;
}

impl Customer {
    fn decide(&self, command: &CustomerCommand) -> Result<Vec<CustomerEvent>, CustomerError> {
        match command {
            CustomerCommand::Register {
                customer_id,
                name,
                email,
                plan,
            } => {
                if self.registered {
                    return Err(CustomerError::AlreadyRegistered);
                }
                Ok(vec![CustomerEvent::Registered {
                    customer_id: customer_id.clone(),
                    name: name.clone(),
                    email: email.clone(),
                    plan: plan.clone(),
                }])
            }
            _ if !self.registered => Err(CustomerError::NotRegistered),
            CustomerCommand::ChangeEmail { customer_id, email } => {
                Ok(vec![CustomerEvent::EmailChanged {
                    customer_id: customer_id.clone(),
                    email: email.clone(),
                }])
            }
            CustomerCommand::ChangePlan { plan, .. } => {
                Ok(vec![CustomerEvent::PlanChanged { plan: plan.clone() }])
            }
        }
    }

    fn evolve(&mut self, event: &CustomerEvent) {
        match event {
            CustomerEvent::Registered {
                name, email, plan, ..
            } => {
                self.registered = true;
                self.name = name.clone();
                self.email = email.clone();
                self.plan = plan.clone();
            }
            CustomerEvent::EmailChanged { email, .. } => self.email = email.clone(),
            CustomerEvent::PlanChanged { plan } => self.plan = plan.clone(),
        }
    }
}

/// What the [`Directory`] reads: the customer events, and the markers of forgotten subjects.
#[derive(Debug)]
pub enum DirectoryEvent {
    /// A customer event.
    Customer(CustomerEvent),
    /// A subject was forgotten.
    Forgotten(SubjectForgotten),
}

const DIRECTORY_TYPES: &[&str] = &[
    "customer.registered",
    "customer.email_changed",
    "customer.plan_changed",
    SUBJECT_FORGOTTEN,
];

impl Event for DirectoryEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Customer(e) => e.event_type(),
            Self::Forgotten(e) => e.event_type(),
        }
    }
    fn schema_version(&self) -> u32 {
        match self {
            Self::Customer(e) => e.schema_version(),
            Self::Forgotten(e) => e.schema_version(),
        }
    }
    fn event_types() -> &'static [&'static str] {
        DIRECTORY_TYPES
    }
    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        match self {
            Self::Customer(e) => e.encode(),
            Self::Forgotten(e) => e.encode(),
        }
    }
    fn decode(stored: &Stored<'_>) -> Result<Self, DecodeError> {
        if stored.event_type == SUBJECT_FORGOTTEN {
            return SubjectForgotten::decode(stored).map(Self::Forgotten);
        }
        CustomerEvent::decode(stored).map(Self::Customer)
    }
    fn decode_all(stored: &Stored<'_>) -> Result<Decoded<Self>, DecodeError> {
        Self::decode(stored).map(Decoded::One)
    }
}

/// The read model: `customer_directory(customer_id text primary key, name text, email text,
/// plan text)`. It copies the personal fields, so it must erase them when their subject is
/// forgotten: on [`SubjectForgotten`] it overwrites them with the placeholder. (A rebuild reads
/// the placeholders from the events themselves.)
#[derive(Debug, Default)]
pub struct Directory;

/// The read model's table, as [`Directory`] creates it.
pub const DIRECTORY_TABLE: &str = "CREATE TABLE IF NOT EXISTS customer_directory (
    customer_id text PRIMARY KEY, name text NOT NULL, email text NOT NULL, plan text NOT NULL)";

impl PgProjection for Directory {
    const NAME: &'static str = "customer_directory";
    const TABLES: &'static [&'static str] = &["customer_directory"];
    type Event = DirectoryEvent;

    async fn apply(
        &mut self,
        tx: &mut ProjectionTx<'_>,
        event: &Envelope<DirectoryEvent>,
    ) -> Result<(), BoxError> {
        let table = tx.table("customer_directory");
        let id = event.stream_id.aggregate_id().to_owned();
        let (sql, binds): (String, Vec<String>) = match &event.event {
            DirectoryEvent::Customer(CustomerEvent::Registered {
                customer_id,
                name,
                email,
                plan,
            }) => (
                format!(
                    "INSERT INTO {table} (customer_id, name, email, plan) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (customer_id) DO UPDATE SET name = $2, email = $3, plan = $4"
                ),
                vec![
                    customer_id.clone(),
                    name.clone(),
                    email.clone(),
                    plan.clone(),
                ],
            ),
            DirectoryEvent::Customer(CustomerEvent::EmailChanged { customer_id, email }) => (
                format!("UPDATE {table} SET email = $2 WHERE customer_id = $1"),
                vec![customer_id.clone(), email.clone()],
            ),
            DirectoryEvent::Customer(CustomerEvent::PlanChanged { plan }) => (
                format!("UPDATE {table} SET plan = $2 WHERE customer_id = $1"),
                vec![id, plan.clone()],
            ),
            // The subject of this model's personal columns is the customer id.
            DirectoryEvent::Forgotten(forgotten) => (
                format!("UPDATE {table} SET name = $2, email = $2 WHERE customer_id = $1"),
                vec![
                    forgotten.subject.as_str().to_owned(),
                    factum::personal::PLACEHOLDER.to_owned(),
                ],
            ),
        };
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for bind in binds {
            query = query.bind(bind);
        }
        query.execute(tx.conn()).await?;
        Ok(())
    }
}

/// The book's personal data chapter, compiled so it cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/src/personal-data.md")]
mod personal_data_chapter {}
