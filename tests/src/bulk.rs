//! Bulk transfers for end-to-end tests: a server that sends or sinks a
//! given number of bytes of a known pattern, and clients that report how far
//! a transfer got when it stalls.
//!
//! The protocol, one request per connection:
//!
//! - `GET N SEED\n`: the server answers `NAME PEER\n` (as the echo server
//!   does), then N bytes of the pattern of SEED, then closes the connection
//!   (the server closes first).
//! - `PUT N SEED\n` followed by N bytes: the server checks every byte
//!   against the pattern and answers `NAME PEER RECEIVED BAD\n`, where BAD is
//!   the offset of the first wrong byte or `-`.
//!
//! The pattern is a hash of the offset, so a dropped, duplicated or
//! reordered segment shows as a wrong byte at a known offset.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::echo::parse_reply;
use crate::netns::Netns;
use crate::process::{wait_until, ChildGuard};
use crate::topology::target_bin;

/// Longest request or answer line.
const MAX_LINE: u64 = 4096;
/// Largest transfer the server accepts.
const MAX_BYTES: u64 = 1 << 30;
/// A server connection that sees nothing for this long gives up.
const SERVER_IDLE: Duration = Duration::from_secs(60);
/// Reads and writes wait at most this long before the deadline is checked.
const SLICE: Duration = Duration::from_millis(200);
const CHUNK: usize = 64 * 1024;
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(5);

/// The pattern's 8-byte word number `k` (splitmix64).
fn word(seed: u64, k: u64) -> u64 {
    let mut z = seed.wrapping_add(k.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern of `seed` from stream offset `offset` on.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let bytes = word(seed, pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&bytes[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// The stream offset of the first byte of `data` (which starts at `offset`)
/// that differs from the pattern.
pub fn first_mismatch(seed: u64, offset: u64, data: &[u8]) -> Option<u64> {
    let mut expected = vec![0u8; data.len()];
    fill(seed, offset, &mut expected);
    data.iter()
        .zip(&expected)
        .position(|(a, b)| a != b)
        .map(|i| offset + i as u64)
}

/// `1.2 MiB`, `37.0 KiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

// ---------------------------------------------------------------- server

/// Binds every listener, then serves forever (until the process is killed).
pub fn serve(name: &str, listen: &[SocketAddr]) -> Result<()> {
    ensure!(!listen.is_empty(), "nothing to listen on");
    let listeners = listen
        .iter()
        .map(|a| bind(*a).with_context(|| format!("binding tcp {a}")))
        .collect::<Result<Vec<_>>>()?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let name = name.to_owned();
            std::thread::spawn(move || accept_loop(&name, l))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    Ok(sock.into())
}

fn accept_loop(name: &str, listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.to_owned();
                std::thread::spawn(move || {
                    if let Err(e) = serve_conn(&name, stream, peer) {
                        eprintln!("{name}: bulk {peer}: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("{name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

enum Request {
    Get { bytes: u64, seed: u64 },
    Put { bytes: u64, seed: u64 },
}

fn parse_request(line: &str) -> Result<Request> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [verb, bytes, seed] = words[..] else {
        bail!("malformed request {line:?}");
    };
    let bytes: u64 = bytes
        .parse()
        .with_context(|| format!("bad size in {line:?}"))?;
    let seed: u64 = seed
        .parse()
        .with_context(|| format!("bad seed in {line:?}"))?;
    ensure!(bytes <= MAX_BYTES, "{bytes} bytes is more than {MAX_BYTES}");
    match verb {
        "GET" => Ok(Request::Get { bytes, seed }),
        "PUT" => Ok(Request::Put { bytes, seed }),
        _ => bail!("unknown request {line:?}"),
    }
}

fn serve_conn(name: &str, stream: TcpStream, peer: SocketAddr) -> Result<()> {
    stream.set_read_timeout(Some(SERVER_IDLE))?;
    stream.set_write_timeout(Some(SERVER_IDLE))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(CHUNK, stream);
    let mut line = Vec::new();
    (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(());
    }
    match parse_request(&String::from_utf8_lossy(&line))? {
        Request::Get { bytes, seed } => {
            writer.write_all(format!("{name} {peer}\n").as_bytes())?;
            let mut buf = vec![0u8; CHUNK];
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(CHUNK as u64) as usize;
                fill(seed, sent, &mut buf[..n]);
                writer.write_all(&buf[..n])?;
                sent += n as u64;
            }
            // Returning closes the connection: the server closes first.
            Ok(())
        }
        Request::Put { bytes, seed } => {
            let mut buf = vec![0u8; CHUNK];
            let mut received = 0u64;
            let mut bad = None;
            while received < bytes {
                let want = (bytes - received).min(CHUNK as u64) as usize;
                let n = reader.read(&mut buf[..want])?;
                if n == 0 {
                    bail!("client closed after {received} of {bytes} bytes");
                }
                if bad.is_none() {
                    bad = first_mismatch(seed, received, &buf[..n]);
                }
                received += n as u64;
            }
            let bad = bad.map_or_else(|| "-".to_owned(), |b| b.to_string());
            writer.write_all(format!("{name} {peer} {received} {bad}\n").as_bytes())?;
            // Wait for the client's close, so the client never sees a reset
            // for a reply it has not read yet.
            let _ = reader.read(&mut buf);
            Ok(())
        }
    }
}

/// The `lb-bulk` binary of the current build profile.
pub fn bulk_bin() -> PathBuf {
    target_bin("lb-bulk")
}

/// Starts `lb-bulk` in `ns` on `0.0.0.0:port` and `[::]:port`, answering
/// as `name`, and returns once it answers. The guard stops it on drop.
pub fn start_server(ns: &Netns, bin: &Path, name: &str, port: u16) -> Result<ChildGuard> {
    let mut cmd = ns.command(bin);
    cmd.args(["--name", name])
        .args(["--tcp", &format!("0.0.0.0:{port}")])
        .args(["--tcp", &format!("[::]:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let probe = SocketAddr::from(([127, 0, 0, 1], port));
    let mut exited = None;
    wait_until(
        SERVER_START_TIMEOUT,
        &format!("bulk server of {name} to answer on {probe}"),
        || {
            exited = child.try_wait();
            exited.is_some()
                || ns
                    .run(|| download(probe, 16, Duration::from_millis(500)))
                    .is_ok_and(|t| t.backend == name)
        },
    )?;
    if let Some(status) = exited {
        bail!("bulk server of {name} exited during startup: {status}");
    }
    Ok(child)
}

// ---------------------------------------------------------------- client

/// A transfer that completed, with the backend that served it.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// The server's name (`b1`, ...).
    pub backend: String,
    /// The client address as the server saw it.
    pub peer: SocketAddr,
    pub bytes: u64,
    pub elapsed: Duration,
    /// The client socket's view at the end (for an upload: the path MTU it
    /// settled on).
    pub info: Option<TcpInfo>,
}

/// The fields of the kernel's `struct tcp_info` that diagnose a stall.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpInfo {
    pub state: u8,
    pub snd_mss: u32,
    pub pmtu: u32,
    pub total_retrans: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

impl std::fmt::Display for TcpInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tcp state {}, pmtu {}, mss {}, {} retransmissions, bytes_acked {}, bytes_received {}",
            self.state,
            self.pmtu,
            self.snd_mss,
            self.total_retrans,
            self.bytes_acked,
            self.bytes_received
        )
    }
}

/// `getsockopt(TCP_INFO)`, read at the offsets of the kernel's UAPI
/// struct (libc's glibc struct stops before `tcpi_bytes_acked`).
pub fn tcp_info(stream: &TcpStream) -> Option<TcpInfo> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is writable for len bytes; the kernel writes at most len.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || len < 136 {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
    Some(TcpInfo {
        state: buf[0],
        snd_mss: u32_at(16),
        pmtu: u32_at(60),
        total_retrans: u32_at(100),
        bytes_acked: u64_at(120),
        bytes_received: u64_at(128),
    })
}

/// How a test connects: from an ephemeral port or a fixed one, and whether
/// closing resets the connection (SO_LINGER 0, no TIME_WAIT left behind).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectOptions {
    /// Bind to this address first (with SO_REUSEADDR).
    pub local: Option<SocketAddr>,
    /// SO_LINGER with a zero timeout: close sends a reset.
    pub reset_on_close: bool,
}

/// Connects to `target` within `timeout`. With a fixed local address, a
/// 4-tuple still held by the previous connection (its final ACK in flight)
/// is retried until the timeout.
pub fn connect(target: SocketAddr, opts: ConnectOptions, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        let sock = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        if let Some(local) = opts.local {
            sock.set_reuse_address(true)?;
            sock.bind(&SockAddr::from(local))
                .with_context(|| format!("binding {local}"))?;
        }
        if opts.reset_on_close {
            sock.set_linger(Some(Duration::ZERO))?;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match sock.connect_timeout(&target.into(), left.max(Duration::from_millis(1))) {
            Ok(()) => {
                let stream: TcpStream = sock.into();
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e)
                if opts.local.is_some()
                    && e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                let from = opts.local.map(|l| format!(" from {l}")).unwrap_or_default();
                return Err(e).with_context(|| format!("tcp connect to {target}{from}"));
            }
        }
    }
}

fn seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ NEXT.fetch_add(0x1000_0001, Ordering::Relaxed)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads one line before `deadline`; `Ok(None)` when the deadline passed.
fn read_line(
    reader: &mut BufReader<TcpStream>,
    deadline: Instant,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<()>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        reader.get_ref().set_read_timeout(Some(left.min(SLICE)))?;
        let before = line.len();
        match (&mut *reader)
            .take(MAX_LINE - before as u64)
            .read_until(b'\n', line)
        {
            Ok(0) => return Ok(Some(())),
            Ok(_) if line.ends_with(b"\n") || line.len() as u64 >= MAX_LINE => return Ok(Some(())),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Downloads `bytes` from a bulk server at `target` within `bound`,
/// checking every byte.
pub fn download(target: SocketAddr, bytes: u64, bound: Duration) -> Result<Transfer> {
    download_with(target, bytes, bound, ConnectOptions::default())
}

/// [`download`] with connection options.
pub fn download_with(
    target: SocketAddr,
    bytes: u64,
    bound: Duration,
    opts: ConnectOptions,
) -> Result<Transfer> {
    let start = Instant::now();
    let deadline = start + bound;
    let what = format!("download of {} via {target}", human(bytes));
    let stream = connect(target, opts, bound).with_context(|| what.clone())?;
    let seed = seed();
    (&stream)
        .write_all(format!("GET {bytes} {seed}\n").as_bytes())
        .with_context(|| format!("{what}: sending the request"))?;
    let mut reader = BufReader::with_capacity(CHUNK, stream.try_clone()?);
    let mut line = Vec::new();
    let header = read_line(&mut reader, deadline, &mut line)
        .with_context(|| format!("{what}: reading the header"))?;
    let info = || {
        tcp_info(&stream)
            .map(|i| format!(" ({i})"))
            .unwrap_or_default()
    };
    if header.is_none() {
        bail!("{what} stalled: no header after {bound:?}{}", info());
    }
    ensure!(
        line.ends_with(b"\n"),
        "{what}: connection closed before the header (got {:?})",
        String::from_utf8_lossy(&line)
    );
    let (backend, peer) = parse_reply(&String::from_utf8_lossy(&line))?;
    let what = format!("{what} (backend {backend})");

    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "{what} stalled: {} of {} after {bound:?}{}",
                human(got),
                human(bytes),
                info()
            );
        }
        stream.set_read_timeout(Some(left.min(SLICE)))?;
        let want = (bytes - got).min(CHUNK as u64) as usize;
        match reader.read(&mut buf[..want]) {
            Ok(0) => bail!(
                "{what}: connection closed after {} of {}",
                human(got),
                human(bytes)
            ),
            Ok(n) => {
                if let Some(off) = first_mismatch(seed, got, &buf[..n]) {
                    bail!("{what}: corrupted data, byte {off} differs from what was sent");
                }
                got += n as u64;
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("{what}: failed after {} of {}", human(got), human(bytes))
                })
            }
        }
    }
    // The server closes right after the data: its FIN must arrive too, and
    // nothing after the data.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "{what}: all data received but the server's close did not arrive within {bound:?}{}",
                info()
            );
        }
        stream.set_read_timeout(Some(left.min(SLICE)))?;
        match reader.read(&mut buf[..1]) {
            Ok(0) => break,
            Ok(_) => bail!("{what}: more data than the {bytes} bytes asked for"),
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("{what}: waiting for the server's close"))
            }
        }
    }
    Ok(Transfer {
        backend,
        peer,
        bytes,
        elapsed: start.elapsed(),
        info: tcp_info(&stream),
    })
}

/// Uploads `bytes` to a bulk server at `target` within `bound`; the server
/// checks every byte.
pub fn upload(target: SocketAddr, bytes: u64, bound: Duration) -> Result<Transfer> {
    let start = Instant::now();
    let deadline = start + bound;
    let what = format!("upload of {} via {target}", human(bytes));
    let mut stream =
        connect(target, ConnectOptions::default(), bound).with_context(|| what.clone())?;
    let seed = seed();
    let request = format!("PUT {bytes} {seed}\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("{what}: sending the request"))?;
    let stalled = |stream: &TcpStream, what: &str, sent: u64, why: &str| {
        let info = tcp_info(stream);
        let acked = info.map_or(String::new(), |i| {
            // bytes_acked counts the SYN and the request line too.
            let data = i.bytes_acked.saturating_sub(1 + request.len() as u64);
            format!(", {} acknowledged", human(data.min(bytes)))
        });
        anyhow::anyhow!(
            "{what} stalled: {} of {} written{acked} after {bound:?}{why}{}",
            human(sent),
            human(bytes),
            info.map(|i| format!(" ({i})")).unwrap_or_default()
        )
    };
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(stalled(&stream, &what, sent, ""));
        }
        stream.set_write_timeout(Some(left.min(SLICE)))?;
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        fill(seed, sent, &mut buf[..n]);
        match stream.write(&buf[..n]) {
            Ok(0) => bail!("{what}: the connection accepts no more data"),
            Ok(k) => sent += k as u64,
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("{what}: failed after {} of {}", human(sent), human(bytes))
                })
            }
        }
    }
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = Vec::new();
    let answered = read_line(&mut reader, deadline, &mut line)
        .with_context(|| format!("{what}: reading the answer"))?;
    if answered.is_none() {
        return Err(stalled(
            &stream,
            &what,
            sent,
            ", no answer from the backend",
        ));
    }
    let info = tcp_info(&stream);
    let line = String::from_utf8_lossy(&line).trim_end().to_owned();
    let words: Vec<&str> = line.split(' ').collect();
    let [name, peer, received, bad] = words[..] else {
        bail!("{what}: malformed answer {line:?}");
    };
    let (backend, peer) = parse_reply(&format!("{name} {peer}"))?;
    let what = format!("{what} (backend {backend})");
    ensure!(
        received == bytes.to_string(),
        "{what}: the backend received {received} bytes"
    );
    ensure!(
        bad == "-",
        "{what}: corrupted data, byte {bad} differs from what was sent"
    );
    Ok(Transfer {
        backend,
        peer,
        bytes,
        elapsed: start.elapsed(),
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_the_same_whatever_the_chunking() {
        let mut whole = vec![0u8; 1000];
        fill(7, 0, &mut whole);
        let mut parts = vec![0u8; 1000];
        for (i, chunk) in parts.chunks_mut(13).enumerate() {
            fill(7, i as u64 * 13, chunk);
        }
        assert_eq!(whole, parts);
        assert_eq!(first_mismatch(7, 0, &whole), None);
        whole[500] ^= 1;
        assert_eq!(first_mismatch(7, 0, &whole), Some(500));
        assert_eq!(first_mismatch(7, 100, &parts[100..]), None);
        // Not periodic over a segment's length.
        let mut long = vec![0u8; 4096];
        fill(7, 0, &mut long);
        assert_ne!(long[..8], long[1448..1456]);
    }
}
