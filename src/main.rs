//! `vncgate`: CLI parsing and dispatch. `serve` runs the daemon; the other commands are
//! clients of its control API.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use vncgate::client::ApiClient;
use vncgate::config::ServeArgs;
use vncgate::{Daemon, raise_nofile_limit};

#[derive(Parser)]
#[command(
    name = "vncgate",
    version,
    about = "VNC consoles of many VMs in the browser, through one daemon"
)]
struct Cli {
    /// Control API of the daemon (client commands)
    #[arg(
        long,
        global = true,
        env = "VNCGATE_API",
        default_value = "http://127.0.0.1:6080"
    )]
    api: String,
    /// File whose first line is the API bearer token: for `serve`, the token the API requires;
    /// for client commands, the token they send (else VNCGATE_API_TOKEN)
    #[arg(long, global = true, env = "VNCGATE_API_TOKEN_FILE")]
    api_token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per run; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the daemon
    Serve(ServeArgs),
    /// Open (or retarget) the console session of a VM; prints its console url
    Open {
        vm_id: String,
        /// VNC server: host:port, [v6]:port or unix:/path
        target: String,
        /// Print the whole Session as JSON
        #[arg(long)]
        json: bool,
        /// Close a viewer that sent and got no data this long (e.g. 15m); this session only
        #[arg(long, value_name = "DURATION")]
        idle_timeout: Option<String>,
        /// Close the session this long after it is created (e.g. 8h)
        #[arg(long, value_name = "DURATION")]
        max_lifetime: Option<String>,
    },
    /// Close the console session of a VM
    Close { vm_id: String },
    /// List sessions
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show pool and session status
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a cleanup pass now: close sessions without viewers whose VNC server is gone
    Cleanup {
        #[arg(long)]
        json: bool,
    },
    /// Disconnect one viewer of a VM's console (ids are in `vncgate list --json`)
    Kick { vm_id: String, viewer_id: String },
    /// Issue a new token for a VM's console (the old link stops working); prints the new url
    Rotate {
        vm_id: String,
        /// Also close the live viewers (1008 "token revoked")
        #[arg(long)]
        disconnect: bool,
    },
    /// Print the shell completion script: vncgate completions bash > /etc/bash_completion.d/vncgate
    Completions { shell: clap_complete::Shell },
    /// Print a man page (roff): vncgate man > vncgate.1, vncgate man serve > vncgate-serve.1
    #[command(hide = true)]
    Man {
        /// The subcommand whose page to print (its flags); none: the main page
        subcommand: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vncgate: {}", error_text(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: most of our errors already name their cause in their
/// message, and `{:#}` would print it a second time.
fn error_text(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    let mut parent = text.clone();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        // Only the error it came from can have named it already.
        if !parent.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        parent = cause;
    }
    text
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = || -> anyhow::Result<ApiClient> {
        let token = match &cli.api_token_file {
            Some(path) => Some(vncgate::access::read_token_file(path)?),
            None => std::env::var("VNCGATE_API_TOKEN").ok(),
        };
        Ok(ApiClient::new(
            &cli.api,
            token,
            std::env::var_os("VNCGATE_API_CA").map(Into::into),
        )?)
    };
    let output = match &cli.command {
        Command::Completions { shell } => {
            // Into memory first: clap_complete panics when its writer fails.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "vncgate", &mut script);
            return write_stdout(&script);
        }
        Command::Man { subcommand } => {
            let main = Cli::command();
            let page = match subcommand {
                None => main,
                Some(name) => {
                    let sub = main
                        .find_subcommand(name)
                        .with_context(|| format!("no subcommand {name:?}"))?
                        .clone();
                    // A one-shot command: the title string lives until exit anyway.
                    let title: &'static str = format!("vncgate-{name}").leak();
                    sub.name(title).version(env!("CARGO_PKG_VERSION"))
                }
            };
            let mut roff = Vec::new();
            clap_mangen::Man::new(page)
                .render(&mut roff)
                .context("cannot render the man page")?;
            return write_stdout(&roff);
        }
        Command::Serve(args) => {
            let mut args = args.clone();
            args.api_token_file = cli.api_token_file.clone();
            return serve(&args).await;
        }
        Command::Rotate { vm_id, disconnect } => client()?.rotate(vm_id, *disconnect).await?,
        Command::Kick { vm_id, viewer_id } => client()?.kick(vm_id, viewer_id).await?,
        Command::Cleanup { json } => client()?.cleanup(*json).await?,
        Command::Open {
            vm_id,
            target,
            json,
            idle_timeout,
            max_lifetime,
        } => {
            let limits = vncgate::client::OpenLimits {
                idle_timeout: idle_timeout.clone(),
                max_lifetime: max_lifetime.clone(),
            };
            client()?.open(vm_id, target, &limits, *json).await?
        }
        Command::Close { vm_id } => client()?.close(vm_id).await?,
        Command::List { json } => client()?.list(*json).await?,
        Command::Status { json } => client()?.status(*json).await?,
    };
    write_stdout(format!("{output}\n").as_bytes())
}

/// Writes a command's output. A reader that went away (`vncgate list | head`) ends the command
/// quietly, as other command-line tools do; any other failure (a full disk) is an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write the output"),
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    // Resolved once for the log settings, then again with the sink installed so the warnings
    // resolving gives (clamped values, an ephemeral-range overlap) reach it.
    let first = args.resolve().context("invalid configuration")?;
    let log = vncgate::events::install(first.log_format, first.log_level.as_deref())
        .map_err(anyhow::Error::msg)?;
    let config = args.resolve().context("invalid configuration")?;
    raise_nofile_limit();
    // Installed before the start: a SIGHUP (a certificate renewal hook) while the daemon binds
    // its sessions must not take the default action, which ends the process.
    let mut signals = Signals::install()?;
    let daemon = Daemon::start(config).await?;
    signals.run_until_stopped(&daemon, args, &log).await;
    tracing::info!("shutting down");
    daemon.shutdown().await;
    Ok(())
}

/// The signals `serve` handles, each installed once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?,
        })
    }

    /// Waits for SIGINT or SIGTERM; SIGHUP on the way reloads certificates, the API token and
    /// the configuration file.
    async fn run_until_stopped(
        &mut self,
        daemon: &Daemon,
        args: &ServeArgs,
        log: &vncgate::events::LogControl,
    ) {
        loop {
            tokio::select! {
                _ = self.int.recv() => return,
                _ = self.term.recv() => return,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    // The config file again (flags and environment are what they were).
                    daemon.hangup(args.resolve().map_err(|e| e.to_string()), log);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot lock {path}: {source}")]
    struct Locking {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let named = anyhow::Error::new(Locking {
            path: "/x.lock".into(),
            source: io(),
        });
        assert_eq!(error_text(&named), format!("cannot lock /x.lock: {}", io()));
        let wrapped = anyhow::Error::new(io()).context("cannot write the output");
        assert_eq!(
            error_text(&wrapped),
            format!("cannot write the output: {}", io())
        );
    }
}
