//! Workspace tasks, run as `cargo xtask <command>` from anywhere in the repo.

mod bench;
mod cargo;
#[cfg(test)]
mod deps;
mod man;
mod package;
mod setup;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(bin_name = "cargo xtask")]
#[command(about = "Build, test and demo tasks for the load balancer workspace")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing apt packages, rust-src for the eBPF toolchain and bpf-linker
    Setup,
    /// Set up, then build the release binaries (lbd, lbctl, ...) into target/release, with man pages and completions
    Build,
    /// Set up, build, then make a Debian package of lbd and lbctl (target/package/lb_<version>_<arch>.deb)
    Package,
    /// Write man pages (target/release/man) and bash, zsh and fish completions (target/release/completions) for lbd and lbctl; builds nothing
    Man,
    /// Build, then run every test serially on this kernel, then the VM suites on Debian's 6.1 kernel (as vm-test); arguments after `--` go to the test binaries
    Test {
        /// Skip the VM suites (about 10 minutes under emulation)
        #[arg(long)]
        no_vm: bool,
        /// e.g. a test name filter or --nocapture
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then run the VM suites (packet fixtures, end-to-end, Docker and Swarm tests, the IPVS comparison) on Debian's 6.1 kernel in qemu
    VmTest {
        /// Only these suites (fixtures, fixtures_icmp, fixtures_xdp, e2e, docker_lb, swarm_ipvs), comma-separated; SUITE:FILTER runs only its tests whose names hold FILTER
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Build, then run the benchmarks and write BENCHMARKS.md (with --quick: target/bench-quick/)
    Bench {
        /// Shorter runs and fewer scales (under three minutes)
        #[arg(long)]
        quick: bool,
        /// Extra lb-bench options, e.g. `--only pktcost`
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then run lb-demo against examples/demo.toml (with --docker: a one-node Swarm); arguments after `--` go to lb-demo
    Demo {
        /// Run the Docker Swarm demo: a published port that answers only with lbd
        #[arg(long)]
        docker: bool,
        /// Extra lb-demo options
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => {
            setup::run()?;
        }
        Task::Build => {
            build(&setup::run()?)?;
            man::run(&release_dir())?;
        }
        Task::Man => man::run(&release_dir())?,
        Task::Package => {
            build(&setup::run()?)?;
            man::run(&release_dir())?;
            package::run(&cargo::workspace_root())?;
        }
        Task::Test { no_vm, args } => {
            let env = setup::run()?;
            setup::ensure_packages(setup::TEST_PACKAGES, &[], "test")?;
            build(&env)?;
            // The package tests read the package of this very build.
            man::run(&release_dir())?;
            package::run(&cargo::workspace_root())?;
            // The e2e tests share network namespaces and kernel state, so they
            // must not run concurrently.
            cargo::run(
                cargo::cargo(&env)
                    .args(["test", "--release"])
                    .args(cargo::WORKSPACE)
                    .args(["--", "--test-threads=1"])
                    .args(&args),
            )?;
            // A name filter picks tests on this kernel only: the VM runs
            // its suites whole.
            let filtered = args.iter().any(|a| !a.starts_with('-'));
            if !no_vm && !filtered {
                vm::run(&env, &[])?;
            }
        }
        Task::VmTest { only } => vm::run(&setup::run()?, &only)?,
        Task::Bench { quick, args } => {
            let env = setup::run()?;
            build(&env)?;
            bench::run(&env, quick, &args)?;
        }
        Task::Demo { docker, args } => {
            let env = setup::run()?;
            build(&env)?;
            let mode: &[&str] = if docker {
                &["--docker"]
            } else {
                &["--config", "examples/demo.toml"]
            };
            cargo::run(
                cargo::command(cargo::workspace_root().join("target/release/lb-demo"), &env)
                    .args(mode)
                    .args(args),
            )?;
        }
    }
    Ok(())
}

fn release_dir() -> std::path::PathBuf {
    cargo::workspace_root().join("target/release")
}

/// Builds every binary of the workspace, lb-demo included.
fn build(env: &cargo::Env) -> Result<()> {
    cargo::run(
        cargo::cargo(env)
            .args(["build", "--release"])
            .args(cargo::WORKSPACE)
            .arg("--bins"),
    )
}
