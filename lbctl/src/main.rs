//! lbctl: asks a running lbd what it serves and tells it what to change.

use anyhow::{bail, Result};
use clap::Parser;
use lb_api::cli::lbctl::{Args, Command, Conntrack};
use lb_api::control::{self, Request, Response};
use lb_api::{connections, status};

fn main() -> Result<()> {
    let args = Args::parse();
    let ask = |request: Request| match control::request(&args.socket, &request)? {
        Response::Error(e) => bail!("lbd: {e}"),
        other => Ok(other),
    };
    match args.command {
        Command::Status { service, json, all } => {
            let Response::Status(mut status) = ask(Request::Status)? else {
                bail!("lbd answered something else");
            };
            if let Some(wanted) = service {
                status::retain_service(&mut status, &wanted).map_err(anyhow::Error::msg)?;
            }
            match json {
                true => println!("{}", serde_json::to_string_pretty(&status)?),
                false => print!("{}", status::render_table(&status, all)),
            }
        }
        Command::Drain { service, backend } => done(ask(Request::Drain { service, backend })?)?,
        Command::Undrain { service, backend } => done(ask(Request::Undrain { service, backend })?)?,
        Command::Weight {
            service,
            backend,
            weight,
            clear,
        } => {
            // clap makes WEIGHT and --clear exclusive, and one of them required.
            let weight = if clear { None } else { weight };
            done(ask(Request::Weight {
                service,
                backend,
                weight,
            })?)?
        }
        Command::Conntrack(Conntrack::List {
            service,
            limit,
            json,
        }) => {
            let Response::Connections(list) = ask(Request::ConntrackList { service, limit })?
            else {
                bail!("lbd answered something else");
            };
            match json {
                true => println!("{}", serde_json::to_string_pretty(&list)?),
                false => print!("{}", connections::render_table(&list)),
            }
        }
        Command::Conntrack(Conntrack::Flush { service }) => {
            done(ask(Request::ConntrackFlush { service })?)?
        }
        Command::Reload => done(ask(Request::Reload)?)?,
        Command::Version { json } => {
            let Response::Version(daemon) = ask(Request::Version)? else {
                bail!("lbd answered something else");
            };
            let client = env!("CARGO_PKG_VERSION");
            if json {
                let out = serde_json::json!({ "lbctl": client, "lbd": daemon });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("lbctl {client}");
                println!("lbd {}", daemon.version);
                println!("datapath layout {}", daemon.layout_version);
                println!("kernel {}", daemon.kernel);
            }
        }
    }
    Ok(())
}

fn done(response: Response) -> Result<()> {
    match response {
        Response::Done(msg) => {
            println!("{msg}");
            Ok(())
        }
        _ => bail!("lbd answered something else"),
    }
}
