//! Which HTTP a client connection speaks, from its first bytes: HTTP/2
//! opens with a fixed preface (RFC 9113 3.4; h2c with prior knowledge, or
//! whatever ALPN chose), anything else is taken as HTTP/1.
//!
//! hyper-util's auto builder does the same with a read of at most 24 bytes
//! (the preface's length), after which HTTP/1 reads the rest of the request
//! with a second call. Here the first read takes as much as the client
//! has sent, so a request that arrives whole is read once; with a new
//! connection per request that is one system call of about ten fewer.
//! Written here because no crate offers it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What a client connection opens with when it speaks HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much the first read may take: a request head of common size.
const FIRST_READ: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Reads from `io` until its bytes either are HTTP/2's preface or cannot
/// be (a connection closed early is HTTP/1, whose parser then says what
/// is wrong). The bytes read are handed out again first by the returned
/// stream.
pub async fn detect<I: AsyncRead + Unpin>(mut io: I) -> io::Result<(Protocol, Prefixed<I>)> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let protocol = loop {
        let read = io.read_buf(&mut buf).await?;
        let seen = buf.len().min(H2_PREFACE.len());
        if read == 0 || buf[..seen] != H2_PREFACE[..seen] {
            break Protocol::Http1;
        }
        if seen == H2_PREFACE.len() {
            break Protocol::Http2;
        }
    };
    let prefix = buf.freeze();
    Ok((protocol, Prefixed { prefix, io }))
}

/// A stream whose first bytes were already read: they come first.
pub struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Feeds `chunks` to `detect` one write at a time, then closes; returns
    /// the protocol and everything the returned stream reads.
    async fn detect_from(chunks: &[&[u8]]) -> (Protocol, Vec<u8>) {
        let (mut tx, rx) = tokio::io::duplex(64);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for c in chunks {
                tx.write_all(&c).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let (protocol, mut stream) = detect(rx).await.unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        writer.await.unwrap();
        (protocol, all)
    }

    #[tokio::test]
    async fn http1_is_told_at_the_first_byte_and_nothing_is_lost() {
        let request = b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n";
        let (protocol, all) = detect_from(&[request]).await;
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(all, request);
    }

    #[tokio::test]
    async fn a_preface_split_over_reads_is_http2() {
        let mut frames = H2_PREFACE.to_vec();
        frames.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        let (protocol, all) = detect_from(&[&frames[..3], &frames[3..20], &frames[20..]]).await;
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(all, frames);
    }

    #[tokio::test]
    async fn a_request_like_the_preface_at_first_is_http1() {
        // "PRI" is a method name HTTP/1 parsers accept; the preface differs later.
        let request = b"PRI /x HTTP/1.1\r\n\r\n";
        let (protocol, all) = detect_from(&[&request[..4], &request[4..]]).await;
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(all, request);
    }

    #[tokio::test]
    async fn a_connection_closed_inside_the_preface_is_http1() {
        let (protocol, all) = detect_from(&[&H2_PREFACE[..10]]).await;
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(all, &H2_PREFACE[..10]);
    }

    #[tokio::test]
    async fn a_head_larger_than_the_first_read_is_read_on() {
        let mut request = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        request.resize(3 * FIRST_READ, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        let (protocol, all) = detect_from(&[&request]).await;
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(all, request);
    }
}
