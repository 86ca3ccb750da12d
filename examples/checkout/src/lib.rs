//! A checkout across two services, coordinated by sagas.
//!
//! * The **shop** service owns orders, stock and shipments. Its [`Checkout`] saga, one instance
//!   per order: reserve the stock (step 1), ask billing for the payment (step 2), ship (step 3).
//!   When shipping is rejected, it compensates: releases the stock, asks billing for a refund and
//!   cancels the order. When no payment arrives within [`PAYMENT_TIMEOUT`], it releases the stock
//!   and cancels the order.
//! * The **billing** service owns wallets. Its [`Billing`] saga turns the shop's payment and
//!   refund requests (public changes of the checkout saga, relayed over the bus) into commands on
//!   the customer's wallet, and reports a declined charge back as a public change of its own.
//!
//! The services share no tables: each has its own event store, and they see each other's public
//! events only through the bus. `cargo run -p checkout` runs it all in one process on the
//! in-memory backend and the in-process bus; the tests run it on two PostgreSQL databases, over
//! the in-process bus and over NATS JetStream.

use std::collections::BTreeMap;
use std::time::Duration;

use factum::bus::{PublicEvents, ServiceName};
use factum::saga::{Decisions, Input, Saga};
use factum::{Aggregate, BoxError, Command, Envelope, Event, Projection};
use serde::{Deserialize, Serialize};

/// How long the shop waits for the payment of an order.
pub const PAYMENT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Units of stock of every product.
pub const STOCK_PER_SKU: u32 = 10;

// ---------------------------------------------------------------------------------------------
// The shop: orders.

/// What an order is, as placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderDetails {
    /// The order's id.
    pub order: String,
    /// The product.
    pub sku: String,
    /// How many.
    pub qty: u32,
    /// The price in cents.
    pub amount: u64,
    /// The customer's wallet (at billing).
    pub wallet: String,
    /// Where to ship.
    pub address: String,
}

/// What can be asked of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Command)]
#[command(id = order)]
pub enum OrderCommand {
    /// Place it.
    Place {
        /// The order's id.
        order: String,
        /// What is ordered.
        details: OrderDetails,
    },
    /// It was shipped.
    Complete {
        /// The order's id.
        order: String,
    },
    /// It cannot go through.
    Cancel {
        /// The order's id.
        order: String,
        /// Why.
        reason: String,
    },
}

/// What happened to an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "order")]
pub enum OrderEvent {
    /// `order.placed`
    Placed(OrderDetails),
    /// `order.completed`
    Completed,
    /// `order.cancelled`
    Cancelled {
        /// Why.
        reason: String,
    },
}

/// Why an order refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// `Place` on a placed order.
    #[error("the order is already placed")]
    AlreadyPlaced,
    /// Anything but `Place` on an order that is not open.
    #[error("the order is not open")]
    NotOpen,
}

/// An order's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "order", command = OrderCommand, event = OrderEvent, error = OrderError)]
pub struct Order {
    /// Placed and neither completed nor cancelled.
    pub open: bool,
    /// Placed at all.
    pub placed: bool,
}

impl Order {
    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match command {
            OrderCommand::Place { details, .. } if !self.placed => {
                Ok(vec![OrderEvent::Placed(details.clone())])
            }
            OrderCommand::Place { .. } => Err(OrderError::AlreadyPlaced),
            _ if !self.open => Err(OrderError::NotOpen),
            OrderCommand::Complete { .. } => Ok(vec![OrderEvent::Completed]),
            OrderCommand::Cancel { reason, .. } => Ok(vec![OrderEvent::Cancelled {
                reason: reason.clone(),
            }]),
        }
    }

    fn evolve(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed(_) => {
                self.placed = true;
                self.open = true;
            }
            OrderEvent::Completed | OrderEvent::Cancelled { .. } => self.open = false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The shop: stock.

/// What can be asked of a product's stock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Command)]
#[command(id = sku)]
pub enum StockCommand {
    /// Set units aside for an order.
    Reserve {
        /// The product.
        sku: String,
        /// For which order.
        order: String,
        /// How many.
        qty: u32,
    },
    /// Give an order's units back (compensation).
    Release {
        /// The product.
        sku: String,
        /// Which order's.
        order: String,
    },
}

/// What happened to a product's stock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "stock")]
pub enum StockEvent {
    /// `stock.reserved`
    Reserved {
        /// For which order.
        order: String,
        /// How many.
        qty: u32,
    },
    /// `stock.released`
    Released {
        /// Whose.
        order: String,
        /// How many.
        qty: u32,
    },
}

/// Why the stock refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StockError {
    /// Not enough units left.
    #[error("only {available} units left")]
    OutOfStock {
        /// Units left.
        available: u32,
    },
    /// `Release` for an order with no reservation.
    #[error("order {0} has no reservation")]
    NotReserved(String),
}

/// A product's stock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "stock", command = StockCommand, event = StockEvent, error = StockError)]
pub struct Stock {
    /// Units reserved, per order.
    pub reserved: BTreeMap<String, u32>,
}

impl Stock {
    fn decide(&self, command: &StockCommand) -> Result<Vec<StockEvent>, StockError> {
        match command {
            StockCommand::Reserve { order, qty, .. } => {
                let available = STOCK_PER_SKU - self.reserved.values().sum::<u32>();
                if *qty > available {
                    return Err(StockError::OutOfStock { available });
                }
                Ok(vec![StockEvent::Reserved {
                    order: order.clone(),
                    qty: *qty,
                }])
            }
            StockCommand::Release { order, .. } => match self.reserved.get(order) {
                Some(qty) => Ok(vec![StockEvent::Released {
                    order: order.clone(),
                    qty: *qty,
                }]),
                None => Err(StockError::NotReserved(order.clone())),
            },
        }
    }

    fn evolve(&mut self, event: &StockEvent) {
        match event {
            StockEvent::Reserved { order, qty } => {
                self.reserved.insert(order.clone(), *qty);
            }
            StockEvent::Released { order, .. } => {
                self.reserved.remove(order);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The shop: shipments.

/// What can be asked of an order's shipment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Command)]
pub struct Ship {
    /// The order.
    #[command(id)]
    pub order: String,
    /// Where to.
    pub address: String,
}

/// An order was shipped: `shipment.shipped`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "shipment.shipped")]
pub struct Shipped {
    /// The order.
    pub order: String,
}

/// Why a shipment was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShipmentError {
    /// The carrier does not deliver there.
    #[error("the carrier does not deliver to {0:?}")]
    Undeliverable(String),
}

/// An order's shipment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "shipment", command = Ship, event = Shipped, error = ShipmentError)]
pub struct Shipment {
    /// Shipped already.
    pub shipped: bool,
}

impl Shipment {
    fn decide(&self, command: &Ship) -> Result<Vec<Shipped>, ShipmentError> {
        if command.address == "nowhere" {
            return Err(ShipmentError::Undeliverable(command.address.clone()));
        }
        if self.shipped {
            return Ok(Vec::new());
        }
        Ok(vec![Shipped {
            order: command.order.clone(),
        }])
    }

    fn evolve(&mut self, _event: &Shipped) {
        self.shipped = true;
    }
}

// ---------------------------------------------------------------------------------------------
// The shop's checkout saga.

/// What the checkout saga reacts to: the shop's own events and billing's (from the bus).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum CheckoutInput {
    /// An order was placed (shop).
    #[event(name = "order.placed")]
    Placed(OrderDetails),
    /// Its stock was reserved (shop).
    #[event(name = "stock.reserved")]
    Reserved {
        /// The order.
        order: String,
    },
    /// It was shipped (shop).
    #[event(name = "shipment.shipped")]
    Shipped {
        /// The order.
        order: String,
    },
    /// Billing charged the wallet (billing, over the bus).
    #[event(name = "wallet.charged")]
    Charged {
        /// The order.
        order: String,
    },
    /// Billing could not charge the wallet (billing, over the bus).
    #[event(name = "billing.declined")]
    Declined {
        /// The order.
        order: String,
        /// Why.
        reason: String,
    },
}

/// What a checkout records about itself. `payment_requested` and `refund_requested` are public:
/// the shop's relay publishes them, billing acts on them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "checkout")]
pub enum CheckoutChange {
    /// `checkout.started`
    Started(OrderDetails),
    /// `checkout.stock_reserved`
    StockReserved,
    /// `checkout.payment_requested`
    PaymentRequested(PaymentRequest),
    /// `checkout.paid`
    Paid,
    /// `checkout.shipped`
    Shipped,
    /// `checkout.compensating`
    Compensating {
        /// Why.
        reason: String,
    },
    /// `checkout.refund_requested`
    RefundRequested(PaymentRequest),
    /// `checkout.timed_out`
    TimedOut,
}

/// A payment (or refund) the shop asks billing for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequest {
    /// The order.
    pub order: String,
    /// The wallet.
    pub wallet: String,
    /// How much.
    pub amount: u64,
}

/// Where a checkout stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CheckoutStatus {
    /// Nothing yet.
    #[default]
    New,
    /// Waiting for the stock.
    Reserving,
    /// Waiting for billing.
    AwaitingPayment,
    /// Waiting for the shipment.
    Shipping,
    /// Done.
    Completed,
    /// Undone, for this reason.
    Compensated(String),
    /// No payment in time.
    TimedOut,
}

/// The checkout saga: one instance per order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkout {
    /// Where it stands.
    pub status: CheckoutStatus,
    /// The order.
    pub details: Option<OrderDetails>,
    /// Whether its stock is reserved.
    pub reserved: bool,
    /// Whether it was paid.
    pub paid: bool,
}

impl Checkout {
    fn request(&self) -> Option<PaymentRequest> {
        self.details.as_ref().map(|d| PaymentRequest {
            order: d.order.clone(),
            wallet: d.wallet.clone(),
            amount: d.amount,
        })
    }

    /// Undoes what was done: releases the stock, refunds a payment, cancels the order.
    fn compensate(&self, reason: String, then: &mut Decisions<Self>) -> Result<(), BoxError> {
        let Some(details) = &self.details else {
            return Ok(());
        };
        then.record(CheckoutChange::Compensating {
            reason: reason.clone(),
        });
        then.cancel("payment");
        if self.reserved {
            then.send::<Stock>(StockCommand::Release {
                sku: details.sku.clone(),
                order: details.order.clone(),
            })?;
        }
        if self.paid
            && let Some(request) = self.request()
        {
            then.record(CheckoutChange::RefundRequested(request));
        }
        then.send::<Order>(OrderCommand::Cancel {
            order: details.order.clone(),
            reason,
        })?;
        Ok(())
    }
}

impl Saga for Checkout {
    const NAME: &'static str = "checkout";
    type Event = CheckoutInput;
    type Change = CheckoutChange;
    type Timeout = ();

    fn instance(event: &Envelope<CheckoutInput>) -> Option<String> {
        Some(match &event.event {
            CheckoutInput::Placed(details) => details.order.clone(),
            CheckoutInput::Reserved { order }
            | CheckoutInput::Shipped { order }
            | CheckoutInput::Charged { order }
            | CheckoutInput::Declined { order, .. } => order.clone(),
        })
    }

    fn react(&self, input: Input<'_, Self>, then: &mut Decisions<Self>) -> Result<(), BoxError> {
        use CheckoutStatus as S;
        match input {
            Input::Event(event) => match (&event.event, &self.status) {
                (CheckoutInput::Placed(details), S::New) => {
                    then.record(CheckoutChange::Started(details.clone()));
                    then.send::<Stock>(StockCommand::Reserve {
                        sku: details.sku.clone(),
                        order: details.order.clone(),
                        qty: details.qty,
                    })?;
                    then.schedule("payment", PAYMENT_TIMEOUT, ())?;
                }
                (CheckoutInput::Reserved { .. }, S::Reserving) => {
                    then.record(CheckoutChange::StockReserved);
                    if let Some(request) = self.request() {
                        then.record(CheckoutChange::PaymentRequested(request));
                    }
                }
                (CheckoutInput::Charged { .. }, S::AwaitingPayment) => {
                    then.record(CheckoutChange::Paid);
                    then.cancel("payment");
                    if let Some(details) = &self.details {
                        then.send::<Shipment>(Ship {
                            order: details.order.clone(),
                            address: details.address.clone(),
                        })?;
                    }
                }
                (CheckoutInput::Shipped { order }, S::Shipping) => {
                    then.record(CheckoutChange::Shipped);
                    then.send::<Order>(OrderCommand::Complete {
                        order: order.clone(),
                    })?;
                }
                (CheckoutInput::Declined { reason, .. }, S::AwaitingPayment) => {
                    self.compensate(format!("payment declined: {reason}"), then)?;
                }
                // Late or repeated news: nothing to do.
                _ => {}
            },
            Input::Rejected(rejection) => {
                if let Some(error) = rejection.error::<Shipment>() {
                    self.compensate(format!("shipping refused: {error}"), then)?;
                } else if let Some(error) = rejection.error::<Stock>()
                    && matches!(self.status, S::Reserving)
                {
                    self.compensate(format!("no stock: {error}"), then)?;
                }
            }
            Input::Timeout(_) => {
                if matches!(self.status, S::Reserving | S::AwaitingPayment) {
                    then.record(CheckoutChange::TimedOut);
                    if let Some(details) = &self.details {
                        if self.reserved {
                            then.send::<Stock>(StockCommand::Release {
                                sku: details.sku.clone(),
                                order: details.order.clone(),
                            })?;
                        }
                        then.send::<Order>(OrderCommand::Cancel {
                            order: details.order.clone(),
                            reason: "no payment in time".into(),
                        })?;
                    }
                }
            }
        }
        Ok(())
    }

    fn evolve(&mut self, change: &CheckoutChange) {
        match change {
            CheckoutChange::Started(details) => {
                self.details = Some(details.clone());
                self.status = CheckoutStatus::Reserving;
            }
            CheckoutChange::StockReserved => self.reserved = true,
            CheckoutChange::PaymentRequested(_) => self.status = CheckoutStatus::AwaitingPayment,
            CheckoutChange::Paid => {
                self.paid = true;
                self.status = CheckoutStatus::Shipping;
            }
            CheckoutChange::Shipped => self.status = CheckoutStatus::Completed,
            CheckoutChange::Compensating { reason } => {
                self.status = CheckoutStatus::Compensated(reason.clone());
            }
            CheckoutChange::RefundRequested(_) => {}
            CheckoutChange::TimedOut => self.status = CheckoutStatus::TimedOut,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Billing: wallets.

/// What can be asked of a wallet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Command)]
#[command(id = wallet)]
pub enum WalletCommand {
    /// Put money in.
    Deposit {
        /// The wallet.
        wallet: String,
        /// How much.
        amount: u64,
    },
    /// Pay for an order.
    Charge {
        /// The wallet.
        wallet: String,
        /// The order.
        order: String,
        /// How much.
        amount: u64,
    },
    /// Give an order's payment back.
    Refund {
        /// The wallet.
        wallet: String,
        /// The order.
        order: String,
    },
}

/// What happened to a wallet. `charged` and `refunded` are public.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "wallet")]
pub enum WalletEvent {
    /// `wallet.deposited`
    Deposited {
        /// How much.
        amount: u64,
    },
    /// `wallet.charged`
    Charged {
        /// The order.
        order: String,
        /// How much.
        amount: u64,
    },
    /// `wallet.refunded`
    Refunded {
        /// The order.
        order: String,
        /// How much.
        amount: u64,
    },
}

/// Why a wallet refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalletError {
    /// Not enough money.
    #[error("insufficient funds: {balance} cents")]
    InsufficientFunds {
        /// The balance.
        balance: u64,
    },
    /// `Refund` of an order that was not charged.
    #[error("order {0} was not charged")]
    NotCharged(String),
}

/// A wallet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "wallet", command = WalletCommand, event = WalletEvent, error = WalletError)]
pub struct Wallet {
    /// The balance in cents.
    pub balance: u64,
    /// Charges per order, not refunded.
    pub charges: BTreeMap<String, u64>,
}

impl Wallet {
    fn decide(&self, command: &WalletCommand) -> Result<Vec<WalletEvent>, WalletError> {
        match command {
            WalletCommand::Deposit { amount, .. } => {
                Ok(vec![WalletEvent::Deposited { amount: *amount }])
            }
            WalletCommand::Charge { order, amount, .. } => {
                if self.charges.contains_key(order) {
                    return Ok(Vec::new());
                }
                if *amount > self.balance {
                    return Err(WalletError::InsufficientFunds {
                        balance: self.balance,
                    });
                }
                Ok(vec![WalletEvent::Charged {
                    order: order.clone(),
                    amount: *amount,
                }])
            }
            WalletCommand::Refund { order, .. } => match self.charges.get(order) {
                Some(amount) => Ok(vec![WalletEvent::Refunded {
                    order: order.clone(),
                    amount: *amount,
                }]),
                None => Err(WalletError::NotCharged(order.clone())),
            },
        }
    }

    fn evolve(&mut self, event: &WalletEvent) {
        match event {
            WalletEvent::Deposited { amount } => self.balance += amount,
            WalletEvent::Charged { order, amount } => {
                self.balance -= amount;
                self.charges.insert(order.clone(), *amount);
            }
            WalletEvent::Refunded { order, amount } => {
                self.balance += amount;
                self.charges.remove(order);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Billing's saga.

/// What billing's saga reacts to: the shop's requests, from the bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum BillingInput {
    /// The shop asks for a payment.
    #[event(name = "checkout.payment_requested")]
    PaymentRequested(PaymentRequest),
    /// The shop asks for a refund.
    #[event(name = "checkout.refund_requested")]
    RefundRequested(PaymentRequest),
}

/// What billing's saga records. `declined` is public: the shop compensates on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "billing")]
pub enum BillingChange {
    /// `billing.charging`
    Charging(PaymentRequest),
    /// `billing.refunding`
    Refunding,
    /// `billing.declined`
    Declined {
        /// The order.
        order: String,
        /// Why.
        reason: String,
    },
}

/// Billing's saga: one instance per order, turning requests into wallet commands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Billing {
    /// The request being handled.
    pub request: Option<PaymentRequest>,
    /// Refunding it.
    pub refunding: bool,
    /// Declined.
    pub declined: bool,
}

impl Saga for Billing {
    const NAME: &'static str = "billing";
    type Event = BillingInput;
    type Change = BillingChange;
    type Timeout = ();

    fn instance(event: &Envelope<BillingInput>) -> Option<String> {
        match &event.event {
            BillingInput::PaymentRequested(r) | BillingInput::RefundRequested(r) => {
                Some(r.order.clone())
            }
        }
    }

    fn react(&self, input: Input<'_, Self>, then: &mut Decisions<Self>) -> Result<(), BoxError> {
        match input {
            Input::Event(event) => match &event.event {
                BillingInput::PaymentRequested(r) if self.request.is_none() => {
                    then.record(BillingChange::Charging(r.clone()));
                    then.send::<Wallet>(WalletCommand::Charge {
                        wallet: r.wallet.clone(),
                        order: r.order.clone(),
                        amount: r.amount,
                    })?;
                }
                BillingInput::RefundRequested(r) if !self.refunding && !self.declined => {
                    then.record(BillingChange::Refunding);
                    then.send::<Wallet>(WalletCommand::Refund {
                        wallet: r.wallet.clone(),
                        order: r.order.clone(),
                    })?;
                }
                _ => {}
            },
            Input::Rejected(rejection) => {
                if let (Some(WalletError::InsufficientFunds { .. }), Some(r)) =
                    (rejection.error::<Wallet>(), &self.request)
                {
                    then.record(BillingChange::Declined {
                        order: r.order.clone(),
                        reason: rejection.reason(),
                    });
                }
            }
            Input::Timeout(_) => {}
        }
        Ok(())
    }

    fn evolve(&mut self, change: &BillingChange) {
        match change {
            BillingChange::Charging(r) => self.request = Some(r.clone()),
            BillingChange::Refunding => self.refunding = true,
            BillingChange::Declined { .. } => self.declined = true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The services' names, public events and read models.

/// The shop's name on the bus.
pub fn shop() -> ServiceName {
    ServiceName::new("shop").expect("a valid service name")
}

/// Billing's name on the bus.
pub fn billing() -> ServiceName {
    ServiceName::new("billing").expect("a valid service name")
}

/// What the shop (named `service` on the bus) publishes: the checkout saga's payment and refund
/// requests.
pub fn shop_public_events(service: ServiceName) -> PublicEvents {
    PublicEvents::new(service)
        .publish(
            "checkout",
            ["checkout.payment_requested", "checkout.refund_requested"],
        )
        .expect("valid routes")
}

/// What billing (named `service` on the bus) publishes: charges, refunds, and declined payments.
pub fn billing_public_events(service: ServiceName) -> PublicEvents {
    PublicEvents::new(service)
        .publish("wallet", ["wallet.charged", "wallet.refunded"])
        .and_then(|p| p.publish("billing", ["billing.declined"]))
        .expect("valid routes")
}

/// The shop's events its read model shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum ShopViewEvent {
    /// `order.placed`
    #[event(name = "order.placed")]
    Placed(OrderDetails),
    /// `order.completed`
    #[event(name = "order.completed")]
    Completed,
    /// `order.cancelled`
    #[event(name = "order.cancelled")]
    Cancelled {
        /// Why.
        reason: String,
    },
    /// `stock.reserved`
    #[event(name = "stock.reserved")]
    Reserved {
        /// The order.
        order: String,
        /// How many.
        qty: u32,
    },
    /// `stock.released`
    #[event(name = "stock.released")]
    Released {
        /// The order.
        order: String,
        /// How many.
        qty: u32,
    },
}

/// The shop's read model: each order's status, and units reserved per product.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShopView {
    /// Order id → "placed", "completed" or "cancelled: {reason}".
    pub orders: BTreeMap<String, String>,
    /// Product → units reserved.
    pub reserved: BTreeMap<String, u32>,
}

impl Projection for ShopView {
    const NAME: &'static str = "shop-view";
    type Event = ShopViewEvent;

    fn apply(&mut self, event: &Envelope<ShopViewEvent>) -> Result<(), BoxError> {
        let id = event.stream_id.aggregate_id().to_owned();
        match &event.event {
            ShopViewEvent::Placed(_) => {
                self.orders.insert(id, "placed".into());
            }
            ShopViewEvent::Completed => {
                self.orders.insert(id, "completed".into());
            }
            ShopViewEvent::Cancelled { reason } => {
                self.orders.insert(id, format!("cancelled: {reason}"));
            }
            ShopViewEvent::Reserved { qty, .. } => *self.reserved.entry(id).or_default() += qty,
            ShopViewEvent::Released { qty, .. } => *self.reserved.entry(id).or_default() -= qty,
        }
        Ok(())
    }
}

/// Billing's read model: each wallet's balance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BillingView {
    /// Wallet → balance in cents.
    pub balances: BTreeMap<String, u64>,
    /// Wallet events seen, per (wallet, type): each must be there once per order.
    pub seen: BTreeMap<(String, String), u32>,
}

impl Projection for BillingView {
    const NAME: &'static str = "billing-view";
    type Event = WalletEvent;

    fn apply(&mut self, event: &Envelope<WalletEvent>) -> Result<(), BoxError> {
        let wallet = event.stream_id.aggregate_id().to_owned();
        let balance = self.balances.entry(wallet.clone()).or_default();
        match &event.event {
            WalletEvent::Deposited { amount } | WalletEvent::Refunded { amount, .. } => {
                *balance += amount;
            }
            WalletEvent::Charged { amount, .. } => *balance -= amount,
        }
        *self
            .seen
            .entry((wallet, event.event.event_type().to_owned()))
            .or_default() += 1;
        Ok(())
    }
}
