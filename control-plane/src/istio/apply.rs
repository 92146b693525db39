//! `kubectl apply` against a configuration directory (what `ferry-pilot serve --config DIR`
//! watches): each object of the applied YAML replaces the object of the same kind, namespace
//! and name wherever the directory defines it, or joins the directory. An object lives in a
//! file of its own, `<kind>-<namespace>-<name>.yaml`, written whole under a temporary name and
//! renamed into place, so the watcher never reads half of it; an older definition inside a
//! file of several documents is cut out of that file. Like the API server's validation
//! webhook, the applied objects are checked first ([`crate::istio::validate`], as if they were
//! in force) and nothing is written when one of them has an error.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use super::source::{LoadError, Snapshot, SourceError, load_dir, parse_documents, split_documents};
use super::types::ResourceKey;
use super::validate::{Finding, Severity, validate};

/// What applying one object did, as `kubectl apply` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Created,
    Configured,
    Unchanged,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Created => "created",
            Action::Configured => "configured",
            Action::Unchanged => "unchanged",
        })
    }
}

/// One applied object: `virtualservice default/reviews configured`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub key: ResourceKey,
    pub action: Action,
    /// The file that now holds it.
    pub file: PathBuf,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{} {}",
            self.key.kind.to_lowercase(),
            self.key.namespace,
            self.key.name,
            self.action
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Load(Vec<LoadError>),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Finding>),
    #[error("{file}: no Kubernetes or Istio object in it")]
    Empty { file: PathBuf },
    #[error("{what} {}: {source}", .path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file an object of `key` is written to inside the directory.
pub fn object_file(dir: &Path, key: &ResourceKey) -> PathBuf {
    let ns = if key.namespace.is_empty() {
        "cluster"
    } else {
        key.namespace.as_str()
    };
    dir.join(format!(
        "{}-{ns}-{}.yaml",
        key.kind.to_lowercase(),
        key.name
    ))
}

/// Applies the objects of `text` (read from `file`, which only names it in messages) to the
/// configuration directory `dir`.
pub fn apply(dir: &Path, text: &str, file: &Path) -> Result<Vec<Applied>, ApplyError> {
    let incoming = parse_documents(text, file);
    if !incoming.errors.is_empty() {
        return Err(ApplyError::Load(incoming.errors));
    }
    if incoming.resources.is_empty() {
        return Err(ApplyError::Empty {
            file: file.to_path_buf(),
        });
    }
    let current = load_dir(dir)?;
    let keys: BTreeSet<ResourceKey> = incoming.resources.iter().map(|r| r.key()).collect();

    // Validate as if applied: the directory without the replaced objects, plus the new ones.
    // Only findings about the applied objects stop it; the rest of the directory is not the
    // caller's doing.
    let mut merged = Snapshot {
        resources: current
            .resources
            .iter()
            .filter(|r| !keys.contains(&r.key()))
            .cloned()
            .collect(),
        errors: Vec::new(),
    };
    merged.resources.extend(incoming.resources.iter().cloned());
    let errors: Vec<Finding> = validate(&merged)
        .into_iter()
        .filter(|f| f.severity == Severity::Error)
        .filter(|f| f.resource.as_ref().is_some_and(|k| keys.contains(k)))
        .collect();
    if !errors.is_empty() {
        return Err(ApplyError::Invalid(errors));
    }

    // The documents of the applied text, by the key of the object each holds.
    let docs: Vec<(ResourceKey, &str)> = split_documents(text)
        .into_iter()
        .flat_map(|(_, doc)| {
            parse_documents(doc, file)
                .resources
                .into_iter()
                .map(move |r| (r.key(), doc))
        })
        .collect();
    let mut out = Vec::new();
    for (key, doc) in docs {
        let target = object_file(dir, &key);
        let before: Vec<_> = current
            .resources
            .iter()
            .filter(|r| r.key() == key)
            .collect();
        let new_text = format!("{}\n", doc.trim_matches('\n'));
        let action = if before.is_empty() {
            Action::Created
        } else if before.len() == 1
            && before[0].origin.file == target
            && std::fs::read_to_string(&target).is_ok_and(|t| t == new_text)
        {
            Action::Unchanged
        } else {
            Action::Configured
        };
        if action != Action::Unchanged {
            write_whole(&target, &new_text)?;
        }
        // Older definitions elsewhere (inside a file of several documents) are cut out after
        // the new one is in place.
        let others: BTreeSet<&Path> = before
            .iter()
            .map(|r| r.origin.file.as_path())
            .filter(|f| *f != target)
            .collect();
        for other in others {
            remove_object(other, &key)?;
        }
        out.push(Applied {
            key,
            action,
            file: target,
        });
    }
    Ok(out)
}

/// Writes `text` to `path` under a temporary name, then renames it into place.
pub fn write_whole(path: &Path, text: &str) -> Result<(), ApplyError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let write = |what, p: &Path, source| ApplyError::Write {
        what,
        path: p.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, text).map_err(|e| write("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| write("renaming into", path, e))
}

/// Cuts the documents defining `key` out of `file` (the file goes when nothing is left).
fn remove_object(file: &Path, key: &ResourceKey) -> Result<(), ApplyError> {
    let text = std::fs::read_to_string(file).map_err(|source| ApplyError::Write {
        what: "reading",
        path: file.to_path_buf(),
        source,
    })?;
    let kept: Vec<&str> = split_documents(&text)
        .into_iter()
        .map(|(_, doc)| doc)
        .filter(|doc| {
            !parse_documents(doc, file)
                .resources
                .iter()
                .any(|r| &r.key() == key)
        })
        .collect();
    if kept.is_empty() {
        return std::fs::remove_file(file).map_err(|source| ApplyError::Write {
            what: "removing",
            path: file.to_path_buf(),
            source,
        });
    }
    let joined: Vec<String> = kept
        .iter()
        .map(|d| d.trim_matches('\n').to_string())
        .collect();
    write_whole(file, &format!("{}\n", joined.join("\n---\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-apply-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\n\
                           spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}\n";

    fn vs(subset: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\n\
             spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: {subset}}}\n"
        )
    }

    #[test]
    fn replaces_by_key_and_cuts_older_definitions_out() {
        let dir = tmp("replace");
        // A file of several documents holding the Service and a first VirtualService.
        let all = dir.join("all.yaml");
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n\
                  spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v3, labels: {version: v3}}]}\n";
        std::fs::write(&all, format!("{SERVICE}---\n{}---\n{dr}", vs("v1"))).expect("write");
        let applied = apply(&dir, &vs("v3"), Path::new("v3.yaml")).expect("apply");
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].action, Action::Configured);
        assert_eq!(
            applied[0].to_string(),
            "virtualservice default/reviews configured"
        );
        let snap = load_dir(&dir).expect("load");
        let vss: Vec<_> = snap
            .resources
            .iter()
            .filter(|r| r.kind == "VirtualService")
            .collect();
        assert_eq!(vss.len(), 1, "{vss:?}");
        assert_eq!(vss[0].origin.file, object_file(&dir, &vss[0].key()));
        assert!(
            std::fs::read_to_string(&all)
                .expect("all")
                .contains("kind: Service")
        );
        // The same text again changes nothing; a new object is created.
        let again = apply(&dir, &vs("v3"), Path::new("v3.yaml")).expect("again");
        assert_eq!(again[0].action, Action::Unchanged);
        let sa = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n";
        assert_eq!(
            apply(&dir, sa, Path::new("sa.yaml")).expect("sa")[0].action,
            Action::Created
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_invalid_objects_and_writes_nothing() {
        let dir = tmp("invalid");
        std::fs::write(dir.join("svc.yaml"), SERVICE).expect("write");
        let bad = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n\
                   spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: -5\n";
        let err = apply(&dir, bad, Path::new("bad.yaml")).expect_err("refused");
        assert!(
            err.to_string().contains("VirtualService default/r"),
            "{err}"
        );
        let junk = apply(&dir, "kind: [", Path::new("junk.yaml")).expect_err("junk");
        assert!(junk.to_string().contains("junk.yaml"), "{junk}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
