//! Checks the test harness itself: namespaces, wiring, echo servers and
//! cleanup. Needs root (it creates network namespaces).
//!
//! The LB namespace is a plain router here; no load balancer is attached.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use lb_tests::echo::{tcp_request, udp_request, TcpSession};
use lb_tests::netns::{cleanup_stale, unique_name, Netns};
use lb_tests::topology::{echo_bin, Topology, CLIENT_V4, CLIENT_V6};

const TCP_PORT: u16 = 7070;
const UDP_PORT: u16 = 7071;
const TIMEOUT: Duration = Duration::from_secs(2);

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("running ip netns list");
    assert!(out.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn listed(list: &str, name: &str) -> bool {
    // Lines look like `NAME` or `NAME (id: 3)`.
    list.lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn client_reaches_every_backend_through_the_router() {
    let mut topo = Topology::new("route").expect("building the topology");
    topo.start_servers(&echo_bin(), TCP_PORT, UDP_PORT)
        .expect("starting echo servers");

    for b in &topo.backends {
        let v4 = SocketAddr::new(IpAddr::V4(b.v4), TCP_PORT);
        let v6 = SocketAddr::new(IpAddr::V6(b.v6), TCP_PORT);
        let (name, peer) = topo.client.run(|| tcp_request(v4, TIMEOUT)).unwrap();
        assert_eq!(name, b.name);
        assert_eq!(peer.ip(), IpAddr::V4(CLIENT_V4), "backend sees the client");
        let (name, peer) = topo.client.run(|| tcp_request(v6, TIMEOUT)).unwrap();
        assert_eq!(name, b.name);
        assert_eq!(peer.ip(), IpAddr::V6(CLIENT_V6));

        let v4 = SocketAddr::new(IpAddr::V4(b.v4), UDP_PORT);
        let v6 = SocketAddr::new(IpAddr::V6(b.v6), UDP_PORT);
        let (name, peer) = topo.client.run(|| udp_request(v4, TIMEOUT)).unwrap();
        assert_eq!(name, b.name);
        assert_eq!(peer.ip(), IpAddr::V4(CLIENT_V4));
        let (name, peer) = topo.client.run(|| udp_request(v6, TIMEOUT)).unwrap();
        assert_eq!(name, b.name);
        assert_eq!(peer.ip(), IpAddr::V6(CLIENT_V6));
    }

    // A long-lived connection keeps its source port across requests.
    let b1 = SocketAddr::new(IpAddr::V4(topo.backends[0].v4), TCP_PORT);
    topo.client.run(|| {
        let mut s = TcpSession::connect(b1, TIMEOUT).unwrap();
        let local = s.local_addr().unwrap();
        for _ in 0..5 {
            let (name, peer) = s.request().unwrap();
            assert_eq!(name, "b1");
            assert_eq!(peer, local);
        }
    });

    // A backend added later is wired and served the same way.
    let idx = topo.add_backend().unwrap();
    assert_eq!(topo.backends[idx].name, "b4");
    topo.start_server(idx, &echo_bin(), TCP_PORT, UDP_PORT)
        .unwrap();
    let b4 = SocketAddr::new(IpAddr::V4(topo.backends[idx].v4), UDP_PORT);
    let (name, _) = topo.client.run(|| udp_request(b4, TIMEOUT)).unwrap();
    assert_eq!(name, "b4");

    let names = topo.namespace_names();
    let pids: Vec<u32> = topo
        .backends
        .iter()
        .map(|b| b.server_pid().unwrap())
        .collect();
    let list = netns_list();
    assert!(
        names.iter().all(|n| listed(&list, n)),
        "{names:?} in {list}"
    );

    drop(topo);
    let list = netns_list();
    for n in &names {
        assert!(!listed(&list, n), "{n} still exists after drop: {list}");
    }
    for pid in pids {
        assert!(!pid_alive(pid), "echo server {pid} outlived the topology");
    }
}

#[test]
fn stopped_server_reports_its_exit_and_stops_answering() {
    let mut topo = Topology::new("stop").expect("building the topology");
    topo.start_servers(&echo_bin(), TCP_PORT, UDP_PORT).unwrap();
    let target = SocketAddr::new(IpAddr::V4(topo.backends[1].v4), TCP_PORT);
    let status = topo.backends[1].stop_server().expect("b2 had a server");
    assert!(!status.success(), "killed by SIGTERM, not a normal exit");
    let err = topo
        .client
        .run(|| tcp_request(target, TIMEOUT))
        .expect_err("nobody listens any more");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
}

#[test]
fn udp_reply_from_another_address_is_rejected() {
    let topo = Topology::new("udpsrc").expect("building the topology");
    let b1 = topo.backends[0].v4;
    let asked = SocketAddr::new(IpAddr::V4(b1), UDP_PORT);
    // Answers from a different port than the one the client sent to, as a
    // backend replying around a NAT would.
    let responder = topo.backends[0].ns.run(|| {
        let rx = UdpSocket::bind(asked).unwrap();
        let tx = UdpSocket::bind(SocketAddr::new(IpAddr::V4(b1), 0)).unwrap();
        std::thread::spawn(move || {
            rx.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = [0u8; 64];
            if let Ok((_, peer)) = rx.recv_from(&mut buf) {
                tx.send_to(format!("b1 {peer}\n").as_bytes(), peer).unwrap();
            }
        })
    });
    let err = topo
        .client
        .run(|| udp_request(asked, TIMEOUT))
        .expect_err("reply came from the wrong port");
    assert!(format!("{err:#}").contains("came from"), "{err:#}");
    responder.join().unwrap();
}

#[test]
fn commands_and_threads_enter_the_namespace() {
    cleanup_stale();
    let ns = Netns::new(&unique_name("enter")).unwrap();
    let ino = std::fs::metadata(ns.path()).unwrap().ino();
    let expected = format!("net:[{ino}]");

    let out = ns
        .command("readlink")
        .arg("/proc/self/ns/net")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    // Only the network namespace changes; the mount namespace is the host's.
    let host_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let out = ns
        .command("readlink")
        .arg("/proc/self/ns/mnt")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        host_mnt.to_string_lossy()
    );

    let seen = ns.run(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap());
    assert_eq!(seen.to_string_lossy(), expected);

    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let out = ns.sh("cat /proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    assert!(ns.sh("exit 3").is_err());
    assert!(ns.ip(&["link", "set", "nonexistent0", "up"]).is_err());

    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ns.run(|| panic!("inside the namespace"))
    }));
    assert!(panicked.is_err(), "panics propagate out of run");
}

#[test]
fn leftovers_of_dead_processes_are_removed() {
    // The pid of a process that has certainly exited and been reaped.
    let dead = Command::new("true").spawn().unwrap();
    let mut dead = dead;
    let pid = dead.id();
    dead.wait().unwrap();

    let stale = format!("lbt-{pid}-stale");
    let ours = unique_name("alive");
    for n in [&stale, &ours] {
        let ok = Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .unwrap()
            .success();
        assert!(ok, "creating {n}");
    }
    cleanup_stale();
    let list = netns_list();
    let stale_left = listed(&list, &stale);
    let ours_left = listed(&list, &ours);
    let _ = Command::new("ip").args(["netns", "del", &ours]).status();
    let _ = Command::new("ip")
        .args(["netns", "del", &stale])
        .stderr(std::process::Stdio::null())
        .status();
    assert!(!stale_left, "{stale} should be gone");
    assert!(ours_left, "{ours} belongs to a live process and must stay");
}

/// Every lbd the tests start runs with the systemd unit's capabilities
/// alone, so that the whole suite shows the unit grants enough.
#[test]
fn lbd_runs_with_the_units_capabilities_only() {
    let ns = Netns::new(&unique_name("caps")).expect("namespace");
    let lbd = lb_tests::lbd::Lbd::start(&ns, "caps", "", &[]).expect("lbd");
    let pid = lbd.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    // CAP_NET_ADMIN is 12, CAP_SYS_ADMIN 21 (linux/capability.h).
    let unit = (1 << 12) | (1 << 21);
    assert_eq!(
        lb_tests::lbd::unit_capabilities().unwrap(),
        "-all,+sys_admin,+net_admin"
    );
    assert_eq!(field("CapBnd:"), unit, "{status}");
    assert_eq!(field("CapEff:"), unit, "{status}");
    assert!(lbd.status().is_ok());
}
