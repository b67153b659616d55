//! The connection: greeting, capability negotiation, commands matched to
//! replies by id, and the event buffer.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, ErrorClass, Result};
use crate::types::{Event, Greeting};

/// The longest greeting accepted; anything longer is not QMP.
const MAX_GREETING: usize = 64 * 1024;
/// The longest message accepted after the greeting (`query-qmp-schema` is
/// a few hundred KiB).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// The most bytes of unclaimed events kept, whatever their number: events
/// are small, and a peer sending large ones must not fill memory.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Where the monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket (`--chardev socket,path=...,server=on`).
    Unix(PathBuf),
    /// `host:port` (`--chardev socket,host=...,port=...,server=on`).
    Tcp(String),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp(host_port) => write!(f, "tcp:{host_port}"),
        }
    }
}

impl From<&Path> for Address {
    fn from(path: &Path) -> Self {
        Address::Unix(path.to_owned())
    }
}

impl From<PathBuf> for Address {
    fn from(path: PathBuf) -> Self {
        Address::Unix(path)
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long connecting, the greeting and `qmp_capabilities` may take.
    pub greeting_timeout: Duration,
    /// Default time limit of [`Qmp::execute`].
    pub command_timeout: Duration,
    /// How many unclaimed events are kept (and at most 16 MiB of them);
    /// beyond that the oldest go.
    pub event_capacity: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            greeting_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(60),
            event_capacity: 4096,
        }
    }
}

/// What QEMU said about one command.
type Reply = std::result::Result<Value, (ErrorClass, String)>;

/// A buffered event and the size of its message on the wire.
struct Buffered {
    event: Event,
    bytes: usize,
}

/// State shared with the reader task.
struct Shared {
    address: String,
    state: Mutex<State>,
    /// Woken on every new event and when the connection closes.
    changed: Notify,
    event_capacity: usize,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    events: VecDeque<Buffered>,
    /// Sum of `bytes` over `events`.
    event_bytes: usize,
    closed: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent
        // (every critical section is a single map or queue operation).
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn closed_error(&self, reason: &str) -> Error {
        Error::Closed {
            address: self.address.clone(),
            reason: reason.to_owned(),
        }
    }

    /// Routes one message from QEMU, `bytes` long on the wire.
    fn dispatch(&self, message: Value, bytes: usize) {
        let Value::Object(object) = message else {
            tracing::warn!(peer = %self.address, "ignoring a QMP message that is not an object");
            return;
        };
        if object.contains_key("event") {
            match Event::from_object(object) {
                Some(event) => self.push_event(event, bytes),
                None => tracing::warn!(peer = %self.address, "ignoring a malformed QMP event"),
            }
            return;
        }
        let reply = if let Some(value) = object.get("return") {
            Ok(value.clone())
        } else if let Some(error) = object.get("error") {
            let class = error
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("GenericError");
            let desc = error
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("(no description)");
            Err((ErrorClass::from_name(class), desc.to_owned()))
        } else {
            tracing::warn!(peer = %self.address, "ignoring a QMP message that is neither reply nor event");
            return;
        };
        let Some(id) = object.get("id").and_then(Value::as_u64) else {
            tracing::warn!(peer = %self.address, ?reply, "ignoring a QMP reply without our id");
            return;
        };
        match self.lock().pending.remove(&id) {
            // The receiver may have given up (timeout); nothing to do then.
            Some(sender) => drop(sender.send(reply)),
            None => tracing::debug!(peer = %self.address, id, "late QMP reply discarded"),
        }
    }

    fn push_event(&self, event: Event, bytes: usize) {
        tracing::trace!(peer = %self.address, event = %event.name, data = %event.data, "QMP event");
        {
            let mut state = self.lock();
            while (state.events.len() >= self.event_capacity
                || state.event_bytes + bytes > MAX_EVENT_BYTES)
                && let Some(old) = state.events.pop_front()
            {
                state.event_bytes -= old.bytes;
                tracing::debug!(peer = %self.address, event = %old.event.name, "event buffer full, dropping the oldest");
            }
            state.event_bytes += bytes;
            state.events.push_back(Buffered { event, bytes });
        }
        self.changed.notify_waiters();
    }

    /// Marks the connection dead and fails everything waiting on it.
    fn close(&self, reason: String) {
        {
            let mut state = self.lock();
            if state.closed.is_none() {
                tracing::debug!(peer = %self.address, %reason, "QMP connection closed");
                state.closed = Some(reason);
            }
            // Dropping the senders wakes every waiting command.
            state.pending.clear();
        }
        self.changed.notify_waiters();
    }
}

/// An open, negotiated QMP connection.
///
/// All methods take `&self`: commands may be issued concurrently, and
/// their replies are matched by id. Events are kept in a bounded buffer
/// until claimed with [`Qmp::wait_event`] or [`Qmp::take_events`].
/// Dropping the client closes the connection.
pub struct Qmp {
    shared: Arc<Shared>,
    outgoing: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    greeting: Greeting,
    command_timeout: Duration,
    tasks: [JoinHandle<()>; 2],
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("address", &self.shared.address)
            .finish_non_exhaustive()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Qmp {
    /// Connects with default [`Options`].
    pub async fn connect(address: impl Into<Address>) -> Result<Self> {
        Self::connect_with(address.into(), Options::default()).await
    }

    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect_with(address: Address, options: Options) -> Result<Self> {
        let name = address.to_string();
        let connect_error = |source| Error::Connect {
            address: name.clone(),
            source,
        };
        let limit = options.greeting_timeout;
        let timeout_error = || Error::Timeout {
            address: name.clone(),
            what: "the connection".into(),
            after: limit,
        };
        match &address {
            Address::Unix(path) => {
                let stream = tokio::time::timeout(limit, UnixStream::connect(path))
                    .await
                    .map_err(|_| timeout_error())?
                    .map_err(connect_error)?;
                Self::from_stream(stream, name, options).await
            }
            Address::Tcp(host_port) => {
                let stream = tokio::time::timeout(limit, TcpStream::connect(host_port.as_str()))
                    .await
                    .map_err(|_| timeout_error())?
                    .map_err(connect_error)?;
                // Commands are small and latency-bound.
                stream.set_nodelay(true).map_err(connect_error)?;
                Self::from_stream(stream, name, options).await
            }
        }
    }

    /// Speaks QMP over an already open stream; `name` is used in messages.
    pub async fn from_stream<S>(stream: S, name: String, options: Options) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read_half, write_half) = tokio::io::split(stream);
        let mut reader = BufReader::new(read_half);
        let greeting = read_greeting(&mut reader, &name, options.greeting_timeout).await?;
        tracing::debug!(peer = %name, version = %greeting.version, "QMP greeting");

        let shared = Arc::new(Shared {
            address: name,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            event_capacity: options.event_capacity.max(1),
        });
        let (outgoing, to_write) = mpsc::unbounded_channel();
        let tasks = [
            tokio::spawn(read_loop(reader, Arc::clone(&shared))),
            tokio::spawn(write_loop(write_half, to_write, Arc::clone(&shared))),
        ];
        let qmp = Self {
            shared,
            outgoing,
            next_id: AtomicU64::new(1),
            greeting,
            command_timeout: options.command_timeout,
            tasks,
        };
        qmp.execute_timeout("qmp_capabilities", Value::Null, options.greeting_timeout)
            .await?;
        Ok(qmp)
    }

    /// The greeting QEMU sent (its version and capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The peer, as given to [`Qmp::connect`].
    pub fn address(&self) -> &str {
        &self.shared.address
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.shared.lock().closed.is_none()
    }

    /// Runs `command` with `arguments` (an object, or `Value::Null` for
    /// none) and returns QEMU's `return` value, within the default time
    /// limit.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.execute_timeout(command, arguments, self.command_timeout)
            .await
    }

    /// [`Qmp::execute`] and decodes the result into `T`.
    pub async fn execute_as<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Value,
    ) -> Result<T> {
        let value = self.execute(command, arguments).await?;
        T::deserialize(value).map_err(|source| Error::Decode {
            address: self.shared.address.clone(),
            command: command.to_owned(),
            source,
        })
    }

    /// [`Qmp::execute`] with an explicit time limit.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Value,
        limit: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = Map::new();
        message.insert("execute".into(), Value::from(command));
        if !arguments.is_null() {
            message.insert("arguments".into(), arguments);
        }
        message.insert("id".into(), Value::from(id));
        let mut line = Value::Object(message).to_string().into_bytes();
        line.push(b'\n');

        let (sender, receiver) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.closed {
                return Err(self.shared.closed_error(reason));
            }
            state.pending.insert(id, sender);
        }
        // Removes the pending entry however this future ends (timeout,
        // error or being dropped).
        let _pending = PendingGuard {
            shared: &self.shared,
            id,
        };
        tracing::debug!(peer = %self.shared.address, id, command, "QMP command");
        if self.outgoing.send(line).is_err() {
            return Err(self.closed_now());
        }
        let reply = match tokio::time::timeout(limit, receiver).await {
            Err(_) => {
                return Err(Error::Timeout {
                    address: self.shared.address.clone(),
                    what: format!("the reply to {command}"),
                    after: limit,
                });
            }
            Ok(Err(_)) => return Err(self.closed_now()),
            Ok(Ok(reply)) => reply,
        };
        reply.map_err(|(class, desc)| {
            tracing::debug!(peer = %self.shared.address, command, %class, %desc, "QMP error");
            Error::Command {
                command: command.to_owned(),
                class,
                desc,
            }
        })
    }

    fn closed_now(&self) -> Error {
        let reason = self.shared.lock().closed.clone();
        self.shared
            .closed_error(reason.as_deref().unwrap_or("the connection ended"))
    }

    /// Waits for the first buffered or future event called `name` for
    /// which `predicate` holds, removes it from the buffer and returns it.
    /// Other events stay buffered.
    pub async fn wait_event(
        &self,
        name: &str,
        predicate: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before looking, so an event arriving in between
            // still wakes us.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.shared.lock();
                let found = state
                    .events
                    .iter()
                    .position(|b| b.event.name == name && predicate(&b.event));
                if let Some(b) = found.and_then(|index| state.events.remove(index)) {
                    state.event_bytes -= b.bytes;
                    return Ok(b.event);
                }
                if let Some(reason) = &state.closed {
                    return Err(self.shared.closed_error(reason));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::Timeout {
                    address: self.shared.address.clone(),
                    what: format!("event {name}"),
                    after: timeout,
                });
            }
        }
    }

    /// Removes and returns every buffered event.
    pub fn take_events(&self) -> Vec<Event> {
        let mut state = self.shared.lock();
        state.event_bytes = 0;
        state.events.drain(..).map(|b| b.event).collect()
    }

    /// A copy of the buffered events, oldest first.
    pub fn buffered_events(&self) -> Vec<Event> {
        let state = self.shared.lock();
        state.events.iter().map(|b| b.event.clone()).collect()
    }

    /// Drops buffered events called `name` for which `predicate` holds
    /// (stale events of an earlier object with the same id, say).
    pub fn discard_events(&self, name: &str, predicate: impl Fn(&Event) -> bool) {
        let mut state = self.shared.lock();
        state
            .events
            .retain(|b| !(b.event.name == name && predicate(&b.event)));
        state.event_bytes = state.events.iter().map(|b| b.bytes).sum();
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// Result of reading one line.
enum Line {
    Complete,
    Eof,
}

/// Reads up to and excluding the next `\n` into `line`, refusing lines
/// longer than `max`. On cancellation `line` holds what was read so far.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(Line::Eof);
        }
        if let Some(end) = available.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&available[..end]);
            reader.consume(end + 1);
            return Ok(Line::Complete);
        }
        let taken = available.len();
        line.extend_from_slice(available);
        reader.consume(taken);
        if line.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a message longer than {max} bytes"),
            ));
        }
    }
}

/// A short, printable excerpt of bytes a peer sent.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]);
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    format!("{text:?}{}", if bytes.len() > 80 { "..." } else { "" })
}

async fn read_greeting<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    address: &str,
    limit: Duration,
) -> Result<Greeting> {
    let not_qmp = |detail: String| Error::NotQmp {
        address: address.to_owned(),
        detail,
    };
    let mut line = Vec::new();
    let outcome = tokio::time::timeout(limit, read_line(reader, &mut line, MAX_GREETING)).await;
    match outcome {
        Err(_) if line.is_empty() => {
            return Err(Error::Timeout {
                address: address.to_owned(),
                what: "the QMP greeting (nothing arrived; a QEMU monitor serves one client at a time, so another may be connected)".into(),
                after: limit,
            });
        }
        Err(_) => {
            return Err(not_qmp(format!(
                "no QMP greeting within {limit:?}; it sent {}",
                excerpt(&line)
            )));
        }
        Ok(Err(error)) => return Err(not_qmp(format!("reading the greeting: {error}"))),
        Ok(Ok(Line::Eof)) if line.is_empty() => {
            return Err(not_qmp(
                "it closed the connection without a greeting".into(),
            ));
        }
        Ok(Ok(_)) => {}
    }

    #[derive(Deserialize)]
    struct Wrapper {
        #[serde(rename = "QMP")]
        qmp: Greeting,
    }
    serde_json::from_slice::<Wrapper>(&line)
        .map(|w| w.qmp)
        .map_err(|error| not_qmp(format!("it sent {} ({error})", excerpt(&line))))
}

async fn read_loop<R: AsyncBufRead + Unpin>(mut reader: R, shared: Arc<Shared>) {
    let mut line = Vec::new();
    let reason = loop {
        line.clear();
        match read_line(&mut reader, &mut line, MAX_MESSAGE).await {
            Ok(Line::Complete) => {}
            Ok(Line::Eof) => break "the peer closed the connection".to_owned(),
            Err(error) => break format!("reading: {error}"),
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(message) => shared.dispatch(message, line.len()),
            Err(error) => {
                break format!(
                    "the peer sent something that is not JSON: {} ({error})",
                    excerpt(&line)
                );
            }
        }
    };
    shared.close(reason);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    // Whole lines are written by this one task, so a cancelled command can
    // never leave half a message on the wire.
    while let Some(line) = lines.recv().await {
        let sent = async {
            writer.write_all(&line).await?;
            writer.flush().await
        };
        if let Err(error) = sent.await {
            shared.close(format!("writing: {error}"));
            return;
        }
    }
}
