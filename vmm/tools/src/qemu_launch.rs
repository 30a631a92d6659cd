//! Starting a stock QEMU with its gdbstub and QMP on loopback and a Unix socket (or, as an
//! operator's VM, with QMP alone), for the benchmarks and tests that patch a guest through the
//! QEMU backend.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qemu_backend::{QemuError, QemuGuest};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("cannot start {program}; install QEMU (scripts/setup does, with VMM_NEED_QEMU=1)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("QEMU exited before it was ready ({status}); its log: {log}")]
    Exited { status: String, log: String },
    #[error("QEMU's QMP socket did not appear within {0:?}")]
    Timeout(Duration),
}

/// How to run QEMU.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub memory_mib: u64,
    pub vcpus: usize,
    /// QEMU's `-cpu` model (`max` offers every feature the accelerator can, LA57 included under
    /// TCG); `None` leaves QEMU's default (`qemu64`).
    pub cpu: Option<String>,
    /// `kvm` or `tcg`.
    pub accel: &'static str,
    /// Start a gdbstub (`-gdb tcp:127.0.0.1:PORT`); without it only QMP is offered, as by an
    /// operator's VM.
    pub gdb: bool,
    /// Where the sockets, console log and QEMU's stderr go (created if missing).
    pub dir: PathBuf,
}

/// A running QEMU; killed on drop.
pub struct QemuProcess {
    child: Child,
    /// The gdbstub's `127.0.0.1:PORT` (`None`: started without one).
    pub gdb: Option<String>,
    pub qmp: PathBuf,
    pub console: PathBuf,
    pub accel: &'static str,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl QemuProcess {
    pub fn spawn(o: &LaunchOptions) -> Result<QemuProcess, LaunchError> {
        std::fs::create_dir_all(&o.dir)?;
        let gdb = if o.gdb {
            Some(format!("127.0.0.1:{}", free_port()?))
        } else {
            None
        };
        let qmp = o.dir.join("qmp.sock");
        let console = o.dir.join("console.log");
        let _ = std::fs::remove_file(&qmp);
        let stderr = std::fs::File::create(o.dir.join("qemu.stderr"))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "pc",
            "-accel",
            o.accel,
            "-display",
            "none",
            "-nodefaults",
        ])
        .args([
            "-m",
            &o.memory_mib.to_string(),
            "-smp",
            &o.vcpus.to_string(),
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&o.kernel)
        .args(["-append", &o.append])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
        if let Some(initrd) = &o.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        if let Some(gdb) = &gdb {
            cmd.arg("-gdb").arg(format!("tcp:{gdb}"));
        }
        if let Some(cpu) = &o.cpu {
            cmd.args(["-cpu", cpu]);
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            program: "qemu-system-x86_64".into(),
            source,
        })?;
        let mut p = QemuProcess {
            child,
            gdb,
            qmp,
            console,
            accel: o.accel,
        };
        let timeout = Duration::from_secs(20);
        let deadline = Instant::now() + timeout;
        while !p.qmp.exists() {
            if let Some(status) = p.child.try_wait()? {
                let log = std::fs::read_to_string(o.dir.join("qemu.stderr")).unwrap_or_default();
                return Err(LaunchError::Exited {
                    status: status.to_string(),
                    log,
                });
            }
            if Instant::now() > deadline {
                return Err(LaunchError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(p)
    }

    /// The console so far, as lines.
    pub fn console_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.console)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// Attaches the QEMU backend: through the gdbstub if QEMU has one, else through QMP alone
    /// ([`QemuGuest::attach_qmp`]).
    pub fn attach(&self) -> Result<QemuGuest, QemuError> {
        match &self.gdb {
            Some(gdb) => QemuGuest::attach(gdb, &self.qmp),
            None => QemuGuest::attach_qmp(&self.qmp),
        }
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
