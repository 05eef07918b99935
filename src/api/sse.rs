//! Server-Sent Events of the watch streams, written straight into the response body: each event
//! as poem formats it (`poem::web::sse::Event`), and the heartbeat comment from one timer shared by
//! every stream. poem's own `SSE` response gives each stream an interval timer of its own and
//! copies the events through a 4 KiB read buffer per stream: with thousands of idle streams open
//! both add up, and an idle stream should cost only its connection.

use super::types::JobChange;
use bytes::Bytes;
use futures::{Stream, StreamExt, stream::BoxStream};
use poem::{Body, IntoResponse, Response};
use poem_openapi::{
    payload::{EventStream, Payload},
    registry::{MetaSchemaRef, Registry},
};
use std::{
    pin::Pin,
    sync::{Arc, Once, Weak},
    task::{Context, Poll},
    time::Duration,
};
use tokio::sync::{Notify, futures::OwnedNotified};

/// The comment line a heartbeat writes; clients ignore it, proxies see traffic.
const COMMENT: &[u8] = b":\n\n";

/// One timer that makes every open stream send a heartbeat comment each `period`. The timer
/// starts with the first stream and stops once the last handle is gone.
#[derive(Clone)]
pub struct Heartbeat(Arc<Shared>);

struct Shared {
    period: Duration,
    beat: Arc<Notify>,
    started: Once,
}

impl Heartbeat {
    pub fn every(period: Duration) -> Self {
        Self(Arc::new(Shared { period, beat: Arc::new(Notify::new()), started: Once::new() }))
    }

    /// The next beat of the timer, for a new stream (the timer starts now if it has not).
    fn next_beat(&self) -> OwnedNotified {
        self.0.started.call_once(|| {
            let (shared, period) = (Arc::downgrade(&self.0), self.0.period);
            tokio::spawn(beat_until_unused(shared, tokio::time::Instant::now() + period, period));
        });
        self.0.beat.clone().notified_owned()
    }
}

async fn beat_until_unused(shared: Weak<Shared>, first: tokio::time::Instant, period: Duration) {
    let mut timer = tokio::time::interval_at(first, period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        shared.beat.notify_waiters();
    }
}

/// An SSE response body: the events of `S`, already formatted, and a heartbeat comment on every
/// beat of the shared timer. It ends when `S` ends.
pub struct EventBody<S> {
    events: S,
    heartbeat: Heartbeat,
    /// Registered from its creation, so no beat is missed between two polls.
    beat: Pin<Box<OwnedNotified>>,
}

impl<S> EventBody<S> {
    pub fn new(events: S, heartbeat: Heartbeat) -> Self {
        let beat = Box::pin(heartbeat.next_beat());
        Self { events, heartbeat, beat }
    }
}

impl<S: Stream<Item = Bytes> + Unpin> Stream for EventBody<S> {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(event) = self.events.poll_next_unpin(cx) {
            return Poll::Ready(event.map(Ok));
        }
        if self.beat.as_mut().poll(cx).is_ready() {
            let next = self.heartbeat.next_beat();
            self.beat.set(next);
            return Poll::Ready(Some(Ok(Bytes::from_static(COMMENT))));
        }
        Poll::Pending
    }
}

/// The answer of a watch: a job's changes as Server-Sent Events. In the OpenAPI document it is
/// what poem-openapi's `EventStream` of [`JobChange`] is.
pub struct WatchEvents(Body);

impl WatchEvents {
    pub fn new<S: Stream<Item = Bytes> + Unpin + Send + 'static>(events: S, heartbeat: Heartbeat) -> Self {
        Self(Body::from_bytes_stream(EventBody::new(events, heartbeat)))
    }
}

/// The document's view of the payload.
type Documented = EventStream<BoxStream<'static, JobChange>>;

impl Payload for WatchEvents {
    const CONTENT_TYPE: &'static str = Documented::CONTENT_TYPE;

    fn schema_ref() -> MetaSchemaRef {
        Documented::schema_ref()
    }

    fn register(registry: &mut Registry) {
        Documented::register(registry);
    }
}

/// With the headers poem's `SSE` response sends.
impl IntoResponse for WatchEvents {
    fn into_response(self) -> Response {
        Response::builder()
            .content_type(Self::CONTENT_TYPE)
            .header("X-Accel-Buffering", "no")
            .header("Cache-Control", "no-cache")
            .body(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, channel::mpsc};

    const PERIOD: Duration = Duration::from_secs(15);

    /// The next item of a body, if it has one ready without waiting.
    fn ready<S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin>(body: &mut S) -> Option<Option<Bytes>> {
        body.next().now_or_never().map(|item| item.map(|bytes| bytes.unwrap()))
    }

    /// Let the timer task run up to `by` from now (time is paused: nothing waits for real).
    async fn advance(by: Duration) {
        tokio::time::advance(by).await;
        tokio::task::yield_now().await;
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_beats_every_open_stream_and_events_pass_through() {
        let heartbeat = Heartbeat::every(PERIOD);
        let (send_a, events_a) = mpsc::unbounded::<Bytes>();
        let (_send_b, events_b) = mpsc::unbounded::<Bytes>();
        let (mut a, mut b) = (EventBody::new(events_a, heartbeat.clone()), EventBody::new(events_b, heartbeat.clone()));
        assert_eq!(ready(&mut a), None, "nothing to send before the first beat");

        advance(PERIOD).await;
        assert_eq!(ready(&mut a), Some(Some(Bytes::from_static(b":\n\n"))));
        assert_eq!(ready(&mut b), Some(Some(Bytes::from_static(b":\n\n"))));
        assert_eq!(ready(&mut a), None, "one comment per beat");

        // A stream opened between two beats gets the next one; the others get theirs too.
        let (_send_c, events_c) = mpsc::unbounded::<Bytes>();
        let mut c = EventBody::new(events_c, heartbeat.clone());
        advance(PERIOD).await;
        for body in [&mut a, &mut b, &mut c] {
            assert_eq!(ready(body), Some(Some(Bytes::from_static(b":\n\n"))));
        }

        send_a.unbounded_send(Bytes::from_static(b"event: job\ndata: {}\n\n")).unwrap();
        assert_eq!(ready(&mut a), Some(Some(Bytes::from_static(b"event: job\ndata: {}\n\n"))));
        drop(send_a);
        assert_eq!(ready(&mut a), Some(None), "the body ends with its events");
    }

    #[tokio::test(start_paused = true)]
    async fn a_beat_between_two_polls_is_not_lost() {
        let heartbeat = Heartbeat::every(PERIOD);
        let mut body = EventBody::new(futures::stream::pending::<Bytes>(), heartbeat);
        // Never polled before the beat: registered when created all the same.
        advance(PERIOD).await;
        assert_eq!(ready(&mut body), Some(Some(Bytes::from_static(b":\n\n"))));
        advance(PERIOD).await;
        assert_eq!(ready(&mut body), Some(Some(Bytes::from_static(b":\n\n"))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_stops_with_its_last_handle() {
        let heartbeat = Heartbeat::every(PERIOD);
        let shared = Arc::downgrade(&heartbeat.0);
        let body = EventBody::new(futures::stream::pending::<Bytes>(), heartbeat);
        drop(body);
        advance(PERIOD).await;
        assert!(shared.upgrade().is_none(), "nothing holds the timer once its streams and owner are gone");
    }
}
