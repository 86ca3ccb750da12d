//! The bank account domain of the `bank` example: open, deposit, withdraw (rejected when the
//! balance is too low), close (only at a zero balance); a closed account rejects everything.

use factum::{Aggregate, Command, Event};
use serde::{Deserialize, Serialize};

/// Amounts are whole cents.
pub type Cents = u64;

/// What can be asked of an account.
#[derive(Clone, Debug, PartialEq, Eq, Command)]
#[command(id = account)]
pub enum AccountCommand {
    /// Open a new account.
    Open {
        /// The account's id.
        account: String,
        /// Who owns it.
        owner: String,
    },
    /// Put money in.
    Deposit {
        /// The account's id.
        account: String,
        /// How much.
        amount: Cents,
    },
    /// Take money out; rejected when the balance is too low.
    Withdraw {
        /// The account's id.
        account: String,
        /// How much.
        amount: Cents,
    },
    /// Close the account; only at a zero balance.
    Close {
        /// The account's id.
        account: String,
    },
}

/// The account was opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    /// Who owns it.
    pub owner: String,
}

/// Money was put in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deposited {
    /// How much.
    pub amount: Cents,
}

/// Money was taken out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawn {
    /// How much.
    pub amount: Cents,
}

/// The account was closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {}

/// What happened to an account. Wire names follow the rule `{prefix}.{variant in snake_case}`:
/// `account.opened`, `account.deposited`, `account.withdrawn`, `account.closed`.
#[derive(Clone, Debug, PartialEq, Eq, Event)]
#[event(prefix = "account")]
pub enum AccountEvent {
    /// `account.opened`
    Opened(Opened),
    /// `account.deposited`
    Deposited(Deposited),
    /// `account.withdrawn`
    Withdrawn(Withdrawn),
    /// `account.closed`
    Closed(Closed),
}

/// Why an account refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// `Open` on an account that exists.
    #[error("the account is already open")]
    AlreadyOpen,
    /// Any command but `Open` on an account that does not exist.
    #[error("the account has not been opened")]
    NotOpen,
    /// Any command on a closed account.
    #[error("the account is closed")]
    Closed,
    /// A deposit or withdrawal of zero.
    #[error("the amount must be positive")]
    ZeroAmount,
    /// A withdrawal larger than the balance.
    #[error("insufficient funds: the balance is {balance} cents, {requested} requested")]
    InsufficientFunds {
        /// The balance.
        balance: Cents,
        /// The amount asked for.
        requested: Cents,
    },
    /// `Close` while money is left.
    #[error("the balance is {0} cents; withdraw it before closing")]
    BalanceNotZero(Cents),
}

/// A bank account's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "account", command = AccountCommand, event = AccountEvent, error = AccountError)]
pub struct Account {
    /// Whether it was opened.
    pub open: bool,
    /// Whether it was closed.
    pub closed: bool,
    /// Who owns it.
    pub owner: String,
    /// The balance in cents.
    pub balance: Cents,
}

impl Account {
    /// Decides what a command does (`Aggregate::decide`).
    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        if self.closed {
            return Err(AccountError::Closed);
        }
        match command {
            AccountCommand::Open { owner, .. } if !self.open => {
                Ok(vec![AccountEvent::Opened(Opened {
                    owner: owner.clone(),
                })])
            }
            AccountCommand::Open { .. } => Err(AccountError::AlreadyOpen),
            _ if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit { amount: 0, .. }
            | AccountCommand::Withdraw { amount: 0, .. } => Err(AccountError::ZeroAmount),
            AccountCommand::Deposit { amount, .. } => {
                Ok(vec![AccountEvent::Deposited(Deposited { amount: *amount })])
            }
            AccountCommand::Withdraw { amount, .. } if *amount > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    requested: *amount,
                })
            }
            AccountCommand::Withdraw { amount, .. } => {
                Ok(vec![AccountEvent::Withdrawn(Withdrawn { amount: *amount })])
            }
            AccountCommand::Close { .. } if self.balance > 0 => {
                Err(AccountError::BalanceNotZero(self.balance))
            }
            AccountCommand::Close { .. } => Ok(vec![AccountEvent::Closed(Closed {})]),
        }
    }

    /// Applies one recorded event (`Aggregate::evolve`).
    fn evolve(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened(e) => {
                self.open = true;
                self.owner = e.owner.clone();
            }
            AccountEvent::Deposited(e) => self.balance += e.amount,
            AccountEvent::Withdrawn(e) => self.balance -= e.amount,
            AccountEvent::Closed(_) => self.closed = true,
        }
    }
}

// The README's example runs against this domain: compile it with the tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
mod readme {}
