//! Backend server for end-to-end tests and demos: answers every TCP line and
//! every UDP datagram with `NAME PEER`.
//!
//! Usage: lb-echo --name NAME [--tcp ADDR:PORT]... [--udp ADDR:PORT]...

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: lb-echo --name NAME [--tcp ADDR:PORT]... [--udp ADDR:PORT]...";

struct Args {
    name: String,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut name = None;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
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
            "--tcp" | "--udp" => {
                let addr = value
                    .parse()
                    .with_context(|| format!("{flag} {value}: expected ADDR:PORT"))?;
                if flag == "--tcp" {
                    tcp.push(addr);
                } else {
                    udp.push(addr);
                }
            }
            _ => bail!("unknown argument {flag}"),
        }
    }
    let Some(name) = name else {
        bail!("--name is required");
    };
    if name.contains(char::is_whitespace) {
        bail!("--name must not contain whitespace");
    }
    if tcp.is_empty() && udp.is_empty() {
        bail!("give at least one --tcp or --udp address");
    }
    Ok(Args { name, tcp, udp })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("lb-echo: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match lb_tests::echo::serve(&args.name, &args.tcp, &args.udp) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-echo {}: {e:#}", args.name);
            ExitCode::FAILURE
        }
    }
}
