//! `capture agent` and `capture pod add|remove|list`: the node agent and its control-socket client.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use super::{
    Options, PodSpec,
    control::{self, DEFAULT_SOCKET, Request, Response},
    registry::Settings,
};

/// Exit code for a request the agent refused (bad flags, unknown namespace): bad input, as for `capture`.
const EXIT_REFUSED: u8 = 2;

#[derive(Parser)]
#[command(name = "capture", about = "capture's node agent and its client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: attach the programs once, capture pods as their sources say, keep records.
    Agent {
        /// The control socket (root only).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// bpffs directory of the programs and maps.
        #[arg(long, default_value = crate::config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// cgroup v2 directory the programs attach to [default: with --kubernetes, the pods' parent cgroup,
        /// kubepods.slice or kubepods under --cgroup-root; else --cgroup-root itself].
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// The root of the host's cgroup v2 hierarchy, where the default --cgroup is found [default: from
        /// /proc/mounts].
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Directory of the agent's records (tmpfs, like the pins).
        #[arg(long, default_value = "/run/capture/agent")]
        state_dir: PathBuf,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = "127.0.0.1:15081")]
        listen: std::net::SocketAddr,
        /// Log lines as JSON objects.
        #[arg(long)]
        log_json: bool,
        /// Also capture this node's injected pods from Kubernetes (node name from $NODE_NAME, in-cluster
        /// credentials or $KUBECONFIG).
        #[arg(long)]
        kubernetes: bool,
    },
    /// Ask the running agent to capture, release or list pods.
    Pod {
        /// The agent's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET, global = true)]
        socket: PathBuf,
        #[command(subcommand)]
        action: PodAction,
    },
}

#[derive(Subcommand)]
enum PodAction {
    /// Capture a pod: its id, its network namespace, then istio-iptables flags after `--`.
    Add {
        /// A unique name (e.g. namespace/pod).
        id: String,
        /// The pod's network namespace (/proc/PID/ns/net, /run/netns/NAME).
        netns: PathBuf,
        /// istio-iptables flags, as `capture` takes them.
        #[arg(last = true, allow_hyphen_values = true)]
        flags: Vec<String>,
    },
    /// Release a pod.
    Remove {
        /// Its id.
        id: String,
    },
    /// List the captured pods.
    List,
}

/// Runs `capture agent …` or `capture pod …` (argv as given, program name first).
pub fn main(args: Vec<std::ffi::OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            eprintln!(
                "capture: {}",
                text.lines().next().unwrap_or_default().trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capture: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Agent {
            socket,
            pin_dir,
            cgroup,
            cgroup_root,
            state_dir,
            listen,
            log_json,
            kubernetes,
        } => {
            use std::io::IsTerminal as _;
            let subscriber = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal());
            if log_json {
                subscriber.json().init();
            } else {
                subscriber.init();
            }
            let root = move || cgroup_root.map_or_else(crate::cgroup::cgroup2_root, Ok);
            let cgroup = match cgroup {
                Some(c) => c,
                None if kubernetes => crate::cgroup::kubepods(&root()?)?,
                None => root()?,
            };
            super::run(Options {
                settings: Settings {
                    pin_dir,
                    cgroup,
                    state_dir,
                },
                socket,
                listen,
                kubernetes: kubernetes.then(super::kube::KubeSource::from_env).transpose()?,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pod { socket, action } => {
            let request = match action {
                PodAction::Add { id, netns, flags } => Request::Add {
                    pod: PodSpec { id, netns, flags },
                },
                PodAction::Remove { id } => Request::Remove { id },
                PodAction::List => Request::List,
            };
            match control::request(&socket, &request)? {
                Response::Done { changed } => {
                    if !changed {
                        eprintln!("capture: nothing to change");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Response::Pods { pods } => {
                    for p in pods {
                        let source = serde_json::to_string(&p.source).context("source")?;
                        println!(
                            "{}\t{}\tnetns-cookie={}\tsource={}\t{}",
                            p.spec.id,
                            p.spec.netns.display(),
                            p.cookie,
                            source.trim_matches('"'),
                            p.spec.flags.join(" ")
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Response::Error { message } => {
                    eprintln!("capture: {message}");
                    Ok(ExitCode::from(EXIT_REFUSED))
                }
            }
        }
    }
}
