//! A connection that is plain or TLS, in either direction (`T` is tokio-rustls's server or
//! client stream over `P`), so a driver has one type to read and write and STARTTLS can swap
//! one for the other. `P` is TCP on the wire; the session driver takes any byte stream, so
//! tests drive it over an in-memory pipe.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A plain or TLS connection.
#[derive(Debug)]
pub enum Stream<T, P = TcpStream> {
    Plain(P),
    Tls(Box<T>),
    /// After a failed upgrade or an abort: every read and write fails, shutdown succeeds.
    Closed,
}

/// A client connection of the inbound side over `S` (TCP, or an in-memory pipe in tests).
pub type ServerStream<S = TcpStream> = Stream<tokio_rustls::server::TlsStream<S>, S>;
/// An upstream connection of the outbound side.
pub type ClientStream = Stream<tokio_rustls::client::TlsStream<TcpStream>>;

/// The error of every operation on [`Stream::Closed`].
pub fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl<T: AsyncRead + Unpin, P: AsyncRead + Unpin> AsyncRead for Stream<T, P> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl<T: AsyncWrite + Unpin, P: AsyncWrite + Unpin> AsyncWrite for Stream<T, P> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}
