//! Fuzzing the inputs: `capture`'s flags and env vars, and the agent's control-socket requests, mutated from
//! Istio's 27 golden flag sets and generated at random (proptest). Properties: nothing panics; every
//! rejection is one line that names the input (the flag or env var, and the value); the same input always
//! gets the same answer. Nothing can be applied: the parser and the request check are pure functions, given
//! argv, the env and the request as values (`tests/tests/bad_input.rs` checks the real command applies
//! nothing).
//!
//! Each property runs for a time budget: [`SMOKE`] in `cargo xtask test`, `$CAPTURE_FUZZ_SECONDS` under
//! `cargo xtask fuzz`.

use std::{
    ffi::OsString,
    os::unix::ffi::{OsStrExt as _, OsStringExt as _},
    time::{Duration, Instant},
};

use capture::{
    agent::{control, registry::Settings},
    config::Invocation,
    flags::{self, FlagError, ISTIO_FLAGS, ParseError},
};
use proptest::{
    prelude::*,
    sample::Index,
    strategy::ValueTree as _,
    test_runner::{Config, TestCaseError, TestRunner},
};
use serde_json::{Value, json};

#[allow(
    dead_code,
    reason = "the golden test uses the cases' IPv6 and DNS facts; the fuzz test only their flags"
)]
mod golden_cases;

/// Seconds each property runs for (`cargo xtask fuzz --seconds N` sets it).
const BUDGET_ENV: &str = "CAPTURE_FUZZ_SECONDS";
/// Each property's budget without it: four properties, two at a time, well under a minute in a debug build.
const SMOKE: Duration = Duration::from_secs(8);
/// Cases per runner: a fresh seed each time, until the budget is spent.
const BATCH: u32 = 64;

/// Runs `property` on values of `strategy` until the budget is spent; panics with the (shrunk) failing input.
fn fuzz<S>(name: &str, strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let budget = std::env::var(BUDGET_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(SMOKE, Duration::from_secs);
    let started = Instant::now();
    let mut cases = 0;
    while started.elapsed() < budget {
        let mut runner = TestRunner::new(Config {
            cases: BATCH,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, &property) {
            panic!("{name}: {e}");
        }
        cases += BATCH;
    }
    eprintln!("{name}: {cases} cases in {:.1?}", started.elapsed());
}

/// Values that are one edit away from valid, or typical junk: ports out of range, bad CIDRs, wildcards,
/// empty list tokens, booleans in other languages, unicode, newlines, bytes that are not UTF-8.
fn junk() -> impl Strategy<Value = OsString> {
    let special = prop::sample::select(vec![
        "",
        "*",
        ",",
        ",,",
        "0",
        "-1",
        "65535",
        "65536",
        "4294967295",
        "4294967296",
        "99999999999999999999",
        "1337",
        "1.2.3.4/33",
        "10.0.0.0/8",
        "::/129",
        "2001:db8::/32",
        "127.0.0.1/7",
        "true",
        "yes",
        "T",
        "TPROXY",
        "redirect",
        "5s",
        "-5s",
        "1e9h",
        "µs",
        "1.5.5s",
        "99999999999h",
        "-",
        "--",
        "--help",
        "eth0:1",
        "an-interface-name-too-long",
        "root",
        "nogroup",
        "é",
        "\n",
        "a\nb",
        "\u{2028}",
        "\0",
        " ",
        "legacy",
    ]);
    prop_oneof![
        4 => special.clone().prop_map(OsString::from),
        2 => prop::collection::vec(special, 1..4).prop_map(|v| v.join(",").into()),
        2 => any::<String>().prop_map(OsString::from),
        1 => "[0-9]{1,25}".prop_map(OsString::from),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(OsString::from_vec),
    ]
}

/// A flag of `capture`, as `-p` or `--envoy-port`, or one of our own.
fn flag() -> impl Strategy<Value = String> {
    let ours = [
        "--backend",
        "--pin-dir",
        "--log-level",
        "--cgroup",
        "--resolv-conf",
        "--loopback-accel",
    ];
    (any::<Index>(), any::<bool>()).prop_map(move |(i, short)| {
        let n = ISTIO_FLAGS.len() + ours.len();
        match ISTIO_FLAGS.get(i.index(n)) {
            Some(spec) => match spec.short {
                Some(c) if short => format!("-{c}"),
                _ => format!("--{}", spec.long),
            },
            None => ours[i.index(n) - ISTIO_FLAGS.len()].to_owned(),
        }
    })
}

/// One change to a golden case's argv or env.
#[derive(Clone, Debug)]
enum Edit {
    /// Replace a token (a value or a flag) with junk.
    Replace(Index, OsString),
    /// Drop a token.
    Drop(Index),
    /// Repeat a token somewhere else.
    Duplicate(Index, Index),
    /// Swap two tokens.
    Swap(Index, Index),
    /// Insert a flag with junk, as `--flag=junk` or `--flag junk`.
    Flag(Index, String, bool, OsString),
    /// Set one of the env vars the parser reads to junk.
    Env(Index, OsString),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), junk()).prop_map(|(i, j)| Edit::Replace(i, j)),
        1 => any::<Index>().prop_map(Edit::Drop),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::Duplicate(a, b)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::Swap(a, b)),
        3 => (any::<Index>(), flag(), any::<bool>(), junk()).prop_map(|(i, f, eq, j)| Edit::Flag(i, f, eq, j)),
        2 => (any::<Index>(), junk()).prop_map(|(i, j)| Edit::Env(i, j)),
    ]
}

/// An invocation: argv (with the program name) and the env vars set.
#[derive(Clone, Debug)]
struct Input {
    argv: Vec<OsString>,
    env: Vec<(String, OsString)>,
}

impl Input {
    /// Golden case `case` with `edits` applied in order.
    fn edited(case: Index, edits: &[Edit]) -> Input {
        let case = &golden_cases::CASES[case.index(golden_cases::CASES.len())];
        let mut argv: Vec<OsString> = case.argv().map(OsString::from).collect();
        let mut env: Vec<(String, OsString)> = case.env.iter().map(|(k, v)| (k.to_string(), v.into())).collect();
        let names: Vec<&str> = flags::env_names().collect();
        for edit in edits {
            // Token positions after the program name; insertion points include the end.
            let (tokens, at) = (argv.len() - 1, |i: &Index, n: usize| 1 + i.index(n.max(1)));
            match edit {
                Edit::Replace(i, junk) if tokens > 0 => argv[at(i, tokens)] = junk.clone(),
                Edit::Drop(i) if tokens > 0 => drop(argv.remove(at(i, tokens))),
                Edit::Duplicate(i, to) if tokens > 0 => {
                    let token = argv[at(i, tokens)].clone();
                    argv.insert(at(to, tokens + 1), token);
                }
                Edit::Swap(a, b) if tokens > 0 => argv.swap(at(a, tokens), at(b, tokens)),
                Edit::Flag(i, flag, equals, junk) => {
                    let at = at(i, tokens + 1);
                    if *equals {
                        let mut token = OsString::from(format!("{flag}="));
                        token.push(junk);
                        argv.insert(at, token);
                    } else {
                        argv.splice(at..at, [flag.into(), junk.clone()]);
                    }
                }
                Edit::Env(i, junk) => {
                    let name = names[i.index(names.len())];
                    env.retain(|(k, _)| k != name);
                    env.push((name.to_owned(), junk.clone()));
                }
                _ => {}
            }
        }
        Input { argv, env }
    }

    /// What `capture` does with it: read the env as `main` does, then parse.
    fn parse(&self) -> Result<Invocation, ParseError> {
        let env = flags::environment(|name| self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))?;
        flags::parse(self.argv.clone(), &|name| env.get(name).cloned())
    }

    /// Whether `flag` (`-p` or `--envoy-port`) is on the command line (also as `--flag=v`, `-pV`, `-np`).
    fn has_flag(&self, flag: &str) -> bool {
        self.argv
            .iter()
            .skip(1)
            .filter_map(|a| a.to_str())
            .any(|a| match flag.strip_prefix("--") {
                Some(_) => a == flag || a.starts_with(&format!("{flag}=")),
                None => !a.starts_with("--") && a.starts_with('-') && a.contains(&flag[1..]),
            })
    }

    /// Whether `text` occurs in an argument or env value (compared as lossy UTF-8).
    fn contains(&self, text: &str) -> bool {
        let argv = self.argv.iter().skip(1);
        argv.chain(self.env.iter().map(|(_, v)| v))
            .any(|v| v.to_string_lossy().contains(text))
    }
}

fn one_line(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.trim().is_empty(), "an empty message");
    prop_assert!(!message.contains(['\n', '\r']), "not one line: {message:?}");
    Ok(())
}

/// A rejection names where the bad value came from (a flag given, an env var set, or the argument that is
/// not UTF-8) and the value (or each of its list tokens; `true` is implied by a bare boolean flag).
fn names_its_input(e: &FlagError, input: &Input) -> Result<(), TestCaseError> {
    let origin = &e.origin;
    let named = if let Some(rest) = origin.strip_prefix("env ") {
        let var = rest.split(' ').next().unwrap_or_default();
        input.env.iter().any(|(k, _)| k == var)
    } else if let Some(n) = origin.strip_prefix("command-line argument ") {
        let arg = n.parse::<usize>().ok().and_then(|i| input.argv.get(i));
        arg.is_some_and(|a| a.to_str().is_none())
    } else {
        origin
            .split(['/', ' ', '(', ')', ','])
            .filter(|w| w.len() > 1 && w.starts_with('-'))
            .any(|flag| input.has_flag(flag))
    };
    prop_assert!(named, "{e} names no flag or env var that was given");
    let value_given = e.value == "true" || e.value.split(',').all(|token| input.contains(token));
    prop_assert!(value_given, "{e}: the value {:?} is not in the input", e.value);
    Ok(())
}

/// The properties, for one input.
fn check(input: Input) -> Result<(), TestCaseError> {
    let answer = |r: &Result<Invocation, ParseError>| match r {
        Ok(inv) => format!("{inv:?}"),
        Err(e) => e.to_string(),
    };
    let first = input.parse();
    prop_assert_eq!(answer(&first), answer(&input.parse()), "the same input, another answer");
    match first {
        Ok(_) => {}
        // --help or --version: text on stdout, exit 0, nothing applied.
        Err(ParseError::Clap(e)) if !e.use_stderr() => {}
        Err(e @ ParseError::Clap(_)) => {
            let line = e.to_string();
            one_line(&line)?;
            prop_assert!(line.contains('"'), "{line:?} quotes no argument");
        }
        Err(ParseError::Flag(e)) => {
            one_line(&e.to_string())?;
            names_its_input(&e, &input)?;
        }
    }
    Ok(())
}

#[test]
fn golden_flag_sets_mutated_parse_or_are_refused_in_one_line_naming_the_input() {
    let strategy = (any::<Index>(), prop::collection::vec(edit(), 1..5));
    fuzz("golden mutated", strategy, |(case, edits)| {
        check(Input::edited(case, &edits))
    });
}

#[test]
fn random_command_lines_parse_or_are_refused_in_one_line_naming_the_input() {
    let token = prop_oneof![
        2 => flag().prop_map(OsString::from),
        2 => junk(),
        1 => (flag(), junk()).prop_map(|(f, j)| {
            let mut t = OsString::from(format!("{f}="));
            t.push(j);
            t
        }),
        1 => prop::sample::select(vec!["clean", "status", "-n", "-nb", "-p15001", "--", "-h", "-V"]).prop_map(OsString::from),
    ];
    let names: Vec<&'static str> = flags::env_names().collect();
    let env = prop::collection::vec((prop::sample::select(names), junk()), 0..3);
    let strategy = (prop::collection::vec(token, 0..8), env);
    fuzz("random argv", strategy, |(args, env)| {
        let argv = std::iter::once(OsString::from("capture")).chain(args).collect();
        let env = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        check(Input { argv, env })
    });
}

/// Where the agent's programs would be; nothing is created there.
fn settings() -> Settings {
    Settings {
        pin_dir: "/run/capture-fuzz/pins".into(),
        cgroup: "/sys/fs/cgroup/capture-fuzz".into(),
        state_dir: "/run/capture-fuzz/state".into(),
    }
}

/// The control socket's properties for one request line.
fn check_request(line: &str) -> Result<(), TestCaseError> {
    let answer = |r: Result<control::Request, String>| r.map(|req| format!("{req:?}"));
    let first = answer(control::parse_request(line, &settings()));
    prop_assert_eq!(&first, &answer(control::parse_request(line, &settings())));
    if let Err(message) = first {
        one_line(&message)?;
    }
    Ok(())
}

/// Any JSON value, small.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        junk().prop_map(|s| Value::from(s.to_string_lossy().into_owned())),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request as a client would send it, with any part of it replaced: the op, the pod's id, its namespace,
/// its flags (a golden case's, edited), or a field of another type.
fn request() -> impl Strategy<Value = Value> {
    let text = |choices: Vec<&'static str>| {
        prop_oneof![
            3 => prop::sample::select(choices).prop_map(Value::from),
            1 => junk().prop_map(|s| Value::from(s.to_string_lossy().into_owned())),
            1 => json_value(),
        ]
    };
    let op = text(vec!["add", "remove", "list", "ADD", "", "pods"]);
    let id = text(vec!["default/app", "x", ""]);
    let netns = text(vec!["/run/netns/pod", "/proc/42/ns/net", "relative/ns", "/"]);
    let flags = prop_oneof![
        4 => (any::<Index>(), prop::collection::vec(edit(), 0..4)).prop_map(|(case, edits)| {
            let argv = Input::edited(case, &edits).argv;
            Value::from(argv.iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>())
        }),
        1 => json_value(),
    ];
    (op, id.clone(), netns, flags, id, any::<bool>()).prop_map(|(op, id, netns, flags, remove_id, extra)| {
        let mut request = json!({ "op": op, "pod": { "id": id, "netns": netns, "flags": flags }, "id": remove_id });
        if extra {
            request["unknown"] = json!(1);
        }
        request
    })
}

#[test]
fn control_requests_mutated_are_answered_or_refused_in_one_line() {
    fuzz("control requests", request(), |request| {
        check_request(&request.to_string())
    });
}

#[test]
fn control_lines_of_any_text_are_refused_in_one_line() {
    // A valid request with a few characters changed, or any text at all.
    let garbled = (
        request(),
        prop::collection::vec((any::<Index>(), any::<char>(), any::<bool>()), 1..4),
    )
        .prop_map(|(request, edits)| {
            let mut chars: Vec<char> = request.to_string().chars().collect();
            for (i, c, insert) in edits {
                let at = i.index(chars.len());
                if insert {
                    chars.insert(at, c);
                } else {
                    chars[at] = c;
                }
            }
            chars.into_iter().collect::<String>()
        });
    let strategy = prop_oneof![3 => garbled, 1 => any::<String>()];
    fuzz("control text", strategy, |line| check_request(&line));
}

#[test]
fn junk_includes_bytes_that_are_not_utf8() {
    // The fuzzers' own sanity: `junk` reaches bytes that are not UTF-8 (so the argv and env checks run).
    let mut runner = TestRunner::deterministic();
    let bytes = (0..2000)
        .map(|_| junk().new_tree(&mut runner).unwrap().current())
        .filter(|j| std::str::from_utf8(j.as_bytes()).is_err())
        .count();
    assert!(bytes > 0, "junk never makes invalid UTF-8");
}
