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
use lb_tests::swarm::{container_netns, create_network, create_service, IMAGE};
use lb_tests::topology::LB_CLIENT_V4;

/// How long a labelled container may take to be routed (or unrouted).
const ROUTED: Duration = Duration::from_secs(1);
/// lb-http in a fresh container needs a moment to listen.
const READY: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(60);

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

    fn start_router(&mut self, config: &str) {
        let host = format!("unix://{}", self.dockerd.socket().display());
        let args = ["--docker", "--docker-host", &host];
        let router = Router::start_in(&self.at, config, &[], &args).expect("lbrouter");
        self.router = Some(router);
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
    node.start_router("");
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
    node.start_router("");
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

    // The scenario: the second service is routed by labels alone.
    node.dockerd
        .docker(&[
            "service",
            "update",
            "--detach",
            "--label-add",
            "com.df.notify=true",
            "--label-add",
            "com.df.servicePath=/",
            "--label-add",
            "com.df.port=8000",
            "site",
        ])
        .expect("service update");
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

    // An unsupported df label takes the service out, with a reason.
    node.dockerd
        .docker(&[
            "service",
            "update",
            "--detach",
            "--label-add",
            "com.df.reqPathSearchReplace=/a,/b",
            "site",
        ])
        .unwrap();
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
