//! What every accepted connection is held to, below HTTP: the listener's connection
//! limit, the header-read and idle timeouts, and the check for a request head that
//! carries both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper's own HTTP/1 header timeout starts when the previous response ends, so it
//! cannot tell a client that is slow to send its head from a keep-alive connection
//! waiting for its next request, and HTTP/2 has none. Instead [`Guarded`] wraps the
//! connection's socket and watches what hyper reads through it, while the connection's
//! [`ConnState`] (shared with the request service) counts the requests in flight:
//!
//! - from accept until the first request is dispatched, the header-read timeout runs;
//! - while a request is in flight (its response body not yet sent), nothing runs:
//!   request and response bodies are the business of request timeouts;
//! - when the last response ends, the idle timeout runs; on HTTP/1.1 the first byte
//!   of the next request replaces it with the header-read timeout. On HTTP/2, bytes
//!   while no stream is open (PING, SETTINGS) do not keep the connection alive.
//! - after a successful `CONNECT` (a tunnel) nothing runs.
//!
//! A timeout fails hyper's read, so hyper closes the connection. The timer is one
//! boxed `Sleep` per connection, re-armed in place; the request path only touches a
//! few atomics per request (the counts, and a wake of the connection's task when its
//! last request ends, since hyper reads again only when bytes arrive).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::limits::ListenerCounters;

// === impl ConnectionLimit ===

/// At most `max` connections of one listener at once, counted on its `open` gauge.
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    max: Option<i64>,
    open: Gauge,
}

/// One connection's place under its listener's limit; freed on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    open: Gauge,
}

impl ConnectionLimit {
    /// A limit of `max` connections (none: unlimited), counted on `open`.
    pub fn new(max: Option<usize>, open: Gauge) -> Self {
        Self {
            max: max.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
            open,
        }
    }

    /// A place for one more connection, or `None` when the listener is full.
    pub fn try_acquire(&self) -> Option<ConnectionPermit> {
        let permit = || ConnectionPermit {
            open: self.open.clone(),
        };
        match self.max {
            None => {
                self.open.inc();
                Some(permit())
            }
            Some(max) => self
                .open
                .inner()
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                    (open < max).then_some(open + 1)
                })
                .ok()
                .map(|_| permit()),
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

// === impl ConnState ===

const HTTP2: u8 = 1;
const UPGRADED: u8 = 2;
const CL_TE: u8 = 4;
const RELEASE: u8 = 8;
const BODY: u8 = 16;

/// What the request service tells the connection's [`Guarded`] socket: requests in
/// flight, HTTP/2 or not, tunnelled or not, and whether the last head read was
/// smuggling-shaped.
#[derive(Debug, Default)]
pub struct ConnState {
    in_flight: AtomicU32,
    /// Requests dispatched so far (wrapping): a request may start and end between
    /// two reads, and the socket must still see that the connection went idle.
    dispatched: AtomicU32,
    flags: AtomicU8,
    /// The connection's task, woken when its last request ends: hyper does not read
    /// again until bytes arrive, and the idle timeout must start then.
    reader: AtomicWaker,
}

/// One request in flight on a connection, until its response body ends (or the
/// request is dropped).
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl ConnState {
    /// Counts a request dispatched on this connection.
    pub fn start(self: &Arc<Self>, version: http::Version) -> InFlight {
        if version == http::Version::HTTP_2 {
            self.flags.fetch_or(HTTP2, Ordering::Relaxed);
        }
        self.dispatched.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// The connection became a tunnel: it no longer carries HTTP.
    pub fn upgraded(&self) {
        self.flags.fetch_or(UPGRADED, Ordering::Release);
    }

    /// Whether the request head read last carried both `Content-Length` and
    /// `Transfer-Encoding` (hyper keeps only the latter in the headers it hands on).
    pub fn take_cl_te(&self) -> bool {
        self.flags.fetch_and(!CL_TE, Ordering::AcqRel) & CL_TE != 0
    }

    /// Whether the request just dispatched has a body. hyper may still be reading (or
    /// discarding) it after the response ended, so the connection's HTTP/1 state is
    /// not released before a bodiless request has been answered.
    pub fn request_body(&self, has_body: bool) {
        let flags = self.flags();
        if has_body && flags & BODY == 0 {
            self.flags.fetch_or(BODY, Ordering::AcqRel);
        } else if !has_body && flags & BODY != 0 {
            self.flags.fetch_and(!BODY, Ordering::AcqRel);
        }
    }

    /// Whether the connection has been idle long enough that its HTTP/1 state should be
    /// released (see [`Guarded::release_after`]); until [`Self::released`], the socket
    /// is not shut down when hyper closes the connection.
    pub fn wants_release(&self) -> bool {
        self.flags() & RELEASE != 0
    }

    /// The socket is back in the serving loop: the next connection shuts it down again.
    pub fn released(&self) {
        self.flags.fetch_and(!RELEASE, Ordering::AcqRel);
    }

    fn dispatched(&self) -> u32 {
        self.dispatched.load(Ordering::Acquire)
    }

    /// Requests in flight on the connection now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn flags(&self) -> u8 {
        self.flags.load(Ordering::Acquire)
    }
}

impl InFlight {
    /// The request's response turned the connection into a tunnel.
    pub fn upgraded(&self) {
        self.0.upgraded();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request [`InFlight`] until it ends.
    pub struct Tracked<B> {
        #[pin]
        body: B,
        in_flight: InFlight,
    }
}

impl<B> Tracked<B> {
    /// `body`, holding `in_flight` for as long as it lives.
    pub fn new(body: B, in_flight: InFlight) -> Self {
        Self { body, in_flight }
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// === impl Guarded ===

/// The two timeouts of [`Guarded`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Timeouts {
    /// From accept, or from a keep-alive request's first byte, to a dispatched request.
    pub header: Option<Duration>,
    /// With no request in flight.
    pub idle: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading a request head (or, before the first request, anything).
    Head,
    /// No request in flight and no byte of the next one yet.
    Idle,
    /// A request in flight.
    Busy,
    /// A timeout fired: every read fails.
    TimedOut,
}

/// A connection's socket under the header-read and idle timeouts (see the module doc).
#[derive(Debug)]
pub struct Guarded<I> {
    io: I,
    /// Bytes already read (by the serving loop, before hyper), read back first.
    prefix: Bytes,
    conn: Arc<ConnState>,
    counters: Arc<ListenerCounters>,
    timeouts: Timeouts,
    phase: Phase,
    /// When the current phase's timeout closes the connection.
    deadline: Option<Instant>,
    /// How long an idle connection keeps its HTTP/1 state, and when this one's ends.
    release: Option<Duration>,
    release_at: Option<Instant>,
    /// The last write found the socket full: hyper still holds bytes to send.
    write_blocked: bool,
    timer: Option<Pin<Box<Sleep>>>,
    /// [`ConnState::dispatched`] when last looked at.
    seen: u32,
    scan: HeadScan,
}

impl<I> Guarded<I> {
    /// Wraps `io`; the header-read timeout starts now.
    pub fn new(
        io: I,
        conn: Arc<ConnState>,
        timeouts: Timeouts,
        counters: Arc<ListenerCounters>,
    ) -> Self {
        let mut guarded = Self {
            io,
            prefix: Bytes::new(),
            conn,
            counters,
            timeouts,
            phase: Phase::Head,
            deadline: None,
            release: None,
            release_at: None,
            write_blocked: false,
            timer: None,
            seen: 0,
            scan: HeadScan::default(),
        };
        guarded.arm(timeouts.header);
        guarded
    }

    /// `bytes` are read back before anything else from the socket: the first bytes of a
    /// request that the serving loop read while hyper's state was released.
    pub fn replay(&mut self, bytes: Bytes) {
        self.prefix = bytes;
    }

    /// Once idle this long with no byte of a next request, the connection asks (in its
    /// [`ConnState`]) for its HTTP/1 state to be released (none: never).
    pub fn release_after(&mut self, after: Option<Duration>) {
        self.release = after;
    }

    /// Starts the phase's `timeout`; in the idle phase, also the release delay.
    fn arm(&mut self, timeout: Option<Duration>) {
        let now = Instant::now();
        self.deadline = timeout.map(|t| now + t);
        self.release_at = match self.phase {
            Phase::Idle => self.release.map(|r| now + r),
            _ => None,
        };
        self.rearm();
    }

    /// Sets the timer to the earliest of the deadline and the release.
    fn rearm(&mut self) {
        let at = match (self.deadline, self.release_at) {
            (Some(d), Some(r)) => Some(d.min(r)),
            (d, r) => d.or(r),
        };
        if let Some(at) = at {
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
    }

    /// The timer fired while a read waited: the connection times out, or (the release
    /// delay passed first) asks for its HTTP/1 state to be released and waits on.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.deadline.is_none() && self.release_at.is_none() {
                return Poll::Pending;
            }
            let Some(timer) = &mut self.timer else {
                return Poll::Pending;
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match self.release_at.take() {
                // Not while hyper may still read a request body or write a response.
                Some(_) if self.conn.flags() & BODY != 0 => self.rearm(),
                Some(_) if self.write_blocked => {
                    self.release_at = self.release.map(|r| Instant::now() + r);
                    self.rearm();
                }
                Some(_) => {
                    self.conn.flags.fetch_or(RELEASE, Ordering::AcqRel);
                    self.rearm();
                }
                None => return Poll::Ready(self.time_out()),
            }
        }
    }

    fn time_out(&mut self) -> io::Error {
        let (counter, what) = if self.phase == Phase::Idle {
            (&self.counters.idle_timeouts, "idle timeout")
        } else {
            (&self.counters.header_timeouts, "header-read timeout")
        };
        counter.inc();
        tracing::debug!(
            listener = self.counters.listener,
            what,
            "closing connection"
        );
        self.phase = Phase::TimedOut;
        self.deadline = None;
        self.release_at = None;
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flags = this.conn.flags();
        if flags & UPGRADED != 0 {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        this.conn.reader.register(cx.waker());
        if this.phase == Phase::TimedOut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection timed out",
            )));
        }
        if !this.prefix.is_empty() {
            // Read (and looked at) by the serving loop already.
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            if this.prefix.is_empty() {
                // An empty slice still holds its buffer (hyper's, after a release).
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let dispatched = this.conn.dispatched();
        if this.conn.in_flight() > 0 {
            this.phase = Phase::Busy;
            this.seen = dispatched;
            this.deadline = None;
            this.release_at = None;
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if this.phase == Phase::Busy || this.seen != dispatched {
            this.seen = dispatched;
            // The last response has ended: the connection waits for its next request.
            this.phase = Phase::Idle;
            this.scan = HeadScan::default();
            this.arm(this.timeouts.idle);
        }
        if this.deadline.is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(Err(this.time_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() && flags & HTTP2 == 0 {
                    if this.phase == Phase::Idle {
                        this.phase = Phase::Head;
                        this.arm(this.timeouts.header);
                    }
                    if this.scan.feed(read) {
                        this.conn.flags.fetch_or(CL_TE, Ordering::AcqRel);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_timer(cx).map(Err),
            failed => failed,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.write_blocked = polled.is_pending();
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.write_blocked = polled.is_pending();
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper flushes the socket once its own buffer is empty: a wrapper's (TLS) may not be.
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.write_blocked = polled.is_pending();
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.wants_release() {
            // hyper closes its idle HTTP/1 state and hands the socket back: it stays open.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

// === impl HeadScan ===

const CONTENT_LENGTH: &[u8] = b"content-length:";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding:";
const BOTH: u8 = 0b11;

/// Finds `Content-Length` and `Transfer-Encoding` field lines in an HTTP/1.1 request
/// head as its bytes go by, up to the blank line that ends it (the body is never
/// looked at). A head read together with the end of the previous request's body
/// (pipelining) is not looked at either; hyper still closes such a connection after
/// answering it.
#[derive(Clone, Copy, Debug, Default)]
struct HeadScan {
    /// Bytes of the current line so far (`\r` not counted).
    line: u16,
    /// Which names the current line may still be.
    candidates: u8,
    /// Which names the head carried.
    seen: u8,
    /// A non-empty line has been seen (empty lines before a request line are allowed).
    started: bool,
    /// The blank line that ends the head went by.
    done: bool,
    reported: bool,
}

impl HeadScan {
    /// Looks at the next bytes of the head; true once both names have been seen.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            if self.done {
                break;
            }
            rest = tail;
            if b != b'\n' && self.line > 0 && (self.candidates == 0 || !self.started) {
                // Nothing more to learn from this line (the request line, or a field
                // that is neither name): skip to its end, one compare a byte.
                let end = rest.iter().position(|&c| c == b'\n');
                rest = &rest[end.unwrap_or(rest.len())..];
                continue;
            }
            match b {
                b'\n' => {
                    if self.line == 0 && self.started {
                        self.done = true;
                    }
                    self.started |= self.line > 0;
                    self.line = 0;
                    self.candidates = BOTH;
                }
                b'\r' => {}
                _ => {
                    let at = usize::from(self.line);
                    self.line = self.line.saturating_add(1);
                    if !self.started {
                        // The request line: no field here.
                        continue;
                    }
                    let b = b.to_ascii_lowercase();
                    for (bit, name) in [(1, CONTENT_LENGTH), (2, TRANSFER_ENCODING)] {
                        if self.candidates & bit == 0 {
                            continue;
                        }
                        if name.get(at) != Some(&b) {
                            self.candidates &= !bit;
                        } else if at + 1 == name.len() {
                            self.seen |= bit;
                            self.candidates &= !bit;
                        }
                    }
                }
            }
        }
        if self.seen == BOTH && !self.reported {
            self.reported = true;
            return true;
        }
        false
    }
}

/// Drains a `Buf` (used by tests to read frames).
#[cfg(test)]
fn drain(mut b: impl bytes::Buf) -> Vec<u8> {
    let mut out = vec![0; b.remaining()];
    b.copy_to_slice(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const HEADER: Duration = Duration::from_secs(3);
    const IDLE: Duration = Duration::from_secs(10);

    fn guarded() -> (
        DuplexStream,
        Guarded<DuplexStream>,
        Arc<ConnState>,
        Arc<ListenerCounters>,
    ) {
        let (client, server) = tokio::io::duplex(1024);
        let conn = Arc::new(ConnState::default());
        let counters = Arc::new(ListenerCounters::default());
        let timeouts = Timeouts {
            header: Some(HEADER),
            idle: Some(IDLE),
        };
        let io = Guarded::new(server, Arc::clone(&conn), timeouts, Arc::clone(&counters));
        (client, io, conn, counters)
    }

    async fn read_until_error(io: &mut Guarded<DuplexStream>) -> io::Error {
        let mut buf = [0u8; 256];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => panic!("the client closed"),
                Ok(_) => {}
                Err(error) => return error,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_sent_a_line_at_a_time_is_cut_at_the_header_timeout() {
        let (mut client, mut io, _conn, counters) = guarded();
        let start = Instant::now();
        let trickle = tokio::spawn(async move {
            client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(b"x-slow: 1\r\n").await.is_err() {
                    break;
                }
            }
            client
        });
        let error = read_until_error(&mut io).await;
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= HEADER && start.elapsed() < HEADER + Duration::from_secs(1));
        assert_eq!(counters.header_timeouts.get(), 1);
        assert_eq!(counters.idle_timeouts.get(), 0);
        drop(io);
        drop(trickle.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_cut_at_the_header_timeout() {
        let (_client, mut io, _conn, counters) = guarded();
        let start = Instant::now();
        let error = read_until_error(&mut io).await;
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), HEADER);
        assert_eq!(counters.header_timeouts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_cut_and_idle_follows_its_response() {
        let (mut client, mut io, conn, counters) = guarded();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = io.read(&mut buf).await.unwrap();
        let request = conn.start(http::Version::HTTP_11);
        // A slow upstream: far past both timeouts, the body still flows.
        tokio::time::sleep(IDLE * 3).await;
        client.write_all(b"body").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 4);
        drop(request);
        let idle_from = Instant::now();
        let error = read_until_error(&mut io).await;
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle_from.elapsed(), IDLE);
        assert_eq!(counters.idle_timeouts.get(), 1);
        assert_eq!(counters.header_timeouts.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waiting_when_the_last_response_ends_starts_the_idle_timeout() {
        let (mut client, mut io, conn, counters) = guarded();
        let mut buf = [0u8; 64];
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        let request = conn.start(http::Version::HTTP_11);
        // hyper waits on the socket while the response is written, and reads no more.
        let reader = tokio::spawn(async move { read_until_error(&mut io).await });
        tokio::time::sleep(IDLE * 2).await;
        let idle_from = Instant::now();
        drop(request);
        let error = reader.await.unwrap();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle_from.elapsed(), IDLE);
        assert_eq!(counters.idle_timeouts.get(), 1);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_asks_for_release_and_keeps_its_socket_and_idle_timeout() {
        const RELEASE: Duration = Duration::from_millis(250);
        let (mut client, mut io, conn, counters) = guarded();
        io.release_after(Some(RELEASE));
        let mut buf = [0u8; 64];
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        drop(conn.start(http::Version::HTTP_11));
        let idle_from = Instant::now();
        let read = tokio::time::timeout(RELEASE * 2, io.read(&mut buf)).await;
        assert!(read.is_err(), "still waiting for the next request");
        assert!(conn.wants_release(), "asked after the release delay");
        io.shutdown().await.unwrap();
        client.write_all(b"x").await.unwrap();
        assert_eq!(
            io.read(&mut buf).await.unwrap(),
            1,
            "the socket stayed open"
        );
        conn.released();
        assert!(!conn.wants_release());
        // Bytes came: a head is being read; replayed bytes are read back first.
        io.replay(Bytes::from_static(b"GET"));
        assert_eq!(io.read(&mut buf).await.unwrap(), 3);
        assert_eq!(&buf[..3], b"GET");
        let error = read_until_error(&mut io).await;
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle_from.elapsed(), RELEASE * 2 + HEADER);
        assert_eq!(counters.header_timeouts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_release_after_a_request_with_a_body_or_while_a_write_waits() {
        const RELEASE: Duration = Duration::from_millis(250);
        let (mut client, mut io, conn, _counters) = guarded();
        io.release_after(Some(RELEASE));
        let mut buf = [0u8; 64];
        client.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        let request = conn.start(http::Version::HTTP_11);
        conn.request_body(true);
        drop(request);
        // hyper may still be reading the body the handler left.
        let read = tokio::time::timeout(RELEASE * 4, io.read(&mut buf)).await;
        assert!(read.is_err());
        assert!(!conn.wants_release());
        // A bodiless request, then a response the client does not read.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        let request = conn.start(http::Version::HTTP_11);
        conn.request_body(false);
        let big = vec![b'x'; 4096];
        let blocked = tokio::time::timeout(RELEASE, io.write_all(&big)).await;
        assert!(blocked.is_err(), "the pipe is full");
        drop(request);
        let read = tokio::time::timeout(RELEASE * 4, io.read(&mut buf)).await;
        assert!(read.is_err());
        assert!(!conn.wants_release(), "not while a write waits");
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_byte_of_a_keep_alive_request_starts_the_header_timeout() {
        let (mut client, mut io, conn, counters) = guarded();
        let mut buf = [0u8; 64];
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        drop(conn.start(http::Version::HTTP_11));
        // Idle for a while (under the idle timeout), then a slow head.
        let reader = tokio::spawn(async move { (read_until_error(&mut io).await, io) });
        tokio::time::sleep(IDLE / 2).await;
        client.write_all(b"GET /next HTTP/1.1\r\n").await.unwrap();
        let head_from = Instant::now();
        let (error, _io) = reader.await.unwrap();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(head_from.elapsed(), HEADER);
        assert_eq!(counters.header_timeouts.get(), 1);
        assert_eq!(counters.idle_timeouts.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_pings_do_not_keep_an_idle_connection() {
        let (mut client, mut io, conn, counters) = guarded();
        let mut buf = [0u8; 64];
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        drop(conn.start(http::Version::HTTP_2));
        let idle_from = Instant::now();
        let pinger = tokio::spawn(async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(b"ping").await.is_err() {
                    break;
                }
            }
        });
        let error = read_until_error(&mut io).await;
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle_from.elapsed(), IDLE);
        assert_eq!(counters.idle_timeouts.get(), 1);
        drop(io);
        pinger.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_has_no_timeouts() {
        let (mut client, mut io, conn, counters) = guarded();
        let mut buf = [0u8; 64];
        client
            .write_all(b"CONNECT a:443 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        let request = conn.start(http::Version::HTTP_11);
        conn.upgraded();
        drop(request);
        tokio::time::sleep(IDLE * 2).await;
        client.write_all(b"tls").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 3);
        assert_eq!(
            counters.idle_timeouts.get() + counters.header_timeouts.get(),
            0
        );
    }

    #[tokio::test]
    async fn a_head_with_both_lengths_is_flagged_once() {
        let (mut client, mut io, conn, _counters) = guarded();
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTRANSFER-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let _ = io.read(&mut buf).await.unwrap();
        assert!(conn.take_cl_te());
        assert!(!conn.take_cl_te(), "taken");
    }

    #[test]
    fn the_scan_reads_fields_of_the_head_only() {
        let mut scan = HeadScan::default();
        assert!(
            !scan.feed(b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\ntransfer-encoding: x\r\n")
        );
        let mut scan = HeadScan::default();
        assert!(!scan.feed(b"POST /content-length: HTTP/1.1\r\nx-transfer-encoding: chunked\r\ncontent-length: 1\r\n\r\n"));
        let mut scan = HeadScan::default();
        // Split anywhere, in any case, in either order.
        let head =
            b"\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nCONTENT-LENGTH: 3\r\n\r\n";
        let (a, b) = head.split_at(30);
        assert!(!scan.feed(a));
        assert!(scan.feed(b));
        // Names that start alike, fed a byte at a time.
        let head = b"POST / HTTP/1.1\r\ncontent-type: a\r\ntransfer-encodings: b\r\nTransfer-Encoding: chunked\r\ncontent-length: 1\r\n\r\n";
        let mut scan = HeadScan::default();
        let flagged: Vec<bool> = head.iter().map(|b| scan.feed(&[*b])).collect();
        assert_eq!(flagged.iter().filter(|f| **f).count(), 1);
        let mut scan = HeadScan::default();
        assert!(!scan.feed(b"GET / HTTP/1.1\r\ncontent-type: a\r\ntransfer-encodings: b\r\n\r\n"));
    }

    #[test]
    fn the_limit_refuses_beyond_its_max_and_frees_on_drop() {
        let open = Gauge::default();
        let limit = ConnectionLimit::new(Some(2), open.clone());
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        assert_eq!(open.get(), 2);
        drop(a);
        assert!(limit.try_acquire().is_some());
        let unlimited = ConnectionLimit::new(None, Gauge::default());
        let held: Vec<_> = (0..100).filter_map(|_| unlimited.try_acquire()).collect();
        assert_eq!(held.len(), 100);
    }

    #[tokio::test]
    async fn a_tracked_body_holds_its_request_until_it_ends() {
        use http_body_util::BodyExt;
        let conn = Arc::new(ConnState::default());
        let body = Tracked::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"hi")),
            conn.start(http::Version::HTTP_11),
        );
        assert_eq!(conn.in_flight(), 1);
        let mut body = Box::pin(body);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(drain(frame.into_data().unwrap()), b"hi");
        drop(body);
        assert_eq!(conn.in_flight(), 0);
    }
}
