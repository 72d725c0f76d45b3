//! `stratus-guest-agent`: the daemon the guest's init starts (see the library docs for the
//! protocol).

use std::process::ExitCode;

use stratus_guest_agent::agent::{self, Address, Config, Listener};

const USAGE: &str = "\
usage: stratus-guest-agent [--listen vsock:PORT|unix:PATH]

  --listen ADDR   where to serve (default vsock:1024)";

fn main() -> ExitCode {
    let mut address = Address::Vsock(stratus_guest_agent::PORT);
    let config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let parsed = match arg.as_str() {
            "--listen" => args
                .next()
                .ok_or("--listen needs a value".to_owned())
                .and_then(|v| v.parse())
                .map(|a| address = a),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--version" => {
                println!("stratus-guest-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument '{other}'")),
        };
        if let Err(message) = parsed {
            eprintln!("stratus-guest-agent: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let listener = match Listener::bind(&address) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("stratus-guest-agent: cannot listen on {address}: {e}");
            return ExitCode::FAILURE;
        }
    };
    agent::log(format_args!("version {} listening on {address}", env!("CARGO_PKG_VERSION")));
    agent::serve(listener, config)
}
