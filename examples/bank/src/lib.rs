//! The bank account domain of the `bank` example: open, deposit, withdraw (rejected when the
//! balance is too low), close (only at a zero balance); a closed account rejects everything.

use factum::{Aggregate, Command, DecodeError, EncodeError, Event, RawValue};
use serde::{Deserialize, Serialize};

/// Amounts are whole cents.
pub type Cents = u64;

/// What can be asked of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
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

impl Command for AccountCommand {
    fn command_name(&self) -> &'static str {
        match self {
            AccountCommand::Open { .. } => "Open",
            AccountCommand::Deposit { .. } => "Deposit",
            AccountCommand::Withdraw { .. } => "Withdraw",
            AccountCommand::Close { .. } => "Close",
        }
    }

    fn aggregate_id(&self) -> String {
        match self {
            AccountCommand::Open { account, .. }
            | AccountCommand::Deposit { account, .. }
            | AccountCommand::Withdraw { account, .. }
            | AccountCommand::Close { account } => account.clone(),
        }
    }
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

/// What happened to an account.
#[derive(Clone, Debug, PartialEq, Eq)]
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

impl Event for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened(_) => "account.opened",
            AccountEvent::Deposited(_) => "account.deposited",
            AccountEvent::Withdrawn(_) => "account.withdrawn",
            AccountEvent::Closed(_) => "account.closed",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }

    fn event_types() -> &'static [&'static str] {
        &[
            "account.opened",
            "account.deposited",
            "account.withdrawn",
            "account.closed",
        ]
    }

    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        match self {
            AccountEvent::Opened(e) => factum::encode_json(e),
            AccountEvent::Deposited(e) => factum::encode_json(e),
            AccountEvent::Withdrawn(e) => factum::encode_json(e),
            AccountEvent::Closed(e) => factum::encode_json(e),
        }
    }

    fn decode(event_type: &str, version: u32, payload: &RawValue) -> Result<Self, DecodeError> {
        Ok(match (event_type, version) {
            ("account.opened", 1) => AccountEvent::Opened(factum::decode_json(payload)?),
            ("account.deposited", 1) => AccountEvent::Deposited(factum::decode_json(payload)?),
            ("account.withdrawn", 1) => AccountEvent::Withdrawn(factum::decode_json(payload)?),
            ("account.closed", 1) => AccountEvent::Closed(factum::decode_json(payload)?),
            _ => return Err(DecodeError::unknown(event_type, version)),
        })
    }
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

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
