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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_in_process_services_run_the_checkout_to_its_compensation() {
    use checkout::{
        Billing, BillingView, Checkout, Order, ShopView, Stock, Wallet, WalletCommand,
        billing_public_events, shop_public_events,
    };
    use factum::Repository;
    use factum::subscription::{Projector, StartFrom, Subscription};
    use factum_testkit::InProcessServices;

    let services = InProcessServices::new()
        .service("shop", shop_public_events)
        .service("billing", billing_public_events)
        .saga::<Checkout>("shop", |runtime, store| {
            runtime
                .repository(Repository::<Stock, _>::new(store.clone()))
                .repository(Repository::<Order, _>::new(store.clone()))
                .repository(Repository::<Shipment, _>::new(store.clone()))
        })
        .saga::<Billing>("billing", |runtime, store| {
            runtime.repository(Repository::<Wallet, _>::new(store.clone()))
        });
    let (shop, billing) = (services.store("shop"), services.store("billing"));
    let (shop_view, billing_view) = services
        .run(async {
            Repository::<Wallet, _>::new(billing.clone())
                .execute(WalletCommand::Deposit {
                    wallet: "ada".into(),
                    amount: 100,
                })
                .await
                .expect("deposit");
            Repository::<Order, _>::new(shop.clone())
                .execute(OrderCommand::Place {
                    order: "o-1".into(),
                    details: details(),
                })
                .await
                .expect("place");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let mut shop_view = Projector::new(ShopView::default());
                Subscription::for_projection::<ShopView>(shop.clone())
                    .start_from(StartFrom::Beginning)
                    .catch_up(&mut shop_view)
                    .await
                    .expect("shop view");
                let mut billing_view = Projector::new(BillingView::default());
                Subscription::for_projection::<BillingView>(billing.clone())
                    .start_from(StartFrom::Beginning)
                    .catch_up(&mut billing_view)
                    .await
                    .expect("billing view");
                let refunded = billing_view
                    .get()
                    .seen
                    .contains_key(&("ada".to_owned(), "wallet.refunded".to_owned()));
                if refunded {
                    break (shop_view.into_inner(), billing_view.into_inner());
                }
                assert!(tokio::time::Instant::now() < deadline, "no refund in time");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    assert!(shop_view.orders["o-1"].starts_with("cancelled: shipping refused"));
    assert_eq!(shop_view.reserved["lamp"], 0);
    assert_eq!(billing_view.balances["ada"], 100);
    assert_eq!(
        billing_view.seen[&("ada".to_owned(), "wallet.charged".to_owned())],
        1
    );
}
