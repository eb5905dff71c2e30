//! placeholder
/// Entry point of the `virtnetd` binary; returns the process exit code.
pub fn main() -> i32 {
    0
}
