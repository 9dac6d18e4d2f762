//! One connection: connect within the timeout, AUTH, SELECT, commands.

#[allow(unused_imports)]
use super::*;

/// One connection, authenticated and on its database.
pub(super) struct Conn {
    pub(super) reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connects within `timeout` (per address tried, all within one
    /// deadline), then AUTH and SELECT if the URL asks. A refused AUTH or
    /// SELECT is `PermissionDenied`.
    pub(super) fn connect(target: &Target, timeout: Duration) -> io::Result<Conn> {
        let deadline = Instant::now() + timeout;
        let addrs = (target.host.as_str(), target.port).to_socket_addrs()?;
        let mut last_error = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: no address", target.host),
        );
        let mut stream = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        let stream = stream.ok_or(last_error)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            reader: BufReader::with_capacity(REDIS_READ_BUFFER_BYTES, stream),
        };
        if let Some(password) = &target.password {
            let reply = match &target.user {
                Some(user) => conn.command(&[b"AUTH", user, password], 0)?,
                None => conn.command(&[b"AUTH", password], 0)?,
            };
            if reply != Reply::Status("OK".into()) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("AUTH refused: {reply:?}"),
                ));
            }
        }
        if target.db != 0 {
            let db = target.db.to_string();
            let reply = conn.command(&[b"SELECT", db.as_bytes()], 0)?;
            if reply != Reply::Status("OK".into()) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("SELECT {db} refused: {reply:?}"),
                ));
            }
        }
        Ok(conn)
    }

    /// Bounds every read and write on the socket by `timeout`.
    pub(super) fn set_timeouts(&mut self, timeout: Duration) -> io::Result<()> {
        let stream = self.reader.get_ref();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    }

    /// Sends one command and reads its reply, whose values may hold up to
    /// `value_bytes_max` bytes.
    pub(super) fn command(&mut self, args: &[&[u8]], value_bytes_max: u64) -> io::Result<Reply> {
        self.send(args)?;
        read_reply(&mut self.reader, value_bytes_max)
    }

    /// Writes one command as an array of bulk strings.
    pub(super) fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        let stream = self.reader.get_mut();
        let mut head = Vec::with_capacity(256);
        write!(head, "*{}\r\n", args.len())?;
        for arg in args {
            write!(head, "${}\r\n", arg.len())?;
            if arg.len() > REDIS_INLINE_ARG_BYTES_MAX {
                stream.write_all(&head)?;
                head.clear();
                stream.write_all(arg)?;
            } else {
                head.extend_from_slice(arg);
            }
            head.extend_from_slice(b"\r\n");
        }
        stream.write_all(&head)
    }
}
