//! Checks on the dependency graph that the compiler cannot make.

mod tests {
    use crate::cargo;

    /// The crates `package` needs to build: its normal dependencies and
    /// those of build scripts (not its tests').
    fn normal_dependencies(package: &str) -> Vec<String> {
        let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = std::process::Command::new(cargo_bin)
            .current_dir(cargo::workspace_root())
            .args([
                "tree",
                "--offline",
                "-e",
                "normal,build",
                "--prefix",
                "none",
                "-p",
                package,
            ])
            .output()
            .expect("running cargo tree");
        assert!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    }

    /// lbctl and lb-api build without the datapath: no aya, no eBPF crate,
    /// nothing whose build script compiles one.
    #[test]
    fn lbctl_and_lb_api_need_no_ebpf_toolchain() {
        for package in ["lbctl", "lb-api"] {
            let deps = normal_dependencies(package);
            assert!(deps.iter().any(|d| d == "lb-api"), "{package}: {deps:?}");
            for banned in ["aya", "aya-build", "lb-ebpf", "lb-userspace"] {
                assert!(
                    !deps.iter().any(|d| d == banned),
                    "{package} depends on {banned}: {deps:?}"
                );
            }
        }
        // The check can see aya where it is.
        assert!(normal_dependencies("lb-userspace")
            .iter()
            .any(|d| d == "aya"));
    }
}
