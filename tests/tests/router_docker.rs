//! lbrouter `--docker` against a private dockerd: routes from container
//! labels, and from a single-node Swarm's docker-flow-proxy labels, routed
//! to the tasks directly. lbrouter, and the clients, run in the engine's
//! own namespace, from where the bridge's addresses are reachable, or for
//! Swarm in a container's on the overlay (as docker-flow-proxy runs):
//! overlay addresses are reachable only from there. Needs root; run with `--test-threads=1`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use lb_tests::docker::{build_test_image, cleanup_stale, wait_service_running, Dockerd};
use lb_tests::netns::{run_in, unique_name, Netns};
use lb_tests::process::wait_until;
use lb_tests::router::{block_on, get, Router};
use lb_tests::scratch::Scratch;
use lb_tests::swarm::{add_labels, container_netns, create_network, create_service, IMAGE};
use lb_tests::topology::LB_CLIENT_V4;

/// How long a labelled container may take to be routed (or unrouted).
const ROUTED: Duration = Duration::from_secs(1);
/// lb-http in a fresh container needs a moment to listen.
const READY: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(60);
/// The reconfigure API, inside the router's namespace, and its token.
const API: &str = "127.0.0.1:9181";
const TOKEN: &str = "router-docker-test-token";

/// The router before the engine, both before the namespace.
struct Node {
    router: Option<Router>,
    dockerd: Dockerd,
    /// Where the router and the clients run.
    at: PathBuf,
    /// Kept for its drop: the namespace goes last.
    _ns: Netns,
}

impl Node {
    fn new(tag: &str) -> Node {
        cleanup_stale();
        let ns = Netns::new(&unique_name(tag)).expect("namespace");
        // Where lb_tests::router's clients reach the router.
        ns.ip(&["addr", "add", &format!("{LB_CLIENT_V4}/32"), "dev", "lo"])
            .unwrap();
        let dockerd = Dockerd::start(&ns, tag).expect("dockerd");
        build_test_image(&dockerd, IMAGE).expect("test image");
        Node {
            router: None,
            dockerd,
            at: ns.path(),
            _ns: ns,
        }
    }

    fn start_router(&mut self, config: &str, extra: &[&str]) {
        let host = format!("unix://{}", self.dockerd.socket().display());
        let mut args = vec!["--docker", "--docker-host", &host];
        args.extend_from_slice(extra);
        let router = Router::start_in(&self.at, config, &[], &args).expect("lbrouter");
        self.router = Some(router);
    }

    /// A call to the reconfigure API, as docker-flow-swarm-listener makes
    /// it: the status and body.
    fn api(&self, call: &str) -> (u16, String) {
        let url = format!("http://{API}/v1/docker-flow-proxy/{call}");
        let out = lb_tests::netns::command_in(&self.at, "curl")
            .args([
                "-sS",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "--max-time",
                "5",
                &url,
            ])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.trim_end().rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn router(&self) -> &Router {
        self.router.as_ref().expect("started")
    }

    /// The backend answering GET `path` for `host`, or the status.
    fn backend(&self, host: &str, path: &str) -> Result<String, u16> {
        match run_in(&self.at, || block_on(get(host, path))).expect("the namespace") {
            Ok(r) if r.status == 200 => Ok(r.backend().to_string()),
            Ok(r) => Err(r.status),
            Err(_) => Err(0),
        }
    }

    /// Waits until GET `path` reaches `name`.
    fn wait_routed(&self, path: &str, name: &str, within: Duration) {
        wait_until(within, &format!("{path} to reach {name}"), || {
            self.backend("any.example", path).as_deref() == Ok(name)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.router().log()));
    }

    /// The distinct backends of `n` requests to `path`.
    fn backends(&self, path: &str, n: usize) -> BTreeSet<String> {
        (0..n)
            .filter_map(|_| self.backend("any.example", path).ok())
            .collect()
    }

    fn run(&self, name: &str, labels: &[&str]) {
        let mut args = vec!["run", "-d", "--name", name, "--hostname", name];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.push(IMAGE);
        self.dockerd.docker(&args).expect("docker run");
    }
}

#[test]
fn labelled_containers_are_routed_while_they_run() {
    let mut node = Node::new("rdl");
    node.start_router("", &[]);
    // Its server must listen before the route can be seen to work.
    node.run("web1", &["lb.http.port=8000", "lb.http.path=/web"]);
    node.wait_routed("/web/x", "web1", READY);
    node.run("bad", &["lb.http.port=http", "lb.http.path=/bad"]);
    wait_until(
        Duration::from_secs(5),
        "the bad label to be reported",
        || {
            node.router()
                .log()
                .contains("container bad skipped: lb.http.port")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));
    assert_eq!(node.backend("any.example", "/bad"), Err(404));
    assert_eq!(node.backend("any.example", "/web").as_deref(), Ok("web1"));

    // A second container of the same route joins it.
    node.run(
        "web2",
        &[
            "lb.http.port=8000",
            "lb.http.path=/web",
            "lb.http.route=web1",
        ],
    );
    wait_until(READY, "both containers to answer", || {
        node.backends("/web", 10).len() == 2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));

    // A stopped container leaves its route.
    node.run("web3", &["lb.http.port=8000", "lb.http.path=/three"]);
    node.wait_routed("/three", "web3", READY);
    node.dockerd.docker(&["stop", "-t", "1", "web3"]).unwrap();
    wait_until(ROUTED * 3, "web3's route to go", || {
        node.backend("any.example", "/three") == Err(404)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));
}

#[test]
fn swarm_services_are_routed_by_their_df_labels_to_their_tasks() {
    let mut node = Node::new("rds");
    let addr = LB_CLIENT_V4.to_string();
    node.dockerd
        .docker(&["swarm", "init", "--advertise-addr", &addr])
        .expect("swarm init");
    create_network(&node.dockerd, "apps");
    node.dockerd
        .docker(&["run", "-d", "--name", "proxy", "--network", "apps", IMAGE])
        .expect("the router's container");
    node.at = container_netns(&node.dockerd, "proxy");
    let lo = ["addr", "add", &format!("{LB_CLIENT_V4}/32"), "dev", "lo"];
    let status = lb_tests::netns::command_in(&node.at, "ip")
        .args(lo)
        .status()
        .expect("ip");
    assert!(status.success());
    let scratch = Scratch::new("rds-token");
    let token_file = scratch.0.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let token_file = token_file.display().to_string();
    node.start_router("", &["--api", API, "--api-token-file", &token_file]);
    create_service(
        &node.dockerd,
        "api",
        2,
        "",
        &[
            "--network",
            "apps",
            "--label",
            "com.df.notify=true",
            "--label",
            "com.df.servicePath=/api",
            "--label",
            "com.df.port=8000",
        ],
    );
    create_service(&node.dockerd, "site", 1, "", &["--network", "apps"]);
    let tasks = wait_service_running(&node.dockerd, "api", 2, CONVERGE).expect("api tasks");
    wait_service_running(&node.dockerd, "site", 1, CONVERGE).expect("site task");
    // Each task answers.
    wait_until(READY, "both api tasks to answer", || {
        node.backends("/api/x", 10).len() == 2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));
    assert_eq!(tasks.len(), 2);
    // Unlabelled so far: / is not routed.
    assert_eq!(node.backend("any.example", "/"), Err(404));

    // The issue's scenario: the second service is routed by labels alone.
    add_labels(
        &node.dockerd,
        "site",
        &[
            "com.df.notify=true",
            "com.df.servicePath=/",
            "com.df.port=8000",
        ],
    );
    wait_until(READY, "/ to reach site", || {
        node.backend("any.example", "/").is_ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));
    let site = node.backends("/", 5);
    let api = node.backends("/api", 10);
    assert_eq!(site.len(), 1);
    assert!(site.is_disjoint(&api), "{site:?} {api:?}");

    // Scaling adds tasks to the route.
    node.dockerd
        .docker(&["service", "scale", "--detach", "api=3"])
        .unwrap();
    wait_until(CONVERGE, "three api tasks to answer", || {
        node.backends("/api", 15).len() == 3
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));

    // docker-flow-proxy's reconfigure API routes a service without labels.
    create_service(&node.dockerd, "told", 1, "", &["--network", "apps"]);
    wait_service_running(&node.dockerd, "told", 1, CONVERGE).expect("told task");
    let call = "reconfigure?serviceName=told&servicePath=/told&port=8000&distribute=true";
    assert_eq!(node.api(call).0, 401, "no token");
    assert_eq!(
        node.api(&format!("{call}&token=wrong-token-0123456")).0,
        401
    );
    let bad = node.api(&format!("{call}&reqPathSearchReplace=/a,/b&token={TOKEN}"));
    assert_eq!(bad.0, 400);
    assert!(bad.1.contains("is not supported"), "{}", bad.1);
    let (code, body) = node.api(&format!("{call}&token={TOKEN}"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""Status":"OK""#), "{body}");
    wait_until(READY, "/told to be routed", || {
        node.backend("any.example", "/told/x").is_ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));
    let told = node.backends("/told", 5);
    assert_eq!(told.len(), 1);
    assert!(told.is_disjoint(&api), "{told:?} {api:?}");
    let (code, body) = node.api(&format!("remove?serviceName=told&token={TOKEN}"));
    assert_eq!(code, 200, "{body}");
    // What is left for /told is site's route for /.
    wait_until(ROUTED * 3, "/told to go", || {
        node.backends("/told", 3) == site
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));
    assert_eq!(node.backends("/api", 15).len(), 3, "other routes untouched");

    // An unsupported df label takes the service out, with a reason.
    add_labels(
        &node.dockerd,
        "site",
        &["com.df.reqPathSearchReplace=/a,/b"],
    );
    wait_until(Duration::from_secs(10), "site to be skipped", || {
        node.router()
            .log()
            .contains("service site skipped: com.df.reqPathSearchReplace is not supported")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node.router().log()));
    wait_until(Duration::from_secs(5), "/ to go", || {
        node.backend("any.example", "/") == Err(404)
    })
    .unwrap();
}
