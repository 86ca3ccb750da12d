//! [`RedisTx`]: the unit of work handlers write in, applied with `MULTI`/`EXEC`.

use std::sync::OnceLock;

use factum::Error;
use redis::aio::{ConnectionLike as _, MultiplexedConnection};
use redis::{Cmd, FromRedisValue, Pipeline, Value};

use crate::RedisKeyspace;
use crate::error::{SinkError, sink_error, to_error};

/// A consumer's unit of work on Redis: the writes a handler buffers, applied at commit in one
/// `MULTI`/`EXEC` together with the checkpoint move (or the inbox record) and any parked events,
/// on a connection of its own that `WATCH`es the checkpoint (or the inbox record) since the unit
/// of work began. So either all of it is applied or none, and a unit of work whose checkpoint
/// moved meanwhile (another instance committed first) applies nothing.
///
/// * Buffer writes with [`pipe`](Self::pipe): any Redis commands (`HSET`, `LPUSH`, `INCRBY`,
///   `EXPIRE`...). They are sent at commit, not before.
/// * Read with [`query`](Self::query): reads see what is committed, **not** this unit of work's
///   buffered writes (Redis has no read-your-writes inside a transaction). A handler folding
///   several events of a batch into one key keeps the running value itself.
/// * [`watch`](Self::watch) the keys a write depends on that something else may change: if one
///   changes before `EXEC`, nothing is applied and the consumer tries again.
///
/// Redis does not roll back a command that fails while `EXEC` runs it (a `WRONGTYPE`): the rest
/// of the unit of work is applied and the failure is reported
/// ([`SinkError::FailedInExec`](crate::SinkError::FailedInExec)). Commands Redis refuses when
/// queued (syntax, arity) abort it whole.
pub struct RedisTx {
    keyspace: RedisKeyspace,
    conn: Option<MultiplexedConnection>,
    pipe: Pipeline,
    /// factum's own writes (dead letters, unparks), after the handler's.
    internal: Vec<Cmd>,
    /// What the `WATCH` guards, for the error when it fires.
    guarded: String,
}

impl std::fmt::Debug for RedisTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTx")
            .field("namespace", &self.keyspace.namespace())
            .field("guarded", &self.guarded)
            .field("writes", &self.pipe.len())
            .finish_non_exhaustive()
    }
}

/// Commands that would break the unit of work's connection state.
const CONTROL: [&[u8]; 7] = [
    b"MULTI", b"EXEC", b"DISCARD", b"WATCH", b"UNWATCH", b"SELECT", b"RESET",
];

fn name_of(cmd: &Cmd) -> String {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).to_ascii_uppercase(),
        _ => "?".to_owned(),
    }
}

impl RedisTx {
    /// Opens a unit of work on a dedicated connection, `WATCH`ing `key`, and returns it with the
    /// reply of `probe` (a read of `key`), read after the `WATCH` in the same round trip.
    pub(crate) async fn begin(
        keyspace: &RedisKeyspace,
        key: &str,
        probe: Cmd,
        guarded: String,
    ) -> Result<(Self, Value), Error> {
        let mut conn = keyspace.dedicated().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("WATCH").arg(key).add_command(probe);
        let mut replies: Vec<Value> = match pipe.query_async(&mut conn).await {
            Ok(replies) => replies,
            Err(error) => {
                if crate::error::is_transient(&error) {
                    // The server went away or restarted: the idle connections are gone too.
                    keyspace.drop_idle();
                }
                return Err(to_error(error, "begin a unit of work on Redis"));
            }
        };
        let probed = replies.pop().unwrap_or(Value::Nil);
        Ok((
            Self {
                keyspace: keyspace.clone(),
                conn: Some(conn),
                pipe: redis::pipe(),
                internal: Vec::new(),
                guarded,
            },
            probed,
        ))
    }

    /// The buffered writes: add commands to it (`tx.pipe().hset(key, field, value)`, or
    /// `tx.pipe().cmd("LPUSH").arg(key).arg(value)`). They are applied at commit, atomically
    /// with the checkpoint move; replies are not returned (mark nothing `ignore`d, it does not
    /// matter).
    pub fn pipe(&mut self) -> &mut Pipeline {
        &mut self.pipe
    }

    /// Runs a read now, on the unit of work's connection, and decodes its reply. It sees what is
    /// committed, not this unit of work's buffered writes. Transaction control commands
    /// (`MULTI`, `EXEC`, `WATCH`...) are refused: use [`watch`](Self::watch).
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, Error> {
        let name = name_of(cmd);
        if CONTROL.contains(&name.as_bytes()) {
            return Err(Error::InvalidArgument(format!(
                "{name} is not allowed inside a unit of work: it would change the connection's transaction state (use RedisTx::watch to guard keys)"
            )));
        }
        let conn = self.conn()?;
        cmd.query_async(conn)
            .await
            .map_err(|e| to_error(e, "read in a unit of work on Redis"))
    }

    /// Adds `keys` (full keys, e.g. from [`key`](Self::key)) to what the unit of work watches:
    /// if one of them changes before commit, nothing is applied and the consumer tries again
    /// (the commit fails with a transient [`SinkError::Moved`](crate::SinkError::Moved)).
    pub async fn watch(&mut self, keys: &[&str]) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let conn = self.conn()?;
        redis::cmd("WATCH")
            .arg(keys)
            .query_async::<()>(conn)
            .await
            .map_err(|e| to_error(e, "watch keys in a unit of work on Redis"))?;
        self.guarded.push_str(&format!(" or one of {keys:?}"));
        Ok(())
    }

    /// The full key of `name` in the keyspace (`{namespace}:{name}`).
    pub fn key(&self, name: &str) -> String {
        self.keyspace.key(name)
    }

    /// The keyspace it writes in.
    pub fn keyspace(&self) -> &RedisKeyspace {
        &self.keyspace
    }

    /// How many writes the handler buffered.
    pub fn writes(&self) -> usize {
        self.pipe.len()
    }

    pub(crate) fn push_internal(&mut self, cmd: Cmd) {
        self.internal.push(cmd);
    }

    fn conn(&mut self) -> Result<&mut MultiplexedConnection, Error> {
        self.conn.as_mut().ok_or_else(|| {
            Error::permanent(
                "use a unit of work on Redis",
                "the unit of work's connection was lost in an earlier failure of it",
            )
        })
    }

    /// Applies the handler's writes, factum's writes and `last` (the checkpoint move or the
    /// inbox record) in one `MULTI`/`EXEC`. The connection goes back to the pool only when the
    /// exchange completed; otherwise it is dropped, which closes it, and Redis discards a
    /// `MULTI` left open.
    pub(crate) async fn exec(
        mut self,
        last: Vec<Cmd>,
        operation: &'static str,
    ) -> Result<(), Error> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| Error::permanent(operation, "the unit of work's connection was lost"))?;
        let user = std::mem::take(&mut self.pipe);
        let commands: Vec<&Cmd> = user
            .cmd_iter()
            .chain(self.internal.iter())
            .chain(last.iter())
            .collect();
        let mut queue = redis::pipe();
        queue.ignore_errors().cmd("MULTI");
        for cmd in &commands {
            queue.add_command((*cmd).clone());
        }
        let replies: Vec<Value> = queue
            .query_async(&mut conn)
            .await
            .map_err(|e| to_error(e, operation))?;
        // MULTI's OK, then QUEUED for each command (or the error it was refused with).
        for (index, reply) in replies.iter().enumerate().skip(1) {
            if let Value::ServerError(error) = reply {
                return Err(sink_error(
                    SinkError::Refused {
                        index: index - 1,
                        command: name_of(commands[index - 1]),
                        message: error.to_string(),
                    },
                    operation,
                ));
            }
        }
        if let Some(Value::ServerError(error)) = replies.first() {
            return Err(Error::permanent(operation, error.to_string()));
        }
        before_exec();
        let reply = match conn.req_packed_command(&redis::cmd("EXEC")).await {
            Ok(reply) => reply,
            Err(error) if crate::error::is_transient(&error) => {
                return Err(sink_error(
                    SinkError::UnknownOutcome { source: error },
                    operation,
                ));
            }
            Err(error) => return Err(to_error(error, operation)),
        };
        match reply {
            Value::Nil => {
                // EXEC ended the transaction (and the WATCH): the connection is clean.
                self.keyspace.give_back(conn);
                Err(sink_error(
                    SinkError::Moved {
                        what: std::mem::take(&mut self.guarded),
                    },
                    operation,
                ))
            }
            Value::Array(results) => {
                let failed = results.iter().enumerate().find_map(|(i, r)| match r {
                    Value::ServerError(error) => Some((i, error.to_string())),
                    _ => None,
                });
                // The transaction ran to its end: the connection is clean again.
                self.keyspace.give_back(conn);
                match failed {
                    Some((index, message)) => Err(sink_error(
                        SinkError::FailedInExec {
                            index,
                            command: name_of(commands[index]),
                            message,
                        },
                        operation,
                    )),
                    None => Ok(()),
                }
            }
            Value::ServerError(error) => Err(Error::permanent(operation, error.to_string())),
            other => Err(Error::permanent(
                operation,
                format!("EXEC answered {other:?}, not the replies of the transaction"),
            )),
        }
    }

    /// Abandons the unit of work: `UNWATCH`, and the connection goes back to the pool (or is
    /// dropped if that fails).
    pub(crate) async fn abandon(mut self) {
        if let Some(mut conn) = self.conn.take()
            && redis::cmd("UNWATCH")
                .query_async::<()>(&mut conn)
                .await
                .is_ok()
        {
            self.keyspace.give_back(conn);
        }
    }
}

type Hook = Box<dyn Fn() + Send + Sync>;

static BEFORE_EXEC: OnceLock<Hook> = OnceLock::new();

fn before_exec() {
    if let Some(hook) = BEFORE_EXEC.get() {
        hook();
    }
}

/// Installs `hook`, called in every commit after `MULTI` and the queued commands were sent and
/// before `EXEC` is: for crash tests that kill the process at that point. Once per process.
#[doc(hidden)]
pub fn __set_before_exec_hook(hook: impl Fn() + Send + Sync + 'static) {
    let _ = BEFORE_EXEC.set(Box::new(hook));
}
