//! The "who am I talking to" echo protocol used by test backends.
//!
//! Every request (a TCP line or a UDP datagram) is answered with one line
//! `NAME PEER\n`: the backend's name and the client address exactly as the
//! backend saw it. That lets a test tell which backend served it and whether
//! the client's source address survived the load balancer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// Longest line either side reads; keeps a misbehaving peer from growing a
/// buffer without bound.
const MAX_LINE: u64 = 4096;

const REQUEST: &[u8] = b"hello\n";

/// Binds every listener, then serves forever (until the process is killed).
///
/// All sockets are bound before any is served, so once a TCP request is
/// answered every UDP socket is ready too.
pub fn serve(name: &str, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Result<()> {
    ensure!(!tcp.is_empty() || !udp.is_empty(), "nothing to listen on");
    let udp_sockets = udp
        .iter()
        .map(|a| bind_udp(*a).with_context(|| format!("binding udp {a}")))
        .collect::<Result<Vec<_>>>()?;
    let tcp_listeners = tcp
        .iter()
        .map(|a| bind_tcp(*a).with_context(|| format!("binding tcp {a}")))
        .collect::<Result<Vec<_>>>()?;

    let mut threads = Vec::new();
    for sock in udp_sockets {
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || serve_udp(&name, sock)));
    }
    for listener in tcp_listeners {
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || serve_tcp(&name, listener)));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    // Lets `0.0.0.0:P` and `[::]:P` coexist, and keeps v4 clients from
    // showing up as v4-mapped v6 peers.
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener> {
    let sock = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    sock.listen(128)?;
    Ok(sock.into())
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    Ok(new_socket(addr, Type::DGRAM, Protocol::UDP)?.into())
}

fn reply(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}\n")
}

fn serve_tcp(name: &str, listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.to_owned();
                std::thread::spawn(move || {
                    if let Err(e) = serve_conn(&name, stream, peer) {
                        eprintln!("{name}: tcp {peer}: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("{name}: accept: {e}");
                // Avoid spinning on a persistent error such as EMFILE.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_conn(name: &str, stream: TcpStream, peer: SocketAddr) -> Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let answer = reply(name, peer);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        writer.write_all(answer.as_bytes())?;
    }
}

fn serve_udp(name: &str, sock: UdpSocket) {
    let mut buf = [0u8; 65536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = sock.send_to(reply(name, peer).as_bytes(), peer) {
                    eprintln!("{name}: udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("{name}: udp recv: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Parses `NAME PEER` into the backend name and the peer it saw.
pub fn parse_reply(line: &str) -> Result<(String, SocketAddr)> {
    let line = line.trim_end_matches('\n');
    let (name, peer) = line
        .split_once(' ')
        .with_context(|| format!("malformed reply {line:?}"))?;
    let peer = peer
        .parse()
        .with_context(|| format!("bad peer address in reply {line:?}"))?;
    Ok((name.to_owned(), peer))
}

/// One request on a fresh TCP connection: connect, send a line, read the
/// reply, close.
pub fn tcp_request(target: SocketAddr, timeout: Duration) -> Result<(String, SocketAddr)> {
    TcpSession::connect(target, timeout)?.request()
}

/// A long-lived TCP connection, for checking that an established flow keeps
/// going to the same backend.
#[derive(Debug)]
pub struct TcpSession {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    target: SocketAddr,
}

impl TcpSession {
    /// Connects; `timeout` also bounds every later read and write.
    pub fn connect(target: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&target, timeout)
            .with_context(|| format!("tcp connect to {target}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            target,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }

    /// Sends one line and reads the reply on the same connection.
    pub fn request(&mut self) -> Result<(String, SocketAddr)> {
        let target = self.target;
        self.writer
            .write_all(REQUEST)
            .with_context(|| format!("tcp send to {target}"))?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("tcp receive from {target}"))?;
        ensure!(n > 0, "tcp connection to {target} closed by the server");
        ensure!(
            line.ends_with(b"\n"),
            "incomplete reply from {target}: {:?}",
            String::from_utf8_lossy(&line)
        );
        parse_reply(&String::from_utf8_lossy(&line))
    }
}

/// One UDP request from an ephemeral port. The reply must come from `target`
/// itself: a reply from any other address (say, a backend answering
/// directly instead of through the virtual address) is an error.
pub fn udp_request(target: SocketAddr, timeout: Duration) -> Result<(String, SocketAddr)> {
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    ensure!(!timeout.is_zero(), "udp request needs a non-zero timeout");
    let sock = UdpSocket::bind(any)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(REQUEST, target)
        .with_context(|| format!("udp send to {target}"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("udp receive from {target} (timeout {timeout:?})"))?;
    ensure!(
        from == target,
        "udp reply to a request for {target} came from {from}"
    );
    parse_reply(&String::from_utf8_lossy(&buf[..n]))
}
