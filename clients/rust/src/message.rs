//! What travels on the wire: delivered messages, server errors, the text
//! commands this client sends, and the checks it makes before sending them.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// A message delivered on a subscribed topic.
///
/// The server sends the seed's five fields, and `publisher_sub` when the
/// publisher's connection has a token. `payload` is any JSON value; most
/// publishers send a string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The name the publisher registered (or put in its publish command):
    /// its own word, a display name.
    #[serde(default)]
    pub publisher_name: String,
    /// The `sub` of the publisher's verified token, set by the server alone
    /// (`None` for an anonymous publisher): the identity to trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher_sub: Option<String>,
    /// The topic it was published on.
    pub topic: String,
    /// The published value.
    #[serde(default)]
    pub payload: Value,
    /// RFC 3339 time the publisher gave, or the server's time of publishing.
    #[serde(default)]
    pub timestamp: String,
    /// The session the message was published in (always the receiver's).
    #[serde(default)]
    pub session_id: String,
}

impl Message {
    /// The payload as text when it is a JSON string.
    pub fn payload_str(&self) -> Option<&str> {
        self.payload.as_str()
    }

    /// Deserializes the payload into `T`.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(T::deserialize(&self.payload)?)
    }
}

/// One line, for logs: `topic [session] from publisher at time: payload`.
/// String payloads are shown without quotes, other values as compact JSON.
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] from {} at {}: ",
            self.topic, self.session_id, self.publisher_name, self.timestamp
        )?;
        match &self.payload {
            Value::String(s) => f.write_str(s),
            other => write!(f, "{other}"),
        }
    }
}

/// An error frame from the server (`{"type":"error",...}`). The connection
/// stays open; the command it refers to had no effect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, thiserror::Error)]
#[error("{code} on {command}: {message}")]
pub struct ServerError {
    /// Machine-readable code: `unknown_command`, `invalid_command`,
    /// `invalid_topic`, `invalid_session`, `session_mismatch`,
    /// `invalid_json`, `payload_too_large`, `too_many_subscriptions`,
    /// `publish_failed`, `not_registered`.
    #[serde(rename = "error", default)]
    pub code: String,
    /// Human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// The verb of the command it answers (`subscribe`, `publish-json`, ...).
    #[serde(default)]
    pub command: String,
}

/// The current time as an RFC 3339 timestamp in UTC with whole seconds,
/// e.g. `2024-01-24T10:25:37Z`: the format [`WsClient::publish`] expects.
///
/// [`WsClient::publish`]: crate::WsClient::publish
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Commands that get exactly one reply (or one error), in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Verb {
    RegisterName,
    RegisterSession,
    Subscribe,
    Unsubscribe,
    Ping,
}

impl Verb {
    fn from_command(command: &str) -> Option<Verb> {
        // Tolerate a server that echoes the whole command, not only its verb.
        let verb = command.split(':').next().unwrap_or(command);
        match verb {
            "register-name" => Some(Verb::RegisterName),
            "register-session" => Some(Verb::RegisterSession),
            "subscribe" => Some(Verb::Subscribe),
            "unsubscribe" => Some(Verb::Unsubscribe),
            "ping" => Some(Verb::Ping),
            _ => None,
        }
    }
}

/// A text frame from the server, classified.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A delivered message.
    Message(Message),
    /// The answer to a command: success (with the topic for (un)subscribe)
    /// or an error.
    Reply {
        verb: Verb,
        topic: Option<String>,
        result: Result<(), ServerError>,
    },
    /// An error about a command without a reply of its own (publish-json,
    /// unknown commands).
    Error(ServerError),
    /// Anything else: logged and ignored.
    Other(String),
}

pub(crate) fn parse_incoming(text: &str) -> Incoming {
    if text == "pong" {
        return Incoming::Reply {
            verb: Verb::Ping,
            topic: None,
            result: Ok(()),
        };
    }
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
        return Incoming::Other(text.to_owned());
    };
    let field = |name: &str| map.get(name).and_then(Value::as_str).map(str::to_owned);
    match map.get("type").and_then(Value::as_str) {
        None if map.contains_key("topic") => {
            match serde_json::from_value::<Message>(Value::Object(map.clone())) {
                Ok(message) => Incoming::Message(message),
                Err(_) => Incoming::Other(text.to_owned()),
            }
        }
        Some("subscribed") => Incoming::Reply {
            verb: Verb::Subscribe,
            topic: field("topic"),
            result: Ok(()),
        },
        Some("unsubscribed") => Incoming::Reply {
            verb: Verb::Unsubscribe,
            topic: field("topic"),
            result: Ok(()),
        },
        Some("registered") if map.contains_key("session_id") => Incoming::Reply {
            verb: Verb::RegisterSession,
            topic: None,
            result: Ok(()),
        },
        Some("registered") if map.contains_key("name") => Incoming::Reply {
            verb: Verb::RegisterName,
            topic: None,
            result: Ok(()),
        },
        Some("error") => {
            let error = ServerError {
                code: field("error").unwrap_or_default(),
                message: field("message").unwrap_or_default(),
                command: field("command").unwrap_or_default(),
            };
            match Verb::from_command(&error.command) {
                Some(verb) => Incoming::Reply {
                    verb,
                    topic: None,
                    result: Err(error),
                },
                None => Incoming::Error(error),
            }
        }
        _ => Incoming::Other(text.to_owned()),
    }
}

/// Topics and session ids: 1-128 characters of `[A-Za-z0-9_.-]`.
pub(crate) fn check_id(what: &'static str, value: &str) -> Result<(), Error> {
    let reason = if value.is_empty() {
        "must not be empty"
    } else if value.len() > 128 {
        "must be at most 128 characters"
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        "may only contain A-Z, a-z, 0-9, '_', '.' and '-'"
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument {
        what,
        value: value.to_owned(),
        reason,
    })
}

/// Client names go into a text command; keep them to one printable line.
pub(crate) fn check_name(value: &str) -> Result<(), Error> {
    let reason = if value.is_empty() {
        "must not be empty"
    } else if value.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument {
        what: "client name",
        value: value.to_owned(),
        reason,
    })
}

/// The body of a `publish-json:` command. Empty publisher name and timestamp
/// are left out so the server fills them in.
#[derive(Serialize)]
pub(crate) struct Outgoing<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    pub publisher_name: &'a str,
    pub topic: &'a str,
    pub payload: Value,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub timestamp: &'a str,
    pub session_id: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_frames() {
        let m = parse_incoming(
            r#"{"publisher_name":"Client1","topic":"T","payload":{"a":1},"timestamp":"2024-01-24T10:25:37Z","session_id":"s"}"#,
        );
        assert!(matches!(m, Incoming::Message(ref m) if m.topic == "T" && m.payload["a"] == 1));
        assert!(matches!(
            parse_incoming(r#"{"type":"subscribed","topic":"T","session_id":"s"}"#),
            Incoming::Reply { verb: Verb::Subscribe, topic: Some(ref t), result: Ok(()) } if t == "T"
        ));
        assert!(matches!(
            parse_incoming(r#"{"type":"registered","name":"n"}"#),
            Incoming::Reply {
                verb: Verb::RegisterName,
                ..
            }
        ));
        assert!(matches!(
            parse_incoming(r#"{"type":"registered","session_id":"s"}"#),
            Incoming::Reply {
                verb: Verb::RegisterSession,
                ..
            }
        ));
        assert!(matches!(
            parse_incoming(
                r#"{"type":"error","error":"invalid_topic","message":"m","command":"subscribe"}"#
            ),
            Incoming::Reply { verb: Verb::Subscribe, result: Err(ref e), .. } if e.code == "invalid_topic"
        ));
        assert!(matches!(
            parse_incoming(
                r#"{"type":"error","error":"invalid_json","message":"m","command":"publish-json"}"#
            ),
            Incoming::Error(_)
        ));
        assert!(matches!(
            parse_incoming("pong"),
            Incoming::Reply {
                verb: Verb::Ping,
                ..
            }
        ));
        assert!(matches!(parse_incoming("hello"), Incoming::Other(_)));
    }

    #[test]
    fn checks_ids() {
        assert!(check_id("topic", "Network.Connected_Event-1").is_ok());
        assert!(check_id("topic", "").is_err());
        assert!(check_id("topic", "a|b").is_err());
        assert!(check_id("topic", &"x".repeat(129)).is_err());
        assert!(check_id("topic", &"x".repeat(128)).is_ok());
        assert!(check_name("Client 1").is_ok());
        assert!(check_name("a\nb").is_err());
    }

    #[test]
    fn displays_and_timestamps() {
        let m = Message {
            publisher_name: "C1".into(),
            publisher_sub: None,
            topic: "T".into(),
            payload: Value::String("hi".into()),
            timestamp: "2024-01-24T10:25:37Z".into(),
            session_id: "s".into(),
        };
        assert_eq!(m.to_string(), "T [s] from C1 at 2024-01-24T10:25:37Z: hi");
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.ends_with('Z'));
        assert!(humantime::parse_rfc3339(&now).is_ok());
    }
}
