//! `virtnetd`: the virtnet daemon. All of it lives in the `virtnet-daemon` library crate.

fn main() {
    std::process::exit(virtnet_daemon::main());
}
