//! Definition files: `*.yaml` / `*.yml` (multi-document `ClusterEndpoint` manifests) and `*.toml`
//! (`[[clusterEndpoints]]` tables with the same fields), given as files or folders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::spec::Manifest;
use crate::model::{Definition, DefinitionKey, KIND, Problem, Unusable, validate};

/// Everything the files currently say, valid or not.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub definitions: BTreeMap<DefinitionKey, Definition>,
    pub problems: Vec<Problem>,
    pub files: Vec<PathBuf>,
    /// Services named by files that cannot be used and have no last good version.
    pub unusable: Unusable,
    /// The definitions of each file as of its last version without problems.
    last_good: BTreeMap<PathBuf, Vec<Definition>>,
}

/// A TOML definition file; entries are converted one by one so a bad one stands alone.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    cluster_endpoints: Vec<toml::Value>,
}

/// Reads every definition file under `paths`. Never fails as a whole: unreadable or unparsable
/// files become problems, and the first definition of a namespace/name wins over later ones.
pub fn load(paths: &[PathBuf]) -> Loaded {
    reload(paths, &Loaded::default())
}

/// Like [`load`], but a file that now has problems keeps the definitions of its last version
/// without problems in force (a half-edited file never withdraws endpoints); a file that is
/// gone takes its definitions with it.
pub fn reload(paths: &[PathBuf], previous: &Loaded) -> Loaded {
    let mut loaded = Loaded::default();
    for path in paths {
        match definition_files(path) {
            Ok(files) => loaded.files.extend(files),
            Err(reason) => {
                // A folder that cannot be read may hold any definition.
                loaded.unusable.any = true;
                loaded.problems.push(file_problem(path, reason));
            }
        }
    }
    for file in loaded.files.clone() {
        let FileContent {
            definitions,
            mut problems,
            unusable,
        } = read_file(&file);
        let in_force = if problems.is_empty() {
            loaded.last_good.insert(file.clone(), definitions.clone());
            definitions
        } else if let Some(good) = previous.last_good.get(&file) {
            let reason = "this file has problems; its last version without problems stays in force"
                .to_string();
            problems.push(file_problem(&file, reason));
            loaded.last_good.insert(file.clone(), good.clone());
            good.clone()
        } else {
            loaded.unusable.merge(unusable);
            definitions
        };
        loaded.problems.extend(problems);
        for definition in in_force {
            admit(&mut loaded, definition);
        }
    }
    loaded
}

/// What one file says: its valid definitions, every problem, and the Services it names
/// without a usable definition.
struct FileContent {
    definitions: Vec<Definition>,
    problems: Vec<Problem>,
    unusable: Unusable,
}

fn read_file(file: &Path) -> FileContent {
    let mut content = FileContent {
        definitions: Vec::new(),
        problems: Vec::new(),
        unusable: Unusable::default(),
    };
    for document in parse_file(file) {
        let definition = match document.manifest {
            Ok(manifest) => {
                let (definition, found) = validate(&manifest, &document.origin);
                content.problems.extend(found);
                definition
            }
            Err(unreadable) => {
                content.problems.push(Problem {
                    origin: document.origin,
                    field: unreadable.field,
                    value: unreadable.value,
                    reason: unreadable.reason,
                });
                None
            }
        };
        match (definition, document.names) {
            (Some(definition), _) => content.definitions.push(definition),
            (None, Names::Service(key)) => {
                content.unusable.keys.insert(key);
            }
            (None, Names::Unknown) => content.unusable.any = true,
            (None, Names::NotOurs) => {}
        }
    }
    content
}

fn admit(loaded: &mut Loaded, definition: Definition) {
    if let Some(first) = loaded.definitions.get(&definition.key) {
        loaded.problems.push(Problem {
            origin: definition.origin.clone(),
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
        // Not `is_file`: a dangling link (a mount gone) must show as unreadable, not vanish.
        if !hidden && is_definition_file(&file) && !file.is_dir() {
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

/// One document of a definition file: where it is, and its manifest or why it has none.
pub struct Document {
    pub origin: String,
    pub manifest: Result<Manifest, Unreadable>,
    /// Which Service a document without a usable manifest is about, as far as can be told.
    pub names: Names,
}

/// Why a document has no manifest: the field (a path such as `spec.ports[0].port`, when the
/// document parsed but a field has the wrong type), the value found there, and the reason.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unreadable {
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl From<String> for Unreadable {
    fn from(reason: String) -> Self {
        Unreadable {
            reason,
            ..Unreadable::default()
        }
    }
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{} = {:?}: {}", self.field, self.value, self.reason)
        }
    }
}

/// A manifest from a parsed document. Going through a generic value first lets a type error
/// name its field and the value there, which the parsers' own errors do not.
fn manifest_from<'de, D>(document: D) -> Result<Manifest, Unreadable>
where
    D: serde::Deserializer<'de>,
{
    let value =
        serde_json::Value::deserialize(document).map_err(|e| Unreadable::from(e.to_string()))?;
    serde_path_to_error::deserialize::<_, Manifest>(&value).map_err(|e| {
        let field = e.path().to_string();
        let found = (e.path().iter()).try_fold(&value, |v, segment| match segment {
            serde_path_to_error::Segment::Seq { index } => v.get(index),
            serde_path_to_error::Segment::Map { key } => v.get(key),
            _ => None,
        });
        Unreadable {
            value: match found {
                Some(serde_json::Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            },
            field: if field == "." { String::new() } else { field },
            reason: e.into_inner().to_string(),
        }
    })
}

/// The Service a document names, read leniently so that a broken manifest still says it.
#[derive(Debug, Clone, PartialEq)]
pub enum Names {
    Service(DefinitionKey),
    /// Not a `ClusterEndpoint` (another kind, or an empty document).
    NotOurs,
    /// Too broken to tell: it may be any Service.
    Unknown,
}

/// Only the fields that say what a document is and which Service it names.
#[derive(Deserialize)]
struct Head {
    kind: Option<String>,
    metadata: Option<HeadMetadata>,
}

#[derive(Deserialize)]
struct HeadMetadata {
    name: Option<String>,
    namespace: Option<String>,
}

impl Names {
    fn of(head: Option<Head>) -> Names {
        let Some(head) = head else {
            return Names::Unknown;
        };
        let foreign = head.kind.as_deref().is_some_and(|k| k != KIND);
        match head.metadata {
            Some(HeadMetadata {
                name: Some(name),
                namespace,
            }) => Names::Service(DefinitionKey {
                // Another kind may be a misspelt ClusterEndpoint: the Service it names is held.
                namespace: namespace.unwrap_or_else(|| "default".into()),
                name,
            }),
            _ if foreign => Names::NotOurs,
            _ => Names::Unknown,
        }
    }
}

/// Parses one file into documents. Each document stands alone: a broken one is reported and
/// the others still load. An unreadable file or a TOML syntax error is one failed document.
pub fn parse_file(path: &Path) -> Vec<Document> {
    let name = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            return vec![Document {
                origin: name,
                manifest: Err(format!("cannot read: {e}").into()),
                names: Names::Unknown,
            }];
        }
    };
    if path.extension().and_then(|e| e.to_str()) == Some("toml") {
        parse_toml(&name, &text)
    } else {
        parse_yaml(&name, &text)
    }
}

pub fn parse_yaml(file: &str, text: &str) -> Vec<Document> {
    let documents = split_yaml(text);
    let numbered = documents.len() > 1;
    let mut out = Vec::new();
    for (index, (line, doc)) in documents.into_iter().enumerate() {
        let origin = if numbered {
            format!("{file} (document {}, line {line})", index + 1)
        } else {
            file.to_string()
        };
        // Empty documents (a trailing `---`, a comment-only file) are allowed and ignored.
        let head = match serde_saphyr::from_str::<Option<Head>>(&doc) {
            Ok(None) => continue,
            Ok(Some(head)) => Some(head),
            Err(_) => None,
        };
        let foreign = head
            .as_ref()
            .and_then(|h| h.kind.clone())
            .filter(|k| k != KIND);
        let names = Names::of(head);
        let manifest = match foreign {
            Some(kind) => Err(format!(
                "kind {kind:?} is not {KIND}; only ClusterEndpoint documents belong here"
            )
            .into()),
            None => match serde_saphyr::from_str::<serde_json::Value>(&doc) {
                Ok(value) => manifest_from(value).map_err(|mut unreadable| {
                    // The YAML parser knows the line, the path-aware one the field: say both.
                    let direct = serde_saphyr::from_str::<Manifest>(&doc).err();
                    let line = direct.map(|e| yaml_error(&e)).and_then(|text| {
                        let at = text.split(':').next().filter(|at| at.starts_with("line "));
                        at.map(str::to_string)
                    });
                    if let Some(line) = line {
                        unreadable.reason = format!("{} ({line})", unreadable.reason);
                    }
                    unreadable
                }),
                Err(e) => Err(yaml_error(&e).into()),
            },
        };
        out.push(Document {
            origin,
            manifest,
            names,
        });
    }
    out
}

/// Splits at `---` lines, keeping line numbers: each document is preceded by as many empty
/// lines as came before it, so parser errors name lines of the whole file. Returns the
/// 1-based first line of each document with its text.
fn split_yaml(text: &str) -> Vec<(usize, String)> {
    let mut documents = Vec::new();
    let mut current = String::new();
    let mut first_line = 1;
    for (i, line) in text.lines().enumerate() {
        let marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if marker {
            if !current.trim().is_empty() {
                documents.push((first_line, std::mem::take(&mut current)));
            }
            // Content may follow the marker on the same line (`--- {a: 1}`).
            current = "\n".repeat(i);
            current.push_str(&line[3..]);
            current.push('\n');
            first_line = i + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if !current.trim().is_empty() {
        documents.push((first_line, current));
    }
    documents
}

/// The parser's first line says what and where; the snippet under it is left out so the
/// message fits one line in logs and the status API.
fn yaml_error(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

pub fn parse_toml(file: &str, text: &str) -> Vec<Document> {
    let table: TomlFile = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            return vec![Document {
                origin: file.to_string(),
                manifest: Err(e.to_string().trim().to_string().into()),
                names: Names::Unknown,
            }];
        }
    };
    let numbered = table.cluster_endpoints.len() > 1;
    table
        .cluster_endpoints
        .into_iter()
        .enumerate()
        .map(|(index, value)| Document {
            origin: if numbered {
                format!("{file} (clusterEndpoints[{index}])")
            } else {
                file.to_string()
            },
            names: Names::of(Head::deserialize(value.clone()).ok()),
            manifest: manifest_from(value),
        })
        .collect()
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

    fn manifests(docs: &[Document]) -> Vec<&str> {
        docs.iter()
            .filter_map(|d| d.manifest.as_ref().ok())
            .map(|m| m.metadata.name.as_str())
            .collect()
    }

    fn errors(docs: &[Document]) -> Vec<String> {
        docs.iter()
            .filter_map(|d| {
                d.manifest
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", d.origin))
            })
            .collect()
    }

    #[test]
    fn multi_document_yaml_yields_every_manifest() {
        let docs = parse_yaml("f.yaml", TWO_DOCS);
        assert_eq!(manifests(&docs), ["a", "b"]);
        assert_eq!(docs[1].origin, "f.yaml (document 2, line 8)");
    }

    #[test]
    fn a_broken_document_is_reported_with_its_file_line_and_the_others_still_load() {
        let text = format!(
            "{TWO_DOCS}metadata: {{name: c}}\nspec:\n  ports:\n    - port: eighty\n---\n{TWO_DOCS}"
        );
        let docs = parse_yaml("f.yaml", &text);
        assert_eq!(manifests(&docs), ["a", "b", "a", "b"]);
        let errors = errors(&docs);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0],
            "f.yaml (document 3, line 15): spec.ports[0].port = \"eighty\": invalid type: string \"eighty\", expected i64 (line 18 column 13)",
        );
    }

    #[test]
    fn misspelled_fields_are_rejected_by_name() {
        let docs = parse_yaml(
            "f.yaml",
            "metadata: {name: a, lables: {}}\nspec:\n  perodSeconds: 3\n  ports: []\n",
        );
        let errors = errors(&docs);
        assert!(errors[0].contains("lables"), "{errors:?}");
        let docs = parse_yaml(
            "f.yaml",
            "metadata: {name: a}\nspec:\n  perodSeconds: 3\n  ports: []\n",
        );
        assert!(errors_contain(&docs, "perodSeconds"));
    }

    fn errors_contain(docs: &[Document], needle: &str) -> bool {
        errors(docs).iter().any(|e| e.contains(needle))
    }

    #[test]
    fn objects_exported_from_a_cluster_load_and_other_kinds_are_named() {
        let exported = "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\nmetadata:\n  name: a\n  uid: 123\n  resourceVersion: \"9\"\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\n  generation: 2\n  finalizers: [sealos.io/cluster-endpoints.finalizers]\nspec:\n  ports: [{port: 80}]\nstatus:\n  phase: Healthy\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n";
        let docs = parse_yaml("f.yaml", exported);
        assert_eq!(manifests(&docs), ["a"]);
        assert!(
            errors_contain(&docs, "kind \"ConfigMap\" is not ClusterEndpoint"),
            "{:?}",
            errors(&docs)
        );
    }

    #[test]
    fn empty_and_comment_only_documents_are_ignored() {
        assert!(parse_yaml("f.yaml", "").is_empty());
        assert!(parse_yaml("f.yaml", "# nothing\n---\n---\n").is_empty());
    }

    #[test]
    fn files_with_unusable_definitions_name_the_services_they_hold() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("syntax.yaml", "metadata: {name: a\nspec: [");
        write(
            "invalid.yaml",
            "kind: ClusterEndpoint\nmetadata: {name: b, namespace: db}\nspec: {clusterIP: bogus}\n",
        );
        // Another kind may be a misspelt ClusterEndpoint: what it names is held, no more.
        write(
            "other-kind.yaml",
            "kind: ClusterEndpiont\nmetadata: {name: c}\n",
        );
        write("nameless.yaml", "kind: ConfigMap\ndata: {x: y}\n");
        let loaded = load(&[dir.path().to_path_buf()]);
        assert!(
            loaded.unusable.any,
            "a file that does not parse may name any Service"
        );
        let b = DefinitionKey {
            namespace: "db".into(),
            name: "b".into(),
        };
        let c = DefinitionKey {
            namespace: "default".into(),
            name: "c".into(),
        };
        assert_eq!(loaded.unusable.keys.iter().collect::<Vec<_>>(), [&b, &c]);

        std::fs::remove_file(dir.path().join("syntax.yaml")).unwrap();
        let loaded = load(&[dir.path().to_path_buf()]);
        assert!(
            !loaded.unusable.any,
            "a nameless other kind is not ours: {loaded:?}"
        );
        assert!(loaded.unusable.holds(&b, true) && loaded.unusable.holds(&c, false));

        // A dangling link (a mount that went away) is unreadable, not gone.
        std::os::unix::fs::symlink(
            dir.path().join("gone/web.yaml"),
            dir.path().join("web.yaml"),
        )
        .unwrap();
        let loaded = load(&[dir.path().to_path_buf()]);
        assert!(loaded.unusable.any, "{loaded:?}");
        assert!(
            loaded
                .problems
                .iter()
                .any(|p| p.origin.ends_with("web.yaml"))
        );
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();

        // Once a version is in force, a broken edit keeps it: nothing is unusable.
        write(
            "invalid.yaml",
            "metadata: {name: b, namespace: db}\nspec: {ports: [{port: 80}]}\n",
        );
        let good = load(&[dir.path().to_path_buf()]);
        write(
            "invalid.yaml",
            "metadata: {name: b, namespace: db}\nspec: {clusterIP: bogus}\n",
        );
        let kept = reload(&[dir.path().to_path_buf()], &good);
        assert!(kept.definitions.contains_key(&b));
        assert!(!kept.unusable.holds(&b, true));
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_version_and_a_deleted_file_takes_its_definitions() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().to_path_buf()];
        std::fs::write(dir.path().join("a.yaml"), TWO_DOCS).unwrap();
        std::fs::write(
            dir.path().join("c.yaml"),
            "metadata: {name: c}\nspec:\n  ports: [{port: 1}]\n",
        )
        .unwrap();
        let first = load(&paths);
        assert_eq!(first.definitions.len(), 3);
        // Half-edited: a.yaml breaks; its two definitions stay, and the problem is reported.
        std::fs::write(
            dir.path().join("a.yaml"),
            TWO_DOCS.replace("port: 80", "port: eighty"),
        )
        .unwrap();
        let second = reload(&paths, &first);
        assert_eq!(second.definitions.len(), 3, "{:?}", second.problems);
        assert!(second.problems.iter().any(|p| {
            p.reason
                .contains("last version without problems stays in force")
        }));
        // Fixed with a change: the new version takes over.
        std::fs::write(
            dir.path().join("a.yaml"),
            TWO_DOCS.replace("port: 80", "port: 81"),
        )
        .unwrap();
        let third = reload(&paths, &second);
        assert!(third.problems.is_empty(), "{:?}", third.problems);
        let a = &third.definitions[&DefinitionKey {
            namespace: "default".into(),
            name: "a".into(),
        }];
        assert_eq!(a.ports[0].port, 81);
        std::fs::remove_file(dir.path().join("c.yaml")).unwrap();
        assert_eq!(reload(&paths, &third).definitions.len(), 2);
    }

    #[test]
    fn toml_carries_the_same_fields_and_a_bad_entry_stands_alone() {
        let docs = parse_toml(
            "f.toml",
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

[[clusterEndpoints]]
metadata = { name = "b" }
spec = { ports = [{ port = "eighty" }] }
"#,
        );
        let a = docs[0].manifest.as_ref().unwrap();
        assert_eq!(a.spec.period_seconds, Some(5));
        assert_eq!(a.spec.ports[0].hosts, ["10.0.0.1"]);
        assert!(
            errors(&docs)[0].starts_with("f.toml (clusterEndpoints[1])"),
            "{:?}",
            errors(&docs)
        );
    }

    #[test]
    fn the_first_definition_of_a_name_wins_and_the_second_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.yaml"), TWO_DOCS).unwrap();
        std::fs::write(dir.path().join("2.yml"), TWO_DOCS).unwrap();
        std::fs::write(dir.path().join("3.yaml"), "metadata: [").unwrap();
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
        assert!(
            origins[0].ends_with("2.yml (document 1, line 1)") && origins[2].ends_with("3.yaml"),
            "{origins:?}"
        );
    }
}
