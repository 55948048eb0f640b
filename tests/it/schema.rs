//! The JSON Schema of the config (`turbosched config-schema`, shipped as
//! `config/scheduler.schema.json` and named by the shipped config's `#:schema` line) is
//! what editors check a config with: it must accept the shipped file and every key the
//! reference documents, and refuse what validation refuses alone.

use std::path::Path;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn printed_schema() -> Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_turbosched"))
        .arg("config-schema")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("config-schema prints JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&printed_schema()).expect("a valid draft-07 schema")
}

/// A TOML document as the JSON an editor checks against the schema.
fn as_json(toml_text: &str) -> Value {
    let value: toml::Table = toml::from_str(toml_text).expect("TOML");
    serde_json::to_value(value).unwrap()
}

fn errors(validator: &jsonschema::Validator, toml_text: &str) -> Vec<String> {
    validator
        .iter_errors(&as_json(toml_text))
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn the_shipped_schema_is_what_config_schema_prints() {
    let shipped = std::fs::read_to_string(root().join("config/scheduler.schema.json")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_turbosched"))
        .arg("config-schema")
        .output()
        .unwrap();
    assert!(
        shipped == String::from_utf8_lossy(&output.stdout),
        "config/scheduler.schema.json is stale: run `turbosched config-schema > config/scheduler.schema.json`"
    );
}

#[test]
fn the_shipped_config_names_the_schema_and_passes_it() {
    let text = std::fs::read_to_string(root().join("config/scheduler.toml")).unwrap();
    assert_eq!(
        text.lines().next(),
        Some("#:schema ./scheduler.schema.json"),
        "Taplo reads the directive from the first line"
    );
    let validator = validator();
    assert_eq!(errors(&validator, &text), Vec::<String>::new());
}

/// The reference's tables, as (section, key): `[scheduler]`, `[api]`, `[logging]`, and
/// the task keys of `[defaults]` and `[tasks.<name>]`.
fn documented_keys() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("README_SCHEDULE.md")).unwrap();
    let reference = text
        .split("## Configuration reference")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let mut keys = Vec::new();
    for part in reference.split("\n### ").skip(1) {
        let section = part.split('`').nth(1).unwrap_or_default().to_string();
        for line in part.lines().filter(|l| l.starts_with("| `")) {
            let key = line.split('`').nth(1).unwrap().to_string();
            keys.push((section.clone(), key));
        }
    }
    keys
}

#[test]
fn every_key_the_reference_documents_is_in_the_schema() {
    let schema = printed_schema();
    let documented = documented_keys();
    let sections: Vec<&str> = documented.iter().map(|(s, _)| s.as_str()).collect();
    for section in ["[scheduler]", "[api]", "[logging]", "[defaults]"] {
        assert!(sections.contains(&section), "no table read for {section}");
    }
    assert!(documented.len() >= 30, "{documented:?}");
    for (section, key) in &documented {
        let properties = if section.starts_with("[defaults]") {
            &schema["definitions"]["task"]["properties"]
        } else if section.starts_with("[calendars.") {
            &schema["properties"]["calendars"]["additionalProperties"]["properties"]
        } else if section == "[[alerts]]" {
            &schema["properties"]["alerts"]["items"]["properties"]
        } else if section == "[pools.<name>]" {
            &schema["properties"]["pools"]["additionalProperties"]["properties"]
        } else {
            let name = section.trim_matches(|c| c == '[' || c == ']');
            &schema["properties"][name]["properties"]
        };
        let property = &properties[key.as_str()];
        assert!(
            property.is_object(),
            "{section} `{key}` is not in the schema"
        );
        assert!(
            property["description"].is_string(),
            "{section} `{key}` has no description"
        );
    }
    // retry_backoff's own keys, written in its row.
    let backoff = &schema["definitions"]["task"]["properties"]["retry_backoff"]["properties"];
    for key in ["initial", "factor", "max", "jitter"] {
        assert!(backoff[key].is_object(), "retry_backoff.{key}");
    }
    // Each documented default validates against its own key's schema (a row and the
    // schema that disagree on a default disagree on the key).
    let validator = validator();
    for (section, key) in documented
        .iter()
        .filter(|(s, _)| matches!(s.as_str(), "[scheduler]" | "[api]" | "[logging]"))
    {
        let text = std::fs::read_to_string(root().join("README_SCHEDULE.md")).unwrap();
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}` |")))
            .unwrap();
        let default = row.split('|').nth(2).unwrap().trim().trim_matches('`');
        let doc = format!("{section}\n{key} = {default}\n");
        assert_eq!(errors(&validator, &doc), Vec::<String>::new(), "{doc}");
    }
}

/// Each document is refused by the schema, as by `turbosched validate`.
#[test]
fn the_schema_refuses_unknown_keys_and_wrong_types_as_validation_does() {
    let validator = validator();
    let task = "[tasks.a]\nhandler = \"ping\"\n";
    let cases = [
        ("an unknown task key", format!("{task}timout = \"10s\"\n")),
        (
            "an unknown section",
            format!("[schedular]\nmax_workers = 2\n{task}"),
        ),
        (
            "an unknown scheduler key",
            format!("[scheduler]\nworkers = 2\n{task}"),
        ),
        (
            "a string for a number",
            format!("[scheduler]\nmax_workers = \"four\"\n{task}"),
        ),
        (
            "a number below its minimum",
            format!("[scheduler]\nmax_workers = 0\n{task}"),
        ),
        ("a number for a duration", format!("{task}timeout = 10\n")),
        (
            "a word for a duration",
            format!("{task}timeout = \"soon\"\n"),
        ),
        (
            "a word not in the list",
            format!("{task}misfire = \"sometimes\"\n"),
        ),
        (
            "an unknown time zone",
            format!("{task}timezone = \"Mars/Olympus\"\n"),
        ),
        (
            "an unknown handler",
            "[tasks.a]\nhandler = \"trian\"\n".to_string(),
        ),
        (
            "a param the handler does not read",
            format!("{task}params = {{ sleep_secs = 1 }}\n"),
        ),
        (
            "a factor out of range",
            format!("{task}retry_backoff = {{ factor = 0.5 }}\n"),
        ),
        (
            "an unknown backoff key",
            format!("{task}retry_backoff = {{ jiter = true }}\n"),
        ),
        (
            "a task name with a space",
            "[tasks.\"a b\"]\nhandler = \"ping\"\n".to_string(),
        ),
        (
            "a size too small",
            format!("[logging]\nmax_size = 10\n{task}"),
        ),
    ];
    for (what, doc) in &cases {
        assert!(
            !errors(&validator, doc).is_empty(),
            "the schema accepts {what}:\n{doc}"
        );
        assert!(
            turbosched::config::parse(doc, Path::new("case.toml")).is_err(),
            "validation accepts {what}:\n{doc}"
        );
    }
    // And what validation accepts, the schema does too.
    let good = format!(
        "{task}params = {{ sleep_sec = 0.5 }}\ntimeout = \"1h 30m\"\nretry_backoff = {{ factor = 3 }}\n[tasks.b]\ncommand = \"echo hi\"\nshell = true\nenv = {{ A = \"1\" }}\ndepends_on = [\"a\"]\n[logging]\nmax_size = 2048\n"
    );
    turbosched::config::parse(&good, Path::new("good.toml")).unwrap();
    assert_eq!(errors(&validator, &good), Vec::<String>::new());
}
