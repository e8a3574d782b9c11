//! An HTTP client for tests: proxy-form HTTP/1.1 (as `HTTP_PROXY` clients send),
//! origin-form HTTP/1.1 with `Host`, and HTTP/2 with prior knowledge.
//!
//! Every request goes to one fixed address whatever its URL says, so a URL
//! such as `http://reviews.demo/` needs no DNS. The free functions use a fresh
//! connection per call; an [`HttpClient`] keeps connections for reuse (load
//! generators). Requests are never retried by the client: what the test sees is
//! what the server did.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::grpc;

/// How long a request may take, body included, unless set with [`HttpClient::with_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A complete response: status, headers, the whole body and any trailers.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: StatusCode,
    /// The HTTP version the response came over.
    pub version: Version,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The trailers, if the response had any (gRPC status lives there).
    pub trailers: Option<HeaderMap>,
}

impl Response {
    /// A header's value as text, if present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Why the agent made this response itself (`x-bulwark-reason`), if it did.
    pub fn reason(&self) -> Option<&str> {
        self.header("x-bulwark-reason")
    }

    /// The name of the test upstream that answered (`x-upstream`), if one did.
    pub fn upstream(&self) -> Option<&str> {
        self.header(crate::upstream::UPSTREAM_HEADER)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The gRPC status: from the trailers, or from the headers of a trailers-only response.
    pub fn grpc_status(&self) -> Option<u32> {
        let from = |map: &HeaderMap| map.get("grpc-status")?.to_str().ok()?.parse().ok();
        self.trailers
            .as_ref()
            .and_then(from)
            .or_else(|| from(&self.headers))
    }
}

/// A request that could not be made or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL does not parse.
    #[error("invalid URL {url:?}: {source}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        source: http::uri::InvalidUri,
    },
    /// The URL has no host, and the request needs one.
    #[error("URL {url:?} needs a scheme and a host (e.g. http://reviews.demo/)")]
    NotAbsolute {
        /// The URL given.
        url: String,
    },
    /// A header name or value is not valid HTTP.
    #[error("invalid header {name:?}: {value:?}")]
    InvalidHeader {
        /// The header's name.
        name: String,
        /// The header's value.
        value: String,
    },
    /// Connecting, sending or receiving the head failed (includes resets).
    #[error("{request} via {addr}: {source:?}")]
    Request {
        /// The request's method and URL.
        request: String,
        /// Where the client connected.
        addr: SocketAddr,
        /// The underlying error.
        source: Box<hyper_util::client::legacy::Error>,
    },
    /// The body or trailers broke off.
    #[error("{request} via {addr}: reading the body failed: {source}")]
    Body {
        /// The request's method and URL.
        request: String,
        /// Where the client connected.
        addr: SocketAddr,
        /// The underlying error.
        source: Box<hyper::Error>,
    },
    /// No complete response within the client's timeout.
    #[error("{request} via {addr}: no complete response within {after:?}")]
    Timeout {
        /// The request's method and URL.
        request: String,
        /// Where the client connected.
        addr: SocketAddr,
        /// The timeout.
        after: Duration,
    },
}

/// How an [`HttpClient`] frames its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1 in absolute form (`GET http://reviews.demo/ HTTP/1.1`), as sent to a proxy.
    Proxy,
    /// HTTP/1.1 in origin form (`GET / HTTP/1.1` with `Host`).
    Direct,
    /// HTTP/2 with prior knowledge (cleartext); the URL gives `:scheme` and `:authority`.
    H2,
}

/// A reusable client that sends every request to one address.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<FixedConnector, Full<Bytes>>,
    addr: SocketAddr,
    mode: Mode,
    timeout: Duration,
}

impl HttpClient {
    /// A client for an HTTP proxy at `proxy` (the agent's outbound listener): absolute-form HTTP/1.1.
    pub fn proxy(proxy: SocketAddr) -> Self {
        Self::new(proxy, Mode::Proxy)
    }

    /// A client for a server at `addr`: origin-form HTTP/1.1 with `Host` (from the URL unless given).
    pub fn direct(addr: SocketAddr) -> Self {
        Self::new(addr, Mode::Direct)
    }

    /// A client speaking HTTP/2 with prior knowledge to `addr`.
    pub fn h2(addr: SocketAddr) -> Self {
        Self::new(addr, Mode::H2)
    }

    /// A client of the given mode.
    pub fn new(addr: SocketAddr, mode: Mode) -> Self {
        let connector = FixedConnector {
            addr,
            proxied: mode == Mode::Proxy,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.retry_canceled_requests(false);
        if mode == Mode::H2 {
            builder.http2_only(true);
        }
        Self {
            inner: builder.build(connector),
            addr,
            mode,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another overall timeout per request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The address every request goes to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The client's framing.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sends a GET. `url` is absolute (`http://reviews.demo/x`) or, except through
    /// a proxy, a path (`/x`, sent to the client's address).
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Response, ClientError> {
        self.request(Method::GET, url, headers, Bytes::new()).await
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Response, ClientError> {
        let uri = self.uri(url)?;
        let mut request = Request::new(Full::new(body.into()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        if self.mode == Mode::H2 {
            *request.version_mut() = Version::HTTP_2;
        }
        for &(name, value) in headers {
            let invalid = || ClientError::InvalidHeader {
                name: name.to_owned(),
                value: value.to_owned(),
            };
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
            let value = HeaderValue::from_str(value).map_err(|_| invalid())?;
            request.headers_mut().append(name, value);
        }

        let exchange = async {
            let response =
                self.inner
                    .request(request)
                    .await
                    .map_err(|source| ClientError::Request {
                        request: format!("{method} {url}"),
                        addr: self.addr,
                        source: Box::new(source),
                    })?;
            let (parts, body) = response.into_parts();
            let collected = body.collect().await.map_err(|source| ClientError::Body {
                request: format!("{method} {url}"),
                addr: self.addr,
                source: Box::new(source),
            })?;
            let trailers = collected.trailers().cloned();
            Ok(Response {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                request: format!("{method} {url}"),
                addr: self.addr,
                after: self.timeout,
            }),
        }
    }

    /// Sends one gRPC message (`POST`, `content-type: application/grpc`, `te: trailers`)
    /// and reads the whole response; see [`Response::grpc_status`].
    pub async fn grpc(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        message: &[u8],
    ) -> Result<Response, ClientError> {
        let mut all = vec![("content-type", grpc::CONTENT_TYPE), ("te", "trailers")];
        all.extend_from_slice(headers);
        self.request(Method::POST, url, &all, grpc::frame(message))
            .await
    }

    fn uri(&self, url: &str) -> Result<Uri, ClientError> {
        let full;
        let url_with_host = if url.starts_with('/') && self.mode != Mode::Proxy {
            full = format!("http://{}{url}", self.addr);
            full.as_str()
        } else {
            url
        };
        let uri: Uri = url_with_host
            .parse()
            .map_err(|source| ClientError::InvalidUrl {
                url: url.to_owned(),
                source,
            })?;
        if uri.scheme().is_none() || uri.authority().is_none() {
            return Err(ClientError::NotAbsolute {
                url: url.to_owned(),
            });
        }
        Ok(uri)
    }
}

/// Sends a GET through an HTTP proxy in absolute form, on a fresh connection.
pub async fn proxy_get(
    proxy: SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Response, ClientError> {
    HttpClient::proxy(proxy).get(url, headers).await
}

/// Sends any request through an HTTP proxy in absolute form, on a fresh connection.
pub async fn proxy_request(
    proxy: SocketAddr,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Response, ClientError> {
    HttpClient::proxy(proxy)
        .request(method, url, headers, body)
        .await
}

/// Sends an origin-form GET for `path` to `addr`, on a fresh connection; `Host`
/// is `addr` unless `headers` has one.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response, ClientError> {
    HttpClient::direct(addr).get(path, headers).await
}

/// Sends an origin-form request to `addr`, on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Response, ClientError> {
    HttpClient::direct(addr)
        .request(method, path, headers, body)
        .await
}

/// Sends an HTTP/2 (prior knowledge) GET to `addr`, on a fresh connection. `url` is
/// absolute (its host becomes `:authority`, e.g. through the agent) or a path.
pub async fn h2_get(
    addr: SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Response, ClientError> {
    HttpClient::h2(addr).get(url, headers).await
}

/// Sends an HTTP/2 (prior knowledge) request to `addr`, on a fresh connection.
pub async fn h2_request(
    addr: SocketAddr,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Response, ClientError> {
    HttpClient::h2(addr)
        .request(method, url, headers, body)
        .await
}

// === impl FixedConnector ===

/// Connects to one address whatever the request's URL, and tells hyper whether
/// that address is a proxy (which makes it send absolute-form requests).
#[derive(Debug, Clone, Copy)]
struct FixedConnector {
    addr: SocketAddr,
    proxied: bool,
}

impl tower::Service<Uri> for FixedConnector {
    type Response = FixedConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<FixedConnection>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let Self { addr, proxied } = *self;
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(FixedConnection {
                io: TokioIo::new(stream),
                proxied,
            })
        })
    }
}

/// A connection made by [`FixedConnector`].
#[derive(Debug)]
struct FixedConnection {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for FixedConnection {
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.proxied)
    }
}

impl Read for FixedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for FixedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests;
