//! lbrouter end to end: the standard topology (client, LB node, backends
//! b1..b3, each in a namespace of its own), the router in the LB
//! namespace, an `lb-http` server per backend. Each test builds its own
//! topology and router, and removes them afterwards, failed or not.
//!
//! Every load loop is bounded in requests and in time.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use lb_tests::process::{wait_until, ChildGuard};
use lb_tests::router::{
    backend_addr, block_on, get, h2_connect, h2_get, raw_exchange, raw_status, request, route,
    router_addr, start_backend, Router, H1,
};
use lb_tests::topology::Topology;

const MIB: u64 = 1 << 20;

/// A topology with an `lb-http` server in the first `servers` backends.
fn setup(tag: &str, servers: usize) -> (Topology, Vec<ChildGuard>) {
    let topo = Topology::new(tag).expect("topology");
    let children = topo.backends[..servers]
        .iter()
        .map(|b| start_backend(b).expect("lb-http"))
        .collect();
    (topo, children)
}

fn addrs(topo: &Topology, idx: &[usize]) -> Vec<String> {
    idx.iter()
        .map(|&i| backend_addr(&topo.backends[i]))
        .collect()
}

#[test]
fn routes_by_host_and_path() {
    let (topo, _servers) = setup("rt-route", 3);
    let config = [
        route("default", None, "/", false, &addrs(&topo, &[2])),
        route("static", None, "/static", true, &addrs(&topo, &[1])),
        route(
            "api",
            Some("api.example.com"),
            "/api",
            true,
            &addrs(&topo, &[0]),
        ),
        route(
            "api-v2",
            Some("api.example.com"),
            "/api/v2",
            false,
            &addrs(&topo, &[1]),
        ),
        route(
            "wild",
            Some("*.example.com"),
            "/",
            false,
            &addrs(&topo, &[0]),
        ),
    ]
    .concat();
    let _router = Router::start(&topo.lb, &config, &[]).expect("lbrouter");
    let cases = [
        // host, path, backend, path the backend sees
        ("api.example.com", "/api/users?x=1", "b1", "/users?x=1"),
        ("API.example.com:8080", "/api", "b1", "/"),
        ("api.example.com", "/api/v2/x", "b2", "/api/v2/x"),
        ("api.example.com", "/api/v22", "b1", "/v22"),
        // Not on a segment boundary: the host's routes have none, the wildcard has.
        ("api.example.com", "/apix", "b1", "/apix"),
        ("a.b.example.com", "/anything", "b1", "/anything"),
        ("example.com", "/static/app.css", "b2", "/app.css"),
        ("other.org", "/staticx", "b3", "/staticx"),
        ("other.org", "/", "b3", "/"),
    ];
    topo.client.run(|| {
        block_on(async {
            for (host, path, backend, seen) in cases {
                let r = get(host, path).await.expect("request");
                assert_eq!(r.status, 200, "{host}{path}: {r:?}");
                assert_eq!(r.backend(), backend, "{host}{path}: {}", r.body);
                assert_eq!(r.field("path"), Some(seen), "{host}{path}: {}", r.body);
            }
            // What the backend is told about the client, and what it is not.
            let mut c = H1::connect(router_addr()).await.unwrap();
            let mut req = request("GET", "other.org", "/", Bytes::new());
            let h = req.headers_mut();
            h.insert("connection", "keep-alive, x-private".parse().unwrap());
            h.insert("x-private", "secret".parse().unwrap());
            h.insert("x-forwarded-for", "192.0.2.9".parse().unwrap());
            let r = c.send(req).await.unwrap();
            assert_eq!(
                r.field("x-forwarded-for"),
                Some("192.0.2.9, 10.71.0.2"),
                "{}",
                r.body
            );
            assert_eq!(r.field("x-forwarded-proto"), Some("http"));
            assert_eq!(r.field("x-forwarded-host"), Some("other.org"));
            assert_eq!(
                r.field("forwarded"),
                Some("for=10.71.0.2;proto=http;host=\"other.org\"")
            );
            assert_eq!(r.field("host"), Some("other.org"));
            assert_eq!(r.field("x-private"), None, "{}", r.body);
            assert_eq!(r.field("keep-alive"), None, "{}", r.body);
        })
    });
}

#[test]
fn reuses_backend_connections_and_speaks_h2c() {
    let (topo, _servers) = setup("rt-keep", 1);
    let config = route("all", None, "/", false, &addrs(&topo, &[0]));
    let _router = Router::start(&topo.lb, &config, &[]).expect("lbrouter");
    topo.client.run(|| {
        block_on(async {
            // A new client connection per request: the backend side is pooled.
            let mut conns = std::collections::BTreeSet::new();
            for i in 0..30 {
                let r = get("x", &format!("/{i}")).await.expect("request");
                assert_eq!(r.status, 200);
                conns.insert(r.field("conn").unwrap().to_string());
            }
            assert!(
                conns.len() <= 2,
                "30 requests opened backend connections {conns:?}"
            );

            // HTTP/2 without TLS, several streams at once on one connection.
            let sender = h2_connect(router_addr()).await.expect("h2c handshake");
            let mut tasks = Vec::new();
            for i in 0..8 {
                let mut s = sender.clone();
                tasks.push(tokio::spawn(async move {
                    h2_get(&mut s, "h2.example", &format!("/h2/{i}?sleep_ms=100")).await
                }));
            }
            for t in tasks {
                let r = t.await.unwrap().expect("h2 request");
                assert_eq!(r.status, 200, "{r:?}");
                assert_eq!(r.backend(), "b1");
                // The backend speaks HTTP/1.1 and needs a Host: from :authority.
                assert_eq!(r.field("host"), Some("h2.example"), "{}", r.body);
            }
        })
    });
}

#[test]
fn streams_64_mib_each_way_in_little_memory() {
    let (topo, _servers) = setup("rt-bulk", 1);
    let config = route("all", None, "/", false, &addrs(&topo, &[0]));
    let router = Router::start(&topo.lb, &config, &[]).expect("lbrouter");
    let size = 64 * MIB;
    topo.client.run(|| {
        block_on(async {
            let mut c = H1::connect(router_addr()).await.unwrap();
            // Upload: the body is one buffer here, but crosses the router
            // in frames of a few KiB.
            let body = Bytes::from(vec![b'u'; size as usize]);
            let started = Instant::now();
            let r = c
                .send(request("POST", "x", "/up", body))
                .await
                .expect("upload");
            assert_eq!(r.status, 200);
            assert_eq!(r.field("received"), Some(size.to_string().as_str()));
            eprintln!("64 MiB upload through the router: {:?}", started.elapsed());

            let started = Instant::now();
            let r = c
                .get("x", &format!("/down?download={size}"))
                .await
                .expect("download");
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len() as u64, size);
            eprintln!(
                "64 MiB download through the router: {:?}",
                started.elapsed()
            );
        })
    });
    let peak = router.peak_rss_kib().unwrap();
    eprintln!("router peak RSS: {peak} KiB");
    assert!(
        peak < 40 * 1024,
        "router peak RSS {peak} KiB: a body was buffered"
    );
}

#[test]
fn failing_backends_get_502_503_504() {
    let (topo, mut servers) = setup("rt-fail", 2);
    // b3 has no server: connections to it are refused. A backend refused
    // by one route is left out by every route with that address, so the
    // last route has an address of its own.
    let closed_port = format!("{}:8001", topo.backends[2].v4);
    let config = [
        route("one", Some("one"), "/", false, &addrs(&topo, &[0])),
        route("mixed", Some("mixed"), "/", false, &addrs(&topo, &[1, 2])),
        route("refused", Some("refused"), "/", false, &[closed_port]),
    ]
    .concat();
    let router =
        Router::start(&topo.lb, &config, &["--request-timeout-ms", "700"]).expect("lbrouter");
    let client = &topo.client;
    client.run(|| {
        block_on(async {
            // Dropped without an answer, not safe to repeat: 502.
            let mut c = H1::connect(router_addr()).await.unwrap();
            let r = c
                .send(request("POST", "one", "/?die=1", Bytes::from("x")))
                .await
                .unwrap();
            assert_eq!(r.status, 502, "{r:?}");
            assert!(r.body.starts_with("502 "), "{r:?}");
            // No answer in time: 504.
            let started = Instant::now();
            let r = get("one", "/?sleep_ms=3000").await.unwrap();
            assert_eq!(r.status, 504, "{r:?}");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
            // Refused connections go to the other backend, POST included.
            for i in 0..20 {
                let method = if i % 2 == 0 { "GET" } else { "POST" };
                let mut c = H1::connect(router_addr()).await.unwrap();
                let r = c
                    .send(request(method, "mixed", "/", Bytes::from("b")))
                    .await
                    .unwrap();
                assert_eq!((r.status, r.backend()), (200, "b2"), "{method}: {r:?}");
            }
            // Nothing but a refusing backend: 502, then 503 while it is left out.
            assert_eq!(get("refused", "/").await.unwrap().status, 502);
            assert_eq!(get("refused", "/").await.unwrap().status, 503);
        })
    });
    assert!(
        router
            .metric(&topo.lb, "lbrouter_retries_total", &["route=\"mixed\""])
            .unwrap()
            >= 1.0,
        "{}",
        router.metrics(&topo.lb).unwrap()
    );
    // The backend dies while a request waits for its answer.
    let b1 = servers.remove(0);
    let pending = client.spawn(|| block_on(get("one", "/?sleep_ms=2000")));
    std::thread::sleep(Duration::from_millis(300));
    drop(b1);
    let r = pending.join().unwrap().expect("an answer from the router");
    assert_eq!(r.status, 502, "{r:?}");
    // The backend dies in the middle of its body: the client sees it cut.
    servers.insert(0, start_backend(&topo.backends[0]).unwrap());
    let cut = client.run(|| block_on(get("one", "/?cut=1000000")));
    assert!(cut.is_err(), "a cut body must not look complete: {cut:?}");
}

#[test]
fn limits_431_413_and_slow_headers() {
    let (topo, _servers) = setup("rt-limit", 1);
    let config = format!(
        "{}max_body_bytes = 1000\n",
        route("small", Some("small"), "/", false, &addrs(&topo, &[0]))
    );
    let _router = Router::start(
        &topo.lb,
        &config,
        &[
            "--max-header-bytes",
            "8192",
            "--header-read-timeout-ms",
            "1000",
        ],
    )
    .expect("lbrouter");
    topo.client.run(|| {
        let t = Duration::from_secs(5);
        let big = format!("GET / HTTP/1.1\r\nHost: small\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
        let (out, _) = raw_exchange(big.as_bytes(), t).unwrap();
        assert_eq!(raw_status(&out), Some(431), "{out}");

        let declared = "POST / HTTP/1.1\r\nHost: small\r\nContent-Length: 5000\r\n\r\n";
        let (out, _) = raw_exchange(declared.as_bytes(), t).unwrap();
        assert_eq!(raw_status(&out), Some(413), "{out}");

        // Chunked: only counting the body as it streams can catch it.
        let mut chunked = b"POST / HTTP/1.1\r\nHost: small\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..5 {
            chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 500, "c".repeat(500)).as_bytes());
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let (out, _) = raw_exchange(&chunked, t).unwrap();
        assert_eq!(raw_status(&out), Some(413), "{out}");

        let small = "POST / HTTP/1.1\r\nHost: small\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
        let (out, _) = raw_exchange(small.as_bytes(), t).unwrap();
        assert_eq!(raw_status(&out), Some(200), "{out}");
        assert!(out.contains("received=3"), "{out}");

        let unrouted = "GET / HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n";
        let (out, _) = raw_exchange(unrouted.as_bytes(), t).unwrap();
        assert_eq!(raw_status(&out), Some(404), "{out}");

        // Slowloris: half a request head, then nothing.
        let started = Instant::now();
        let (out, closed) = raw_exchange(b"GET / HTTP/1.1\r\nHost: small\r\n", t).unwrap();
        assert!(closed, "a stalled request head must be cut: {out}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

        // Smuggling: Transfer-Encoding wins over Content-Length and the
        // connection closes after the answer, so the tail is never taken
        // for a second request.
        let smuggle = "POST / HTTP/1.1\r\nHost: small\r\nContent-Length: 40\r\n\
                       Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: small\r\n\r\n";
        let (out, closed) = raw_exchange(smuggle.as_bytes(), t).unwrap();
        assert_eq!(raw_status(&out), Some(200), "{out}");
        assert!(out.contains("received=0"), "{out}");
        assert!(!out.contains("/smuggled"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
        assert!(closed);
        // Two different lengths, or an encoding other than chunked: 400.
        for bad in [
            "POST / HTTP/1.1\r\nHost: small\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            "POST / HTTP/1.1\r\nHost: small\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            let (out, _) = raw_exchange(bad.as_bytes(), t).unwrap();
            assert_eq!(raw_status(&out), Some(400), "{bad:?}: {out}");
        }
    });
}

#[test]
fn weights_are_roughly_honoured() {
    let (topo, _servers) = setup("rt-weight", 2);
    let backends = format!(
        "backends = [{{ addr = \"{}\", weight = 1 }}, {{ addr = \"{}\", weight = 3 }}]\n",
        backend_addr(&topo.backends[0]),
        backend_addr(&topo.backends[1])
    );
    let config = format!("[[http.route]]\nname = \"w\"\n{backends}");
    let _router = Router::start(&topo.lb, &config, &[]).expect("lbrouter");
    let b2 = topo.client.run(|| {
        block_on(async {
            let mut c = H1::connect(router_addr()).await.unwrap();
            let mut b2 = 0;
            for _ in 0..400 {
                let r = c.get("x", "/").await.unwrap();
                assert_eq!(r.status, 200);
                b2 += usize::from(r.backend() == "b2");
            }
            b2
        })
    });
    // 300 expected; the bounds are over five standard deviations away.
    assert!(
        (255..=345).contains(&b2),
        "b2 took {b2} of 400 requests at weight 3 of 4"
    );
}

#[test]
fn reload_under_load_loses_nothing_and_bad_config_keeps_the_last_good() {
    let (topo, _servers) = setup("rt-reload", 2);
    let one = route("app", None, "/", false, &addrs(&topo, &[0]));
    let two = route("app", None, "/", false, &addrs(&topo, &[1]));
    let router = Router::start(&topo.lb, &one, &[]).expect("lbrouter");

    // Load: four clients, each with a keep-alive connection and a new
    // connection per request in turn, some requests slow enough to be in
    // flight across a reload. Bounded in requests and in time.
    let deadline = Instant::now() + Duration::from_secs(30);
    let loaders: Vec<_> = (0..4)
        .map(|n| {
            topo.client.spawn(move || {
                block_on(async move {
                    let mut keep = H1::connect(router_addr()).await.unwrap();
                    let (mut ok, mut failed, mut seen) =
                        (0, Vec::new(), std::collections::BTreeSet::new());
                    for i in 0..400 {
                        if Instant::now() > deadline {
                            break;
                        }
                        let path = if i % 10 == 0 { "/?sleep_ms=150" } else { "/" };
                        let r = if (i + n) % 2 == 0 {
                            keep.get("x", path).await
                        } else {
                            get("x", path).await
                        };
                        match r {
                            Ok(r) if r.status == 200 => {
                                ok += 1;
                                seen.insert(r.backend().to_string());
                            }
                            other => failed.push(format!("{other:?}")),
                        }
                    }
                    (ok, failed, seen)
                })
            })
        })
        .collect();
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        router
            .write_config(if i % 2 == 0 { &two } else { &one })
            .unwrap();
        router.sighup().unwrap();
    }
    let mut total = 0;
    let mut seen = std::collections::BTreeSet::new();
    for l in loaders {
        let (ok, failed, s) = l.join().unwrap();
        assert!(
            failed.is_empty(),
            "requests failed across reloads: {failed:?}"
        );
        total += ok;
        seen.extend(s);
    }
    eprintln!("{total} requests across 6 reloads, none failed");
    assert!(total >= 400, "only {total} requests");
    assert_eq!(seen.len(), 2, "both configs served: {seen:?}");
    assert!(
        router
            .metric(&topo.lb, "lbrouter_config_reloads_total", &["ok"])
            .unwrap()
            >= 6.0
    );

    // Settle on b1, then break the file: b1 keeps serving.
    router.write_config(&one).unwrap();
    router.sighup().unwrap();
    let only_b1 = || {
        topo.client.run(|| {
            block_on(async {
                let mut c = H1::connect(router_addr()).await.unwrap();
                for _ in 0..10 {
                    if c.get("x", "/")
                        .await
                        .map(|r| r.backend().to_string())
                        .ok()
                        .as_deref()
                        != Some("b1")
                    {
                        return false;
                    }
                }
                true
            })
        })
    };
    wait_until(Duration::from_secs(5), "b1 only", only_b1).unwrap();
    let bad = one.replace(&backend_addr(&topo.backends[0]), "10.72.1.2");
    router.write_config(&bad).unwrap();
    let expected = format!(
        "{}:5: backend \"10.72.1.2\": missing port",
        router.config_path().display()
    );
    wait_until(
        Duration::from_secs(5),
        "the rejected reload in the log",
        || router.log().contains(&expected),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", router.log()));
    assert!(router
        .log()
        .contains("keeping the routes of the last good config"));
    assert!(only_b1(), "the last good routes must stay");
    assert!(
        router
            .metric(&topo.lb, "lbrouter_config_reloads_total", &["rejected"])
            .unwrap()
            >= 1.0
    );
    // And lbrouter --check-config says the same.
    let out = std::process::Command::new(lb_tests::topology::target_bin("lbrouter"))
        .arg("--check-config")
        .arg(router.config_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&expected));
}

#[test]
fn websocket_upgrade_is_tunnelled() {
    let (topo, _servers) = setup("rt-ws", 1);
    let config = route("ws", None, "/", false, &addrs(&topo, &[0]));
    let router = Router::start(&topo.lb, &config, &[]).expect("lbrouter");
    let in_flight = |r: &Router| {
        r.metric(&topo.lb, "lbrouter_backend_in_flight", &["route=\"ws\""])
            .unwrap()
    };
    let socket = topo.client.run(|| {
        let mut s = std::net::TcpStream::connect(router_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: keep-alive, Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        // The head, byte by byte so that nothing after it is taken.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        assert!(head.contains("connection: upgrade"), "{head}");
        assert!(head.contains("x-key: dghlihnhbxbszsbub25jzq=="), "{head}");
        // A masked text frame, then plain bytes: the tunnel carries either.
        for message in [
            &b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"[..],
            b"second message",
        ] {
            s.write_all(message).unwrap();
            let mut back = vec![0u8; message.len()];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, message);
        }
        s
    });
    assert_eq!(
        in_flight(&router),
        1.0,
        "an open tunnel counts as in flight"
    );
    let _ = socket.shutdown(std::net::Shutdown::Both);
    drop(socket);
    wait_until(Duration::from_secs(5), "the tunnel to close", || {
        in_flight(&router) == 0.0
    })
    .unwrap();
}

#[test]
fn connections_past_the_limit_wait_for_a_free_slot() {
    let (topo, _servers) = setup("rt-conns", 1);
    let config = route("all", None, "/", false, &addrs(&topo, &[0]));
    let _router = Router::start(&topo.lb, &config, &["--max-connections", "2"]).expect("lbrouter");
    topo.client.run(|| {
        block_on(async {
            // The router's own readiness probe may still hold a slot for a moment.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut a = H1::connect(router_addr()).await.unwrap();
            assert_eq!(a.get("x", "/").await.unwrap().status, 200);
            let mut b = H1::connect(router_addr()).await.unwrap();
            assert_eq!(b.get("x", "/").await.unwrap().status, 200);
            // The third connects (the listen backlog takes it) but is not served.
            let mut c = H1::connect(router_addr()).await.unwrap();
            let third = tokio::spawn(async move { c.get("x", "/").await });
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(
                !third.is_finished(),
                "a third connection was served past the limit"
            );
            drop(a);
            let r = tokio::time::timeout(Duration::from_secs(5), third)
                .await
                .expect("served once a slot is free")
                .unwrap()
                .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(b.get("x", "/").await.unwrap().status, 200);
        })
    });
}
