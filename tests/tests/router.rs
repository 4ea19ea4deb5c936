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
    backend_addr, block_on, get, h2_connect, h2_get, h2_over, h2_send, raw_exchange, raw_status,
    request, route, router_addr, router_tls_addr, start_backend, Router, H1,
};
use lb_tests::scratch::Scratch;
use lb_tests::tls::{self, Ca, Issued, Trust};
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
    // The routes page shows the refusing backend left out (for 2 s), the
    // others up.
    let page = router.page(&topo.lb, "/routes").unwrap();
    let json = &page[page.find("\r\n\r\n").expect("an HTTP answer") + 4..];
    let routes: serde_json::Value = serde_json::from_str(json).expect(&page);
    let names: Vec<&str> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mixed", "one", "refused"], "{page}");
    assert_eq!(routes[2]["backends"][0]["quarantined"], true, "{page}");
    assert_eq!(routes[1]["backends"][0]["quarantined"], false, "{page}");
    let text = router.page(&topo.lb, "/").unwrap();
    assert!(
        text.contains("refused (refused, /)") && text.contains("left out after a failed connect"),
        "{text}"
    );
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
        // And a connection that sends nothing at all, or too little to
        // tell its protocol (part of HTTP/2's preface).
        for silent in [&b""[..], b"PRI * HTTP/2"] {
            let started = Instant::now();
            let (out, closed) = raw_exchange(silent, t).unwrap();
            assert!(closed, "a silent connection must be cut: {out}");
            assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        }

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

/// A `[[http.tls.certificate]]` entry for files beside the config.
fn certificate(name: &str) -> String {
    format!("[[http.tls.certificate]]\ncert = \"tls/{name}.pem\"\nkey = \"tls/{name}.key\"\n\n")
}

/// One route to the first backend, and certificates `names`.
fn https_config(topo: &Topology, names: &[&str]) -> String {
    let certs: String = names.iter().map(|n| certificate(n)).collect();
    format!(
        "{}{certs}",
        route("all", None, "/", false, &addrs(topo, &[0]))
    )
}

/// The files of certificate `name`, for `Router::start_with_files`.
fn cert_files<'a>(name: &str, issued: &'a Issued) -> [(String, &'a str); 2] {
    [
        (format!("tls/{name}.pem"), issued.cert_pem.as_str()),
        (format!("tls/{name}.key"), issued.key_pem.as_str()),
    ]
}

fn start_https(topo: &Topology, config: &str, certs: &[(&str, &Issued)]) -> Router {
    let files: Vec<(String, &str)> = certs
        .iter()
        .flat_map(|(name, issued)| cert_files(name, issued))
        .collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    let tls = router_tls_addr().to_string();
    Router::start_with_files(&topo.lb, config, &files, &["--listen-tls", &tls]).expect("lbrouter")
}

#[test]
fn https_speaks_http1_and_h2_by_alpn_and_streams_both_ways() {
    let (topo, _servers) = setup("rt-https", 1);
    let ca = Ca::new("lbrouter test CA").unwrap();
    let leaf = ca.issue(&["secure.test"]).unwrap();
    let config = format!(
        "{}sticky_cookie = \"lbsticky\"\n\n{}",
        route("all", None, "/", false, &addrs(&topo, &[0])),
        certificate("secure")
    );
    let _router = start_https(&topo, &config, &[("secure", &leaf)]);
    let size = 4 * MIB;
    topo.client.run(|| {
        block_on(async {
            // HTTP/1.1, as ALPN chose it.
            let (stream, served) = tls::connect(
                router_tls_addr(),
                Some("secure.test"),
                &["http/1.1"],
                Trust::Ca(&ca),
            )
            .await
            .expect("TLS handshake");
            assert_eq!(served.cert, leaf.der);
            assert_eq!(served.alpn.as_deref(), Some(&b"http/1.1"[..]));
            let mut c = H1::over(stream).await.unwrap();
            let r = c.get("secure.test", "/hello").await.unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.field("x-forwarded-proto"), Some("https"), "{}", r.body);
            assert_eq!(
                r.field("forwarded"),
                Some("for=10.71.0.2;proto=https;host=\"secure.test\""),
                "{}",
                r.body
            );
            // The sticky cookie of a TLS client is Secure.
            let cookie = r.headers.get("set-cookie").expect("a sticky cookie");
            assert!(
                cookie
                    .to_str()
                    .unwrap()
                    .ends_with("; Path=/; HttpOnly; Secure; SameSite=Lax"),
                "{cookie:?}"
            );
            let up = c
                .send(request(
                    "POST",
                    "secure.test",
                    "/up",
                    Bytes::from(vec![b'u'; size as usize]),
                ))
                .await
                .expect("upload over TLS");
            assert_eq!(up.field("received"), Some(size.to_string().as_str()));
            let down = c
                .get("secure.test", &format!("/down?download={size}"))
                .await
                .expect("download over TLS");
            assert_eq!(down.body.len() as u64, size);

            // HTTP/2, offered first by the client and chosen by ALPN.
            let (stream, served) = tls::connect(
                router_tls_addr(),
                Some("secure.test"),
                &["h2", "http/1.1"],
                Trust::Ca(&ca),
            )
            .await
            .expect("TLS handshake");
            assert_eq!(served.alpn.as_deref(), Some(&b"h2"[..]));
            let h2 = h2_over(stream).await.expect("HTTP/2 over TLS");
            let mut tasks = Vec::new();
            for i in 0..4 {
                let mut s = h2.clone();
                tasks.push(tokio::spawn(async move {
                    h2_get(&mut s, "secure.test", &format!("/h2/{i}?sleep_ms=50")).await
                }));
            }
            for t in tasks {
                let r = t.await.unwrap().expect("h2 request");
                assert_eq!(r.status, 200, "{r:?}");
                assert_eq!(r.field("x-forwarded-proto"), Some("https"), "{}", r.body);
                assert_eq!(r.field("host"), Some("secure.test"), "{}", r.body);
            }
            let mut s = h2.clone();
            let req = hyper::Request::builder()
                .method("POST")
                .uri("https://secure.test/up")
                .body(http_body_util::Full::new(Bytes::from(vec![
                    b'v';
                    size as usize
                ])))
                .unwrap();
            let up = h2_send(&mut s, req).await.expect("h2 upload");
            assert_eq!(up.field("received"), Some(size.to_string().as_str()));
            let down = h2_get(&mut s, "secure.test", &format!("/down?download={size}"))
                .await
                .expect("h2 download");
            assert_eq!(down.body.len() as u64, size);

            // The plain listener still says http.
            let r = get("secure.test", "/").await.unwrap();
            assert_eq!(r.field("x-forwarded-proto"), Some("http"));
        })
    });
}

#[test]
fn sni_picks_the_certificate_and_unknown_names_get_the_first() {
    let (topo, _servers) = setup("rt-sni", 0);
    let ca = Ca::new("lbrouter test CA").unwrap();
    let default = ca.issue(&["default.test"]).unwrap();
    let api = ca.issue(&["api.example.com", "*.example.org"]).unwrap();
    let config = https_config(&topo, &["default", "api"]);
    let _router = start_https(&topo, &config, &[("default", &default), ("api", &api)]);
    topo.client.run(|| {
        block_on(async {
            let served = |name: Option<&'static str>, verified: bool| {
                let ca = &ca;
                async move {
                    let trust = if verified { Trust::Ca(ca) } else { Trust::Any };
                    tls::connect(router_tls_addr(), name, &["http/1.1"], trust)
                        .await
                        .unwrap_or_else(|e| panic!("{name:?}: {e:#}"))
                        .1
                        .cert
                }
            };
            assert!(served(Some("api.example.com"), true).await == api.der);
            assert!(served(Some("API.Example.COM"), true).await == api.der);
            assert!(served(Some("www.example.org"), true).await == api.der);
            assert!(served(Some("default.test"), true).await == default.der);
            // A wildcard covers one label only; other names and no name
            // get the first certificate.
            assert!(served(Some("a.b.example.org"), false).await == default.der);
            assert!(served(Some("unknown.test"), false).await == default.der);
            assert!(served(None, false).await == default.der);
        })
    });
}

#[test]
fn certificates_are_reloaded_when_their_files_change() {
    let (topo, _servers) = setup("rt-rotate", 1);
    let ca = Ca::new("lbrouter test CA").unwrap();
    let first = ca.issue(&["rot.test"]).unwrap();
    let second = ca.issue(&["rot.test"]).unwrap();
    let third = ca.issue(&["rot.test"]).unwrap();
    let config = https_config(&topo, &["rot"]);
    let router = start_https(&topo, &config, &[("rot", &first)]);
    let served_now = || {
        topo.client.run(|| {
            block_on(async {
                tls::connect(
                    router_tls_addr(),
                    Some("rot.test"),
                    &["http/1.1"],
                    Trust::Ca(&ca),
                )
                .await
                .expect("TLS handshake")
                .1
                .cert
            })
        })
    };
    // A keep-alive connection made with the first certificate, kept open
    // across the rotations in a thread of the client namespace.
    let (to_keeper, orders) = std::sync::mpsc::channel::<()>();
    let (answers, from_keeper) = std::sync::mpsc::channel::<(u16, Vec<u8>)>();
    let keeper = topo.client.spawn(move || {
        block_on(async move {
            let (stream, served) = tls::connect(
                router_tls_addr(),
                Some("rot.test"),
                &["http/1.1"],
                Trust::Any,
            )
            .await
            .unwrap();
            let cert = served.cert.to_vec();
            let mut c = H1::over(stream).await.unwrap();
            while orders.recv().is_ok() {
                let status = c.get("rot.test", "/").await.map_or(0, |r| r.status);
                answers.send((status, cert.clone())).unwrap();
            }
        })
    });
    let ask_keeper = || {
        to_keeper.send(()).unwrap();
        from_keeper.recv_timeout(Duration::from_secs(10)).unwrap()
    };
    assert_eq!(ask_keeper(), (200, first.der.to_vec()));

    router.write_file("tls/rot.key", &second.key_pem).unwrap();
    router.write_file("tls/rot.pem", &second.cert_pem).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the second certificate served",
        || served_now() == second.der,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", router.log()));
    assert_eq!(
        ask_keeper(),
        (200, first.der.to_vec()),
        "the open connection keeps working with the certificate it had"
    );

    // A key file that is not a key: logged with its file, the second
    // certificate stays.
    router.write_file("tls/rot.key", "not a key\n").unwrap();
    let key = router.file_path("tls/rot.key");
    let expected = format!("{}: no PEM private key", key.display());
    wait_until(Duration::from_secs(10), "the broken key in the log", || {
        router.log().contains(&expected)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", router.log()));
    assert!(router
        .log()
        .contains("new handshakes keep the last good certificate"));
    assert!(served_now() == second.der);

    // A certificate whose key is not the one beside it: the same.
    router.write_file("tls/rot.key", &second.key_pem).unwrap();
    router.write_file("tls/rot.pem", &third.cert_pem).unwrap();
    let expected = format!("{}: not the key of", key.display());
    wait_until(
        Duration::from_secs(10),
        "the mismatched key in the log",
        || router.log().contains(&expected),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", router.log()));
    assert!(served_now() == second.der);
    assert_eq!(ask_keeper().0, 200);
    assert!(
        router
            .metric(
                &topo.lb,
                "lbrouter_tls_certificate_reloads_total",
                &["rejected"]
            )
            .unwrap()
            >= 2.0
    );

    // Fixed: its key arrives and the third is served.
    router.write_file("tls/rot.key", &third.key_pem).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the third certificate served",
        || served_now() == third.der,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", router.log()));
    drop(to_keeper);
    keeper.join().unwrap();
}

#[test]
fn a_bad_certificate_stops_the_start_naming_its_file() {
    let (topo, _servers) = setup("rt-badcert", 0);
    let ca = Ca::new("lbrouter test CA").unwrap();
    let good = ca.issue(&["good.test"]).unwrap();
    let other = ca.issue(&["other.test"]).unwrap();
    let config = https_config(&topo, &["bad"]);
    let tls = router_tls_addr().to_string();
    let args = ["--listen-tls", tls.as_str()];
    let start = |files: &[(&str, &str)]| {
        Router::start_with_files(&topo.lb, &config, files, &args)
            .err()
            .map(|e| format!("{e:#}"))
            .expect("lbrouter must not start")
    };
    let cases = [
        (
            "not PEM at all",
            good.key_pem.as_str(),
            "bad.pem: no certificate in it",
        ),
        (good.cert_pem.as_str(), "", "bad.key: no PEM private key"),
        (
            good.cert_pem.as_str(),
            other.key_pem.as_str(),
            "bad.key: not the key of",
        ),
    ];
    for (cert, key, expected) in cases {
        let err = start(&[("tls/bad.pem", cert), ("tls/bad.key", key)]);
        assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
        assert!(err.contains("[http.tls]"), "{err}");
    }
    // A missing file names itself, and --check-config says the same.
    let err = start(&[("tls/bad.pem", &good.cert_pem)]);
    assert!(err.contains("bad.key: cannot read"), "{err}");
    // HTTPS without any certificate.
    let plain = route("all", None, "/", false, &addrs(&topo, &[0]));
    let err = Router::start(&topo.lb, &plain, &args)
        .err()
        .map(|e| format!("{e:#}"))
        .expect("lbrouter must not start");
    assert!(err.contains("HTTPS needs a certificate"), "{err}");

    let scratch = Scratch::new("router-check");
    let dir = &scratch.0;
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    std::fs::write(dir.join("lbd.toml"), &config).unwrap();
    std::fs::write(dir.join("tls/bad.pem"), &good.cert_pem).unwrap();
    let check = || {
        std::process::Command::new(lb_tests::topology::target_bin("lbrouter"))
            .arg("--check-config")
            .arg(dir.join("lbd.toml"))
            .output()
            .unwrap()
    };
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bad.key: cannot read"), "{stderr}");
    std::fs::write(dir.join("tls/bad.key"), &good.key_pem).unwrap();
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("ok (1 routes, 1 certificates)"), "{stdout}");
}

/// One GET on a new connection, with `cookie` as its Cookie header.
async fn get_with_cookie(cookie: Option<&str>) -> lb_tests::router::Reply {
    let mut req = request("GET", "shop.example", "/", Bytes::new());
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    let r = H1::connect(router_addr())
        .await
        .unwrap()
        .send(req)
        .await
        .expect("request");
    assert_eq!(r.status, 200, "{r:?}");
    r
}

/// `name=value` of a response's Set-Cookie, if it has one.
fn set_cookie(r: &lb_tests::router::Reply) -> Option<String> {
    let v = r.headers.get("set-cookie")?.to_str().ok()?;
    Some(v.split(';').next()?.to_string())
}

#[test]
fn sticky_cookie_pins_clients_and_moves_them_when_their_backend_is_gone() {
    let (topo, mut servers) = setup("rt-sticky", 3);
    let sticky = |weights: [u32; 3]| {
        let list: Vec<String> = (0..3)
            .map(|i| {
                format!(
                    "{{ addr = \"{}\", weight = {} }}",
                    backend_addr(&topo.backends[i]),
                    weights[i]
                )
            })
            .collect();
        format!(
            "[[http.route]]\nname = \"shop\"\nsticky_cookie = \"lbsticky\"\nbackends = [{}]\n",
            list.join(", ")
        )
    };
    let router = Router::start(&topo.lb, &sticky([1, 1, 1]), &[]).expect("lbrouter");
    let client = &topo.client;

    // A new client is pinned by a cookie that does not show the address.
    let first = client.run(|| block_on(get_with_cookie(None)));
    let header = first.headers.get("set-cookie").expect("a sticky cookie");
    let header = header.to_str().unwrap();
    assert!(
        header.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
        "{header}"
    );
    assert!(!header.contains("10.72."), "{header}");
    let cookie = set_cookie(&first).unwrap();
    let pinned = first.backend().to_string();

    // With the cookie: 50 requests, 50 times the same backend, no new cookie.
    client.run(|| {
        block_on(async {
            for _ in 0..50 {
                let r = get_with_cookie(Some(&format!("theme=dark; {cookie}"))).await;
                assert_eq!(r.backend(), pinned, "{r:?}");
                assert_eq!(set_cookie(&r), None, "{r:?}");
            }
        })
    });
    // Without: spread, each answer pinning to the backend that gave it,
    // one token per backend.
    let mut tokens = std::collections::BTreeMap::new();
    client.run(|| {
        block_on(async {
            for _ in 0..60 {
                let r = get_with_cookie(None).await;
                let c = set_cookie(&r).expect("a cookie for a new client");
                let known = tokens.entry(r.backend().to_string()).or_insert(c.clone());
                assert_eq!(*known, c, "one token per backend");
            }
        })
    });
    assert!(tokens.len() >= 2, "requests without the cookie: {tokens:?}");
    assert_eq!(
        tokens
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        tokens.len()
    );
    // An invalid cookie counts as none: the client is pinned anew.
    client.run(|| {
        block_on(async {
            for bad in ["lbsticky=0123456789abcdef", "lbsticky=", "lbsticky"] {
                let r = get_with_cookie(Some(bad)).await;
                assert!(set_cookie(&r).is_some(), "{bad}: {r:?}");
            }
        })
    });

    // Drained (weight 0): no new client goes there, its pinned clients stay.
    let idx = topo.backends.iter().position(|b| b.name == pinned).unwrap();
    let mut weights = [1, 1, 1];
    weights[idx] = 0;
    router.write_config(&sticky(weights)).unwrap();
    router.sighup().unwrap();
    wait_until(
        Duration::from_secs(5),
        "the drained backend left out",
        || {
            client.run(|| {
                block_on(async {
                    for _ in 0..20 {
                        if get_with_cookie(None).await.backend() == pinned {
                            return false;
                        }
                    }
                    true
                })
            })
        },
    )
    .unwrap();
    client.run(|| {
        block_on(async {
            for _ in 0..20 {
                let r = get_with_cookie(Some(&cookie)).await;
                assert_eq!(r.backend(), pinned, "a drained backend keeps its clients");
            }
        })
    });

    // Its server gone: the next request goes elsewhere with a new cookie,
    // and stays there.
    drop(servers.remove(idx));
    let (moved, new_cookie) = client.run(|| {
        block_on(async {
            let r = get_with_cookie(Some(&cookie)).await;
            (r.backend().to_string(), set_cookie(&r))
        })
    });
    assert_ne!(moved, pinned);
    let new_cookie = new_cookie.expect("a new cookie for a moved client");
    assert_ne!(new_cookie, cookie);
    assert_eq!(Some(&new_cookie), tokens.get(&moved));
    client.run(|| {
        block_on(async {
            for _ in 0..20 {
                let r = get_with_cookie(Some(&new_cookie)).await;
                assert_eq!(r.backend(), moved);
                assert_eq!(set_cookie(&r), None);
            }
        })
    });
}
