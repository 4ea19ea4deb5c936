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
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Status { json } => match control::request(&args.socket, &Request::Status)? {
            Response::Status(status) if json => {
                println!("{}", serde_json::to_string_pretty(&status)?)
            }
            Response::Status(status) => print!("{}", render_table(&status)),
            Response::Error(e) => bail!("lbd: {e}"),
        },
    }
    Ok(())
}
