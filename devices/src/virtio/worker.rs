//! The thread a virtio device does its I/O on.
//!
//! [`DeviceWorker::spawn`] starts the thread when the device is created (the
//! VMM does that before the guest runs; vCPU threads never create threads).
//! The thread waits in epoll on a control eventfd, the kicks of the active
//! queues and whatever descriptors the device adds ([`Watch`], e.g. a tap).
//! The model side ([`DeviceWorker`]) sends it commands:
//! - [`DeviceWorker::activate`]: the queues are live; the worker watches
//!   their kicks and calls [`QueueHandler::activate`];
//! - [`DeviceWorker::reset`]: the worker stops watching the kicks, calls
//!   [`QueueHandler::reset`] (which drops the queues and guest memory) and
//!   answers; `reset` returns only then, so that a reset driver can reuse
//!   the rings at once;
//! - dropping the `DeviceWorker` stops the thread and joins it.
//!
//! A queue kick is drained before [`QueueHandler::queue_kicked`] runs, so a
//! handler must process every available buffer each time (kicks coalesce).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, Activation};

/// Epoll token of the control eventfd.
const CONTROL_TOKEN: u64 = 0;
/// Epoll tokens of queue kicks: `KICK_TOKEN_BASE + queue index`.
const KICK_TOKEN_BASE: u64 = 1 << 16;
/// Tokens a handler may give its own descriptors: below this.
pub const MAX_HANDLER_TOKEN: u64 = KICK_TOKEN_BASE - 1;

/// A function every worker thread runs first (the VMM installs its seccomp
/// filter there). It gets the thread's name.
pub type ThreadInit = Arc<dyn Fn(&str) + Send + Sync>;

/// The device-specific half of a worker (see the module docs).
pub trait QueueHandler: Send + 'static {
    /// DRIVER_OK: the handler keeps `activation` (queues, memory,
    /// interrupt) and may watch descriptors of its own with `watch`.
    fn activate(&mut self, activation: Activation, watch: &mut Watch<'_>);

    /// The guest notified queue `index` (the kick is drained already).
    fn queue_kicked(&mut self, index: u16, watch: &mut Watch<'_>);

    /// A descriptor the handler watches is ready (`token` as given to
    /// [`Watch::add`], `events` as epoll reported them).
    fn fd_ready(&mut self, token: u64, events: EventSet, watch: &mut Watch<'_>) {
        let _ = (token, events, watch);
    }

    /// The driver reset the device: drop the queues and guest memory and
    /// stop watching what [`QueueHandler::activate`] added.
    fn reset(&mut self, watch: &mut Watch<'_>);
}

/// The worker's epoll, for a handler's own descriptors.
pub struct Watch<'a> {
    epoll: &'a Epoll,
}

impl Watch<'_> {
    /// Watches `fd` for `events` under `token` (at most
    /// [`MAX_HANDLER_TOKEN`]).
    pub fn add(&mut self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.control(ControlOperation::Add, fd, token, events)
    }

    /// Changes the events `fd` is watched for.
    pub fn modify(&mut self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.control(ControlOperation::Modify, fd, token, events)
    }

    /// Stops watching `fd`.
    pub fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    fn control(
        &mut self,
        operation: ControlOperation,
        fd: RawFd,
        token: u64,
        events: EventSet,
    ) -> io::Result<()> {
        if token > MAX_HANDLER_TOKEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("epoll token {token} is reserved for the worker"),
            ));
        }
        self.epoll
            .ctl(operation, fd, EpollEvent::new(events, token))
    }
}

enum Command {
    Activate(Activation),
    Reset(Sender<()>),
    Stop,
}

/// The model side of a device's worker thread (see the module docs).
#[derive(Debug)]
pub struct DeviceWorker {
    control: Arc<EventFd>,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    name: String,
}

impl DeviceWorker {
    /// Starts thread `name` running `handler`, after `init`.
    pub fn spawn<H: QueueHandler>(
        name: &str,
        handler: H,
        init: Option<ThreadInit>,
    ) -> io::Result<Self> {
        let control = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            control.as_raw_fd(),
            EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
        )?;
        let (commands, receiver) = mpsc::channel();
        let thread_control = Arc::clone(&control);
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Some(init) = init {
                    init(&thread_name);
                }
                run(&thread_name, epoll, &thread_control, &receiver, handler);
            })?;
        Ok(Self {
            control,
            commands,
            thread: Some(thread),
            name: name.to_string(),
        })
    }

    fn send(&self, command: Command) -> Result<(), ActivateError> {
        self.commands
            .send(command)
            .map_err(|_| ActivateError::WorkerGone)?;
        self.control.write(1).map_err(|_| ActivateError::WorkerGone)
    }

    /// Hands the worker the live queues.
    pub fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        self.send(Command::Activate(activation))
    }

    /// Makes the worker drop the queues; returns when it has.
    pub fn reset(&self) {
        let (ack, done) = mpsc::channel();
        if self.send(Command::Reset(ack)).is_ok() && done.recv().is_err() {
            log::warn!("{}: the worker exited during a reset", self.name);
        }
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        let _ = self.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: the worker thread panicked", self.name);
            }
        }
    }
}

fn run<H: QueueHandler>(
    name: &str,
    epoll: Epoll,
    control: &EventFd,
    commands: &Receiver<Command>,
    mut handler: H,
) {
    let mut kicks: Vec<(u16, Arc<EventFd>)> = Vec::new();
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("{name}: epoll_wait failed: {e}; the device stops");
                return;
            }
        };
        for event in &events[..count] {
            let token = event.data();
            let set = event.event_set();
            if token == CONTROL_TOKEN {
                let _ = control.read();
                while let Ok(command) = commands.try_recv() {
                    let mut watch = Watch { epoll: &epoll };
                    match command {
                        Command::Activate(activation) => {
                            unwatch_kicks(&epoll, &mut kicks);
                            for queue in &activation.queues {
                                let token = KICK_TOKEN_BASE + u64::from(queue.index);
                                match epoll.ctl(
                                    ControlOperation::Add,
                                    queue.kick.as_raw_fd(),
                                    EpollEvent::new(EventSet::IN, token),
                                ) {
                                    Ok(()) => kicks.push((queue.index, Arc::clone(&queue.kick))),
                                    Err(e) => log::error!(
                                        "{name}: cannot watch the kick of queue {}: {e}",
                                        queue.index
                                    ),
                                }
                            }
                            let indices: Vec<u16> = kicks.iter().map(|(i, _)| *i).collect();
                            handler.activate(activation, &mut watch);
                            // Buffers made available before DRIVER_OK (or
                            // kicks that came before the watch) are served.
                            for index in indices {
                                handler.queue_kicked(index, &mut watch);
                            }
                        }
                        Command::Reset(ack) => {
                            unwatch_kicks(&epoll, &mut kicks);
                            handler.reset(&mut watch);
                            let _ = ack.send(());
                        }
                        Command::Stop => {
                            unwatch_kicks(&epoll, &mut kicks);
                            handler.reset(&mut watch);
                            return;
                        }
                    }
                }
            } else if token >= KICK_TOKEN_BASE {
                let index = (token - KICK_TOKEN_BASE) as u16;
                if let Some((_, kick)) = kicks.iter().find(|(i, _)| *i == index) {
                    let _ = kick.read();
                    handler.queue_kicked(index, &mut Watch { epoll: &epoll });
                }
            } else {
                handler.fd_ready(token, set, &mut Watch { epoll: &epoll });
            }
        }
    }
}

fn unwatch_kicks(epoll: &Epoll, kicks: &mut Vec<(u16, Arc<EventFd>)>) {
    for (_, kick) in kicks.drain(..) {
        let _ = epoll.ctl(
            ControlOperation::Delete,
            kick.as_raw_fd(),
            EpollEvent::default(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::{ActivatedQueue, VirtioInterrupt};

    #[derive(Default)]
    struct Seen {
        activated: Vec<u16>,
        kicked: Vec<u16>,
        resets: usize,
    }

    struct Recorder(Arc<Mutex<Seen>>, Option<Activation>);

    impl QueueHandler for Recorder {
        fn activate(&mut self, activation: Activation, _watch: &mut Watch<'_>) {
            self.0.lock().unwrap().activated = activation.queues.iter().map(|q| q.index).collect();
            self.1 = Some(activation);
        }
        fn queue_kicked(&mut self, index: u16, _watch: &mut Watch<'_>) {
            self.0.lock().unwrap().kicked.push(index);
        }
        fn reset(&mut self, _watch: &mut Watch<'_>) {
            self.1 = None;
            self.0.lock().unwrap().resets += 1;
        }
    }

    struct NoInterrupt;
    impl VirtioInterrupt for NoInterrupt {
        fn signal_queue(&self, _queue: u16) {}
        fn signal_config(&self) {}
    }

    fn activation(kick: &Arc<EventFd>) -> Activation {
        Activation {
            memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
            features: crate::virtio::VIRTIO_F_VERSION_1,
            queues: vec![ActivatedQueue {
                index: 1,
                queue: Queue::new(16).unwrap(),
                kick: Arc::clone(kick),
            }],
            interrupt: Arc::new(NoInterrupt),
        }
    }

    fn wait_for(seen: &Arc<Mutex<Seen>>, what: impl Fn(&Seen) -> bool) {
        for _ in 0..500 {
            if what(&seen.lock().unwrap()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("the worker never got there");
    }

    #[test]
    fn activation_kicks_reset_and_stop_reach_the_handler() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let inits = Arc::new(Mutex::new(Vec::new()));
        let init_log = Arc::clone(&inits);
        let init: ThreadInit =
            Arc::new(move |name: &str| init_log.lock().unwrap().push(name.to_string()));
        let worker =
            DeviceWorker::spawn("virtio-test", Recorder(Arc::clone(&seen), None), Some(init))
                .unwrap();
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        worker.activate(activation(&kick)).unwrap();
        // Activation serves each queue once, as if kicked.
        wait_for(&seen, |s| s.activated == [1] && s.kicked == [1]);
        kick.write(1).unwrap();
        wait_for(&seen, |s| s.kicked == [1, 1]);
        worker.reset();
        assert_eq!(seen.lock().unwrap().resets, 1);
        // A kick after the reset is not the handler's business.
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(seen.lock().unwrap().kicked, [1, 1]);
        drop(worker);
        assert_eq!(seen.lock().unwrap().resets, 2);
        assert_eq!(*inits.lock().unwrap(), ["virtio-test"]);
    }

    #[test]
    fn handler_tokens_above_the_limit_are_refused() {
        let epoll = Epoll::new().unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut watch = Watch { epoll: &epoll };
        assert!(watch
            .add(fd.as_raw_fd(), MAX_HANDLER_TOKEN + 1, EventSet::IN)
            .is_err());
        watch.add(fd.as_raw_fd(), 7, EventSet::IN).unwrap();
        watch.remove(fd.as_raw_fd()).unwrap();
    }
}
