//! The QEMU backend: the patch engine's [`GuestControl`] over a running, stock
//! `qemu-system-x86_64`, through its gdbstub (all-stop: halt every vCPU, per-vCPU registers,
//! guest-physical memory) and QMP (run state, vCPU list).
//!
//! QEMU keeps no patch state, so every `vmm patch … --qmp` command builds an engine over a
//! state directory (the journal) and attaches for the length of one command. QEMU halts the
//! guest when a debugger attaches; [`QemuGuest::attach`] lets it run again at once, so the guest
//! is only stopped inside the engine's blackouts and for the short halts below.
//!
//! A VM started without `-gdb` is attached with its QMP socket alone ([`QemuGuest::attach_qmp`]):
//! the backend starts a gdbstub on a Unix socket in an owner-only directory (HMP `gdbserver`),
//! and stops it and removes the directory when it detaches.
//!
//! The gdbstub serves memory only while the guest is halted, so a read or write the engine makes
//! while the guest runs (checking sites, writing arena code nobody executes yet) is done in a
//! short halt of its own (a few hundred µs, like a `stop`/`cont`). Every halt the backend causes
//! is counted in [`QemuGuest::halts`].

pub mod qmp;
pub mod rsp;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use guest_control::paging::PagingRegs;
use guest_control::{GuestControl, GuestError, VcpuState};
pub use qmp::{Qmp, QmpError};
pub use rsp::{Rsp, RspError};

/// How long one gdbstub or QMP exchange may take before the backend gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The label QEMU gives the gdbstub's character device (`-gdb`, HMP `gdbserver`).
pub const GDB_CHARDEV: &str = "gdb";

/// The longest path a Unix socket address holds (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Error)]
pub enum QemuError {
    #[error(transparent)]
    Gdb(#[from] RspError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(
        "the VM is {0} (QMP query-status), not running: patching would resume it; resume it first (QMP cont) or stop patching"
    )]
    NotRunning(String),
    #[error("QMP lists {qmp} vCPUs but the gdbstub {gdb}: is the gdbstub of another VM?")]
    VcpuMismatch { qmp: usize, gdb: usize },
    #[error(
        "the VM already has a gdbstub ({0}); vmm does not start its own, which would replace it \
         and cut off whoever uses it: give its address with --qemu-gdb (HOST:PORT, or unix:PATH), \
         or stop it (HMP `gdbserver none`) when nobody needs it"
    )]
    GdbstubInUse(String),
    #[error(
        "cannot create a private directory for the gdbstub socket in {parent}: set XDG_RUNTIME_DIR \
         (or TMPDIR) to a directory of yours"
    )]
    RuntimeDir {
        parent: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the gdbstub socket path {0} is longer than a Unix socket address holds ({MAX_SOCKET_PATH} \
         bytes): set XDG_RUNTIME_DIR (or TMPDIR) to a shorter directory"
    )]
    SocketPathTooLong(String),
    #[error("QEMU did not start a gdbstub on {socket}: HMP `gdbserver` answered {answer:?}{hint}")]
    GdbserverStart {
        socket: String,
        answer: String,
        hint: &'static str,
    },
    #[error("cannot make the gdbstub socket {path} owner-only (mode 0600)")]
    SocketMode {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "QEMU did not stop the gdbstub it serves on {socket}: HMP `gdbserver none` answered \
         {answer:?}; stop it with the HMP command `gdbserver none`"
    )]
    GdbserverStop { socket: String, answer: String },
    #[error("cannot remove the gdbstub's directory {path}: remove it by hand")]
    RemoveDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Every halt of the guest the backend caused since it attached: the one attaching causes, the
/// short halts around memory access while the guest runs, and the engine's pauses (its
/// blackouts), each from the halt request to the resume's acknowledgement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HaltStats {
    pub count: u64,
    pub total_us: u64,
    pub longest_us: u64,
}

impl HaltStats {
    pub fn record(&mut self, halt: Duration) {
        let us = u64::try_from(halt.as_micros()).unwrap_or(u64::MAX);
        self.count += 1;
        self.total_us = self.total_us.saturating_add(us);
        self.longest_us = self.longest_us.max(us);
    }
}

struct Link {
    rsp: Rsp,
    /// When the engine's current pause completed: every vCPU's registers read (`None`:
    /// running). Its blackout is measured from here, as ever.
    halted_since: Option<Instant>,
    /// When the engine's current pause was requested: its halt is counted from here.
    halt_began: Option<Instant>,
    halts: HaltStats,
    /// The guest was let run and the gdbstub connection closed.
    detached: bool,
}

/// A running QEMU VM the engine can patch.
pub struct QemuGuest {
    link: Mutex<Link>,
    vcpus: usize,
    /// QMP serves one client at a time: unless we hold it for our own gdbstub, connect per
    /// use, never hold it.
    qmp: PathBuf,
    /// The gdbstub [`QemuGuest::attach_qmp`] started, with the QMP connection that stops it.
    own: Mutex<Option<OwnGdbstub>>,
}

impl QemuGuest {
    /// Attaches to QEMU's gdbstub at `gdb` (`HOST:PORT` or `unix:PATH`) after checking with QMP
    /// at `qmp` that the VM is running and how many vCPUs it has. Leaves the guest running.
    pub fn attach(gdb: &str, qmp: &Path) -> Result<QemuGuest, QemuError> {
        let mut q = Qmp::connect(qmp, IO_TIMEOUT)?;
        let cpus = running_cpus(&mut q)?;
        drop(q);
        Self::connect_gdb(gdb, cpus, qmp, None)
    }

    /// Attaches to a VM through its QMP socket alone (started without `-gdb`): checks that it
    /// runs, starts a gdbstub on a Unix socket in a new owner-only directory (HMP `gdbserver
    /// unix:DIR/gdb.sock,server=on,wait=off`) and connects to it. Leaves the guest running.
    ///
    /// The QMP connection is held until [`QemuGuest::detach`] (or drop), which lets the guest
    /// run, disconnects, stops the gdbstub (`gdbserver none`) and removes the directory; every
    /// error after the gdbstub was started does the same. A VM that already has a gdbstub is
    /// refused ([`QemuError::GdbstubInUse`]) rather than have it replaced.
    pub fn attach_qmp(qmp: &Path) -> Result<QemuGuest, QemuError> {
        let mut q = Qmp::connect(qmp, IO_TIMEOUT)?;
        let cpus = running_cpus(&mut q)?;
        if let Some(c) = q.chardevs()?.into_iter().find(|c| c.label == GDB_CHARDEV) {
            return Err(QemuError::GdbstubInUse(c.filename));
        }
        let mut own = OwnGdbstub::create(q)?;
        own.start()?;
        let addr = format!("unix:{}", own.socket.display());
        Self::connect_gdb(&addr, cpus, qmp, Some(own))
    }

    /// Connects to the gdbstub at `addr` (which halts the guest), checks it serves `cpus`
    /// vCPUs and lets the guest run again. On an error `own` is stopped (by its drop).
    fn connect_gdb(
        addr: &str,
        cpus: usize,
        qmp: &Path,
        mut own: Option<OwnGdbstub>,
    ) -> Result<QemuGuest, QemuError> {
        let began = Instant::now();
        let mut rsp = match Rsp::connect(addr, IO_TIMEOUT) {
            Ok(rsp) => rsp,
            Err(e) => {
                // `Rsp::connect` resumes a guest it halted before it gives up; make sure.
                if let Some(own) = &mut own {
                    own.ensure_running();
                }
                return Err(e.into());
            }
        };
        let resumed = if rsp.threads.len() != cpus {
            let gdb = rsp.threads.len();
            let _ = rsp.cont();
            Err(QemuError::VcpuMismatch { qmp: cpus, gdb })
        } else {
            rsp.cont().map_err(QemuError::from)
        };
        if let Err(e) = resumed {
            let _ = rsp.close();
            if let Some(own) = &mut own {
                own.ensure_running();
            }
            return Err(e);
        }
        let mut halts = HaltStats::default();
        halts.record(began.elapsed());
        tracing::info!(gdb = addr, vcpus = cpus, "attached to QEMU");
        Ok(QemuGuest {
            link: Mutex::new(Link {
                rsp,
                halted_since: None,
                halt_began: None,
                halts,
                detached: false,
            }),
            vcpus: cpus,
            qmp: qmp.to_path_buf(),
            own: Mutex::new(own),
        })
    }

    /// The IDT base of vCPU 0, from QMP's `info registers` (the gdbstub does not expose IDTR).
    pub fn idt_base(&self) -> Result<u64, QemuError> {
        let text = self.with_qmp(|q| q.hmp("info registers"))?;
        parse_idt_base(&text).ok_or_else(|| {
            QemuError::Qmp(QmpError::Malformed(format!(
                "no IDT= line in `info registers`: {}",
                text.lines().take(3).collect::<Vec<_>>().join(" | ")
            )))
        })
    }

    /// Every halt the backend caused since it attached (see [`HaltStats`]).
    pub fn halts(&self) -> HaltStats {
        self.link().halts
    }

    /// The gdbstub socket [`QemuGuest::attach_qmp`] started (`None` after detaching, or when
    /// attached to the VM's own gdbstub).
    pub fn own_gdbstub(&self) -> Option<PathBuf> {
        self.own_lock().as_ref().map(|o| o.socket.clone())
    }

    /// Runs `f` on the QMP connection this backend holds, or on a new one.
    fn with_qmp<T>(&self, f: impl FnOnce(&mut Qmp) -> Result<T, QmpError>) -> Result<T, QmpError> {
        if let Some(own) = self.own_lock().as_mut() {
            return f(&mut own.qmp);
        }
        f(&mut Qmp::connect(&self.qmp, IO_TIMEOUT)?)
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn own_lock(&self) -> MutexGuard<'_, Option<OwnGdbstub>> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the guest halted: inside a blackout as it is, otherwise in a short halt.
    /// The outer error is the halt or the resume failing; the inner one is `f`'s own.
    fn halted<T>(
        &self,
        f: impl FnOnce(&mut Rsp) -> Result<T, RspError>,
    ) -> Result<Result<T, RspError>, GuestError> {
        let mut link = self.link();
        if link.halted_since.is_some() {
            return Ok(f(&mut link.rsp));
        }
        let began = Instant::now();
        link.rsp
            .interrupt()
            .map_err(|e| GuestError::Pause(Box::new(e)))?;
        let out = f(&mut link.rsp);
        let resumed = link.rsp.cont();
        link.halts.record(began.elapsed());
        resumed.map_err(|e| GuestError::Resume(Box::new(e)))?;
        Ok(out)
    }

    /// Lets the guest run and closes the gdbstub connection. For [`QemuGuest::attach_qmp`]
    /// it also stops the gdbstub and removes its directory. Later calls do nothing.
    pub fn detach(&self) -> Result<(), QemuError> {
        let mut link = self.link();
        if link.detached {
            return Ok(());
        }
        link.detached = true;
        let mut result = Ok(());
        if link.halted_since.take().is_some() {
            let began = link.halt_began.take();
            let resumed = link.rsp.cont();
            if let Some(b) = began {
                link.halts.record(b.elapsed());
            }
            result = resumed.map_err(QemuError::from);
        }
        if let Err(e) = link.rsp.close() {
            tracing::warn!(error = %e, "closing the gdbstub connection");
        }
        drop(link);
        if let Some(mut own) = self.own_lock().take() {
            if result.is_err() {
                own.ensure_running();
            }
            let stopped = own.stop();
            result = result.and(stopped);
        }
        result
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        // Never leave the guest halted, or a gdbstub of ours, behind us.
        if let Err(e) = self.detach() {
            tracing::error!(error = %e, "detaching from QEMU");
        }
    }
}

/// The VM's vCPU count, after checking with QMP that it runs.
fn running_cpus(q: &mut Qmp) -> Result<usize, QemuError> {
    let status = q.status()?;
    if status != "running" {
        return Err(QemuError::NotRunning(status));
    }
    Ok(q.cpus()?.len())
}

/// A gdbstub this backend started through QMP on a Unix socket in an owner-only directory;
/// dropping it stops the gdbstub and removes the directory.
struct OwnGdbstub {
    /// Held from the start: nobody else can start or stop a gdbstub through this socket
    /// meanwhile, and the `gdbserver none` we owe cannot be locked out.
    qmp: Qmp,
    /// Mode 0700, ours: only we (and root) can reach the socket inside.
    dir: Option<tempfile::TempDir>,
    socket: PathBuf,
    /// `gdbserver` was sent, so `gdbserver none` is owed.
    started: bool,
}

impl OwnGdbstub {
    /// Creates the directory: under `$XDG_RUNTIME_DIR` if set, else the system temp dir.
    fn create(qmp: Qmp) -> Result<OwnGdbstub, QemuError> {
        let parent = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let failed = |source| QemuError::RuntimeDir {
            parent: parent.display().to_string(),
            source,
        };
        let dir = tempfile::Builder::new()
            .prefix("vmm-gdb-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(failed)?;
        // The umask may only narrow the mode; make it exactly 0700.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(failed)?;
        let socket = dir.path().join("gdb.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(QemuError::SocketPathTooLong(socket.display().to_string()));
        }
        Ok(OwnGdbstub {
            qmp,
            dir: Some(dir),
            socket,
            started: false,
        })
    }

    /// HMP `gdbserver unix:SOCKET,server=on,wait=off` (QEMU 7.2 adds `server=on` only to
    /// `tcp:`), then makes the socket owner-only.
    fn start(&mut self) -> Result<(), QemuError> {
        let device = format!(
            "unix:{},server=on,wait=off",
            chardev_escape(&self.socket.display().to_string())
        );
        // Counted as started before the answer: if it is lost, `gdbserver none` is harmless.
        self.started = true;
        let answer = self.qmp.hmp(&format!("gdbserver {}", hmp_quote(&device)))?;
        // QEMU 7.2: "Waiting for gdb connection on device '…'", else "Could not open gdbserver
        // on device '…'" after the reason.
        if !answer.contains("Waiting for gdb connection") || !self.socket.exists() {
            let hint = if answer.contains("Permission denied") {
                "; QEMU runs as another user and cannot create a socket in vmm's owner-only \
                 directory: run vmm as QEMU's user, or start QEMU with -gdb and give --qemu-gdb"
            } else {
                ""
            };
            return Err(QemuError::GdbserverStart {
                socket: self.socket.display().to_string(),
                answer: answer.trim().to_string(),
                hint,
            });
        }
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| QemuError::SocketMode {
                path: self.socket.display().to_string(),
                source,
            },
        )?;
        tracing::info!(socket = %self.socket.display(), "started a gdbstub through QMP");
        Ok(())
    }

    /// Resumes the guest through QMP unless it runs: after the gdbstub failed to (it was
    /// running when we attached, so only we can have halted it).
    fn ensure_running(&mut self) {
        match self.qmp.status() {
            Ok(s) if s == "running" => {}
            Ok(s) => {
                tracing::warn!(status = %s, "the guest is still halted: resuming it through QMP");
                if let Err(e) = self.qmp.cont() {
                    tracing::error!(error = %e, "could not resume the guest through QMP");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not read the VM's run state"),
        }
    }

    /// `gdbserver none`, then removes the directory (and the socket, should QEMU have left it:
    /// with it gone, nothing can reach a gdbstub QEMU failed to stop). Later calls do nothing.
    fn stop(&mut self) -> Result<(), QemuError> {
        let socket = self.socket.display().to_string();
        let mut result = Ok(());
        if std::mem::take(&mut self.started) {
            result = match self.qmp.hmp("gdbserver none") {
                // QEMU 7.2: "Disabled gdbserver".
                Ok(a) if a.contains("Disabled gdbserver") => Ok(()),
                Ok(answer) => Err(QemuError::GdbserverStop {
                    socket: socket.clone(),
                    answer: answer.trim().to_string(),
                }),
                Err(e) => Err(e.into()),
            };
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().display().to_string();
            let removed = dir
                .close()
                .map_err(|source| QemuError::RemoveDir { path, source });
            result = result.and(removed);
        }
        if result.is_ok() {
            tracing::info!(%socket, "stopped our gdbstub");
        }
        result
    }
}

impl Drop for OwnGdbstub {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "stopping the gdbstub vmm started");
        }
    }
}

/// A QEMU option value: a `,` is written `,,`.
fn chardev_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// One HMP string argument: quoted, so a space does not end it, with HMP's escapes.
fn hmp_quote(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl GuestControl for QemuGuest {
    fn vcpu_count(&self) -> usize {
        self.vcpus
    }

    fn pause_all(&self) -> Result<Vec<Option<VcpuState>>, GuestError> {
        let mut link = self.link();
        if link.halted_since.is_some() {
            return Err(GuestError::AlreadyPaused);
        }
        let began = Instant::now();
        link.rsp
            .interrupt()
            .map_err(|e| GuestError::Pause(Box::new(e)))?;
        match snapshot(&mut link.rsp) {
            Ok(out) => {
                link.halted_since = Some(Instant::now());
                link.halt_began = Some(began);
                Ok(out)
            }
            Err(e) => {
                // A pause that cannot see every vCPU is no pause: let the guest run again
                // rather than leave it halted behind an error.
                if let Err(resume) = link.rsp.cont() {
                    tracing::error!(error = %resume, "could not resume the guest after a failed pause");
                }
                link.halts.record(began.elapsed());
                Err(e)
            }
        }
    }

    fn resume_all(&self) -> Result<Duration, GuestError> {
        let mut link = self.link();
        let since = link.halted_since.take().ok_or(GuestError::NotPaused)?;
        let began = link.halt_began.take();
        let resumed = link.rsp.cont();
        if let Some(b) = began {
            link.halts.record(b.elapsed());
        }
        resumed.map_err(|e| GuestError::Resume(Box::new(e)))?;
        Ok(since.elapsed())
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let len = buf.len();
        self.halted(|rsp| rsp.read_phys(gpa, buf))?
            .map_err(|_| GuestError::OutsideMemory { gpa, len })
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        self.halted(|rsp| rsp.write_phys(gpa, data))?
            .map_err(|_| GuestError::OutsideMemory {
                gpa,
                len: data.len(),
            })
    }

    fn set_rip(&self, vcpu: usize, rip: u64) -> Result<(), GuestError> {
        let mut link = self.link();
        if link.halted_since.is_none() {
            return Err(GuestError::NotPaused);
        }
        let thread = link
            .rsp
            .threads
            .get(vcpu)
            .cloned()
            .ok_or(GuestError::NoSuchVcpu(vcpu))?;
        link.rsp
            .set_reg(&thread, "rip", rip)
            .map_err(|e| GuestError::SetRip {
                vcpu,
                source: Box::new(e),
            })
    }
}

/// Every vCPU's registers, read while halted; refuses rather than invent a missing register.
fn snapshot(rsp: &mut Rsp) -> Result<Vec<Option<VcpuState>>, GuestError> {
    let threads = rsp.threads.clone();
    let mut out = Vec::with_capacity(threads.len());
    for (id, t) in threads.iter().enumerate() {
        let g = rsp.registers(t).map_err(|e| GuestError::Registers {
            vcpu: id,
            source: Box::new(e),
        })?;
        let r = |name: &'static str| {
            rsp.reg(&g, name).ok_or(GuestError::Registers {
                vcpu: id,
                source: format!("the gdbstub did not report register {name}").into(),
            })
        };
        out.push(Some(VcpuState {
            id,
            rip: r("rip")?,
            rsp: r("rsp")?,
            cpl: (r("cs")? & 3) as u8,
            paging: PagingRegs {
                cr0: r("cr0")?,
                cr3: r("cr3")?,
                cr4: r("cr4")?,
                efer: r("efer")?,
            },
        }));
    }
    Ok(out)
}

/// The base from an `IDT=     fffffe0000000000 00000fff` line of HMP `info registers`.
pub fn parse_idt_base(text: &str) -> Option<u64> {
    let rest = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("IDT="))?;
    u64::from_str_radix(rest.split_whitespace().next()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halts_add_up() {
        let mut h = HaltStats::default();
        h.record(Duration::from_micros(300));
        h.record(Duration::from_micros(1200));
        h.record(Duration::from_micros(5));
        assert_eq!(
            h,
            HaltStats {
                count: 3,
                total_us: 1505,
                longest_us: 1200
            }
        );
    }

    #[test]
    fn hmp_arguments_are_quoted_and_chardev_commas_doubled() {
        let device = format!(
            "unix:{},server=on,wait=off",
            chardev_escape(r#"/run/a b,c\"d/gdb.sock"#)
        );
        assert_eq!(
            hmp_quote(&device),
            r#""unix:/run/a b,,c\\\"d/gdb.sock,server=on,wait=off""#
        );
    }

    #[test]
    fn idt_base_comes_from_info_registers() {
        let text = "RAX=0000000000000000 RBX=0000000000000000\nGDT=     fffffe0000001000 0000007f\nIDT=     fffffe0000000000 00000fff\nCR0=80050033";
        assert_eq!(parse_idt_base(text), Some(0xfffffe0000000000));
        assert_eq!(parse_idt_base("nothing"), None);
    }
}
