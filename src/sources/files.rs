//! Definition files: `*.yaml` / `*.yml` (multi-document `ClusterEndpoint` manifests) and `*.toml`
//! (`[[clusterEndpoints]]` tables with the same fields), given as files or folders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::spec::Manifest;
use crate::model::{Definition, DefinitionKey, Problem, validate};

/// Everything the files currently say, valid or not.
#[derive(Debug, Default)]
pub struct Loaded {
    pub definitions: BTreeMap<DefinitionKey, Definition>,
    pub problems: Vec<Problem>,
    pub files: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    cluster_endpoints: Vec<Manifest>,
}

/// Reads every definition file under `paths`. Never fails as a whole: unreadable or unparsable
/// files become problems, and the first definition of a namespace/name wins over later ones.
pub fn load(paths: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    for path in paths {
        match definition_files(path) {
            Ok(files) => loaded.files.extend(files),
            Err(reason) => loaded.problems.push(file_problem(path, reason)),
        }
    }
    for file in loaded.files.clone() {
        match parse_file(&file) {
            Ok(manifests) => {
                for (index, manifest) in manifests.iter().enumerate() {
                    let origin = if manifests.len() > 1 {
                        format!("{} (document {})", file.display(), index + 1)
                    } else {
                        file.display().to_string()
                    };
                    admit(&mut loaded, manifest, &origin);
                }
            }
            Err(reason) => loaded.problems.push(file_problem(&file, reason)),
        }
    }
    loaded
}

fn admit(loaded: &mut Loaded, manifest: &Manifest, origin: &str) {
    let (definition, problems) = validate(manifest, origin);
    loaded.problems.extend(problems);
    let Some(definition) = definition else { return };
    if let Some(first) = loaded.definitions.get(&definition.key) {
        loaded.problems.push(Problem {
            origin: origin.to_string(),
            field: "metadata.name".into(),
            value: definition.key.to_string(),
            reason: format!(
                "already defined in {}; this definition is ignored",
                first.origin
            ),
        });
        return;
    }
    loaded
        .definitions
        .insert(definition.key.clone(), definition);
}

fn file_problem(path: &Path, reason: String) -> Problem {
    Problem {
        origin: path.display().to_string(),
        field: String::new(),
        value: String::new(),
        reason,
    }
}

/// A file as given, or the definition files directly inside a folder, sorted for determinism.
fn definition_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| format!("cannot list folder: {e}"))? {
        let entry = entry.map_err(|e| format!("cannot list folder: {e}"))?;
        let file = entry.path();
        // Editors and sync tools leave hidden temporaries beside the real files.
        let hidden = file
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if !hidden && is_definition_file(&file) && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

fn is_definition_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "toml")
    )
}

/// Parses one file into manifests; the error names the line where the file is malformed.
pub fn parse_file(path: &Path) -> Result<Vec<Manifest>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    if path.extension().and_then(|e| e.to_str()) == Some("toml") {
        parse_toml(&text)
    } else {
        parse_yaml(&text)
    }
}

pub fn parse_yaml(text: &str) -> Result<Vec<Manifest>, String> {
    // Empty documents (a trailing `---`, a comment-only file) are allowed and ignored.
    let docs: Vec<Option<Manifest>> =
        serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    Ok(docs.into_iter().flatten().collect())
}

pub fn parse_toml(text: &str) -> Result<Vec<Manifest>, String> {
    let file: TomlFile = toml::from_str(text).map_err(|e| e.to_string())?;
    Ok(file.cluster_endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_DOCS: &str = "\
apiVersion: sealos.io/v1beta1
kind: ClusterEndpoint
metadata: {name: a}
spec:
  ports:
    - {port: 80, hosts: [10.0.0.1], tcpSocket: {enable: true}}
---
apiVersion: sealos.io/v1beta1
kind: ClusterEndpoint
metadata: {name: b, namespace: db}
spec:
  ports:
    - {port: 5432, hosts: [10.0.0.2]}
---
";

    #[test]
    fn multi_document_yaml_yields_every_manifest() {
        let docs = parse_yaml(TWO_DOCS).unwrap();
        assert_eq!(
            docs.iter()
                .map(|d| d.metadata.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn yaml_errors_name_the_line() {
        let err =
            parse_yaml("metadata: {name: a}\nspec:\n  ports:\n    - port: eighty\n").unwrap_err();
        assert!(err.contains("line 4") || err.contains("4:"), "{err}");
    }

    #[test]
    fn misspelled_fields_are_rejected() {
        let err =
            parse_yaml("metadata: {name: a}\nspec:\n  perodSeconds: 3\n  ports: []\n").unwrap_err();
        assert!(err.contains("perodSeconds"), "{err}");
    }

    #[test]
    fn toml_carries_the_same_fields() {
        let docs = parse_toml(
            r#"
[[clusterEndpoints]]
metadata = { name = "a", namespace = "db" }
[clusterEndpoints.spec]
periodSeconds = 5
[[clusterEndpoints.spec.ports]]
name = "pg"
port = 5432
hosts = ["10.0.0.1"]
tcpSocket = { enable = true }
"#,
        )
        .unwrap();
        assert_eq!(docs[0].spec.period_seconds, Some(5));
        assert_eq!(docs[0].spec.ports[0].hosts, ["10.0.0.1"]);
    }

    #[test]
    fn the_first_definition_of_a_name_wins_and_the_second_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.yaml"), TWO_DOCS).unwrap();
        std::fs::write(dir.path().join("2.yml"), TWO_DOCS).unwrap();
        std::fs::write(dir.path().join("3.yaml"), "spec: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let loaded = load(&[dir.path().to_path_buf()]);
        assert_eq!(loaded.definitions.len(), 2);
        assert!(
            loaded
                .definitions
                .values()
                .all(|d| d.origin.contains("1.yaml"))
        );
        let origins: Vec<&str> = loaded.problems.iter().map(|p| p.origin.as_str()).collect();
        assert_eq!(origins.len(), 3, "{:?}", loaded.problems);
        assert!(origins[0].ends_with("2.yml (document 1)") && origins[2].ends_with("3.yaml"));
    }
}
