//! The `nbdfault` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use nbdfault::cli::{Cli, Command, ServeArgs};
use nbdfault::config::Config;
use nbdfault::server::{self, Server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    nbdfault::logging::init(cli.verbose as i8 - cli.quiet as i8);
    match cli.command {
        Command::Serve(args) => serve(&args),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match Config::load(&args.overrides()) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the async runtime: {error}")),
    };
    runtime.block_on(async {
        let server = match Server::start(&config).await {
            Ok(server) => server,
            Err(error) => return fail(&error),
        };
        let addresses = server.local_addresses();
        for address in &addresses {
            for export in server.exports().iter() {
                tracing::info!(export = %export.name, size = export.size(), "serving nbd://{address}/{}", export.name);
            }
        }
        server::announce_ready(&addresses, server.control_address());
        server.run(server::termination_signal()).await;
        ExitCode::SUCCESS
    })
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("nbdfault: {error}");
    ExitCode::from(2)
}
