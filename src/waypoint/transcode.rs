//! gRPC↔JSON transcoding (docs/waypoint.md, "gRPC↔JSON transcoding"): a service's methods,
//! read from its FileDescriptorSet with their `google.api.http` bindings, offered to HTTP/1.1
//! JSON clients. This module holds the pure parts: loading and validating the bindings, path
//! template parsing and matching, building the request message from path, query and body, the
//! gRPC framing of the call, reading the answer's frames, and the gRPC → HTTP status mapping.
//! `request` calls [`handle`] for a request that matched, which sends the call through the
//! waypoint's normal upstream path.
//!
//! Dynamic messages and the proto3 JSON mapping are prost-reflect's; the only framing done here
//! is gRPC's 5-byte message prefix (compressed flag, big-endian length).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    ReflectMessage, SerializeOptions, Value,
};

use super::config::{GrpcTranscoding, StreamingFormat};
use super::request::{Body, BoxError};

/// The `google.api.http` extension of `google.protobuf.MethodOptions` (field 72295728).
const HTTP_RULE_EXTENSION: &str = "google.api.http";
/// Where the rejections of this module are counted (`zmesh_rejected_total{listener=..}`).
pub(super) const REJECTIONS: &str = "grpc_transcoding";

/// Why a transcoding config cannot be loaded; the config (and on reload, the old one) is
/// refused.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("descriptor set {path}: {detail}")]
    DescriptorSet { path: String, detail: String },
    #[error("service {0:?} is not in the descriptor set (fully qualified, e.g. pkg.Service)")]
    UnknownService(String),
    #[error("method {method}: no google.api.http option (set unannotated_methods: true to offer it as POST /{method})")]
    Unannotated { method: String },
    #[error("method {method}: path template {template:?}: {reason}")]
    Template {
        method: String,
        template: String,
        reason: String,
    },
    #[error("method {method}: {reason}")]
    Binding { method: String, reason: String },
}

// ---------------------------------------------------------------------------------------
// Path templates (google.api.http syntax):
//   Template = "/" Segments [ Verb ] ;  Segments = Segment { "/" Segment } ;
//   Segment  = "*" | "**" | LITERAL | Variable ;  Variable = "{" FieldPath [ "=" Segments ] "}" ;
//   FieldPath = IDENT { "." IDENT } ;  Verb = ":" LITERAL ;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    Star,
    /// `**`: any number of segments, the last of the template.
    StarStar,
}

/// A variable: the field path it sets and the template segments it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Variable {
    field: Vec<String>,
    start: usize,
    end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
}

fn ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn literal(s: &str) -> Result<Segment, String> {
    match s {
        "" => Err("empty segment".into()),
        "*" => Ok(Segment::Star),
        "**" => Ok(Segment::StarStar),
        _ if s.chars().any(|c| "{}=*".contains(c)) => Err(format!("bad segment {s:?}")),
        _ => Ok(Segment::Literal(s.to_string())),
    }
}

impl PathTemplate {
    pub fn parse(t: &str) -> Result<PathTemplate, String> {
        let rest = t.strip_prefix('/').ok_or("must start with '/'")?;
        // The verb is after the last ':' that is outside braces.
        let (body, verb) = {
            let mut depth = 0i32;
            let mut at = None;
            for (i, c) in rest.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ':' if depth == 0 => at = Some(i),
                    _ => {}
                }
            }
            match at {
                Some(i) => (&rest[..i], Some(rest[i + 1..].to_string())),
                None => (rest, None),
            }
        };
        if verb
            .as_deref()
            .is_some_and(|v| v.is_empty() || v.contains('/'))
        {
            return Err("bad verb".into());
        }
        let mut segments = Vec::new();
        let mut variables = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(inner) = chars.strip_prefix('{') {
                let close = inner.find('}').ok_or("unclosed '{'")?;
                let (var, after) = (&inner[..close], &inner[close + 1..]);
                let (field, sub) = match var.split_once('=') {
                    Some((f, s)) => (f, s),
                    None => (var, "*"),
                };
                let field: Vec<String> = field.split('.').map(str::to_string).collect();
                if !field.iter().all(|f| ident(f)) {
                    return Err(format!("bad field path {:?}", field.join(".")));
                }
                if sub.contains('{') {
                    return Err("nested variables".into());
                }
                let start = segments.len();
                for s in sub.split('/') {
                    segments.push(literal(s)?);
                }
                variables.push(Variable {
                    field,
                    start,
                    end: segments.len(),
                });
                chars = after;
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let seg = &chars[..end];
                if seg.contains('}') {
                    return Err(format!("unexpected '}}' in {seg:?}"));
                }
                segments.push(literal(seg)?);
                chars = &chars[end..];
            }
            match chars.strip_prefix('/') {
                Some("") => return Err("trailing '/'".into()),
                Some(r) => chars = r,
                None if chars.is_empty() => {}
                None => return Err(format!("expected '/' before {chars:?}")),
            }
        }
        if segments.is_empty() {
            return Err("no segments".into());
        }
        if let Some(i) = segments.iter().position(|s| *s == Segment::StarStar) {
            if i + 1 != segments.len() {
                return Err("'**' must be the last segment".into());
            }
        }
        let mut seen = HashSet::new();
        for v in &variables {
            if !seen.insert(v.field.join(".")) {
                return Err(format!("field {:?} bound twice", v.field.join(".")));
            }
        }
        Ok(PathTemplate {
            segments,
            variables,
            verb,
        })
    }

    /// Literal segments: more of them is a more specific template.
    fn literals(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// Matches a (normalized) request path; the variables' values are percent-decoded.
    pub fn matches(&self, path: &str) -> Option<Vec<(Vec<String>, String)>> {
        let rest = path.strip_prefix('/')?;
        let (rest, verb) = match &self.verb {
            Some(v) => (rest.strip_suffix(v.as_str())?.strip_suffix(':')?, Some(v)),
            None => (rest, None),
        };
        let _ = verb;
        let parts: Vec<&str> = rest.split('/').collect();
        let n = self.segments.len();
        let tail = self.segments.last() == Some(&Segment::StarStar);
        if tail {
            if parts.len() < n - 1 {
                return None;
            }
        } else if parts.len() != n {
            return None;
        }
        for (i, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Literal(l) => {
                    if parts.get(i) != Some(&l.as_str()) {
                        return None;
                    }
                }
                Segment::Star => {
                    if parts.get(i).is_none_or(|p| p.is_empty()) {
                        return None;
                    }
                }
                Segment::StarStar => {}
            }
        }
        // Without a verb, a template must not swallow another method's `:verb`.
        if self.verb.is_none() && !tail && parts.last().is_some_and(|p| p.contains(':')) {
            let last = &self.segments[n - 1];
            if !matches!(last, Segment::Literal(l) if l.contains(':')) {
                return None;
            }
        }
        let mut vars = Vec::new();
        for v in &self.variables {
            let end = if v.end == n && tail {
                parts.len()
            } else {
                v.end
            };
            let raw = parts[v.start.min(parts.len())..end].join("/");
            vars.push((v.field.clone(), percent_decode(&raw).ok()?));
        }
        Some(vars)
    }
}

/// RFC 3986 percent-decoding to UTF-8 (no `+` for space: that is HTML forms, not URLs).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = |x: Option<&u8>| x.and_then(|c| (*c as char).to_digit(16));
            match (h(b.get(i + 1)), h(b.get(i + 2))) {
                (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
                _ => return Err(format!("malformed percent-escape in {s:?}")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

// ---------------------------------------------------------------------------------------
// Bindings

#[derive(Debug, Clone)]
enum BodySpec {
    None,
    Star,
    Field(FieldDescriptor),
}

#[derive(Debug)]
struct Binding {
    method: MethodDescriptor,
    http_method: Method,
    template: PathTemplate,
    body: BodySpec,
    /// `/pkg.Service/Method`.
    grpc_path: String,
}

/// A service's compiled transcoding config.
#[derive(Debug)]
pub struct Transcoder {
    bindings: Vec<Binding>,
    pub(super) cfg: GrpcTranscoding,
}

/// A request that matched a binding: which one, and its path variables.
pub struct Matched<'a> {
    binding: &'a Binding,
    vars: Vec<(Vec<String>, String)>,
}

impl Matched<'_> {
    pub fn grpc_path(&self) -> &str {
        &self.binding.grpc_path
    }
}

/// The field `name` of `desc`, by its proto name or its JSON name.
fn field(desc: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
}

/// Resolves a dotted field path; every step but the last must be a singular message.
fn resolve(desc: &MessageDescriptor, path: &[String]) -> Result<Vec<FieldDescriptor>, String> {
    let mut d = desc.clone();
    let mut out = Vec::new();
    for (i, name) in path.iter().enumerate() {
        let f = field(&d, name).ok_or_else(|| {
            format!(
                "no field {:?} in {}",
                path[..=i].join("."),
                desc.full_name()
            )
        })?;
        if i + 1 < path.len() {
            match f.kind() {
                Kind::Message(m) if !f.is_list() && !f.is_map() => d = m,
                _ => return Err(format!("{:?} is not a message field", path[..=i].join("."))),
            }
        }
        out.push(f);
    }
    Ok(out)
}

fn rule_pattern(rule: &DynamicMessage) -> Option<(Method, String)> {
    for (m, name) in [
        (Method::GET, "get"),
        (Method::PUT, "put"),
        (Method::POST, "post"),
        (Method::DELETE, "delete"),
        (Method::PATCH, "patch"),
    ] {
        if let Some(Value::String(p)) = rule.get_field_by_name(name).as_deref() {
            if rule.has_field_by_name(name) {
                return Some((m, p.clone()));
            }
        }
    }
    let custom = rule.get_field_by_name("custom")?;
    let custom = custom.as_message()?;
    let kind = custom.get_field_by_name("kind")?.as_str()?.to_string();
    let path = custom.get_field_by_name("path")?.as_str()?.to_string();
    Some((Method::from_bytes(kind.as_bytes()).ok()?, path))
}

impl Transcoder {
    /// Reads the descriptor set named by `cfg` and compiles its bindings.
    pub fn load(cfg: &GrpcTranscoding) -> Result<Transcoder, TranscodeError> {
        let path = cfg.descriptor_set.display().to_string();
        let bytes =
            std::fs::read(&cfg.descriptor_set).map_err(|e| TranscodeError::DescriptorSet {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        Transcoder::from_bytes(&bytes, &path, cfg)
    }

    pub fn from_bytes(
        bytes: &[u8],
        path: &str,
        cfg: &GrpcTranscoding,
    ) -> Result<Transcoder, TranscodeError> {
        let pool = DescriptorPool::decode(bytes).map_err(|e| TranscodeError::DescriptorSet {
            path: path.to_string(),
            detail: format!("not a valid FileDescriptorSet: {e}"),
        })?;
        let ext = pool.get_extension_by_name(HTTP_RULE_EXTENSION);
        let mut bindings = Vec::new();
        for name in &cfg.services {
            let svc = pool
                .get_service_by_name(name)
                .ok_or_else(|| TranscodeError::UnknownService(name.clone()))?;
            for m in svc.methods() {
                let method_name = m.full_name().to_string();
                let grpc_path = format!("/{}/{}", svc.full_name(), m.name());
                if m.is_client_streaming() {
                    return Err(TranscodeError::Binding {
                        method: method_name,
                        reason: "client streaming cannot be transcoded".into(),
                    });
                }
                let opts = m.options();
                let rule = ext
                    .as_ref()
                    .filter(|e| opts.has_extension(e))
                    .and_then(|e| opts.get_extension(e).as_message().cloned());
                let Some(rule) = rule else {
                    if !cfg.unannotated_methods {
                        return Err(TranscodeError::Unannotated {
                            method: method_name,
                        });
                    }
                    bindings.push(Binding {
                        method: m.clone(),
                        http_method: Method::POST,
                        template: PathTemplate::parse(&grpc_path).map_err(|reason| {
                            TranscodeError::Template {
                                method: method_name.clone(),
                                template: grpc_path.clone(),
                                reason,
                            }
                        })?,
                        body: BodySpec::Star,
                        grpc_path,
                    });
                    continue;
                };
                let mut rules = vec![rule.clone()];
                if let Some(Value::List(extra)) =
                    rule.get_field_by_name("additional_bindings").as_deref()
                {
                    rules.extend(extra.iter().filter_map(|v| v.as_message().cloned()));
                }
                for r in rules {
                    bindings.push(binding(&m, &method_name, &grpc_path, &r)?);
                }
            }
        }
        // Most literal segments first, so `/v1/shelves:count` beats `/v1/{name}`.
        bindings
            .sort_by_key(|b| std::cmp::Reverse((b.template.literals(), b.template.verb.is_some())));
        Ok(Transcoder {
            bindings,
            cfg: cfg.clone(),
        })
    }

    /// The binding an HTTP request matches, if any (else the request is routed as usual).
    pub fn find(&self, method: &Method, path: &str) -> Option<Matched<'_>> {
        self.bindings.iter().find_map(|b| {
            if b.http_method != *method {
                return None;
            }
            b.template
                .matches(path)
                .map(|vars| Matched { binding: b, vars })
        })
    }
}

fn binding(
    m: &MethodDescriptor,
    method_name: &str,
    grpc_path: &str,
    rule: &DynamicMessage,
) -> Result<Binding, TranscodeError> {
    let bad = |reason: String| TranscodeError::Binding {
        method: method_name.to_string(),
        reason,
    };
    let (http_method, template_text) =
        rule_pattern(rule).ok_or_else(|| bad("google.api.http names no HTTP method".into()))?;
    let template =
        PathTemplate::parse(&template_text).map_err(|reason| TranscodeError::Template {
            method: method_name.to_string(),
            template: template_text.clone(),
            reason,
        })?;
    let input = m.input();
    for v in &template.variables {
        let fields = resolve(&input, &v.field).map_err(|reason| TranscodeError::Template {
            method: method_name.to_string(),
            template: template_text.clone(),
            reason,
        })?;
        let last = fields.last().expect("a field path has a field");
        if last.is_list() || last.is_map() || matches!(last.kind(), Kind::Message(_)) {
            return Err(TranscodeError::Template {
                method: method_name.to_string(),
                template: template_text.clone(),
                reason: format!("{:?} is not a singular scalar field", v.field.join(".")),
            });
        }
    }
    let body = match rule.get_field_by_name("body").as_deref() {
        Some(Value::String(b)) if b == "*" => BodySpec::Star,
        Some(Value::String(b)) if b.is_empty() => BodySpec::None,
        Some(Value::String(b)) => {
            let f = field(&input, b)
                .ok_or_else(|| bad(format!("body field {b:?} is not in {}", input.full_name())))?;
            if !matches!(f.kind(), Kind::Message(_)) || f.is_list() || f.is_map() {
                return Err(bad(format!("body field {b:?} must be a singular message")));
            }
            BodySpec::Field(f)
        }
        _ => BodySpec::None,
    };
    if matches!(rule.get_field_by_name("response_body").as_deref(), Some(Value::String(r)) if !r.is_empty())
    {
        return Err(bad("response_body is not supported".into()));
    }
    Ok(Binding {
        method: m.clone(),
        http_method,
        template,
        body,
        grpc_path: grpc_path.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// Request message

/// A request the waypoint refuses before calling the service: status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

fn bad_request(reason: &'static str, message: String) -> Rejected {
    Rejected {
        status: StatusCode::BAD_REQUEST,
        reason,
        message,
    }
}

/// A scalar field's value from its text form (a path variable or a query parameter).
fn parse_scalar(f: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let num = |e: &dyn std::fmt::Display| format!("{text:?} is not a valid {:?}: {e}", f.kind());
    Ok(match f.kind() {
        Kind::String => Value::String(text.to_string()),
        Kind::Bytes => {
            use base64::Engine;
            let b = base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
                .map_err(|e| num(&e))?;
            Value::Bytes(b.into())
        }
        Kind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(format!("{text:?} is not true or false")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(text.parse().map_err(|e| num(&e))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(text.parse().map_err(|e| num(&e))?)
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(text.parse().map_err(|e| num(&e))?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(text.parse().map_err(|e| num(&e))?),
        Kind::Float => Value::F32(text.parse().map_err(|e| num(&e))?),
        Kind::Double => Value::F64(text.parse().map_err(|e| num(&e))?),
        Kind::Enum(e) => match e.get_value_by_name(text) {
            Some(v) => Value::EnumNumber(v.number()),
            None => match text.parse::<i32>() {
                Ok(n) if e.get_value(n).is_some() => Value::EnumNumber(n),
                _ => return Err(format!("{text:?} is not a value of {}", e.full_name())),
            },
        },
        Kind::Message(m) => {
            return Err(format!(
                "is a message ({}); set its fields one by one",
                m.full_name()
            ))
        }
    })
}

/// Sets the field at `path` of `msg` from text; a repeated field gets the value appended.
fn set_path(msg: &mut DynamicMessage, path: &[String], text: &str) -> Result<(), String> {
    let fields = resolve(&msg.descriptor(), path)?;
    let (last, parents) = fields.split_last().expect("a field path has a field");
    let mut m = msg;
    for f in parents {
        m = match m.get_field_mut(f) {
            Value::Message(inner) => inner,
            _ => return Err(format!("{:?} is not a message field", f.name())),
        };
    }
    if last.is_map() {
        return Err("is a map".into());
    }
    let v = parse_scalar(last, text)?;
    if last.is_list() {
        if let Value::List(l) = m.get_field_mut(last) {
            l.push(v);
        }
    } else {
        m.set_field(last, v);
    }
    Ok(())
}

/// The JSON body as a message of type `desc`, refused with the JSON path of what was wrong.
fn json_message(desc: MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, Rejected> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(desc));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut track = serde_path_to_error::Track::new();
    let parsed = {
        use serde::de::DeserializeSeed;
        desc.deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track))
    };
    let msg = parsed.and_then(|m| de.end().map(|()| m)).map_err(|e| {
        let path = track.path().to_string();
        let at = if path == "." || path.is_empty() {
            String::new()
        } else {
            format!("field {path:?}: ")
        };
        bad_request("invalid_json", format!("invalid JSON body: {at}{e}"))
    })?;
    Ok(msg)
}

impl Transcoder {
    /// The gRPC request message for a matched request: the body (per the binding), then the
    /// path variables, then the query parameters.
    pub fn request_message(
        &self,
        m: &Matched<'_>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<DynamicMessage, Rejected> {
        let b = m.binding;
        let input = b.method.input();
        let mut msg = match &b.body {
            BodySpec::Star => json_message(input, body)?,
            BodySpec::Field(f) => {
                let Kind::Message(d) = f.kind() else {
                    unreachable!("checked at load: a body field is a message")
                };
                let inner = json_message(d, body)?;
                let mut msg = DynamicMessage::new(input);
                msg.set_field(f, Value::Message(inner));
                msg
            }
            BodySpec::None => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    return Err(bad_request(
                        "unexpected_body",
                        format!("{} takes no request body", b.grpc_path),
                    ));
                }
                DynamicMessage::new(input)
            }
        };
        // Bound fields are kept as resolved field paths, not spellings: a query key may name
        // a field by its proto or its JSON name, and either must hit the same guard.
        let mut bound: Vec<Vec<FieldDescriptor>> = Vec::new();
        for (path, value) in &m.vars {
            set_path(&mut msg, path, value).map_err(|e| {
                bad_request(
                    "bad_path_field",
                    format!("path field {:?}: {e}", path.join(".")),
                )
            })?;
            if let Ok(fields) = resolve(&input_of(b), path) {
                bound.push(fields);
            }
        }
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(k).map_err(|e| bad_request("bad_query", e))?;
            let value = percent_decode(v).map_err(|e| bad_request("bad_query", e))?;
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            let into_body = match &b.body {
                BodySpec::Star => true,
                BodySpec::Field(f) => {
                    field(&input_of(b), &path[0]).is_some_and(|q| q.number() == f.number())
                }
                BodySpec::None => false,
            };
            let clashes =
                resolve(&input_of(b), &path).is_ok_and(|q| bound.iter().any(|p| overlaps(p, &q)));
            if clashes || into_body {
                return Err(bad_request(
                    "bad_query",
                    format!("query parameter {key:?} sets a field the path or body already sets"),
                ));
            }
            match set_path(&mut msg, &path, &value) {
                Ok(()) => {}
                Err(_)
                    if self.cfg.ignore_unknown_query_parameters
                        && resolve(&input_of(b), &path).is_err() => {}
                Err(e) => {
                    return Err(bad_request(
                        "bad_query",
                        format!("query parameter {key:?}: {e}"),
                    ))
                }
            }
        }
        Ok(msg)
    }
}

/// Whether setting the field path `q` would change what the field path `p` set: the same
/// field, one inside the other, or, where they part, two members of one oneof (setting one
/// clears the other).
fn overlaps(p: &[FieldDescriptor], q: &[FieldDescriptor]) -> bool {
    for (a, b) in p.iter().zip(q) {
        if a.number() != b.number() {
            return match (a.containing_oneof(), b.containing_oneof()) {
                (Some(x), Some(y)) => x.name() == y.name(),
                _ => false,
            };
        }
    }
    true
}

fn input_of(b: &Binding) -> MessageDescriptor {
    b.method.input()
}

// ---------------------------------------------------------------------------------------
// gRPC status → HTTP

/// Google's mapping of a gRPC status code to an HTTP status (google.rpc.Code's comments).
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    let n = match code {
        Ok => 200,
        Cancelled => 499,
        InvalidArgument | FailedPrecondition | OutOfRange => 400,
        DeadlineExceeded => 504,
        NotFound => 404,
        AlreadyExists | Aborted => 409,
        PermissionDenied => 403,
        Unauthenticated => 401,
        ResourceExhausted => 429,
        Unimplemented => 501,
        Unavailable => 503,
        Unknown | Internal | DataLoss => 500,
    };
    StatusCode::from_u16(n).expect("a valid status code")
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `{"code":N,"message":"..."}` with the mapped HTTP status.
pub fn error_response(status: &tonic::Status) -> Response<Body> {
    let body = serde_json::json!({"code": status.code() as i32, "message": status.message()});
    json_response(
        http_status(status.code()),
        serde_json::to_vec(&body).expect("JSON of a string"),
    )
}

/// An answer the waypoint makes itself (400, 413, 502...) in the same JSON shape.
pub fn local_json(status: StatusCode, message: &str) -> Response<Body> {
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::InvalidArgument,
        _ => tonic::Code::Unavailable,
    };
    let body = serde_json::json!({"code": code as i32, "message": message});
    json_response(status, serde_json::to_vec(&body).expect("JSON of a string"))
}

// ---------------------------------------------------------------------------------------
// gRPC call framing

/// The call to send: a gRPC POST over HTTP/2 to `/pkg.Service/Method`, with the request's
/// headers that mean something to the service (not its HTTP/1.1 connection or body headers).
pub fn grpc_request(
    m: &Matched<'_>,
    msg: &DynamicMessage,
    authority: &str,
    mut headers: HeaderMap,
    timeout: Option<Duration>,
) -> Result<Request<Body>, String> {
    let encoded = msg.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + encoded.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(encoded.len()).map_err(|_| "request message too large")?);
    framed.put_slice(&encoded);
    for h in [
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "content-length",
        "content-type",
        "content-encoding",
        "accept",
        "accept-encoding",
        "expect",
    ] {
        headers.remove(h);
    }
    // The client spoke JSON, not gRPC: its `grpc-*` headers (grpc-timeout, grpc-encoding,
    // grpc-accept-encoding, ...) would steer a call it did not make. Only the route's
    // timeout, below, becomes a grpc-timeout.
    let client_grpc: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("grpc-"))
        .cloned()
        .collect();
    for k in client_grpc {
        headers.remove(k);
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    if let Some(t) = timeout {
        // gRPC's timeout header: at most 8 digits and a unit; milliseconds fit any route timeout.
        let ms = t.as_millis().clamp(1, 99_999_999);
        headers.insert(
            "grpc-timeout",
            HeaderValue::from_str(&format!("{ms}m")).expect("digits"),
        );
    }
    let uri = format!("http://{authority}{}", m.binding.grpc_path);
    let mut req = Request::new(Full::new(framed.freeze()).map_err(|n| match n {}).boxed());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.parse().map_err(|e| format!("{uri:?}: {e}"))?;
    *req.version_mut() = http::Version::HTTP_2;
    *req.headers_mut() = headers;
    Ok(req)
}

/// What the next read from a gRPC response body gave.
#[derive(Debug)]
enum Event {
    Message(DynamicMessage),
    /// The call ended with this status (OK or not).
    End(tonic::Status),
    /// The service broke the protocol (502).
    Broken(String),
}

/// Reads length-prefixed messages, then the trailers, from a gRPC response body.
struct GrpcReader {
    body: Body,
    buf: BytesMut,
    desc: MessageDescriptor,
    max: usize,
    ended: bool,
    /// A `grpc-status` the response headers carried (trailers-only): the call's status if the
    /// body ends without trailers.
    header_status: Option<tonic::Status>,
}

impl GrpcReader {
    async fn next(&mut self) -> Event {
        loop {
            if self.ended {
                return Event::Broken("read past the end of the call".into());
            }
            if self.buf.len() >= 5 {
                let compressed = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if compressed != 0 {
                    self.ended = true;
                    return Event::Broken(
                        "the service sent a compressed message the waypoint did not ask for".into(),
                    );
                }
                if len > self.max {
                    self.ended = true;
                    return Event::Broken(format!(
                        "response message of {len} bytes exceeds max_response_message_bytes ({})",
                        self.max
                    ));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let bytes = self.buf.split_to(len).freeze();
                    return match DynamicMessage::decode(self.desc.clone(), bytes) {
                        Ok(m) => Event::Message(m),
                        Err(e) => {
                            self.ended = true;
                            Event::Broken(format!(
                                "the service's answer is not a {}: {e}",
                                self.desc.full_name()
                            ))
                        }
                    };
                }
            }
            match self.body.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => self.buf.extend_from_slice(&d),
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.ended = true;
                            if !self.buf.is_empty() {
                                return Event::Broken("the call ended inside a message".into());
                            }
                            return match tonic::Status::from_header_map(&t) {
                                Some(s) => Event::End(s),
                                None => Event::Broken("trailers without grpc-status".into()),
                            };
                        }
                    }
                },
                Some(Err(e)) => {
                    self.ended = true;
                    return Event::Broken(format!("the service's stream failed: {e}"));
                }
                None => {
                    self.ended = true;
                    if self.buf.is_empty() {
                        if let Some(s) = self.header_status.take() {
                            return Event::End(s);
                        }
                    }
                    return Event::Broken("the call ended without grpc-status".into());
                }
            }
        }
    }
}

fn print(msg: &DynamicMessage, cfg: &GrpcTranscoding) -> Result<Vec<u8>, String> {
    let p = &cfg.print;
    let opts = SerializeOptions::new()
        .use_proto_field_name(p.use_proto_field_names)
        .skip_default_fields(!p.emit_defaults)
        .use_enum_numbers(p.enums_as_ints)
        .stringify_64_bit_integers(!p.int64_as_numbers);
    let mut ser = serde_json::Serializer::new(Vec::new());
    msg.serialize_with_options(&mut ser, &opts)
        .map_err(|e| format!("printing {}: {e}", msg.descriptor().full_name()))?;
    Ok(ser.into_inner())
}

/// Why the answer could not be turned into JSON: (HTTP status, message, for the access log).
pub type Failure = (StatusCode, String);

/// Turns the service's HTTP/2 answer into the JSON response. A unary call is answered whole;
/// a server-streaming call is streamed (module docs; docs/waypoint.md), and a failure after
/// its first message aborts the response instead of ending it.
pub async fn json_answer(
    t: &Arc<Transcoder>,
    m: &Matched<'_>,
    resp: Response<Body>,
) -> Result<Response<Body>, Failure> {
    let bad_gateway = |msg: String| (StatusCode::BAD_GATEWAY, msg);
    let (parts, body) = resp.into_parts();
    // Trailers-only: the status is in the headers. A non-OK one is the answer; an OK one is
    // kept for when the body ends without trailers (a stream with no messages).
    let header_status = tonic::Status::from_header_map(&parts.headers);
    if let Some(s) = &header_status {
        if s.code() != tonic::Code::Ok {
            return Ok(error_response(s));
        }
    }
    let is_grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if parts.status != StatusCode::OK || !is_grpc {
        return Err(bad_gateway(format!(
            "the service did not answer gRPC (HTTP {}, content-type {:?})",
            parts.status.as_u16(),
            parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        )));
    }
    let mut reader = GrpcReader {
        body,
        buf: BytesMut::new(),
        desc: m.binding.method.output(),
        max: t.cfg.max_response_message_bytes as usize,
        ended: false,
        header_status,
    };
    let first = reader.next().await;
    if !m.binding.method.is_server_streaming() {
        let msg = match first {
            Event::Message(msg) => msg,
            Event::End(s) if s.code() != tonic::Code::Ok => return Ok(error_response(&s)),
            Event::End(_) => return Err(bad_gateway("a unary call ended with no message".into())),
            Event::Broken(e) => return Err(bad_gateway(e)),
        };
        match reader.next().await {
            Event::End(s) if s.code() == tonic::Code::Ok => {}
            Event::End(s) => return Ok(error_response(&s)),
            Event::Message(_) => {
                return Err(bad_gateway(
                    "a unary call answered more than one message".into(),
                ))
            }
            Event::Broken(e) => return Err(bad_gateway(e)),
        }
        return Ok(json_response(
            StatusCode::OK,
            print(&msg, &t.cfg).map_err(bad_gateway)?,
        ));
    }
    // Streaming: an error before the first message still gets its own HTTP status.
    let first = match first {
        Event::Message(msg) => Some(msg),
        Event::End(s) if s.code() != tonic::Code::Ok => return Ok(error_response(&s)),
        Event::End(_) => None,
        Event::Broken(e) => return Err(bad_gateway(e)),
    };
    let state = Streamed {
        // No first message: the call already ended well, nothing more to read.
        reader: first.is_some().then_some(reader),
        pending: first,
        sent_any: false,
        then_abort: None,
        done: false,
        cfg: t.cfg.clone(),
    };
    let format = t.cfg.streaming;
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let item = st.step().await?;
        Some((item, st))
    });
    let body = StreamBody::new(futures_util::StreamExt::map(stream, |r| {
        r.map(hyper::body::Frame::data)
    }));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(match format {
            StreamingFormat::Ndjson => "application/x-ndjson",
            StreamingFormat::Array => "application/json",
        }),
    );
    Ok(resp)
}

/// A server-streaming answer on its way to the client.
struct Streamed {
    reader: Option<GrpcReader>,
    /// The first message, read before the response headers were committed.
    pending: Option<DynamicMessage>,
    sent_any: bool,
    /// An ndjson stream that failed: its error line was sent, the abort comes next.
    then_abort: Option<String>,
    done: bool,
    cfg: GrpcTranscoding,
}

impl Streamed {
    /// The next chunk of the body; `Err` aborts the response (hyper then never sends the final
    /// chunk, so the client sees an incomplete response, not a complete-looking one).
    async fn step(&mut self) -> Option<Result<Bytes, BoxError>> {
        if self.done {
            return None;
        }
        if let Some(reason) = self.then_abort.take() {
            self.done = true;
            return Some(Err(abort(reason)));
        }
        let format = self.cfg.streaming;
        let event = match (self.pending.take(), self.reader.as_mut()) {
            (Some(m), _) => Event::Message(m),
            (None, Some(r)) => r.next().await,
            (None, None) => Event::End(tonic::Status::new(tonic::Code::Ok, "")),
        };
        let failed = match event {
            Event::Message(msg) => match print(&msg, &self.cfg) {
                Ok(j) => {
                    let chunk = frame_element(format, j, self.sent_any);
                    self.sent_any = true;
                    return Some(Ok(chunk));
                }
                Err(e) => tonic::Status::internal(e),
            },
            Event::End(s) if s.code() == tonic::Code::Ok => {
                self.done = true;
                return Some(Ok(match (format, self.sent_any) {
                    (StreamingFormat::Array, true) => Bytes::from_static(b"]"),
                    (StreamingFormat::Array, false) => Bytes::from_static(b"[]"),
                    (StreamingFormat::Ndjson, _) => Bytes::new(),
                }));
            }
            Event::End(s) => s,
            Event::Broken(e) => tonic::Status::internal(e),
        };
        let reason = format!(
            "the call failed mid-stream: {:?}: {}",
            failed.code(),
            failed.message()
        );
        if format == StreamingFormat::Ndjson {
            // A last line that says why, then the abort: a reader that only looks at lines
            // still learns that the stream failed.
            let line = serde_json::json!({"error": {"code": failed.code() as i32, "message": failed.message()}});
            let mut b = serde_json::to_vec(&line).expect("JSON of a string");
            b.push(b'\n');
            self.then_abort = Some(reason);
            return Some(Ok(Bytes::from(b)));
        }
        self.done = true;
        Some(Err(abort(reason)))
    }
}

/// One streamed element: a line, or an array element with its separator.
fn frame_element(format: StreamingFormat, json: Vec<u8>, sent_any: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 2);
    match format {
        StreamingFormat::Ndjson => {
            b.put_slice(&json);
            b.put_u8(b'\n');
        }
        StreamingFormat::Array => {
            b.put_u8(if sent_any { b',' } else { b'[' });
            b.put_slice(&json);
        }
    }
    b.freeze()
}

/// The error that aborts a streamed response: hyper then closes the HTTP/1.1 connection without
/// the final chunk, so the client sees an incomplete response, never a complete-looking one.
fn abort(reason: String) -> BoxError {
    tracing::debug!(%reason, "transcoded stream aborted");
    reason.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(t)
            .unwrap()
            .matches(path)
            .map(|v| v.into_iter().map(|(f, s)| (f.join("."), s)).collect())
    }

    #[test]
    fn templates_parse_or_name_what_is_wrong() {
        for good in [
            "/v1/shelves",
            "/v1/shelves/{shelf_id}",
            "/v1/{name=shelves/*}/books/{book.id}",
            "/v1/{name=shelves/**}",
            "/v1/*/x:verb",
            "/v1/{a}:cancel",
            "/pkg.Svc/Method",
        ] {
            PathTemplate::parse(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for (bad, why) in [
            ("v1/x", "must start with '/'"),
            ("/v1/{x", "unclosed '{'"),
            ("/v1//x", "empty segment"),
            ("/v1/x/", "trailing '/'"),
            ("/v1/**/x", "'**' must be the last segment"),
            ("/v1/{a}/{a}", "field \"a\" bound twice"),
            ("/v1/{1a}", "bad field path"),
            ("/v1/x:", "bad verb"),
            ("/v1/{a=b/{c}}", "nested variables"),
            ("/", "no segments"),
        ] {
            let e = PathTemplate::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn templates_match_and_bind_variables() {
        let v = |f: &str, s: &str| (f.to_string(), s.to_string());
        assert_eq!(
            vars("/v1/shelves/{shelf_id}", "/v1/shelves/42"),
            Some(vec![v("shelf_id", "42")])
        );
        assert_eq!(vars("/v1/shelves/{shelf_id}", "/v1/shelves"), None);
        assert_eq!(vars("/v1/shelves/{shelf_id}", "/v1/shelves/4/x"), None);
        assert_eq!(vars("/v1/shelves/{shelf_id}", "/v1/shelves/"), None);
        assert_eq!(
            vars("/v1/{parent=shelves/*}/books", "/v1/shelves/s1/books"),
            Some(vec![v("parent", "shelves/s1")])
        );
        assert_eq!(
            vars("/v1/{parent=shelves/*}/books", "/v1/racks/s1/books"),
            None
        );
        assert_eq!(
            vars("/v1/{name=files/**}", "/v1/files/a/b/c"),
            Some(vec![v("name", "files/a/b/c")])
        );
        assert_eq!(
            vars("/v1/{name=files/**}", "/v1/files"),
            Some(vec![v("name", "files")])
        );
        assert_eq!(
            vars("/v1/{a.b}/x/{c}", "/v1/p%20q/x/caf%C3%A9"),
            Some(vec![v("a.b", "p q"), v("c", "café")])
        );
        assert_eq!(
            vars("/v1/{a}:cancel", "/v1/7:cancel"),
            Some(vec![v("a", "7")])
        );
        assert_eq!(vars("/v1/{a}:cancel", "/v1/7"), None);
        assert_eq!(
            vars("/v1/{a}", "/v1/7:cancel"),
            None,
            "a verb is not a value"
        );
        assert_eq!(vars("/v1/*/x", "/v1/any/x"), Some(vec![]));
        assert_eq!(vars("/v1/{a}", "/v1/%zz"), None, "bad escape: no match");
    }

    #[test]
    fn grpc_codes_map_as_google_maps_them() {
        use tonic::Code::*;
        let table = [
            (Ok, 200),
            (Cancelled, 499),
            (Unknown, 500),
            (InvalidArgument, 400),
            (DeadlineExceeded, 504),
            (NotFound, 404),
            (AlreadyExists, 409),
            (PermissionDenied, 403),
            (ResourceExhausted, 429),
            (FailedPrecondition, 400),
            (Aborted, 409),
            (OutOfRange, 400),
            (Unimplemented, 501),
            (Internal, 500),
            (Unavailable, 503),
            (DataLoss, 500),
            (Unauthenticated, 401),
        ];
        for (code, want) in table {
            assert_eq!(http_status(code).as_u16(), want, "{code:?}");
        }
    }

    /// A descriptor set compiled here from the testbed's shelf.proto.
    fn shelf(cfg_extra: impl FnOnce(&mut GrpcTranscoding)) -> Result<Transcoder, TranscodeError> {
        let mut cfg: GrpcTranscoding = serde_yaml::from_str(
            "{descriptor_set: shelf.pb, services: [zmesh.test.shelf.Shelves]}",
        )
        .unwrap();
        cfg_extra(&mut cfg);
        Transcoder::from_bytes(zmesh_testbed_fds(), "shelf.pb", &cfg)
    }

    fn zmesh_testbed_fds() -> &'static [u8] {
        zmesh_testbed::shelf::DESCRIPTOR_SET
    }

    fn message_json(
        t: &Transcoder,
        method: Method,
        path_q: &str,
        body: &str,
    ) -> Result<String, Rejected> {
        let (path, query) = match path_q.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_q, None),
        };
        let m = t.find(&method, path).expect("a binding matches");
        let msg = t.request_message(&m, query, body.as_bytes())?;
        let opts = SerializeOptions::new().stringify_64_bit_integers(false);
        let mut ser = serde_json::Serializer::new(Vec::new());
        msg.serialize_with_options(&mut ser, &opts).unwrap();
        Ok(format!(
            "{} {}",
            m.grpc_path(),
            String::from_utf8(ser.into_inner()).unwrap()
        ))
    }

    #[test]
    fn requests_bind_path_query_and_body() {
        let t = shelf(|_| {}).unwrap();
        let cases = [
            (Method::GET, "/v1/shelves/42", "", "/zmesh.test.shelf.Shelves/GetShelf {\"shelfId\":42}"),
            (
                Method::GET,
                "/v1/shelves/s1/books?pageSize=3&authors=a&authors=b%20c&filter.genre=SCIENCE&filter.min_pages=9000000000",
                "",
                "/zmesh.test.shelf.Shelves/ListBooks {\"parent\":\"shelves/s1\",\"pageSize\":3,\"authors\":[\"a\",\"b c\"],\"filter\":{\"genre\":\"SCIENCE\",\"minPages\":9000000000}}",
            ),
            (Method::GET, "/v1/books?filter.genre=1", "", "/zmesh.test.shelf.Shelves/ListBooks {\"filter\":{\"genre\":\"FICTION\"}}"),
            (Method::GET, "/v1/shelves/s1/books:stream", "", "/zmesh.test.shelf.Shelves/StreamBooks {\"parent\":\"shelves/s1\"}"),
            (
                Method::POST,
                "/v1/shelves",
                r#"{"theme":"sea","genre":"FICTION"}"#,
                "/zmesh.test.shelf.Shelves/CreateShelf {\"shelf\":{\"theme\":\"sea\",\"genre\":\"FICTION\"}}",
            ),
            (
                Method::POST,
                "/v1/echo",
                r#"{"text":"hi","count":2,"numbers":["1",2],"filter":{"min_pages":"5"}}"#,
                "/zmesh.test.shelf.Shelves/Echo {\"text\":\"hi\",\"count\":2,\"filter\":{\"minPages\":5},\"numbers\":[1,2]}",
            ),
        ];
        for (method, path, body, want) in cases {
            assert_eq!(
                message_json(&t, method, path, body).unwrap(),
                want,
                "{path}"
            );
        }
        assert!(
            t.find(&Method::GET, "/v1/unknown").is_none(),
            "unknown paths fall through"
        );
        assert!(
            t.find(&Method::DELETE, "/v1/shelves/1").is_none(),
            "wrong method falls through"
        );
    }

    #[test]
    fn bad_requests_are_refused_naming_the_field() {
        let t = shelf(|_| {}).unwrap();
        let cases = [
            (
                Method::POST,
                "/v1/echo",
                r#"{"text":"hi","colour":"red"}"#,
                "colour",
            ),
            (
                Method::POST,
                "/v1/echo",
                r#"{"count":"many"}"#,
                "field \"count\"",
            ),
            (
                Method::POST,
                "/v1/echo",
                r#"{"filter":{"minPages":true}}"#,
                "field \"filter.minPages\"",
            ),
            (
                Method::POST,
                "/v1/echo",
                r#"{"text":"hi""#,
                "invalid JSON body",
            ),
            (Method::POST, "/v1/echo", r#"{"text":"hi"} x"#, "trailing"),
            (
                Method::POST,
                "/v1/shelves",
                r#"{"genre":"POETRY"}"#,
                "field \"genre\"",
            ),
            (
                Method::GET,
                "/v1/shelves/abc",
                "",
                "path field \"shelf_id\"",
            ),
            (
                Method::GET,
                "/v1/books?page_size=x",
                "",
                "query parameter \"page_size\"",
            ),
            (
                Method::GET,
                "/v1/books?colour=red",
                "",
                "query parameter \"colour\": no field",
            ),
            (Method::GET, "/v1/books?filter=1", "", "is a message"),
            (
                Method::GET,
                "/v1/books?filter.genre=POETRY",
                "",
                "not a value of",
            ),
            (
                Method::GET,
                "/v1/shelves/s/books?parent=x",
                "",
                "already sets",
            ),
            (Method::POST, "/v1/echo?text=x", "{}", "already sets"),
            // The JSON spelling of a path variable is the same field (a policy on
            // /v1/shelves/1 must not let shelf 2 through).
            (
                Method::GET,
                "/v1/shelves/1?shelfId=2",
                "",
                "query parameter \"shelfId\" sets a field the path or body already sets",
            ),
            (
                Method::GET,
                "/v1/shelves/1?shelf_id=2",
                "",
                "query parameter \"shelf_id\" sets",
            ),
            (Method::GET, "/v1/shelves/1", "{}", "takes no request body"),
            (
                Method::GET,
                "/v1/books?a=%zz",
                "",
                "malformed percent-escape",
            ),
        ];
        for (method, path, body, want) in cases {
            let e = message_json(&t, method, path, body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{path} {body}");
            assert!(e.message.contains(want), "{path} {body}: {}", e.message);
        }
        // Deep nesting and invalid UTF-8 are refused, not a crash.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = message_json(&t, Method::POST, "/v1/echo", &deep).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let m = t.find(&Method::POST, "/v1/echo").unwrap();
        let e = t
            .request_message(&m, None, b"{\"text\":\"\xff\xfe\"}")
            .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
        // Ignored when configured.
        let lax = shelf(|c| c.ignore_unknown_query_parameters = true).unwrap();
        assert!(message_json(&lax, Method::GET, "/v1/books?colour=red", "").is_ok());
    }

    /// A descriptor set compiled here, with protox, from `proto` (which may import the
    /// testbed's google/api/annotations.proto).
    fn compile(proto: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.proto"), proto).unwrap();
        let google = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/proto");
        let mut c = protox::Compiler::new([dir.path(), std::path::Path::new(google)]).unwrap();
        c.include_imports(true);
        c.open_file("t.proto").unwrap();
        c.encode_file_descriptor_set()
    }

    #[test]
    fn bindings_that_cannot_work_are_refused_at_load_naming_method_and_template() {
        let fds = compile(
            r#"syntax = "proto3";
package t;
import "google/api/annotations.proto";
message M { string name = 1; N n = 2; repeated string tags = 3; }
message N { string x = 1; }
service Bare { rpc Plain(M) returns (M); }
service BadTemplate { rpc Get(M) returns (M) { option (google.api.http) = { get: "/v1/{name" }; } }
service BadField { rpc Get(M) returns (M) { option (google.api.http) = { get: "/v1/{nope}" }; } }
service MessageVar { rpc Get(M) returns (M) { option (google.api.http) = { get: "/v1/{n}" }; } }
service ListVar { rpc Get(M) returns (M) { option (google.api.http) = { get: "/v1/{tags}" }; } }
service BadBody { rpc Post(M) returns (M) { option (google.api.http) = { post: "/v1/m" body: "name" }; } }
service Upload { rpc Up(stream M) returns (M) { option (google.api.http) = { post: "/v1/up" body: "*" }; } }
service Custom { rpc Head(M) returns (M) { option (google.api.http) = { custom: { kind: "HEAD" path: "/v1/{name}" } }; } }
"#,
        );
        let load = |service: &str, unannotated: bool| {
            let mut cfg: GrpcTranscoding =
                serde_yaml::from_str("{descriptor_set: t.pb, services: [x]}").unwrap();
            cfg.services = vec![service.to_string()];
            cfg.unannotated_methods = unannotated;
            Transcoder::from_bytes(&fds, "t.pb", &cfg)
        };
        for (service, want) in [
            ("t.Bare", "method t.Bare.Plain: no google.api.http option"),
            (
                "t.BadTemplate",
                "method t.BadTemplate.Get: path template \"/v1/{name\": unclosed '{'",
            ),
            (
                "t.BadField",
                "path template \"/v1/{nope}\": no field \"nope\" in t.M",
            ),
            ("t.MessageVar", "\"n\" is not a singular scalar field"),
            ("t.ListVar", "\"tags\" is not a singular scalar field"),
            (
                "t.BadBody",
                "method t.BadBody.Post: body field \"name\" must be a singular message",
            ),
            (
                "t.Upload",
                "method t.Upload.Up: client streaming cannot be transcoded",
            ),
        ] {
            let e = load(service, false).unwrap_err().to_string();
            assert!(e.contains(want), "{service}: {e}");
        }
        // An unannotated method, when allowed, is POST /<pkg.Service>/<Method> with body "*".
        let t = load("t.Bare", true).unwrap();
        let m = t.find(&Method::POST, "/t.Bare/Plain").unwrap();
        let msg = t.request_message(&m, None, br#"{"name":"x"}"#).unwrap();
        assert_eq!(msg.get_field_by_name("name").unwrap().as_str(), Some("x"));
        // A custom verb.
        let t = load("t.Custom", false).unwrap();
        assert!(t.find(&Method::HEAD, "/v1/a").is_some());
        assert!(t.find(&Method::GET, "/v1/a").is_none());
    }

    #[test]
    fn query_parameters_cannot_touch_path_bound_fields_or_their_oneof() {
        let fds = compile(
            r#"syntax = "proto3";
package t;
import "google/api/annotations.proto";
message Key { oneof k { string name = 1; int64 number = 2; } string note = 3; }
message M { oneof id { string user_id = 1; string group_id = 2; } Key key = 3; string other = 4; }
service S {
  rpc ByUser(M) returns (M) { option (google.api.http) = { get: "/v1/users/{user_id}" }; }
  rpc ByKey(M) returns (M) { option (google.api.http) = { get: "/v1/keys/{key.name}" }; }
}
"#,
        );
        let cfg: GrpcTranscoding =
            serde_yaml::from_str("{descriptor_set: t.pb, services: [t.S]}").unwrap();
        let t = Transcoder::from_bytes(&fds, "t.pb", &cfg).unwrap();
        for (path_q, key) in [
            ("/v1/users/u1?groupId=g", "groupId"),
            ("/v1/users/u1?group_id=g", "group_id"),
            ("/v1/users/u1?userId=u2", "userId"),
            ("/v1/keys/k1?key.number=7", "key.number"),
            ("/v1/keys/k1?key.name=k2", "key.name"),
        ] {
            let e = message_json(&t, Method::GET, path_q, "").unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{path_q}");
            assert!(
                e.message.contains(&format!("query parameter {key:?}")),
                "{path_q}: {}",
                e.message
            );
        }
        // Fields outside the bound field and its oneof stay settable.
        assert_eq!(
            message_json(&t, Method::GET, "/v1/users/u1?other=x", "").unwrap(),
            "/t.S/ByUser {\"userId\":\"u1\",\"other\":\"x\"}"
        );
        assert_eq!(
            message_json(&t, Method::GET, "/v1/keys/k1?key.note=n", "").unwrap(),
            "/t.S/ByKey {\"key\":{\"name\":\"k1\",\"note\":\"n\"}}"
        );
    }

    /// A gRPC answer with these headers and body (data frames, no trailers).
    fn grpc_answer(
        headers: &[(&'static str, &'static str)],
        body: &'static [u8],
    ) -> Response<Body> {
        let body = Full::new(Bytes::from_static(body))
            .map_err(|e| match e {})
            .boxed();
        let mut r = Response::new(body);
        for (k, v) in headers {
            r.headers_mut().insert(
                http::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        r
    }

    async fn answer_text(r: Result<Response<Body>, Failure>) -> (StatusCode, String) {
        let r = r.unwrap_or_else(|(st, e)| panic!("failed {st}: {e}"));
        let st = r.status();
        let b = r.into_body().collect().await.map_err(|e| e.to_string());
        (
            st,
            String::from_utf8_lossy(&b.unwrap().to_bytes()).into_owned(),
        )
    }

    #[tokio::test]
    async fn trailers_only_answers_keep_the_status_from_the_headers() {
        let grpc = ("content-type", "application/grpc");
        for (streaming, want) in [
            (StreamingFormat::Ndjson, ""),
            (StreamingFormat::Array, "[]"),
        ] {
            let t = Arc::new(shelf(|c| c.streaming = streaming).unwrap());
            let m = t.find(&Method::GET, "/v1/shelves/s1/books:stream").unwrap();
            // Trailers-only OK on a server stream: an empty stream, not a 502.
            let r = json_answer(&t, &m, grpc_answer(&[grpc, ("grpc-status", "0")], b"")).await;
            assert_eq!(answer_text(r).await, (StatusCode::OK, want.to_string()));
            // Trailers-only NOT_FOUND: its own status.
            let r = json_answer(
                &t,
                &m,
                grpc_answer(&[grpc, ("grpc-status", "5"), ("grpc-message", "no")], b""),
            )
            .await;
            assert_eq!(answer_text(r).await.0, StatusCode::NOT_FOUND);
            // No status anywhere: still a broken call.
            let e = json_answer(&t, &m, grpc_answer(&[grpc], b""))
                .await
                .unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_GATEWAY);
            assert!(e.1.contains("without grpc-status"), "{}", e.1);
            // An OK header status does not excuse a cut message.
            let cut = grpc_answer(&[grpc, ("grpc-status", "0")], b"\0\0\0\0\x09ab");
            let e = json_answer(&t, &m, cut).await.unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_GATEWAY, "{}", e.1);
        }
        // A unary call with trailers-only OK has no message: 502, naming that.
        let t = Arc::new(shelf(|_| {}).unwrap());
        let m = t.find(&Method::GET, "/v1/shelves/1").unwrap();
        let e = json_answer(&t, &m, grpc_answer(&[grpc, ("grpc-status", "0")], b""))
            .await
            .unwrap_err();
        assert!(e.1.contains("no message"), "{}", e.1);
    }

    #[test]
    fn client_grpc_headers_are_not_forwarded() {
        let t = shelf(|_| {}).unwrap();
        let m = t.find(&Method::GET, "/v1/shelves/1").unwrap();
        let msg = t.request_message(&m, None, b"").unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("grpc-timeout", "1n"),
            ("grpc-accept-encoding", "gzip"),
            ("grpc-encoding", "gzip"),
            ("grpc-status", "0"),
            ("x-keep", "yes"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        let r = grpc_request(&m, &msg, "shelf", h.clone(), None).unwrap();
        let grpc: Vec<_> = r
            .headers()
            .keys()
            .filter(|k| k.as_str().starts_with("grpc-"))
            .collect();
        assert!(grpc.is_empty(), "{grpc:?}");
        assert_eq!(r.headers()["x-keep"], "yes");
        // The route's timeout is the only grpc-timeout.
        let r = grpc_request(&m, &msg, "shelf", h, Some(Duration::from_secs(2))).unwrap();
        assert_eq!(r.headers()["grpc-timeout"], "2000m");
        assert!(r.headers().get("grpc-accept-encoding").is_none());
    }

    #[test]
    fn configs_that_cannot_work_are_refused_naming_the_service_or_method() {
        let e = shelf(|c| c.services = vec!["zmesh.test.shelf.Nope".into()]).unwrap_err();
        assert!(e.to_string().contains("zmesh.test.shelf.Nope"), "{e}");
        let e =
            Transcoder::from_bytes(b"\xff\xff", "x.pb", &shelf(|_| {}).unwrap().cfg).unwrap_err();
        assert!(e.to_string().contains("x.pb"), "{e}");
        let mut cfg = shelf(|_| {}).unwrap().cfg;
        cfg.descriptor_set = "/nonexistent/shelf.pb".into();
        let e = Transcoder::load(&cfg).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/shelf.pb"), "{e}");
    }
}
