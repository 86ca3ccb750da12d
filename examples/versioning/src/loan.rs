//! Library loans: `loan.lent` v1 stored no due date, because every loan ran 21 days. v2 stores
//! it. The upcast from v1 needs to know when the loan was made, which is when the event was
//! recorded: it implements [`Upcast`] (which reads the stored envelope) instead of `From`.

use chrono::{DateTime, Duration, Utc};
use factum::{Aggregate, BoxError, Command, Event, Stored, Upcast};
use serde::{Deserialize, Serialize};

/// How long a loan ran before due dates were stored.
pub const LOAN_PERIOD_DAYS: i64 = 21;

/// `loan.lent` at schema version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LentV1 {
    /// The book's shelf mark.
    pub book: String,
}

/// `loan.lent` at schema version 2, the current one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lent {
    /// The book's shelf mark.
    pub book: String,
    /// When the book is due back.
    pub due: DateTime<Utc>,
}

impl Upcast<LentV1> for Lent {
    /// v1 → v2: due [`LOAN_PERIOD_DAYS`] after the loan was recorded.
    fn upcast(v1: LentV1, stored: &Stored<'_>) -> Result<Self, BoxError> {
        Ok(Self {
            book: v1.book,
            due: stored.recorded_at + Duration::days(LOAN_PERIOD_DAYS),
        })
    }
}

/// What happened to a loan.
#[derive(Clone, Debug, PartialEq, Eq, Event)]
#[event(prefix = "loan")]
pub enum LoanEvent {
    /// `loan.lent` at version 2; v1 payloads get their due date from the envelope.
    #[event(version = 2, upcast_from(LentV1 = 1))]
    Lent(Lent),
    /// `loan.returned`
    Returned,
}

/// What can be asked of a loan.
#[derive(Clone, Debug, PartialEq, Eq, Command)]
#[command(id = loan)]
pub enum LoanCommand {
    /// Lend a book until `due`.
    Lend {
        /// The loan's id.
        loan: String,
        /// The book's shelf mark.
        book: String,
        /// When it is due back.
        due: DateTime<Utc>,
    },
    /// Take the book back.
    Return {
        /// The loan's id.
        loan: String,
    },
}

/// Why a loan refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoanError {
    /// `Lend` on a loan that exists.
    #[error("the loan was already made")]
    AlreadyLent,
    /// `Return` of a book not lent or returned already.
    #[error("the book is not out on this loan")]
    NotOut,
}

/// A loan's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "loan", command = LoanCommand, event = LoanEvent, error = LoanError)]
pub struct Loan {
    /// The book, once lent.
    pub book: Option<String>,
    /// When it is due back, once lent.
    pub due: Option<DateTime<Utc>>,
    /// Whether it came back.
    pub returned: bool,
}

impl Loan {
    fn decide(&self, command: &LoanCommand) -> Result<Vec<LoanEvent>, LoanError> {
        match command {
            LoanCommand::Lend { .. } if self.book.is_some() => Err(LoanError::AlreadyLent),
            LoanCommand::Lend { book, due, .. } => Ok(vec![LoanEvent::Lent(Lent {
                book: book.clone(),
                due: *due,
            })]),
            LoanCommand::Return { .. } if self.book.is_none() || self.returned => {
                Err(LoanError::NotOut)
            }
            LoanCommand::Return { .. } => Ok(vec![LoanEvent::Returned]),
        }
    }

    fn evolve(&mut self, event: &LoanEvent) {
        match event {
            LoanEvent::Lent(lent) => {
                self.book = Some(lent.book.clone());
                self.due = Some(lent.due);
            }
            LoanEvent::Returned => self.returned = true,
        }
    }
}
