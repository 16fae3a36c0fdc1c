//! qnet-hookd: the qnet daemon.

use std::process::ExitCode;

use clap::Parser;
use qnet_hookd::cli::Hookd as Cli;
use qnet_hookd::daemon::{self, Paths};
use qnet_hookd::systemd;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check {
        return check(&cli.config);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .init();

    // Before the runtime starts threads: it removes LISTEN_* from the
    // environment.
    let passed = match systemd::take_passed_sockets(&cli.ctl_socket, &cli.qmp_socket) {
        Ok(passed) => passed,
        Err(e) => {
            eprintln!("qnet-hookd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let paths = Paths {
        config: cli.config,
        run_dir: cli.run_dir,
        state_dir: cli.state_dir,
        ctl_socket: cli.ctl_socket,
        qmp_socket: cli.qmp_socket,
    };
    // The daemon is I/O-bound: two workers. Its blocking work (a guest's
    // /proc walk, nfnetlink batches) takes a millisecond at most; a few
    // threads for it are enough, where tokio's default of 512 would start
    // a thread (with its stack and malloc arena) for each of hundreds of
    // QEMUs connecting at once.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qnet-hookd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = async {
        if cli.cleanup {
            daemon::cleanup().await
        } else {
            daemon::run(paths, passed).await
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qnet-hookd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--check`: validates the configuration (hookd.toml and the run-time
/// networks next to it) the way a start or reload would, touching
/// nothing; one line on stdout or stderr, and the exit status.
fn check(config: &std::path::Path) -> ExitCode {
    match qnet_hookd::config::Config::load(config) {
        Ok(loaded) => {
            let runtime = loaded.origins.values().filter(|o| o.runtime).count();
            println!(
                "{}: ok: {} network(s) ({runtime} created at run time){}, {} forward(s)",
                config.display(),
                loaded.networks.len(),
                if loaded.use_default_network {
                    " plus the default network"
                } else {
                    ""
                },
                loaded.forwards.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qnet-hookd: {e}");
            ExitCode::FAILURE
        }
    }
}
