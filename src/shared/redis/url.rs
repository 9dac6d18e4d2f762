//! The `redis://` URL: where and how to connect (the password never shown).

#[allow(unused_imports)]
use super::*;

/// Where and how to connect, parsed from the URL.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// Without brackets for IPv6.
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) db: u32,
    pub(super) user: Option<Vec<u8>>,
    pub(super) password: Option<Vec<u8>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field(
                "user",
                &self
                    .user
                    .as_ref()
                    .map(|u| String::from_utf8_lossy(u).into_owned()),
            )
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl Target {
    pub(super) fn describe(&self) -> String {
        if self.host.contains(':') {
            format!("redis://[{}]:{}/{}", self.host, self.port, self.db)
        } else {
            format!("redis://{}:{}/{}", self.host, self.port, self.db)
        }
    }
}

/// Parses `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`.
pub(super) fn parse_url(url: &str) -> Result<Target, String> {
    // Errors never quote the URL: it may hold the password.
    let fail = |why: &str| {
        Err(format!(
            "redis URL: {why} (use redis://[:PASSWORD@]HOST:PORT[/DB])"
        ))
    };
    let Some(rest) = url.strip_prefix("redis://") else {
        return fail("it must start with redis://");
    };
    // The last '@' ends the credentials, so a password may hold '@' and '/'.
    let (userinfo, hostpart) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (hostport, db) = match hostpart.split_once('/') {
        Some((hp, db)) => (hp, db),
        None => (hostpart, ""),
    };
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return fail("an IPv6 host lacks its ']'");
        };
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return fail("junk after the IPv6 host"),
            },
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return fail("put an IPv6 host in brackets: [::1]:6379")
            }
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return fail("the host is missing");
    }
    let port = match port {
        None => REDIS_PORT_DEFAULT,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return fail("the port must be a number from 1 to 65535"),
        },
    };
    let db = match db {
        "" => 0,
        d => match d.parse::<u32>() {
            Ok(d) => d,
            Err(_) => return fail("the database after '/' must be a number"),
        },
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(info) => {
            // `USER@` alone: the password comes from a password file.
            let (user, password) = info.split_once(':').unwrap_or((info, ""));
            let Some(user) = percent_decode(user) else {
                return fail("bad %-escape in the user");
            };
            let Some(password) = percent_decode(password) else {
                return fail("bad %-escape in the password");
            };
            let user = (!user.is_empty()).then_some(user);
            (user, (!password.is_empty()).then_some(password))
        }
    };
    Ok(Target {
        host: host.to_string(),
        port,
        db,
        user,
        password,
    })
}

pub(super) fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}
