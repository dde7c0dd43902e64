//! specs.smi-spec.io: HTTPRouteGroup and TCPRoute.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::read::{
    array, child, field, invalid, is_token_byte, object, optional_str, port_number, regex,
    required, required_str, str_at, type_error,
};
use super::{Metadata, SPECS_GROUP, SmiError, root_object, type_meta};
use crate::policy::{AnchoredRegex, HeaderMatch, HttpMatch};

// === HTTPRouteGroup and TCPRoute ===

/// The traffic spec versions read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum SpecsVersion {
    #[serde(rename = "specs.smi-spec.io/v1alpha3")]
    V1alpha3,
    #[serde(rename = "specs.smi-spec.io/v1alpha4")]
    V1alpha4,
}

const SPECS_VERSIONS: &str = "specs.smi-spec.io/v1alpha4 or specs.smi-spec.io/v1alpha3";

fn specs_version(root: &Map<String, Value>, kind: &'static str) -> Result<SpecsVersion, SmiError> {
    match type_meta(root, kind, SPECS_GROUP, SPECS_VERSIONS)? {
        "v1alpha4" => Ok(SpecsVersion::V1alpha4),
        "v1alpha3" => Ok(SpecsVersion::V1alpha3),
        other => Err(SmiError::ApiVersion {
            kind,
            api_version: format!("{SPECS_GROUP}/{other}"),
            expected: SPECS_VERSIONS,
        }),
    }
}

/// An SMI HTTPRouteGroup: named HTTP request matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename = "HTTPRouteGroup", rename_all = "camelCase")]
pub struct HttpRouteGroup {
    pub api_version: SpecsVersion,
    pub metadata: Metadata,
    pub spec: HttpRouteGroupSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRouteGroupSpec {
    pub matches: Vec<HttpRouteMatch>,
}

/// One named match; its conditions all hold (AND). Regexes are compiled (and so validated)
/// when the document is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<AnchoredRegex>,
    /// As written: `*` or upper-case RFC 7231 methods. Empty means any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Lower-case header name to value regex.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, AnchoredRegex>,
}

const METHODS: &[&str] = &[
    "*", "GET", "HEAD", "PUT", "POST", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

// === impl HttpRouteGroup ===

impl HttpRouteGroup {
    pub const KIND: &'static str = "HTTPRouteGroup";

    pub fn from_value(value: &Value) -> Result<Self, SmiError> {
        let root = root_object(value)?;
        let api_version = specs_version(root, Self::KIND)?;
        let metadata = Metadata::parse(root)?;
        let spec = object(required(root, "", "spec")?, "spec")?;
        let list = array(required(spec, "spec", "matches")?, "spec.matches")?;
        let mut matches = Vec::with_capacity(list.len());
        let mut names = BTreeSet::new();
        for (i, m) in list.iter().enumerate() {
            let path = format!("spec.matches[{i}]");
            let m = http_route_match(m, &path)?;
            if !names.insert(m.name.clone()) {
                return Err(SmiError::Duplicate {
                    path: child(&path, "name"),
                    value: m.name,
                });
            }
            matches.push(m);
        }
        Ok(HttpRouteGroup {
            api_version,
            metadata,
            spec: HttpRouteGroupSpec { matches },
        })
    }

    pub fn find(&self, name: &str) -> Option<&HttpRouteMatch> {
        self.spec.matches.iter().find(|m| m.name == name)
    }
}

impl<'de> Deserialize<'de> for HttpRouteGroup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HttpRouteGroup::from_value(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

// === impl HttpRouteMatch ===

impl HttpRouteMatch {
    /// The policy model's form: `*` becomes "any method", headers sorted by name.
    pub fn to_http_match(&self) -> HttpMatch {
        let any = self.methods.is_empty() || self.methods.iter().any(|m| m == "*");
        HttpMatch {
            name: self.name.clone(),
            path: self.path_regex.clone(),
            methods: if any {
                Vec::new()
            } else {
                self.methods.clone()
            },
            headers: self
                .headers
                .iter()
                .map(|(name, value)| HeaderMatch {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
        }
    }
}

fn http_route_match(v: &Value, path: &str) -> Result<HttpRouteMatch, SmiError> {
    let obj = object(v, path)?;
    let name = required_str(obj, path, "name")?;
    let path_regex = match optional_str(obj, path, "pathRegex")? {
        Some(re) => Some(regex(&re, &child(path, "pathRegex"))?),
        None => None,
    };
    let mut methods = Vec::new();
    if let Some(m) = field(obj, "methods") {
        let mpath = child(path, "methods");
        for (i, method) in array(m, &mpath)?.iter().enumerate() {
            let ipath = format!("{mpath}[{i}]");
            let method = str_at(method, &ipath)?;
            if !METHODS.contains(&method) {
                return Err(invalid(
                    &ipath,
                    method,
                    "* or an RFC 7231 method in upper case",
                ));
            }
            if !methods.iter().any(|m| m == method) {
                methods.push(method.to_string());
            }
        }
    }
    let mut headers = BTreeMap::new();
    if let Some(h) = field(obj, "headers") {
        let hpath = child(path, "headers");
        // v1alpha4 SDK: a map; published CRD schema: a list of maps. Both are accepted.
        let maps: Vec<(String, &Map<String, Value>)> = match h {
            Value::Object(map) => vec![(hpath.clone(), map)],
            Value::Array(list) => list
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let p = format!("{hpath}[{i}]");
                    object(m, &p).map(|m| (p, m))
                })
                .collect::<Result<_, _>>()?,
            other => return Err(type_error(&hpath, "a map of header name to regex", other)),
        };
        for (mpath, map) in maps {
            for (name, value) in map {
                let vpath = child(&mpath, name);
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    return Err(invalid(&vpath, name, "an HTTP header name"));
                }
                let re = regex(str_at(value, &vpath)?, &vpath)?;
                if headers.insert(name.to_ascii_lowercase(), re).is_some() {
                    return Err(SmiError::Duplicate {
                        path: hpath.clone(),
                        value: name.to_ascii_lowercase(),
                    });
                }
            }
        }
    }
    Ok(HttpRouteMatch {
        name,
        path_regex,
        methods,
        headers,
    })
}

/// RFC 9110 `tchar`.
/// An SMI TCPRoute: TCP traffic to a set of ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename = "TCPRoute", rename_all = "camelCase")]
pub struct TcpRoute {
    pub api_version: SpecsVersion,
    pub metadata: Metadata,
    pub spec: TcpRouteSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TcpRouteSpec {
    pub matches: TcpRouteMatches,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TcpRouteMatches {
    /// Empty means every port.
    pub ports: Vec<u16>,
}

// === impl TcpRoute ===

impl TcpRoute {
    pub const KIND: &'static str = "TCPRoute";

    pub fn from_value(value: &Value) -> Result<Self, SmiError> {
        let root = root_object(value)?;
        let api_version = specs_version(root, Self::KIND)?;
        let metadata = Metadata::parse(root)?;
        let matches = match api_version {
            SpecsVersion::V1alpha4 => {
                let spec = object(required(root, "", "spec")?, "spec")?;
                Some(required(spec, "spec", "matches")?)
            }
            SpecsVersion::V1alpha3 => match field(root, "spec") {
                Some(spec) => field(object(spec, "spec")?, "matches"),
                None => None,
            },
        };
        let mut ports = Vec::new();
        if let Some(m) = matches {
            let m = object(m, "spec.matches")?;
            let list = match (field(m, "ports"), api_version) {
                (Some(p), _) => array(p, "spec.matches.ports")?.as_slice(),
                (None, SpecsVersion::V1alpha4) => {
                    return Err(SmiError::Missing {
                        path: "spec.matches.ports".to_string(),
                    });
                }
                (None, SpecsVersion::V1alpha3) => &[],
            };
            for (i, p) in list.iter().enumerate() {
                let port = port_number(p, &format!("spec.matches.ports[{i}]"))?;
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
        }
        Ok(TcpRoute {
            api_version,
            metadata,
            spec: TcpRouteSpec {
                matches: TcpRouteMatches { ports },
            },
        })
    }
}

impl<'de> Deserialize<'de> for TcpRoute {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TcpRoute::from_value(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}
