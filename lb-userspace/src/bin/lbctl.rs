//! lbctl: asks a running lbd what it serves.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use lb_userspace::control::{self, Request, Response};
use lb_userspace::status::render_table;

#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// lbd's control socket.
    #[arg(long, default_value = control::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Services, backends, their state and counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send no new flows to BACKEND (ip:port) of SERVICE; its established
    /// flows continue until they end.
    Drain { service: String, backend: String },
    /// Undo `drain`.
    Undrain { service: String, backend: String },
}

fn done(response: Response) -> Result<()> {
    match response {
        Response::Done(msg) => {
            println!("{msg}");
            Ok(())
        }
        Response::Error(e) => bail!("lbd: {e}"),
        Response::Status(_) => bail!("lbd answered something else"),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Status { json } => match control::request(&args.socket, &Request::Status)? {
            Response::Status(status) if json => {
                println!("{}", serde_json::to_string_pretty(&status)?)
            }
            Response::Status(status) => print!("{}", render_table(&status)),
            Response::Done(_) => bail!("lbd answered something else"),
            Response::Error(e) => bail!("lbd: {e}"),
        },
        Command::Drain { service, backend } => done(control::request(
            &args.socket,
            &Request::Drain { service, backend },
        )?)?,
        Command::Undrain { service, backend } => done(control::request(
            &args.socket,
            &Request::Undrain { service, backend },
        )?)?,
    }
    Ok(())
}
