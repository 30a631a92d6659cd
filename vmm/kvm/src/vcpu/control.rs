//! The pause/resume protocol between the controller and the vCPU threads.
//!
//! KVM-free on purpose: the same state machine is driven by real vCPU threads in the VMM and by
//! plain threads in the unit tests below. A vCPU thread calls [`VcpuControl::wants_attention`]
//! after every exit from the guest (one relaxed atomic load on the hot path) and
//! [`VcpuControl::checkpoint`] when it returns true; the controller calls [`VcpuControl::pause`],
//! [`VcpuControl::resume`] and [`VcpuControl::stop`], passing a `kick` that forces the vCPUs out
//! of the guest (in the VMM: `immediate_exit` plus a signal).
//!
//! Phases of one vCPU: `Starting → Running ⇄ Parked`, and from any of them `→ Exited`.
//! A pause is complete when every vCPU that has not exited is `Parked`; the instants of the
//! last park and of the last wake-up are recorded by the vCPU threads themselves, so the
//! reported park latency and blackout do not include the controller's own wake-up delay.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where one vCPU is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VcpuPhase {
    Starting,
    Running,
    Parked,
    Exited,
}

/// What the controller asks of the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// What a vCPU thread does after a checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Checkpoint<U> {
    /// Go back into the guest, first applying `update` (register changes made while parked).
    Continue(Option<U>),
    /// Leave the run loop: the VM is stopping.
    Stop,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("the vCPUs are already paused; resume them first")]
    AlreadyPaused,
    #[error("the vCPUs are not paused")]
    NotPaused,
    #[error("the VM is stopping or has stopped")]
    Stopped,
    #[error(
        "vCPU(s) {stuck:?} did not park within {timeout_ms} ms; the pause was cancelled and the guest keeps running"
    )]
    ParkTimeout { stuck: Vec<usize>, timeout_ms: u64 },
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(usize),
}

/// Result of a completed pause: how long parking took and what each vCPU looked like.
#[derive(Debug, Clone)]
pub struct Paused<S> {
    /// Request → last vCPU parked.
    pub park: Duration,
    /// One snapshot per vCPU; `None` for vCPUs that had exited.
    pub snapshots: Vec<Option<S>>,
}

/// Result of a completed resume.
#[derive(Debug, Clone, Copy)]
pub struct Resumed {
    /// Last vCPU parked → last vCPU running again: what the guest felt.
    pub blackout: Duration,
}

struct State<S, U> {
    request: Request,
    phases: Vec<VcpuPhase>,
    snapshots: Vec<Option<S>>,
    updates: Vec<Option<U>>,
    all_parked_at: Option<Instant>,
    all_running_at: Option<Instant>,
}

/// Shared between the controller and all vCPU threads of one VM.
///
/// `S` is a vCPU snapshot taken when parking; `U` is an update handed to a vCPU on resume.
pub struct VcpuControl<S, U = ()> {
    /// Fast-path flag: set while a pause or a stop is requested.
    attention: AtomicBool,
    /// Set with `all_parked_at`, for the controller to poll without taking the lock.
    all_parked: AtomicBool,
    /// Whether the controller and parked vCPUs poll instead of sleeping at once
    /// ([`VcpuControl::poll_while_paused`]): only where the host has a CPU to spare.
    poll: bool,
    state: Mutex<State<S, U>>,
    /// vCPUs wait on it while parked.
    to_vcpus: Condvar,
    /// The controller waits on it for vCPUs to change phase.
    to_controller: Condvar,
}

/// How often a pause re-kicks vCPUs that have not parked yet (a signal can be lost when it lands
/// between the check and the entry into the guest only if immediate_exit is not set; re-kicking
/// bounds the damage of any such gap).
const REKICK_INTERVAL: Duration = Duration::from_millis(10);

/// How long a parked vCPU polls for the resume, and the controller for the last park, before
/// sleeping ([`VcpuControl::poll_while_paused`]). KVM's own halt polling defaults to 200 µs; a
/// patch's blackout in the nested tier's L1 is about 1 ms, and a longer pause (an operator's
/// `vmm pause`) costs at most this much CPU per thread.
const PARK_POLL: Duration = Duration::from_millis(2);

impl<S: Clone, U> VcpuControl<S, U> {
    pub fn new(vcpus: usize) -> Self {
        VcpuControl {
            attention: AtomicBool::new(false),
            all_parked: AtomicBool::new(false),
            poll: std::thread::available_parallelism().is_ok_and(|n| n.get() > vcpus),
            state: Mutex::new(State {
                request: Request::Run,
                phases: vec![VcpuPhase::Starting; vcpus],
                snapshots: (0..vcpus).map(|_| None).collect(),
                updates: (0..vcpus).map(|_| None).collect(),
                all_parked_at: None,
                all_running_at: None,
            }),
            to_vcpus: Condvar::new(),
            to_controller: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<S, U>> {
        // A panic while holding this lock leaves plain data behind; keep going with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn vcpu_count(&self) -> usize {
        self.lock().phases.len()
    }

    /// Hot path for vCPU threads: is a pause or stop pending?
    #[inline]
    pub fn wants_attention(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }

    /// Called by vCPU `id` once it has started and whenever `wants_attention` is true, at a point
    /// where its state is consistent (no half-completed I/O). Parks if a pause is requested,
    /// taking a snapshot with `snapshot`, and returns once the vCPU may run again.
    pub fn checkpoint(&self, id: usize, snapshot: impl FnOnce() -> S) -> Checkpoint<U> {
        let mut st = self.lock();
        match st.request {
            Request::Stop => return Checkpoint::Stop,
            Request::Run => {
                if st.phases[id] == VcpuPhase::Starting {
                    st.phases[id] = VcpuPhase::Running;
                    self.to_controller.notify_all();
                }
                return Checkpoint::Continue(None);
            }
            Request::Pause => {}
        }
        // Take the snapshot outside the lock: it costs ioctls, and other vCPUs park meanwhile.
        drop(st);
        let snap = snapshot();
        let mut st = self.lock();
        if st.request == Request::Stop {
            return Checkpoint::Stop;
        }
        if st.request == Request::Pause {
            st.snapshots[id] = Some(snap);
            st.phases[id] = VcpuPhase::Parked;
            if st
                .phases
                .iter()
                .all(|p| matches!(p, VcpuPhase::Parked | VcpuPhase::Exited))
            {
                st.all_parked_at = Some(Instant::now());
                self.all_parked.store(true, Ordering::Release);
            }
            self.to_controller.notify_all();
            drop(st);
            self.poll_while_paused();
            st = self.lock();
            while st.request == Request::Pause {
                st = self.to_vcpus.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.request == Request::Stop {
                return Checkpoint::Stop;
            }
        }
        st.phases[id] = VcpuPhase::Running;
        if st
            .phases
            .iter()
            .all(|p| matches!(p, VcpuPhase::Running | VcpuPhase::Exited))
        {
            st.all_running_at = Some(Instant::now());
        }
        let update = st.updates[id].take();
        self.to_controller.notify_all();
        Checkpoint::Continue(update)
    }

    /// A parked vCPU polls for the resume for up to [`PARK_POLL`] before it sleeps on the
    /// condition variable, as KVM's halt polling does for a halted vCPU: most pauses (a patch's
    /// blackout) end well within it, and a thread woken from sleep on an idle CPU can take
    /// longer to run again than the patching took (on this project's PVM host, one vCPU: the
    /// floor's p50 went from 74 to 3 µs). Only where the host has a CPU to spare beyond one
    /// per vCPU, for the controller as for the vCPUs: a poller must never hold a CPU that the
    /// thread it waits for needs, and yielding each turn did not make room reliably. Measured
    /// without a spare CPU (2 vCPUs on 2 CPUs): polling vCPUs stretched over a third of the
    /// nested tier's blackouts to the whole poll time, and a polling controller doubled the
    /// API's apply latency on the PVM host (4.0 → 7.5 ms), the vCPUs being slower to park.
    fn poll_while_paused(&self) {
        if !self.poll {
            return;
        }
        let start = Instant::now();
        while self.attention.load(Ordering::Acquire) && start.elapsed() < PARK_POLL {
            std::thread::yield_now();
        }
    }

    /// Called by vCPU `id` when its thread leaves the run loop for good.
    pub fn exited(&self, id: usize) {
        let mut st = self.lock();
        st.phases[id] = VcpuPhase::Exited;
        if st.request == Request::Pause
            && st.all_parked_at.is_none()
            && st
                .phases
                .iter()
                .all(|p| matches!(p, VcpuPhase::Parked | VcpuPhase::Exited))
        {
            st.all_parked_at = Some(Instant::now());
            self.all_parked.store(true, Ordering::Release);
        }
        self.to_controller.notify_all();
    }

    pub fn phases(&self) -> Vec<VcpuPhase> {
        self.lock().phases.clone()
    }

    pub fn is_paused(&self) -> bool {
        self.lock().request == Request::Pause
    }

    /// Parks every vCPU. `kick(ids)` must force the listed vCPUs out of the guest promptly;
    /// it is called once, then again every 10 ms for those not parked yet. On timeout the
    /// pause is cancelled (the guest keeps running) and the stuck vCPUs are named.
    pub fn pause(
        &self,
        kick: &dyn Fn(&[usize]),
        timeout: Duration,
    ) -> Result<Paused<S>, ControlError> {
        let requested_at = Instant::now();
        let mut st = self.lock();
        match st.request {
            Request::Pause => return Err(ControlError::AlreadyPaused),
            Request::Stop => return Err(ControlError::Stopped),
            Request::Run => {}
        }
        // A previous resume must have completed (every vCPU back to running) before a new pause,
        // otherwise a vCPU still waking up would be counted as parked.
        while st.phases.contains(&VcpuPhase::Parked) {
            st = self
                .to_controller
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        st.request = Request::Pause;
        st.all_parked_at = None;
        self.all_parked.store(false, Ordering::Release);
        st.all_running_at = None;
        for s in st.snapshots.iter_mut() {
            *s = None;
        }
        self.attention.store(true, Ordering::Release);
        let mut pending = Self::not_parked(&st);
        drop(st);
        kick(&pending);
        let deadline = requested_at + timeout;
        // The blackout starts when the last vCPU parks: poll for that before sleeping, so the
        // controller's own wake-up is not part of it (see `poll_while_paused`).
        let poll_until = (Instant::now() + PARK_POLL).min(deadline);
        while self.poll && !self.all_parked.load(Ordering::Acquire) && Instant::now() < poll_until {
            std::thread::yield_now();
        }
        let mut st = self.lock();
        loop {
            if st.request == Request::Stop {
                return Err(ControlError::Stopped);
            }
            if let Some(at) = st.all_parked_at {
                let snapshots = st.snapshots.clone();
                return Ok(Paused {
                    park: at.saturating_duration_since(requested_at),
                    snapshots,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let stuck = Self::not_parked(&st);
                st.request = Request::Run;
                self.attention.store(false, Ordering::Release);
                self.to_vcpus.notify_all();
                return Err(ControlError::ParkTimeout {
                    stuck,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            let wait = REKICK_INTERVAL.min(deadline - now);
            let (guard, res) = self
                .to_controller
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            if res.timed_out() && st.all_parked_at.is_none() {
                pending = Self::not_parked(&st);
                drop(st);
                kick(&pending);
                st = self.lock();
            }
        }
    }

    fn not_parked(st: &State<S, U>) -> Vec<usize> {
        st.phases
            .iter()
            .enumerate()
            .filter(|(_, p)| !matches!(p, VcpuPhase::Parked | VcpuPhase::Exited))
            .map(|(i, _)| i)
            .collect()
    }

    /// Queues `update` for parked vCPU `id`, applied by its thread before it re-enters the guest.
    pub fn set_update(&self, id: usize, update: U) -> Result<(), ControlError> {
        let mut st = self.lock();
        if st.request != Request::Pause {
            return Err(ControlError::NotPaused);
        }
        let slot = st.updates.get_mut(id).ok_or(ControlError::NoSuchVcpu(id))?;
        *slot = Some(update);
        Ok(())
    }

    /// Releases parked vCPUs and waits until every one is running again.
    pub fn resume(&self) -> Result<Resumed, ControlError> {
        let mut st = self.lock();
        match st.request {
            Request::Run => return Err(ControlError::NotPaused),
            Request::Stop => return Err(ControlError::Stopped),
            Request::Pause => {}
        }
        let parked_at = st.all_parked_at.unwrap_or_else(Instant::now);
        st.request = Request::Run;
        self.attention.store(false, Ordering::Release);
        self.to_vcpus.notify_all();
        while st.request == Request::Run && st.phases.contains(&VcpuPhase::Parked) {
            st = self
                .to_controller
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        let running_at = st.all_running_at.unwrap_or_else(Instant::now);
        Ok(Resumed {
            blackout: running_at.saturating_duration_since(parked_at),
        })
    }

    /// Asks every vCPU to leave its run loop; parked vCPUs are released to do so.
    pub fn stop(&self, kick: &dyn Fn(&[usize])) {
        let mut st = self.lock();
        st.request = Request::Stop;
        self.attention.store(true, Ordering::Release);
        self.to_vcpus.notify_all();
        self.to_controller.notify_all();
        let running: Vec<usize> = st
            .phases
            .iter()
            .enumerate()
            .filter(|(_, p)| **p != VcpuPhase::Exited)
            .map(|(i, _)| i)
            .collect();
        drop(st);
        kick(&running);
    }

    pub fn is_stopping(&self) -> bool {
        self.lock().request == Request::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use std::thread;

    /// A fake vCPU: spins doing "guest work" (incrementing a counter) and checks in like the
    /// real run loop. `kicked` mimics immediate_exit: the fake only checks in when kicked or
    /// when it notices the flag, like a real vCPU leaving KVM_RUN.
    struct Fake {
        control: Arc<VcpuControl<u64, u64>>,
        progress: Vec<Arc<AtomicU64>>,
        threads: Vec<thread::JoinHandle<Vec<u64>>>,
    }

    fn spawn(n: usize) -> Fake {
        spawn_polling(n, None)
    }

    /// `poll`: force polling on or off (`None`: as the host's CPU count decides).
    fn spawn_polling(n: usize, poll: Option<bool>) -> Fake {
        let mut control = VcpuControl::<u64, u64>::new(n);
        if let Some(on) = poll {
            control.poll = on;
        }
        let control = Arc::new(control);
        let progress: Vec<_> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let threads = (0..n)
            .map(|id| {
                let c = control.clone();
                let p = progress[id].clone();
                thread::spawn(move || {
                    let mut updates = Vec::new();
                    if let Checkpoint::Stop = c.checkpoint(id, || p.load(Ordering::SeqCst)) {
                        c.exited(id);
                        return updates;
                    }
                    loop {
                        p.fetch_add(1, Ordering::SeqCst);
                        if c.wants_attention() {
                            match c.checkpoint(id, || p.load(Ordering::SeqCst)) {
                                Checkpoint::Stop => break,
                                Checkpoint::Continue(Some(u)) => updates.push(u),
                                Checkpoint::Continue(None) => {}
                            }
                        }
                        std::hint::spin_loop();
                    }
                    c.exited(id);
                    updates
                })
            })
            .collect();
        Fake {
            control,
            progress,
            threads,
        }
    }

    fn wait_running(c: &VcpuControl<u64, u64>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.phases().contains(&VcpuPhase::Starting) {
            assert!(Instant::now() < deadline, "vCPUs never started");
            thread::sleep(Duration::from_millis(1));
        }
    }

    const NO_KICK: &dyn Fn(&[usize]) = &|_| {};
    const T: Duration = Duration::from_secs(10);

    #[test]
    fn pause_parks_everyone_and_freezes_progress() {
        let f = spawn(4);
        wait_running(&f.control);
        let paused = f.control.pause(NO_KICK, T).expect("pause");
        assert!(f.control.phases().iter().all(|p| *p == VcpuPhase::Parked));
        // Snapshots are what each vCPU saw when it parked, and nothing moves while parked.
        let frozen: Vec<u64> = f
            .progress
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect();
        let snaps: Vec<u64> = paused
            .snapshots
            .iter()
            .map(|s| s.unwrap_or(u64::MAX))
            .collect();
        assert_eq!(frozen, snaps);
        thread::sleep(Duration::from_millis(20));
        let later: Vec<u64> = f
            .progress
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect();
        assert_eq!(frozen, later);
        f.control.resume().expect("resume");
        assert!(f.control.phases().iter().all(|p| *p == VcpuPhase::Running));
        thread::sleep(Duration::from_millis(20));
        for (p, before) in f.progress.iter().zip(frozen) {
            assert!(
                p.load(Ordering::SeqCst) > before,
                "vCPU did not run after resume"
            );
        }
        f.control.stop(NO_KICK);
        for t in f.threads {
            t.join().expect("join");
        }
    }

    #[test]
    fn double_pause_and_resume_without_pause_are_refused() {
        let f = spawn(2);
        wait_running(&f.control);
        assert_eq!(f.control.resume().err(), Some(ControlError::NotPaused));
        f.control.pause(NO_KICK, T).expect("pause");
        assert_eq!(
            f.control.pause(NO_KICK, T).err(),
            Some(ControlError::AlreadyPaused)
        );
        f.control.resume().expect("resume");
        f.control.stop(NO_KICK);
        for t in f.threads {
            t.join().expect("join");
        }
    }

    #[test]
    fn many_cycles_keep_the_protocol_consistent() {
        let f = spawn(3);
        wait_running(&f.control);
        for _ in 0..500 {
            let p = f.control.pause(NO_KICK, T).expect("pause");
            assert!(p.snapshots.iter().all(|s| s.is_some()));
            let r = f.control.resume().expect("resume");
            assert!(r.blackout < T);
        }
        f.control.stop(NO_KICK);
        for t in f.threads {
            t.join().expect("join");
        }
    }

    #[test]
    fn polling_or_sleeping_a_pause_holds_until_resumed() {
        for poll in [true, false] {
            let f = spawn_polling(2, Some(poll));
            wait_running(&f.control);
            for _ in 0..200 {
                f.control.pause(NO_KICK, T).expect("pause");
                f.control.resume().expect("resume");
            }
            // A pause longer than the poll: the vCPUs go to sleep and stay parked.
            f.control.pause(NO_KICK, T).expect("pause");
            let frozen: Vec<u64> = f
                .progress
                .iter()
                .map(|p| p.load(Ordering::SeqCst))
                .collect();
            thread::sleep(PARK_POLL * 5);
            let later: Vec<u64> = f
                .progress
                .iter()
                .map(|p| p.load(Ordering::SeqCst))
                .collect();
            assert_eq!(frozen, later, "poll={poll}: a vCPU ran while paused");
            assert!(f.control.phases().iter().all(|p| *p == VcpuPhase::Parked));
            f.control.resume().expect("resume");
            assert!(f.control.phases().iter().all(|p| *p == VcpuPhase::Running));
            f.control.stop(NO_KICK);
            for t in f.threads {
                t.join().expect("join");
            }
        }
    }

    #[test]
    fn updates_reach_the_parked_vcpu() {
        let f = spawn(2);
        wait_running(&f.control);
        assert_eq!(
            f.control.set_update(1, 7).err(),
            Some(ControlError::NotPaused)
        );
        f.control.pause(NO_KICK, T).expect("pause");
        f.control.set_update(1, 42).expect("update");
        assert_eq!(
            f.control.set_update(9, 1).err(),
            Some(ControlError::NoSuchVcpu(9))
        );
        f.control.resume().expect("resume");
        f.control.stop(NO_KICK);
        let updates: Vec<Vec<u64>> = f
            .threads
            .into_iter()
            .map(|t| t.join().expect("join"))
            .collect();
        assert_eq!(updates, vec![vec![], vec![42]]);
    }

    #[test]
    fn stop_releases_parked_vcpus() {
        let f = spawn(2);
        wait_running(&f.control);
        f.control.pause(NO_KICK, T).expect("pause");
        f.control.stop(NO_KICK);
        for t in f.threads {
            t.join().expect("join");
        }
        assert!(f.control.phases().iter().all(|p| *p == VcpuPhase::Exited));
        assert_eq!(
            f.control.pause(NO_KICK, T).err(),
            Some(ControlError::Stopped)
        );
    }

    #[test]
    fn exited_vcpus_do_not_block_a_pause() {
        let control = Arc::new(VcpuControl::<u64, u64>::new(2));
        control.exited(1);
        let c = control.clone();
        let t = thread::spawn(move || {
            c.checkpoint(0, || 0);
            while !c.wants_attention() {
                std::hint::spin_loop();
            }
            let r = c.checkpoint(0, || 5);
            c.exited(0);
            r
        });
        while control.phases()[0] != VcpuPhase::Running {
            thread::sleep(Duration::from_millis(1));
        }
        let p = control.pause(NO_KICK, T).expect("pause");
        assert_eq!(p.snapshots, vec![Some(5), None]);
        control.stop(NO_KICK);
        assert_eq!(t.join().expect("join"), Checkpoint::Stop);
    }

    #[test]
    fn a_vcpu_that_never_parks_times_out_and_the_pause_is_cancelled() {
        let control = Arc::new(VcpuControl::<u64, u64>::new(2));
        // vCPU 0 checks in; vCPU 1 is "stuck in the guest" and never checks in.
        let c = control.clone();
        let t = thread::spawn(move || {
            c.checkpoint(0, || 0);
            loop {
                if c.wants_attention() && c.checkpoint(0, || 0) == Checkpoint::Stop {
                    break;
                }
                thread::sleep(Duration::from_micros(100));
            }
            c.exited(0);
        });
        let kicks = Arc::new(AtomicU64::new(0));
        let k = kicks.clone();
        let kick = move |ids: &[usize]| {
            assert!(ids.contains(&1));
            k.fetch_add(1, Ordering::SeqCst);
        };
        let err = control.pause(&kick, Duration::from_millis(60)).err();
        assert_eq!(
            err,
            Some(ControlError::ParkTimeout {
                stuck: vec![1],
                timeout_ms: 60
            })
        );
        assert!(
            kicks.load(Ordering::SeqCst) >= 3,
            "stuck vCPUs must be re-kicked"
        );
        assert!(!control.is_paused());
        control.stop(NO_KICK);
        t.join().expect("join");
    }
}
