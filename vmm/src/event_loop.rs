//! The main thread's event loop (event-manager): host input for the serial
//! port, and the EventFds that say the VM should stop (a vCPU's stop request,
//! a device's power request, the host asking for a passed-through device
//! back).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::EventSet;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::buses::power::PowerSignal;
use crate::buses::serial::SerialDevice;
use crate::machine::vcpu::{StopCause, VmControl};

/// A subscriber the loop can own.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors from the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll setup or wait failed.
    #[error("event loop: {0:?}")]
    Epoll(event_manager::Error),
    /// Duplicating an EventFd failed.
    #[error("event loop: cannot duplicate an EventFd: {0}")]
    EventFd(io::Error),
    /// Duplicating stdin failed.
    #[error("cannot use stdin for the serial console: {0}")]
    Stdin(io::Error),
}

/// How often the loop wakes up even without events (to check the stop flag
/// and the deadline).
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Host bytes into the guest's serial port. Stops watching its input at
/// end-of-file or hang-up.
#[derive(Debug)]
pub struct SerialInput<R> {
    input: R,
    serial: Arc<Mutex<SerialDevice>>,
}

impl<R: Read + AsRawFd> SerialInput<R> {
    /// Feeds `input` to `serial`.
    pub fn new(input: R, serial: Arc<Mutex<SerialDevice>>) -> Self {
        SerialInput { input, serial }
    }
}

impl<R: Read + AsRawFd> MutEventSubscriber for SerialInput<R> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut stop_watching = events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP);
        if events.event_set().contains(EventSet::IN) {
            let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            // Read no more than the FIFO takes; the rest stays in the pipe
            // or terminal until the guest drains the FIFO.
            let room = serial.input_capacity().clamp(1, 64);
            let mut buf = [0u8; 64];
            match self.input.read(&mut buf[..room]) {
                Ok(0) => stop_watching = true,
                Ok(n) => {
                    serial.enqueue_input(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("serial input: {e}; ignoring further input");
                    stop_watching = true;
                }
            }
        }
        if stop_watching {
            let _ = ops.remove(Events::empty(&self.input));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            // A regular file or /dev/null on stdin cannot be polled: no input.
            log::debug!("serial input not watched: {e:?}");
        }
    }
}

/// Drains EventFds that only exist to wake the loop; turns a device's power
/// request into a stop request.
#[derive(Debug)]
struct StopWatcher {
    exit_evt: EventFd,
    power: PowerSignal,
    control: Arc<VmControl>,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.exit_evt.as_raw_fd() {
            let _ = self.exit_evt.read();
        } else {
            let _ = self.power.event_fd().read();
            match self.power.pending() {
                Some(devices::PowerEvent::PowerOff) => {
                    self.control.request_stop(StopCause::PowerOff)
                }
                Some(devices::PowerEvent::Reset) => self.control.request_stop(StopCause::Reset),
                None => {}
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.exit_evt, self.power.event_fd()] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("cannot watch a stop EventFd: {e:?}");
            }
        }
    }
}

/// The host's request for a passed-through device (VFIO's device request
/// eventfd): stops the VM with [`StopCause::DeviceReleaseRequest`] and says
/// so in one log line, however often vfio-pci signals it (it re-signals
/// every 10 seconds until the device is closed).
#[derive(Debug)]
struct ReleaseRequestWatcher {
    bdf: String,
    request: EventFd,
    control: Arc<VmControl>,
    announced: bool,
}

impl MutEventSubscriber for ReleaseRequestWatcher {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP)
        {
            let _ = ops.remove(Events::empty(&self.request));
        }
        // Non-blocking: a spurious wake-up reads nothing and stops nothing.
        if !matches!(self.request.read(), Ok(count) if count > 0) {
            return;
        }
        if !self.announced {
            self.announced = true;
            log::warn!(
                "vfio: {}: the host asks for the device back (VFIO device request, as when it is \
                 unbound from vfio-pci): stopping the guest and releasing the device",
                self.bdf
            );
        }
        self.control.request_stop(StopCause::DeviceReleaseRequest {
            bdf: self.bdf.clone(),
        });
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.request, EventSet::IN)) {
            log::error!(
                "vfio: {}: cannot watch the device request EventFd: {e:?}; an unbind from \
                 vfio-pci waits until barge exits",
                self.bdf
            );
        }
    }
}

/// The main thread's event loop for one VM run.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    control: Arc<VmControl>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

impl EventLoop {
    /// A loop that watches `control`'s and `power`'s EventFds.
    pub fn new(control: Arc<VmControl>, power: PowerSignal) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Epoll)?;
        let exit_evt = control
            .exit_evt()
            .try_clone()
            .map_err(EventLoopError::EventFd)?;
        manager.add_subscriber(Arc::new(Mutex::new(StopWatcher {
            exit_evt,
            power,
            control: control.clone(),
        })));
        Ok(EventLoop { manager, control })
    }

    /// Feeds the process's stdin to `serial`.
    pub fn add_stdin(&mut self, serial: Arc<Mutex<SerialDevice>>) -> Result<(), EventLoopError> {
        let stdin = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(EventLoopError::Stdin)?;
        self.add_input(File::from(stdin), serial);
        Ok(())
    }

    /// Feeds any pollable reader to `serial`.
    pub fn add_input<R>(&mut self, input: R, serial: Arc<Mutex<SerialDevice>>)
    where
        R: Read + AsRawFd + Send + 'static,
    {
        self.manager
            .add_subscriber(Arc::new(Mutex::new(SerialInput::new(input, serial))));
    }

    /// Stops the VM when `request`, the eventfd VFIO signals when the host
    /// wants device `bdf` back, fires (see [`StopCause::DeviceReleaseRequest`]).
    /// The loop watches a duplicate of it, closed with the loop.
    pub fn watch_release_request(
        &mut self,
        bdf: &str,
        request: &EventFd,
    ) -> Result<(), EventLoopError> {
        let request = request.try_clone().map_err(EventLoopError::EventFd)?;
        self.manager
            .add_subscriber(Arc::new(Mutex::new(ReleaseRequestWatcher {
                bdf: bdf.to_string(),
                request,
                control: self.control.clone(),
                announced: false,
            })));
        Ok(())
    }

    /// Dispatches events until a stop is requested or `deadline` passes
    /// (then the cause is [`StopCause::Timeout`]) or a stop signal arrives
    /// (see [`crate::signals`]; then [`StopCause::Signal`]). Returns the
    /// stop cause.
    pub fn run_until_stopped(&mut self, deadline: Option<Instant>) -> StopCause {
        loop {
            if let Some(signo) = crate::signals::pending_stop_signal() {
                self.control.request_stop(StopCause::Signal(signo));
            }
            if let Some(cause) = self.control.cause() {
                return cause;
            }
            let wait = match deadline {
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        self.control.request_stop(StopCause::Timeout);
                        continue;
                    }
                    (deadline - now).min(POLL_INTERVAL)
                }
                None => POLL_INTERVAL,
            };
            let millis = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX).max(1);
            if let Err(e) = self.manager.run_with_timeout(millis) {
                self.control
                    .request_stop(StopCause::Error(format!("event loop failed: {e:?}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::buses::serial::IrqFdTrigger;

    fn serial() -> Arc<Mutex<SerialDevice>> {
        Arc::new(Mutex::new(SerialDevice::new(
            IrqFdTrigger::new().unwrap(),
            Box::new(io::sink()),
        )))
    }

    #[test]
    fn stop_request_ends_the_loop_with_its_cause() {
        let control = Arc::new(VmControl::new().unwrap());
        let power = PowerSignal::new().unwrap();
        let mut event_loop = EventLoop::new(control.clone(), power).unwrap();
        let c = control.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c.request_stop(StopCause::Reset);
        });
        assert_eq!(event_loop.run_until_stopped(None), StopCause::Reset);
        t.join().unwrap();
    }

    #[test]
    fn device_power_request_stops_the_loop() {
        let control = Arc::new(VmControl::new().unwrap());
        let power = PowerSignal::new().unwrap();
        let mut event_loop = EventLoop::new(control.clone(), power.clone()).unwrap();
        power.raise(devices::PowerEvent::PowerOff);
        let cause = event_loop.run_until_stopped(Some(Instant::now() + Duration::from_secs(5)));
        assert_eq!(cause, StopCause::PowerOff);
    }

    #[test]
    fn deadline_ends_the_loop_with_timeout() {
        let control = Arc::new(VmControl::new().unwrap());
        let mut event_loop = EventLoop::new(control.clone(), PowerSignal::new().unwrap()).unwrap();
        let start = Instant::now();
        let cause = event_loop.run_until_stopped(Some(start + Duration::from_millis(30)));
        assert_eq!(cause, StopCause::Timeout);
        assert!(control.is_stopping());
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    /// Keeps what this module logs (other tests' records are ignored).
    struct Capture(Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }

        fn log(&self, record: &log::Record<'_>) {
            if record.target() == "vmm::event_loop" {
                let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
                lines.push(format!("{} {}", record.level(), record.args()));
            }
        }

        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

    #[test]
    fn a_device_request_stops_the_loop_with_one_line_however_often_it_fires() {
        // The only test in this crate that installs a logger.
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        const BDF: &str = "0000:5e:00.7";
        let control = Arc::new(VmControl::new().unwrap());
        let mut event_loop = EventLoop::new(control.clone(), PowerSignal::new().unwrap()).unwrap();
        let request = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        event_loop.watch_release_request(BDF, &request).unwrap();
        // Nothing stops the loop before the host asks.
        let cause = event_loop.run_until_stopped(Some(Instant::now() + Duration::from_millis(30)));
        assert_eq!(cause, StopCause::Timeout);
        let control = Arc::new(VmControl::new().unwrap());
        let mut event_loop = EventLoop::new(control.clone(), PowerSignal::new().unwrap()).unwrap();
        event_loop.watch_release_request(BDF, &request).unwrap();
        request.write(1).unwrap();
        request.write(1).unwrap();
        let cause = event_loop.run_until_stopped(Some(Instant::now() + Duration::from_secs(5)));
        let expected = StopCause::DeviceReleaseRequest { bdf: BDF.into() };
        assert_eq!(cause, expected);
        // vfio-pci re-signals until the device is closed: no more lines.
        for _ in 0..5 {
            request.write(1).unwrap();
            event_loop.manager.run_with_timeout(100).unwrap();
        }
        assert_eq!(control.cause(), Some(expected));
        let lines: Vec<String> = CAPTURE
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(BDF))
            .cloned()
            .collect();
        assert_eq!(
            lines,
            [format!(
                "WARN vfio: {BDF}: the host asks for the device back (VFIO device request, as \
                 when it is unbound from vfio-pci): stopping the guest and releasing the device"
            )]
        );
    }

    #[test]
    fn input_reaches_the_serial_fifo_and_eof_unsubscribes() {
        let control = Arc::new(VmControl::new().unwrap());
        let mut event_loop = EventLoop::new(control.clone(), PowerSignal::new().unwrap()).unwrap();
        let dev = serial();
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        event_loop.add_input(guest_side, dev.clone());
        let before = dev.lock().unwrap().input_capacity();
        host.write_all(b"ls\n").unwrap();
        drop(host);
        let cause = event_loop.run_until_stopped(Some(Instant::now() + Duration::from_millis(250)));
        assert_eq!(cause, StopCause::Timeout);
        assert_eq!(dev.lock().unwrap().input_capacity(), before - 3);
    }
}
