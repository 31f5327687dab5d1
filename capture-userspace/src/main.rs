//! `capture`: a drop-in for `istio-iptables`. Parses istio's flags, applies capture to the network
//! namespace it runs in, and exits.

use std::process::ExitCode;

use capture::flags::{self, ParseError};

/// Exit code for bad input, as clap uses for its own usage errors.
const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    // The node agent and its client have command lines of their own.
    if matches!(std::env::args().nth(1).as_deref(), Some("agent" | "pod")) {
        return capture::agent::cli::main(std::env::args_os().collect());
    }
    let env = match flags::environment(|name| std::env::var_os(name)) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("capture: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let invocation = match flags::parse(std::env::args_os(), &|name| env.get(name).cloned()) {
        Ok(inv) => inv,
        Err(ParseError::Clap(e)) if !e.use_stderr() => {
            // --help or --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line naming the argument (see `ParseError`).
            eprintln!("capture: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    match capture::app::run(&invocation) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capture: {e:#}");
            ExitCode::FAILURE
        }
    }
}
