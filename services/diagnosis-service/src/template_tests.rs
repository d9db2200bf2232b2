use super::*;

fn vars() -> Vars {
    let mut v = Vars {
        error_info: "exit 137".into(),
        event_info: "pod OOMKilled".into(),
        log_info: "12: Killed".into(),
        ..Vars::default()
    };
    for (i, k) in MetaKey::ALL.into_iter().enumerate() {
        v.set(k, format!("{k}={i}"));
    }
    v
}

fn render(text: &str) -> String {
    Template::parse("t", text).unwrap().render(&vars())
}

fn error(text: &str) -> TemplateError {
    Template::parse("worker.tmpl", text).unwrap_err()
}

#[test]
fn plain_text_is_kept_as_is() {
    assert_eq!(render("no actions } { }}\n"), "no actions } { }}\n");
    assert_eq!(render(""), "");
}

#[test]
fn top_level_fields_render() {
    assert_eq!(
        render("E={{.ErrorInfo}} V={{ .EventInfo }} L={{.LogInfo}}"),
        "E=exit 137 V=pod OOMKilled L=12: Killed"
    );
}

#[test]
fn metadata_keys_render_by_field_and_by_index() {
    assert_eq!(
        render("{{.Metadata.JobName}}|{{ index .Metadata \"WorkerCreatedCount\" }}"),
        "JobName=0|WorkerCreatedCount=6"
    );
    assert_eq!(
        render("{{index .Metadata `MasterDiagnosis`}}"),
        "MasterDiagnosis=7"
    );
    for k in MetaKey::ALL {
        assert_eq!(render(&format!("{{{{.Metadata.{k}}}}}")), vars().meta(k));
        assert_eq!(
            render(&format!("{{{{ index .Metadata \"{k}\" }}}}")),
            vars().meta(k)
        );
    }
}

#[test]
fn trim_markers_eat_white_space_on_their_side() {
    assert_eq!(render("a  \n\t{{- .LogInfo }}  b"), "a12: Killed  b");
    assert_eq!(render("a {{ .LogInfo -}} \n\n b"), "a 12: Killedb");
    assert_eq!(render("a \n{{- .LogInfo -}}\n b"), "a12: Killedb");
    // Without the space, `{{-3}}` would be a number in Go: not a marker.
    assert!(Template::parse("t", "{{-.LogInfo}}").is_err());
    assert_eq!(render("x\n{{- /* a comment */ -}}\ny"), "xy");
}

#[test]
fn comments_render_nothing() {
    assert_eq!(render("a{{/* {{ not }} an action */}}b"), "ab");
    assert_eq!(render("a{{/* note */}}b"), "ab");
}

#[test]
fn an_aegis_prompt_renders() {
    let aegis = "任务名: {{ index .Metadata \"JobName\" }}\n\
                 Master: {{ index .Metadata \"MasterExpected\" }} / {{ index .Metadata \"MasterCreatedCount\" }}\n\
                 Worker: {{ index .Metadata \"WorkerExpected\" }} / {{ index .Metadata \"WorkerCreatedCount\" }}\n\
                 异常: --- {{.ErrorInfo}} ---\n";
    assert_eq!(
        render(aegis),
        "任务名: JobName=0\nMaster: MasterExpected=3 / MasterCreatedCount=4\n\
         Worker: WorkerExpected=5 / WorkerCreatedCount=6\n异常: --- exit 137 ---\n"
    );
}

#[test]
fn unknown_variables_and_keys_are_errors_with_their_position() {
    let e = error("line one\n  x {{ .Nope }}");
    assert_eq!((e.name.as_str(), e.line, e.column), ("worker.tmpl", 2, 5));
    assert!(e.message.contains("unknown variable `.Nope`"), "{e}");
    assert!(e
        .to_string()
        .starts_with("template `worker.tmpl` line 2 column 5: "));

    let e = error("{{.Metadata.PodName}}");
    assert!(e.message.contains("unknown .Metadata key `PodName`"), "{e}");
    assert!(e.message.contains("WorkerCreatedCount"), "{e}");
    let e = error("ü{{ index .Metadata \"jobname\" }}");
    assert_eq!(e.column, 2);
    assert!(e.message.contains("`jobname`"), "{e}");
    assert!(error("{{.Metadata}}").message.contains("needs a key"));
}

#[test]
fn bad_syntax_is_an_error_not_a_panic() {
    for (text, says) in [
        ("a {{ .LogInfo", "unclosed action"),
        ("{{}}", "empty action"),
        ("{{ }}", "empty action"),
        ("{{ if .LogInfo }}x{{ end }}", "`if` not supported"),
        ("{{ range .Metadata }}{{ end }}", "`range` not supported"),
        ("{{ .LogInfo | printf \"%s\" }}", "pipelines not supported"),
        ("{{ index .Metadata JobName }}", "must be a quoted string"),
        ("{{ index .Metadata \"JobName }}", "unterminated string"),
        ("{{ index .Spec \"JobName\" }}", "on .Metadata only"),
        ("{{ index .Metadata }}", "one quoted key"),
        ("{{ index .Metadata \"a\\q\" }}", "must be a quoted string"),
        ("{{/* open }}", "unclosed comment"),
        ("{{ LogInfo }}", "`LogInfo` not supported"),
        ("{{-}}", "not supported"),
        ("{{- -}}", "empty action"),
    ] {
        let e = error(text);
        assert!(e.message.contains(says), "{text}: {e}");
    }
}

#[test]
fn values_are_not_reinterpreted() {
    let mut v = vars();
    v.log_info = "{{.ErrorInfo}} <b>&".into();
    let t = Template::parse("t", "{{.LogInfo}}").unwrap();
    assert_eq!(t.render(&v), "{{.ErrorInfo}} <b>&");
}
