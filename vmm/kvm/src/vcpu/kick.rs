//! Forcing a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit`.
//!
//! Why both: the signal interrupts a vCPU that is inside the guest; `immediate_exit` covers the
//! window where the signal lands after the thread checked for a pause but before it entered
//! `KVM_RUN` — KVM then returns `EINTR` at once instead of running the guest until the next exit.
//! The handler writes only the calling thread's own `kvm_run` page, found through a thread-local,
//! so no thread ever touches another vCPU's `kvm_run`.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Once;
use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null on threads that are not vCPUs.
    static IMMEDIATE_EXIT: Cell<*const AtomicU8> = const { Cell::new(std::ptr::null()) };
}

/// The signal used for kicks (the first real-time signal, as Firecracker does).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: one atomic store through a const-initialised thread-local.
    let ptr = IMMEDIATE_EXIT.with(|c| c.get());
    if !ptr.is_null() {
        // SAFETY: the pointer was installed by `bind_immediate_exit` on this very thread and
        // stays valid until `unbind_immediate_exit`, which this thread calls before the vCPU's
        // `kvm_run` mapping is dropped.
        unsafe { (*ptr).store(1, Ordering::SeqCst) };
    }
}

/// Installs the kick handler once per process.
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick);
    });
    result
}

/// Registers this thread's `immediate_exit` byte for the kick handler.
///
/// # Safety
/// `flag` must point into this thread's vCPU `kvm_run` mapping and stay valid until
/// [`unbind_immediate_exit`] is called on the same thread.
pub unsafe fn bind_immediate_exit(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(flag as *const AtomicU8));
}

/// Forgets this thread's `immediate_exit` byte; kicks arriving later do nothing.
pub fn unbind_immediate_exit() {
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null()));
}

/// A handle to signal one vCPU thread.
#[derive(Debug, Clone, Copy)]
pub struct Kicker {
    thread: libc::pthread_t,
}

impl Kicker {
    pub fn for_thread<T>(handle: &std::thread::JoinHandle<T>) -> Self {
        Kicker {
            thread: handle.as_pthread_t() as libc::pthread_t,
        }
    }

    /// Sends the kick signal. A thread that already exited makes this a harmless `ESRCH`.
    pub fn kick(&self) {
        // SAFETY: pthread_kill with a valid signal number; the pthread_t comes from a JoinHandle
        // the VM keeps until it has joined the thread, so it names this thread or an exited one.
        unsafe {
            libc::pthread_kill(self.thread, kick_signal());
        }
    }
}
