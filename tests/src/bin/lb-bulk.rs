//! Bulk-transfer server for end-to-end tests: sends or sinks a requested
//! number of bytes of a known pattern (see `lb_tests::bulk`).
//!
//! Usage: lb-bulk --name NAME --tcp ADDR:PORT [--tcp ADDR:PORT]...

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: lb-bulk --name NAME --tcp ADDR:PORT [--tcp ADDR:PORT]...";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<(String, Vec<SocketAddr>)> {
    let mut name = None;
    let mut tcp = Vec::new();
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--name" => name = Some(value),
            "--tcp" => tcp.push(
                value
                    .parse()
                    .with_context(|| format!("--tcp {value}: expected ADDR:PORT"))?,
            ),
            _ => bail!("unknown argument {flag}"),
        }
    }
    let Some(name) = name else {
        bail!("--name is required");
    };
    if name.contains(char::is_whitespace) {
        bail!("--name must not contain whitespace");
    }
    if tcp.is_empty() {
        bail!("give at least one --tcp address");
    }
    Ok((name, tcp))
}

fn main() -> ExitCode {
    let (name, tcp) = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("lb-bulk: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match lb_tests::bulk::serve(&name, &tcp) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bulk {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
