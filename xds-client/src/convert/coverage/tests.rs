//! The lists against Envoy's descriptors, and the generated table.

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};

use super::{Coverage, Status, all};

const DESCRIPTORS: &[u8] = include_bytes!("../../../../envoy-json/descriptors/envoy-v3.bin");

pub(super) fn pool() -> DescriptorPool {
    DescriptorPool::decode(DESCRIPTORS).expect("descriptor set")
}

fn kind_name(k: &Kind) -> String {
    match k {
        Kind::Message(m) => m.full_name().to_string(),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A development aid: `FERRY_FIELDS=envoy.config.route.v3.Route cargo test
/// -p ferry-xds coverage::tests::skeleton -- --nocapture` prints a list to
/// start classifying a message from.
#[test]
fn skeleton() {
    let Ok(names) = std::env::var("FERRY_FIELDS") else {
        return;
    };
    let pool = pool();
    for name in names.split(',') {
        let Some(m) = pool.get_message_by_name(name) else {
            println!("// unknown message {name}");
            continue;
        };
        println!("fields!(pub(super) static X = \"{name}\" {{");
        for f in m.fields() {
            let oneof = f
                .containing_oneof()
                .map(|o| format!(" oneof {}", o.name()))
                .unwrap_or_default();
            let dep = if f
                .field_descriptor_proto()
                .options
                .as_ref()
                .and_then(|o| o.deprecated)
                == Some(true)
            {
                " deprecated"
            } else {
                ""
            };
            let list = if f.is_list() {
                "repeated "
            } else if f.is_map() {
                "map "
            } else {
                ""
            };
            println!(
                "    \"{}\": applied \"\", // {list}{}{oneof}{dep}",
                f.name(),
                kind_name(&f.kind())
            );
        }
        println!("}});");
    }
}

fn descriptor(pool: &DescriptorPool, c: &Coverage) -> MessageDescriptor {
    pool.get_message_by_name(c.message)
        .unwrap_or_else(|| panic!("{} is not in Envoy's descriptors", c.message))
}

/// Each list names every field of its message, once, and nothing else.
#[test]
fn lists_match_the_descriptors() {
    let pool = pool();
    let mut problems = Vec::new();
    for c in all() {
        let d = descriptor(&pool, c);
        let want: Vec<String> = d.fields().map(|f| f.name().to_string()).collect();
        for f in c.fields {
            if !want.iter().any(|w| w == f.name) {
                problems.push(format!(
                    "{} ({}): no field {:?}",
                    c.message, c.module, f.name
                ));
            }
            if c.fields.iter().filter(|g| g.name == f.name).count() > 1 {
                problems.push(format!("{}: {:?} listed twice", c.message, f.name));
            }
            if matches!(f.status, Status::Refused | Status::Warned | Status::Inert)
                && f.note.is_empty()
            {
                problems.push(format!(
                    "{}.{}: a {} field needs a note",
                    c.message,
                    f.name,
                    f.status.name()
                ));
            }
        }
        for w in &want {
            if c.field(w).is_none() {
                problems.push(format!(
                    "{} ({}): field {w:?} is not classified",
                    c.message, c.module
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The generated table: every classified message, field by field.
fn markdown() -> String {
    let pool = pool();
    let lists = all();
    let mut out = String::new();
    out.push_str(
        "# Envoy configuration coverage\n\n\
         Generated from the classification lists beside each converter in \
         `xds-client/src/convert/` (the `fields!` declarations): do not edit by hand. \
         Regenerate with `FERRY_UPDATE_DOCS=1 cargo test -p ferry-xds --lib coverage`; \
         the same test fails when this file is out of date. Each list is checked against \
         Envoy's descriptors (every field of the message, no other), and each converter \
         destructures its message field by field, so a field the protos add fails the build \
         until it is classified.\n\n\
         | status | meaning |\n|---|---|\n\
         | applied | read and enforced as Envoy does (the note says which values are refused) |\n\
         | refused | set to anything but its default, it is an error naming the resource and field: exit 1 for a bootstrap, a NACK over xDS |\n\
         | warned | a tuning knob that changes no decision: accepted with a warning saying it is not applied |\n\
         | inert | changes nothing in Envoy either (names, metadata no filter of Ferry's reads, settings of refused or absent features) |\n\n",
    );
    out.push_str("## Messages\n\n| message | where | applied | refused | warned | inert |\n|---|---|---|---|---|---|\n");
    for c in &lists {
        let n = |s: Status| c.fields.iter().filter(|f| f.status == s).count();
        out.push_str(&format!(
            "| [`{}`](#{}){} | `{}` | {} | {} | {} | {} |\n",
            short(c.message),
            anchor(c),
            context(c),
            c.module.trim_start_matches("ferry_xds::"),
            n(Status::Applied),
            n(Status::Refused),
            n(Status::Warned),
            n(Status::Inert),
        ));
    }
    for c in &lists {
        let d = descriptor(&pool, c);
        out.push_str(&format!(
            "\n## {}{}\n\nConverted in `{}`.\n\n| field | status | note |\n|---|---|---|\n",
            c.message,
            context(c),
            c.module.trim_start_matches("ferry_xds::"),
        ));
        // Fields in the proto's order.
        for fd in d.fields() {
            if let Some(f) = c.field(fd.name()) {
                out.push_str(&format!(
                    "| `{}` | {} | {} |\n",
                    f.name,
                    f.status.name(),
                    f.note.replace('|', "\\|")
                ));
            }
        }
    }
    out
}

/// `envoy.config.route.v3.RouteAction.RequestMirrorPolicy` → `RouteAction.RequestMirrorPolicy`.
fn short(message: &str) -> &str {
    let mut at = 0;
    for part in message.split('.') {
        if part.starts_with(|c: char| c.is_ascii_uppercase()) {
            return &message[at..];
        }
        at += part.len() + 1;
    }
    message
}

fn context(c: &Coverage) -> String {
    if c.context.is_empty() {
        String::new()
    } else {
        format!(" ({})", c.context)
    }
}

/// GitHub's anchor for the section heading `{message}{context}`.
fn anchor(c: &Coverage) -> String {
    format!("{}{}", c.message, context(c))
        .to_lowercase()
        .chars()
        .filter_map(|ch| match ch {
            'a'..='z' | '0'..='9' | '_' | '-' => Some(ch),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

/// The tuning knobs accepted with a warning, for `docs/configuration.md`.
fn knobs() -> String {
    let mut out = String::from("| field | why it is only warned about |\n|---|---|\n");
    for c in all() {
        for f in c.fields.iter().filter(|f| f.status == Status::Warned) {
            out.push_str(&format!(
                "| `{}.{}`{} | {} |\n",
                short(c.message),
                f.name,
                context(c),
                f.note.replace('|', "\\|")
            ));
        }
    }
    out
}

const KNOBS_BEGIN: &str =
    "<!-- tuning knobs: generated by `cargo test -p ferry-xds --lib coverage` -->\n";
const KNOBS_END: &str = "<!-- end of tuning knobs -->";

/// `docs/config-coverage.md` and the tuning-knob table of `docs/configuration.md` are
/// what the code says; `FERRY_UPDATE_DOCS=1` rewrites them.
#[test]
fn generated_docs_are_current() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = root.join("docs/config-coverage.md");
    let readme = root.join("docs/configuration.md");
    let want_doc = markdown();
    let readme_text = std::fs::read_to_string(&readme).expect("docs/configuration.md");
    let (Some(b), Some(e)) = (readme_text.find(KNOBS_BEGIN), readme_text.find(KNOBS_END)) else {
        panic!(
            "docs/configuration.md lacks the tuning-knob markers {KNOBS_BEGIN:?} … {KNOBS_END:?}"
        );
    };
    let want_readme = format!(
        "{}{KNOBS_BEGIN}{}{}",
        &readme_text[..b],
        knobs(),
        &readme_text[e..]
    );
    if std::env::var_os("FERRY_UPDATE_DOCS").is_some() {
        std::fs::create_dir_all(doc.parent().expect("docs dir")).expect("docs dir");
        std::fs::write(&doc, &want_doc).expect("write docs/config-coverage.md");
        std::fs::write(&readme, &want_readme).expect("write docs/configuration.md");
        return;
    }
    let have = std::fs::read_to_string(&doc).unwrap_or_default();
    assert!(
        have == want_doc,
        "docs/config-coverage.md is out of date: FERRY_UPDATE_DOCS=1 cargo test -p ferry-xds --lib coverage"
    );
    assert!(
        readme_text == want_readme,
        "docs/configuration.md's tuning-knob table is out of date: FERRY_UPDATE_DOCS=1 cargo test -p ferry-xds --lib coverage"
    );
}
