//! Internals shared by the fixtures: running the in-memory store's futures, and failure messages.

use std::fmt::{Debug, Write as _};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

/// Runs a future to completion on the current thread.
///
/// The fixtures run on [`factum::InMemoryStore`], whose futures never wait on I/O or timers, so
/// no async runtime is needed — and not using one means the fixtures also work inside
/// `#[tokio::test]`, where starting a nested runtime would panic.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }

    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        match future.as_mut().poll(&mut context) {
            Poll::Ready(output) => return output,
            Poll::Pending => thread::park(),
        }
    }
}

/// `value`'s pretty `Debug`, every line indented by `indent` spaces.
pub(crate) fn pretty<T: Debug + ?Sized>(value: &T, indent: usize) -> String {
    let pad = " ".repeat(indent);
    format!("{value:#?}")
        .lines()
        .map(|line| format!("{pad}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A numbered one-line-per-item listing.
pub(crate) fn listing<T: Debug>(items: &[T]) -> String {
    if items.is_empty() {
        return "  (none)".to_owned();
    }
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = write!(out, "  [{i}] {item:?}");
    }
    out
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `None` when `expected == actual`; otherwise a message naming the first differing item (its
/// index), showing both sides pretty-printed, then both whole sequences.
pub(crate) fn sequence_mismatch<T: Debug + PartialEq>(
    what: &str,
    expected: &[T],
    actual: &[T],
) -> Option<String> {
    let index = expected
        .iter()
        .zip(actual)
        .position(|(e, a)| e != a)
        .or_else(|| (expected.len() != actual.len()).then(|| expected.len().min(actual.len())))?;
    let side = |items: &[T]| match items.get(index) {
        Some(item) => pretty(item, 4),
        None => format!("    (nothing: there {})", there_are(items.len(), what)),
    };
    Some(format!(
        "the {what}s differ, first at {what} #{index}:\n  expected[{index}]:\n{}\n  actual[{index}]:\n{}\n\
         expected {}:\n{}\nactual {}:\n{}",
        side(expected),
        side(actual),
        plural(expected.len(), what),
        listing(expected),
        plural(actual.len(), what),
        listing(actual),
    ))
}

fn there_are(n: usize, what: &str) -> String {
    match n {
        0 => format!("are no {what}s"),
        1 => format!("is only 1 {what}"),
        n => format!("are only {n} {what}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_sequences_have_no_mismatch() {
        assert_eq!(sequence_mismatch("event", &[1, 2], &[1, 2]), None);
    }

    #[test]
    fn a_mismatch_names_the_first_differing_index_and_both_sides() {
        let message = sequence_mismatch("event", &[1, 2, 3], &[1, 5, 4]).expect("differs");
        assert!(
            message.starts_with("the events differ, first at event #1:\n  expected[1]:\n    2\n  actual[1]:\n    5\n"),
            "{message}"
        );
        assert!(
            message.contains("expected 3 events:\n  [0] 1\n  [1] 2\n  [2] 3\n"),
            "{message}"
        );
    }

    #[test]
    fn a_missing_item_is_named_as_such() {
        let message = sequence_mismatch("command", &[1], &[1, 2]).expect("differs");
        assert!(
            message.starts_with(
                "the commands differ, first at command #1:\n  expected[1]:\n    (nothing: there is only 1 command)\n  actual[1]:\n    2\n"
            ),
            "{message}"
        );
    }

    #[test]
    fn block_on_completes_a_future_that_wakes_itself() {
        let mut polled = false;
        let value = block_on(std::future::poll_fn(|cx| {
            if polled {
                Poll::Ready(7)
            } else {
                polled = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }));
        assert_eq!(value, 7);
    }
}
