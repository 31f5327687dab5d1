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

use super::{
    Agent, PodSpec,
    registry::{self, PodRecord, Settings},
};

/// Where the socket is unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/capture/agent.sock";
/// How long a client waits for the agent's answer (a registration takes milliseconds).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pod id: a Kubernetes namespace and name (253 each) and the slash, with room to spare.
const MAX_ID_LEN: usize = 512;
/// How much of a request line an error quotes.
const EXCERPT_CHARS: usize = 80;

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
                    match parse_request(&line, &agent.registry_settings()) {
                        Ok(request) => handle(&agent, request).await,
                        Err(message) => Response::Error { message },
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

/// Reads one request line and checks everything that needs no kernel: the JSON, the pod's id and namespace
/// path, and its flags as `capture` checks them. Pure (nothing is applied); the error is one line naming
/// what was wrong.
pub fn parse_request(line: &str, settings: &Settings) -> Result<Request, String> {
    let request: Request = serde_json::from_str(line)
        // serde quotes an unknown tag or field as it was sent, newlines and all.
        .map_err(|e| format!("bad request {:?}: {}", excerpt(line), escaped(&e.to_string())))?;
    match &request {
        Request::Add { pod } => {
            check_pod(pod)?;
            registry::invocation(pod, settings).map_err(|e| format!("{e:#}"))?;
        }
        Request::Remove { id } => check_id(id)?,
        Request::List => {}
    }
    Ok(request)
}

/// A pod's id, namespace and flags fit in one line of a message and name a namespace at all.
fn check_pod(pod: &PodSpec) -> Result<(), String> {
    check_id(&pod.id)?;
    let netns = pod.netns.to_string_lossy();
    if !pod.netns.is_absolute() || netns.contains(char::is_control) {
        return Err(format!(
            "pod {}: netns {netns:?}: expected an absolute path without control characters",
            pod.id
        ));
    }
    match pod.flags.iter().find(|f| f.contains(char::is_control)) {
        Some(flag) => Err(format!("pod {}: flag {flag:?}: contains a control character", pod.id)),
        None => Ok(()),
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.contains(char::is_control) {
        return Err(format!(
            "pod id {:?}: expected 1 to {MAX_ID_LEN} bytes without control characters",
            excerpt(id)
        ));
    }
    Ok(())
}

/// The start of `text`, for an error message (which quotes it with `{:?}`, escaping control characters).
fn excerpt(text: &str) -> String {
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// `text` with its control characters (newlines above all) escaped, so that it stays on one line.
fn escaped(text: &str) -> String {
    text.chars()
        .flat_map(|c| -> Box<dyn Iterator<Item = char>> {
            if c.is_control() {
                Box::new(c.escape_default())
            } else {
                Box::new(std::iter::once(c))
            }
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::registry::test_settings as settings;

    fn refused(line: &str) -> String {
        let message = parse_request(line, &settings()).expect_err(line);
        assert!(!message.contains(['\n', '\r']), "{line}: not one line: {message:?}");
        message
    }

    // Regressions the fuzz test (`tests/fuzz.rs`) found, pinned: each answer had a newline in it.

    #[test]
    fn a_pods_bad_flag_is_refused_in_one_line() {
        // clap's rendering (usage, tips) used to be the whole answer.
        let line = r#"{"op":"add","pod":{"id":"default/app","netns":"/run/netns/x","flags":["--no-such-flag"]}}"#;
        assert_eq!(refused(line), r#"unexpected argument found: "--no-such-flag""#);
    }

    #[test]
    fn an_unknown_op_is_quoted_escaped() {
        // serde quotes an unknown tag as sent.
        let message = refused(r#"{"op":"a\nb"}"#);
        assert!(
            message.starts_with(r#"bad request "{\"op\":\"a\\nb\"}": unknown variant `a\nb`"#),
            "{message}"
        );
    }

    #[test]
    fn a_pod_id_or_netns_with_a_newline_is_refused_before_it_reaches_a_message() {
        let message = refused(r#"{"op":"add","pod":{"id":"a\nb","netns":"/run/netns/x","flags":["-n"]}}"#);
        assert!(message.starts_with(r#"pod id "a\nb": "#), "{message}");
        let message = refused(r#"{"op":"add","pod":{"id":"a","netns":"/run/\nx","flags":[]}}"#);
        assert!(message.starts_with(r#"pod a: netns "/run/\nx": "#), "{message}");
        let message = refused(r#"{"op":"add","pod":{"id":"a","netns":"/x","flags":["--pin-dir=\n/x"]}}"#);
        assert!(message.starts_with(r#"pod a: flag "--pin-dir=\n/x": "#), "{message}");
        refused(r#"{"op":"remove","id":""}"#);
    }

    #[test]
    fn a_good_request_passes_and_applies_nothing() {
        let line = r#"{"op":"add","pod":{"id":"default/app","netns":"/run/netns/x","flags":["-p","15001"]}}"#;
        assert!(matches!(parse_request(line, &settings()), Ok(Request::Add { .. })));
        assert!(!Path::new("/run/pins").exists() && !Path::new("/run/state").exists());
    }
}
