//! The saga fixture on the checkout example's saga: events, rejections and time.

use std::time::Duration;

use checkout::{
    Checkout, CheckoutChange, CheckoutInput, CheckoutStatus, Order, OrderCommand, OrderDetails,
    PAYMENT_TIMEOUT, PaymentRequest, Ship, Shipment, ShipmentError, Stock, StockCommand,
};
use factum::CommandId;
use factum_testkit::{SagaFixture, envelope};

fn details() -> OrderDetails {
    OrderDetails {
        order: "o-1".into(),
        sku: "lamp".into(),
        qty: 2,
        amount: 30,
        wallet: "ada".into(),
        address: "nowhere".into(),
    }
}

fn request() -> PaymentRequest {
    PaymentRequest {
        order: "o-1".into(),
        wallet: "ada".into(),
        amount: 30,
    }
}

#[test]
fn a_placed_order_reserves_stock_and_starts_the_payment_clock() {
    let placed_id = factum::EventId::new();
    let placed = envelope("order-o-1", CheckoutInput::Placed(details())).event_id(placed_id);
    SagaFixture::<Checkout>::new()
        .when(placed)
        .then_changes([CheckoutChange::Started(details())])
        .then_sent::<Stock>([StockCommand::Reserve {
            sku: "lamp".into(),
            order: "o-1".into(),
            qty: 2,
        }])
        .then_scheduled("payment", PAYMENT_TIMEOUT)
        .then_issued(|sent| {
            assert_eq!(sent[0].context.command_id, CommandId::derived(placed_id, 0));
            assert_eq!(sent[0].context.causation_id, Some(placed_id.into()));
        });
}

#[test]
fn shipping_refused_compensates_every_step_done() {
    SagaFixture::<Checkout>::new()
        .given_events("order-o-1", [CheckoutInput::Placed(details())])
        .given_events(
            "stock-lamp",
            [CheckoutInput::Reserved {
                order: "o-1".into(),
            }],
        )
        .given_events(
            "wallet-ada",
            [CheckoutInput::Charged {
                order: "o-1".into(),
            }],
        )
        .when_rejected::<Shipment>(
            Ship {
                order: "o-1".into(),
                address: "nowhere".into(),
            },
            ShipmentError::Undeliverable("nowhere".into()),
        )
        .then_changes([
            CheckoutChange::Compensating {
                reason: "shipping refused: the carrier does not deliver to \"nowhere\"".into(),
            },
            CheckoutChange::RefundRequested(request()),
        ])
        .then_sent::<Stock>([StockCommand::Release {
            sku: "lamp".into(),
            order: "o-1".into(),
        }])
        .then_sent::<Order>([OrderCommand::Cancel {
            order: "o-1".into(),
            reason: "shipping refused: the carrier does not deliver to \"nowhere\"".into(),
        }])
        .then_cancelled("payment")
        .then_state("o-1", |c| {
            assert!(matches!(c.status, CheckoutStatus::Compensated(_)));
        });
}

#[test]
fn the_payment_timeout_fires_only_once_its_deadline_passes() {
    let fixture = SagaFixture::<Checkout>::new()
        .given_events("order-o-1", [CheckoutInput::Placed(details())])
        .given_events(
            "stock-lamp",
            [CheckoutInput::Reserved {
                order: "o-1".into(),
            }],
        );
    assert_eq!(fixture.pending_timeouts("o-1").len(), 1);
    fixture
        .when_time_passes(PAYMENT_TIMEOUT - Duration::from_secs(1))
        .then_changes([])
        .then_nothing_sent()
        .when_time_passes(Duration::from_secs(1))
        .then_changes([CheckoutChange::TimedOut])
        .then_sent::<Stock>([StockCommand::Release {
            sku: "lamp".into(),
            order: "o-1".into(),
        }])
        .then_sent::<Order>([OrderCommand::Cancel {
            order: "o-1".into(),
            reason: "no payment in time".into(),
        }]);
}

#[test]
fn a_payment_in_time_cancels_the_timeout_and_ships() {
    SagaFixture::<Checkout>::new()
        .given_events("order-o-1", [CheckoutInput::Placed(details())])
        .given_events(
            "stock-lamp",
            [CheckoutInput::Reserved {
                order: "o-1".into(),
            }],
        )
        .when_events(
            "wallet-ada",
            [CheckoutInput::Charged {
                order: "o-1".into(),
            }],
        )
        .then_changes([CheckoutChange::Paid])
        .then_cancelled("payment")
        .then_sent::<Shipment>([Ship {
            order: "o-1".into(),
            address: "nowhere".into(),
        }])
        .when_time_passes(PAYMENT_TIMEOUT * 2)
        .then_changes([]);
}

#[test]
#[should_panic(expected = "never sent")]
fn a_rejection_of_a_command_never_sent_is_a_mistake_in_the_test() {
    let _ = SagaFixture::<Checkout>::new().when_rejected::<Shipment>(
        Ship {
            order: "o-1".into(),
            address: "x".into(),
        },
        ShipmentError::Undeliverable("x".into()),
    );
}
