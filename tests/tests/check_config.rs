//! lbd's checks before it runs: `--check-config FILE`, and no source at all.

use std::process::Command;

use lb_tests::topology::target_bin;

fn check(tag: &str, text: &str) -> (bool, String, String) {
    check_with("lbd", tag, text)
}

fn check_with(bin: &str, tag: &str, text: &str) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("lbt-check-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lbd.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(target_bin(bin))
        .arg("--check-config")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_configuration_passes() {
    let (ok, stdout, _) = check(
        "valid",
        "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\n\
         backends = [\"10.72.1.2:8080\"]\n",
    );
    assert!(ok);
    assert!(stdout.contains("ok (1 services)"), "{stdout}");
}

#[test]
fn an_invalid_configuration_names_the_line_and_fails() {
    let (ok, _, stderr) = check(
        "invalid",
        "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80\"\n\
         backends = [\"10.72.1.2:8080\"]\n",
    );
    assert!(!ok);
    assert!(stderr.contains("lbd.toml:3:"), "{stderr}");
    assert!(stderr.contains("missing protocol"), "{stderr}");
}

/// lbrouter's routes live in the same file: lbd checks them with the same
/// parser, so both daemons agree on which files are valid.
#[test]
fn lbd_checks_the_http_routes_too() {
    let service = "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\n\
                   backends = [\"10.72.1.2:8080\"]\n";
    let (ok, stdout, stderr) = check(
        "http-valid",
        &format!(
            "{service}[[http.route]]\nname = \"api\"\nhost = \"*.example.com\"\n\
             path = \"/api\"\nbackends = [\"10.72.1.2:8080\"]\n"
        ),
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (1 services)"), "{stdout}");
    let (ok, _, stderr) = check(
        "http-invalid",
        &format!("{service}[[http.route]]\nname = \"api\"\npath = \"api\"\nbackends = [\"10.72.1.2:8080\"]\n"),
    );
    assert!(!ok);
    assert!(
        stderr.contains("lbd.toml:7: path \"api\": must start with /"),
        "{stderr}"
    );
}

/// The sticky cookies and the certificates of `[http]`: lbd and lbrouter
/// refuse the same mistakes at the same line.
#[test]
fn lbd_and_lbrouter_agree_on_sticky_cookies_and_certificates() {
    let route = "[[http.route]]\nname = \"shop\"\nbackends = [\"10.72.1.2:8080\"]\n";
    let cases = [
        (
            format!("{route}sticky_cookie = \"a;b\"\n"),
            "lbd.toml:4: sticky_cookie \"a;b\": use letters",
        ),
        (
            format!("{route}[http.tls]\n"),
            "lbd.toml:4: missing field `certificate`",
        ),
        (
            format!("{route}[[http.tls.certificate]]\ncert = \"\"\nkey = \"a.key\"\n"),
            "lbd.toml:5: certificate cert is empty",
        ),
        (
            format!("{route}[[http.tls.certificate]]\ncert = \"a.pem\"\nkeys = \"a.key\"\n"),
            "lbd.toml:6: unknown field `keys`",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        for bin in ["lbd", "lbrouter"] {
            let (ok, _, stderr) = check_with(bin, &format!("tls{i}-{bin}"), text);
            assert!(!ok, "{bin} took:\n{text}");
            assert!(stderr.contains(expected), "{bin}: {stderr}");
        }
    }
    let (ok, stdout, stderr) = check_with(
        "lbrouter",
        "sticky-ok",
        &format!("{route}sticky_cookie = \"lbsticky\"\n"),
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (1 routes, 0 certificates)"), "{stdout}");
    assert!(
        check_with(
            "lbd",
            "sticky-ok-lbd",
            &format!("{route}sticky_cookie = \"s\"\n")
        )
        .0
    );
}

#[test]
fn lbd_without_any_source_says_so() {
    if std::path::Path::new("/etc/lbd/lbd.toml").exists() {
        // The default configuration is this machine's: nothing to check here.
        return;
    }
    let out = Command::new(target_bin("lbd"))
        .args([
            "--pin-dir",
            "/sys/fs/bpf/lbt-nosource",
            "--socket",
            "/tmp/lbt-nosource.sock",
        ])
        .output()
        .expect("running lbd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no source of services"), "{stderr}");
    assert!(!std::path::Path::new("/sys/fs/bpf/lbt-nosource").exists());
}

/// Settings come from the environment too (`LBD_*`), and a flag wins over
/// its variable.
#[test]
fn settings_are_read_from_the_environment_and_flags_win() {
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(target_bin("lbd"))
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .args(args)
            .arg("--check-config")
            .arg("/nonexistent/lbd.toml")
            .output()
            .expect("running lbd");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Parsed from the environment: a bad value is refused as a flag's would be.
    let stderr = run(&[("LBD_LOG_LEVEL", "loud")], &[]);
    assert!(
        stderr.contains("invalid value 'loud'") && stderr.contains("--log-level"),
        "{stderr}"
    );
    let stderr = run(&[("LBD_MAX_FLOWS", "many")], &[]);
    assert!(stderr.contains("invalid value 'many'"), "{stderr}");
    // The flag wins: the bad variable is never parsed.
    let stderr = run(&[("LBD_LOG_LEVEL", "loud")], &["--log-level", "warn"]);
    assert!(!stderr.contains("invalid value"), "{stderr}");
    assert!(stderr.contains("/nonexistent/lbd.toml"), "{stderr}");
}
