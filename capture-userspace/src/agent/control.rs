//! The agent's local control socket: a Unix socket that only root may use, one JSON request per line and
//! one JSON response per line. `capture pod add|remove|list` is its client; a CNI plugin or a test can
//! speak it as well.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
};

use super::{Agent, PodSpec, registry::PodRecord};

/// Where the socket is unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/capture/agent.sock";
/// How long a client waits for the agent's answer (a registration takes milliseconds).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A request to the agent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Capture a pod (or update it).
    Add {
        /// The pod.
        pod: PodSpec,
    },
    /// Release a pod.
    Remove {
        /// Its id.
        id: String,
    },
    /// Every captured pod.
    List,
}

/// The agent's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    /// Done; `changed` is false when the request changed nothing (the same pod added twice, an unknown pod
    /// removed).
    Done {
        /// Whether anything changed.
        changed: bool,
    },
    /// The captured pods.
    Pods {
        /// Each with its source and namespace cookie.
        pods: Vec<PodRecord>,
    },
    /// The request failed; nothing was applied.
    Error {
        /// One line naming what was wrong.
        message: String,
    },
}

/// Serves the control socket at `path` until the task is dropped.
pub async fn serve(path: &Path, agent: Arc<Agent>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // A socket left by an agent that was killed.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    loop {
        let (stream, _) = listener.accept().await.context("accept on the control socket")?;
        let agent = agent.clone();
        tokio::spawn(async move {
            let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = if root {
                    match serde_json::from_str::<Request>(&line) {
                        Ok(request) => handle(&agent, request).await,
                        Err(e) => Response::Error {
                            message: format!("bad request: {e}"),
                        },
                    }
                } else {
                    Response::Error {
                        message: "the control socket is for root only".into(),
                    }
                };
                let mut out = serde_json::to_vec(&response).expect("responses serialize");
                out.push(b'\n');
                if write.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn handle(agent: &Arc<Agent>, request: Request) -> Response {
    let agent = agent.clone();
    // Registration makes syscalls and starts a thread: off the async workers.
    let result = tokio::task::spawn_blocking(move || match request {
        Request::Add { pod } => agent
            .apply(super::SourceEvent::Upsert(pod), super::registry::Source::Control)
            .map(|changed| Response::Done { changed }),
        Request::Remove { id } => agent
            .apply(super::SourceEvent::Remove(id), super::registry::Source::Control)
            .map(|changed| Response::Done { changed }),
        Request::List => Ok(Response::Pods { pods: agent.pods() }),
    })
    .await;
    match result {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => Response::Error {
            message: format!("{e:#}"),
        },
        Err(e) => Response::Error {
            message: format!("the agent failed: {e}"),
        },
    }
}

/// Sends one request to the agent at `socket` and returns its answer (the client side of `capture pod`).
pub fn request(socket: &Path, request: &Request) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to the agent at {} (is `capture agent` running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).context("send the request")?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("read the agent's answer")?;
    if answer.is_empty() {
        bail!("the agent closed the connection without an answer");
    }
    serde_json::from_str(&answer).context("the agent's answer")
}
