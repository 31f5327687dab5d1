//! `capture-probe`'s line protocol: every line it prints on stdout, as one type that the probe prints
//! ([`Line`]'s `Display`) and the harness parses (its `FromStr`), so the two cannot drift apart.
//!
//! ```text
//! ready                                      listen/hold: everything is bound
//! accepted <listener port> <peer> <dst|->    listen: a TCP connection, with SO_ORIGINAL_DST if any
//! udp <listener port> <peer>                 listen: a datagram (echoed back)
//! ok <local> [from <reply source>]           connect: it worked (UDP: where the echo came from)
//! err <text>                                 connect, or any command that could not run
//! ```

use std::{fmt, net::SocketAddr, str::FromStr};

/// What a listener saw of one accepted connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The port of the listener that accepted it.
    pub listener: u16,
    /// The client's address.
    pub peer: SocketAddr,
    /// `SO_ORIGINAL_DST` on the accepted socket, if the kernel had an answer.
    pub original_dst: Option<SocketAddr>,
}

/// What a UDP listener saw of one datagram (which it echoed back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// The port of the socket that received it.
    pub listener: u16,
    /// The sender's address.
    pub peer: SocketAddr,
}

/// One line of `capture-probe`'s output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// `ready`: a listener (or `hold`) has bound everything.
    Ready,
    /// `accepted …`: a listener accepted a TCP connection.
    Accepted(Accepted),
    /// `udp …`: a UDP listener received (and echoed) a datagram.
    Udp(Datagram),
    /// `ok …`: `connect` worked.
    Ok {
        /// The connection's local address.
        local: SocketAddr,
        /// UDP: where the reply came from.
        from: Option<SocketAddr>,
    },
    /// `err …`: what failed (the step and the OS error), or why the command could not run.
    Err(String),
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Ready => f.write_str("ready"),
            Line::Accepted(Accepted {
                listener,
                peer,
                original_dst,
            }) => match original_dst {
                Some(dst) => write!(f, "accepted {listener} {peer} {dst}"),
                None => write!(f, "accepted {listener} {peer} -"),
            },
            Line::Udp(Datagram { listener, peer }) => write!(f, "udp {listener} {peer}"),
            Line::Ok { local, from: None } => write!(f, "ok {local}"),
            Line::Ok {
                local,
                from: Some(from),
            } => write!(f, "ok {local} from {from}"),
            Line::Err(text) => write!(f, "err {text}"),
        }
    }
}

/// A line that is not one of [`Line`]'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine(pub String);

impl fmt::Display for BadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a capture-probe line: {:?}", self.0)
    }
}

impl std::error::Error for BadLine {}

impl FromStr for Line {
    type Err = BadLine;

    fn from_str(line: &str) -> Result<Line, BadLine> {
        let bad = || BadLine(line.to_owned());
        if let Some(text) = line.strip_prefix("err ") {
            return Ok(Line::Err(text.to_owned()));
        }
        let field = |word: &str| word.parse().map_err(|_| bad());
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["ready"] => Ok(Line::Ready),
            ["accepted", port, peer, dst] => Ok(Line::Accepted(Accepted {
                listener: port.parse().map_err(|_| bad())?,
                peer: field(peer)?,
                original_dst: if *dst == "-" { None } else { Some(field(dst)?) },
            })),
            ["udp", port, peer] => Ok(Line::Udp(Datagram {
                listener: port.parse().map_err(|_| bad())?,
                peer: field(peer)?,
            })),
            ["ok", local] => Ok(Line::Ok {
                local: field(local)?,
                from: None,
            }),
            ["ok", local, "from", from] => Ok(Line::Ok {
                local: field(local)?,
                from: Some(field(from)?),
            }),
            _ => Err(bad()),
        }
    }
}
