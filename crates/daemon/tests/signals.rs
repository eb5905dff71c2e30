//! End to end through `virtnet_daemon::main`: this test binary re-executes itself as a
//! `virtnetd` child (env `VIRTNETD_TEST_CHILD=1`), waits for the sockets and the QEMU hints,
//! reads `stats`, then stops the child with SIGTERM (and SIGINT) and checks the exit code and
//! that every socket is gone. It has its own `main` (harness = false) so that the child is
//! exactly the daemon's `main`, signal handling included.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const CHILD: &str = "VIRTNETD_TEST_CHILD";

fn wait_for(what: &str, cond: impl Fn() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err(format!("timed out waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn check(cond: bool, what: &str) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

fn stop_with(signal: libc::c_int) -> Result<(), String> {
    let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
    let d = dir.path();
    let cfg = d.join("virtnet.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{0}/ctl.sock\"\nlog_level = \"info\"\n\
             [[network]]\nname = \"lab\"\nmode = \"internal\"\n\
             [[network.port]]\nsocket = \"{0}/s/lab-0.sock\"\nmac = \"52:54:00:12:34:01\"\n\
             [[network.port]]\nsocket = \"{0}/s/lab-1.sock\"\nqueue_pairs = 2\n",
            d.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(CHILD, "1")
        .args(["--config", cfg.to_str().unwrap_or_default()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let ctl = d.join("ctl.sock");
    let socks = [d.join("s/lab-0.sock"), d.join("s/lab-1.sock")];
    let up = wait_for("the daemon's sockets", || {
        virtnet_daemon::control::request(&ctl, "ping").is_ok()
    });
    let result = up.and_then(|()| {
        for s in &socks {
            check(s.exists(), "port socket missing")?;
        }
        let stats = virtnet_daemon::control::request_stats(&ctl).map_err(|e| e.to_string())?;
        check(stats.networks[0].ports.len() == 2, "two ports in stats")
    });
    let pid = libc::pid_t::try_from(child.id()).map_err(|e| e.to_string())?;
    // SAFETY: sending a signal to our own child process, which has not been reaped yet.
    let ret = unsafe { libc::kill(pid, signal) };
    check(ret == 0, "kill failed")?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("daemon did not exit after the signal".into());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    result.map_err(|e| format!("{e}\nstderr:\n{err}"))?;
    check(
        status.code() == Some(0),
        &format!("exit status {status:?}\n{err}"),
    )?;
    check(!ctl.exists(), "control socket left behind")?;
    for s in &socks {
        check(!s.exists(), "port socket left behind")?;
    }
    // The QEMU hints went to stdout, one per port.
    check(
        out.matches("-device virtio-net-pci").count() == 2,
        &format!("hints on stdout: {out}"),
    )?;
    check(
        out.contains(&format!("path={}", socks[0].display())),
        "hint path",
    )?;
    check(out.contains("mac=52:54:00:12:34:01"), "hint mac")?;
    check(out.contains("queues=2") && out.contains("mq=on"), "hint mq")?;
    check(
        err.contains("shutting down"),
        &format!("log on stderr: {err}"),
    )?;
    Ok(())
}

fn bad_config_exits_2() -> Result<(), String> {
    let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{0}/c.sock\"\n[[network]]\nname = \"a\"\nmode = \"internal\"\n\
             [[network.port]]\nsocket = \"{0}/a.sock\"\n[[network.port]]\nsocket = \"{0}/b.sock\"\nmac = \"zz\"\n",
            dir.path().display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .env(CHILD, "1")
        .args(["--config", cfg.to_str().unwrap_or_default()])
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    check(
        out.status.code() == Some(2),
        &format!("status {:?}", out.status),
    )?;
    check(
        err.trim_end().lines().count() == 1
            && err.starts_with("error: network[0].port[1].mac: Invalid MAC address \"zz\""),
        &format!("one clear line, got: {err}"),
    )?;
    check(
        !Path::new(&dir.path().join("a.sock")).exists(),
        "nothing started",
    )
}

/// One test: Ok, or what went wrong.
type TestFn = fn() -> Result<(), String>;

fn main() {
    if std::env::var_os(CHILD).is_some() {
        std::process::exit(virtnet_daemon::main());
    }
    let tests: [(&str, TestFn); 3] = [
        ("sigterm_stops_cleanly", || stop_with(libc::SIGTERM)),
        ("sigint_stops_cleanly", || stop_with(libc::SIGINT)),
        ("bad_config_exits_2", bad_config_exits_2),
    ];
    let mut failed = 0;
    for (name, test) in tests {
        match test() {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED\n{e}");
            }
        }
    }
    println!("{} passed, {failed} failed", tests.len() - failed);
    if failed > 0 {
        std::process::exit(101);
    }
}
