//! A message on the bus, and its wire format (headers and a JSON body), shared by every bus.

use chrono::{DateTime, Utc};

use crate::error::Error;
use crate::event::{EventMetadata, Metadata, RecordedEvent};
use crate::ids::{
    CausationId, CorrelationId, EventId, GlobalPosition, LogPosition, StreamId, StreamVersion,
};

use super::ServiceName;

/// The headers of a factum message. The body is the event's JSON payload, as stored, so a
/// consumer written without factum reads the event from the body and its identity from these.
pub mod headers {
    /// The message id the broker dedupes on: the event id (JetStream's `Nats-Msg-Id`).
    pub const MESSAGE_ID: &str = "Nats-Msg-Id";
    /// The publishing service.
    pub const SERVICE: &str = "Factum-Service";
    /// The stream the event belongs to in the publishing service.
    pub const STREAM: &str = "Factum-Stream";
    /// Its version in that stream.
    pub const STREAM_VERSION: &str = "Factum-Stream-Version";
    /// Its position in the publishing service's log (`commit:global`).
    pub const POSITION: &str = "Factum-Position";
    /// The event's wire name.
    pub const EVENT_TYPE: &str = "Factum-Event-Type";
    /// The payload's schema version.
    pub const SCHEMA_VERSION: &str = "Factum-Schema-Version";
    /// When the publishing service recorded it (RFC 3339).
    pub const RECORDED_AT: &str = "Factum-Recorded-At";
    /// The workflow it belongs to.
    pub const CORRELATION_ID: &str = "Factum-Correlation-Id";
    /// What caused it.
    pub const CAUSATION_ID: &str = "Factum-Causation-Id";
    /// Application metadata, a JSON object (absent when empty).
    pub const METADATA: &str = "Factum-Metadata";
}

/// The subject a service publishes an event on: `{service}.{category}.{event type}` (an event
/// type's dots become further tokens: `orders.order.order.placed`).
///
/// Fails when the category or the event type holds a character a subject cannot (whitespace,
/// `*`, `>`) or an empty token.
pub fn subject(service: &ServiceName, category: &str, event_type: &str) -> Result<String, Error> {
    let subject = format!("{service}.{category}.{event_type}");
    let valid = subject
        .split('.')
        .all(|t| !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>'));
    if valid {
        Ok(subject)
    } else {
        Err(Error::InvalidArgument(format!(
            "category {category:?} and event type {event_type:?} do not make a valid subject ({subject:?}): a subject's dot-separated tokens must be non-empty, without whitespace, `*` or `>`"
        )))
    }
}

/// An event on the bus: what a service published, as the receiving service sees it.
///
/// It carries the event as the publishing service stored it (or as its relay mapped it to a
/// public contract type), so the receiving side decodes it with
/// [`RecordedEvent::decode`] into its own copy of the contract type, and handles it with the
/// same handlers as local events. `event.position` is the position in the *publisher's* log,
/// informative only; the event id is the identity.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BusMessage {
    /// The subject it is published on.
    pub subject: String,
    /// The publishing service.
    pub service: ServiceName,
    /// The event.
    pub event: RecordedEvent,
}

/// Why a delivered message is not a factum message the consumer can read: a header missing or
/// malformed, or a body that is not JSON. The consumer parks such a message with this error.
#[derive(Debug, thiserror::Error)]
#[error(
    "message on subject {subject:?} (id {message_id:?}) is not a readable factum message: {problem}"
)]
pub struct MessageDecodeError {
    /// The subject it arrived on.
    pub subject: String,
    /// Its message id, if it had one.
    pub message_id: Option<String>,
    /// What is wrong with it.
    pub problem: String,
}

impl BusMessage {
    /// A message for `event`, published by `service` on `subject`.
    pub fn new(subject: impl Into<String>, service: ServiceName, event: RecordedEvent) -> Self {
        Self {
            subject: subject.into(),
            service,
            event,
        }
    }

    /// The message id: the event id.
    pub fn message_id(&self) -> String {
        self.event.event_id.to_string()
    }

    /// The headers of the wire format (see [`headers`]).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let e = &self.event;
        let mut out = vec![
            (headers::MESSAGE_ID, e.event_id.to_string()),
            (headers::SERVICE, self.service.to_string()),
            (headers::STREAM, e.stream_id.to_string()),
            (headers::STREAM_VERSION, e.stream_version.get().to_string()),
            (
                headers::POSITION,
                format!("{}:{}", e.position.commit, e.position.global.get()),
            ),
            (headers::EVENT_TYPE, e.event_type.clone()),
            (headers::SCHEMA_VERSION, e.schema_version.to_string()),
            (
                headers::RECORDED_AT,
                e.recorded_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
        ];
        if let Some(correlation) = e.metadata.correlation_id {
            out.push((headers::CORRELATION_ID, correlation.to_string()));
        }
        if let Some(causation) = e.metadata.causation_id {
            out.push((headers::CAUSATION_ID, causation.to_string()));
        }
        if !e.metadata.user.is_empty() {
            let json = serde_json::to_string(e.metadata.user.as_map())
                .unwrap_or_else(|_| String::from("{}"));
            out.push((headers::METADATA, json));
        }
        out
    }

    /// The body of the wire format: the event's JSON payload.
    pub fn body(&self) -> &[u8] {
        self.event.payload.get().as_bytes()
    }

    /// Reads a message back from its subject, headers and body.
    pub fn decode(
        subject: &str,
        header_list: &[(String, String)],
        body: &[u8],
    ) -> Result<Self, MessageDecodeError> {
        let get = |name: &str| {
            header_list
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let fail = |problem: String| MessageDecodeError {
            subject: subject.to_owned(),
            message_id: get(headers::MESSAGE_ID).map(str::to_owned),
            problem,
        };
        let required =
            |name: &str| get(name).ok_or_else(|| fail(format!("header {name} is missing")));
        fn parse<T: std::str::FromStr>(
            name: &str,
            value: &str,
            fail: &dyn Fn(String) -> MessageDecodeError,
        ) -> Result<T, MessageDecodeError>
        where
            T::Err: std::fmt::Display,
        {
            value
                .parse()
                .map_err(|e| fail(format!("header {name} ({value:?}) is malformed: {e}")))
        }
        let event_id: EventId = parse(headers::MESSAGE_ID, required(headers::MESSAGE_ID)?, &fail)?;
        let service: ServiceName = parse(headers::SERVICE, required(headers::SERVICE)?, &fail)?;
        let stream_id: StreamId = parse(headers::STREAM, required(headers::STREAM)?, &fail)?;
        let version: u64 = parse(
            headers::STREAM_VERSION,
            required(headers::STREAM_VERSION)?,
            &fail,
        )?;
        let position = {
            let value = required(headers::POSITION)?;
            let (commit, global) = value.split_once(':').ok_or_else(|| {
                fail(format!(
                    "header {} ({value:?}) is malformed",
                    headers::POSITION
                ))
            })?;
            LogPosition::new(
                parse(headers::POSITION, commit, &fail)?,
                GlobalPosition::new(parse(headers::POSITION, global, &fail)?),
            )
        };
        let event_type = required(headers::EVENT_TYPE)?.to_owned();
        let schema_version: u32 = parse(
            headers::SCHEMA_VERSION,
            required(headers::SCHEMA_VERSION)?,
            &fail,
        )?;
        let recorded_at: DateTime<Utc> = {
            let value = required(headers::RECORDED_AT)?;
            DateTime::parse_from_rfc3339(value)
                .map_err(|e| {
                    fail(format!(
                        "header {} ({value:?}) is malformed: {e}",
                        headers::RECORDED_AT
                    ))
                })?
                .with_timezone(&Utc)
        };
        let correlation_id: Option<CorrelationId> = get(headers::CORRELATION_ID)
            .map(|v| parse(headers::CORRELATION_ID, v, &fail))
            .transpose()?;
        let causation_id: Option<CausationId> = get(headers::CAUSATION_ID)
            .map(|v| parse(headers::CAUSATION_ID, v, &fail))
            .transpose()?;
        let user = match get(headers::METADATA) {
            None => Metadata::new(),
            Some(json) => {
                let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
                    .map_err(|e| {
                        fail(format!(
                            "header {} is not a JSON object: {e}",
                            headers::METADATA
                        ))
                    })?;
                Metadata::from(map)
            }
        };
        let text =
            std::str::from_utf8(body).map_err(|e| fail(format!("body is not UTF-8: {e}")))?;
        let payload = serde_json::value::RawValue::from_string(text.to_owned())
            .map_err(|e| fail(format!("body is not JSON: {e}")))?;
        Ok(Self {
            subject: subject.to_owned(),
            service,
            event: RecordedEvent {
                event_id,
                stream_id,
                stream_version: StreamVersion::new(version),
                position,
                event_type,
                schema_version,
                payload,
                metadata: EventMetadata {
                    correlation_id,
                    causation_id,
                    user,
                },
                recorded_at,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> BusMessage {
        let mut user = Metadata::new();
        user.insert("tenant", "acme").expect("a string serialises");
        BusMessage::new(
            "orders.order.order.placed",
            ServiceName::new("orders").expect("valid"),
            RecordedEvent {
                event_id: EventId::new(),
                stream_id: StreamId::new("order-7").expect("valid"),
                stream_version: StreamVersion::new(3),
                position: LogPosition::new(812, GlobalPosition::new(41)),
                event_type: "order.placed".into(),
                schema_version: 2,
                payload: serde_json::value::RawValue::from_string(r#"{"total":30}"#.into())
                    .expect("json"),
                metadata: EventMetadata {
                    correlation_id: Some(CorrelationId::new()),
                    causation_id: Some(CausationId::from(EventId::new())),
                    user,
                },
                recorded_at: Utc::now(),
            },
        )
    }

    fn owned(headers: Vec<(&'static str, String)>) -> Vec<(String, String)> {
        headers
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect()
    }

    #[test]
    fn a_message_reads_back_what_was_written() {
        let sent = message();
        let got = BusMessage::decode(&sent.subject, &owned(sent.headers()), sent.body())
            .expect("decodes");
        let (a, b) = (&sent.event, &got.event);
        assert_eq!(got.service, sent.service);
        assert_eq!(a.event_id, b.event_id);
        assert_eq!(a.stream_id, b.stream_id);
        assert_eq!(a.stream_version, b.stream_version);
        assert_eq!(a.position, b.position);
        assert_eq!(a.event_type, b.event_type);
        assert_eq!(a.schema_version, b.schema_version);
        assert_eq!(a.payload.get(), b.payload.get());
        assert_eq!(a.metadata, b.metadata);
        assert_eq!(
            a.recorded_at.timestamp_micros(),
            b.recorded_at.timestamp_micros()
        );
    }

    #[test]
    fn a_missing_or_malformed_header_is_named() {
        let sent = message();
        let mut headers = owned(sent.headers());
        headers.retain(|(n, _)| n != headers::EVENT_TYPE);
        let err = BusMessage::decode(&sent.subject, &headers, sent.body()).unwrap_err();
        assert!(
            err.problem.contains("Factum-Event-Type is missing"),
            "{err}"
        );
        assert_eq!(err.message_id, Some(sent.message_id()));

        let mut headers = owned(sent.headers());
        for (n, v) in &mut headers {
            if n == headers::STREAM_VERSION {
                *v = "three".into();
            }
        }
        let err = BusMessage::decode(&sent.subject, &headers, sent.body()).unwrap_err();
        assert!(err.problem.contains("Factum-Stream-Version"), "{err}");

        let err =
            BusMessage::decode(&sent.subject, &owned(sent.headers()), b"not json").unwrap_err();
        assert!(err.problem.contains("body is not JSON"), "{err}");
    }

    #[test]
    fn subjects_are_service_category_and_event_type() {
        let orders = ServiceName::new("orders").expect("valid");
        assert_eq!(
            subject(&orders, "order", "order.placed").expect("valid"),
            "orders.order.order.placed"
        );
        assert!(subject(&orders, "order", "order placed").is_err());
        assert!(subject(&orders, "", "order.placed").is_err());
        assert!(subject(&orders, "order", "order.>").is_err());
    }
}
