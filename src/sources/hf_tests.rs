use super::*;

fn listing(paths: &[&str]) -> Vec<TreeEntry> {
    paths
        .iter()
        .map(|p| TreeEntry {
            kind: "file".into(),
            path: p.to_string(),
            size: 100,
            lfs: Some(Lfs {
                oid: format!("{:0>64}", p.len()),
                size: 1000,
            }),
        })
        .collect()
}

fn paths(c: &Chosen) -> Vec<&str> {
    c.files.iter().map(|f| f.path.as_str()).collect()
}

#[test]
fn references_parse_in_every_documented_form() {
    let hub = |repo: &str, quant: Option<&str>, file: Option<&str>| PullRef::Hub {
        repo: repo.into(),
        quant: quant.map(Into::into),
        file: file.map(Into::into),
    };
    assert_eq!(
        parse("hf.co/u/r-GGUF:Q8_0").unwrap(),
        hub("u/r-GGUF", Some("Q8_0"), None)
    );
    assert_eq!(parse("hf.co/u/r").unwrap(), hub("u/r", None, None));
    assert_eq!(
        parse("https://huggingface.co/u/r/sub/f.gguf").unwrap(),
        hub("u/r", None, Some("sub/f.gguf"))
    );
    assert_eq!(
        parse("https://example.org/m/f.gguf").unwrap(),
        PullRef::Url {
            url: "https://example.org/m/f.gguf".into()
        }
    );
}

#[test]
fn bad_references_say_what_is_wrong() {
    for bad in [
        "llama3",
        "hf.co/u",
        "hf.co/u/r:",
        "hf.co/u/r:Q4/x.gguf",
        "ftp://x/y.gguf",
    ] {
        assert!(matches!(parse(bad), Err(RefError::Form(_))), "{bad}");
    }
    assert!(matches!(parse("hf.co/../r"), Err(RefError::Name(_))));
    assert!(matches!(
        parse("hf.co/u/r/x.bin"),
        Err(RefError::NotGguf(_))
    ));
    assert!(matches!(
        parse("https://x.org/a.bin"),
        Err(RefError::NotGguf(_))
    ));
    assert!(matches!(
        parse("hf.co/u/r/../x.gguf"),
        Err(RefError::Form(_))
    ));
    let msg = parse("llama3").unwrap_err().to_string();
    assert!(msg.contains("hf.co/USER/REPO[:QUANT]"), "{msg}");
}

#[test]
fn a_quant_is_a_whole_token() {
    assert!(has_token("model-Q4_K_M.gguf", "q4_k_m"));
    assert!(!has_token("model-Q4_K_M.gguf", "Q4_K"));
    assert!(!has_token("model-IQ4_XS.gguf", "Q4_XS"));
    assert!(has_token("model.Q8_0.gguf", "Q8_0"));
    assert!(!has_token("model-Q8_0.gguf", ""));
}

#[test]
fn without_a_quant_q4_k_m_is_preferred_and_a_lone_model_taken() {
    let l = listing(&[
        "m-Q8_0.gguf",
        "m-Q4_K_M.gguf",
        "README.md",
        "mmproj-m-F16.gguf",
    ]);
    let c = choose(&l, None, None).unwrap();
    assert_eq!(paths(&c), ["m-Q4_K_M.gguf"]);
    assert_eq!(c.mmproj.as_ref().unwrap().path, "mmproj-m-F16.gguf");
    assert_eq!(c.files[0].size, 1000, "the LFS size, not the pointer's");
    assert_eq!(c.files[0].sha256.as_deref().unwrap().len(), 64);
    let lone = listing(&["only-Q5_K_S.gguf"]);
    assert_eq!(
        paths(&choose(&lone, None, None).unwrap()),
        ["only-Q5_K_S.gguf"]
    );
}

#[test]
fn no_match_and_several_matches_list_the_files() {
    let l = listing(&["a-Q8_0.gguf", "b-Q8_0.gguf", "a-Q5_0.gguf"]);
    let e = choose(&l, Some("Q2_K"), None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no file matches \"Q2_K\"; the repository has: a-Q8_0.gguf, b-Q8_0.gguf, a-Q5_0.gguf"
    );
    let e = choose(&l, Some("Q8_0"), None).unwrap_err();
    assert!(matches!(e, ChooseError::Several { .. }), "{e}");
    assert!(e.to_string().contains("a-Q8_0, b-Q8_0"), "{e}");
    assert!(matches!(
        choose(&l, None, None),
        Err(ChooseError::NoMatch { .. })
    ));
    assert_eq!(
        choose(&listing(&["x.txt"]), None, None),
        Err(ChooseError::NoGguf)
    );
}

#[test]
fn a_split_model_is_fetched_whole_and_refused_incomplete() {
    let l = listing(&[
        "Q8_0/m-Q8_0-00002-of-00002.gguf",
        "Q8_0/m-Q8_0-00001-of-00002.gguf",
        "m-Q4_K_M.gguf",
    ]);
    let c = choose(&l, Some("Q8_0"), None).unwrap();
    assert_eq!(
        paths(&c),
        [
            "Q8_0/m-Q8_0-00001-of-00002.gguf",
            "Q8_0/m-Q8_0-00002-of-00002.gguf"
        ]
    );
    assert_eq!(c.files[0].local_name(), "m-Q8_0-00001-of-00002.gguf");
    let half = listing(&["m-Q8_0-00001-of-00003.gguf", "m-Q8_0-00002-of-00003.gguf"]);
    let e = choose(&half, Some("Q8_0"), None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "m-Q8_0-00001-of-00003.gguf: split model incomplete in the listing (has 2 of 3 parts)"
    );
}

#[test]
fn a_named_file_is_taken_and_a_traversing_one_refused() {
    let l = listing(&["a.gguf", "../x.gguf", "sub/b.gguf"]);
    assert_eq!(
        paths(&choose(&l, None, Some("sub/b.gguf")).unwrap()),
        ["sub/b.gguf"]
    );
    assert_eq!(
        choose(&l, None, Some("c.gguf")),
        Err(ChooseError::NoFile("c.gguf".into()))
    );
    let e = choose(&l, None, Some("../x.gguf")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsafe file name in the listing: \"../x.gguf\""
    );
    let only_bad = listing(&["../evil-Q4_K_M.gguf"]);
    assert!(matches!(
        choose(&only_bad, None, None),
        Err(ChooseError::Unsafe(_))
    ));
    for bad in ["/abs.gguf", "a\\b.gguf", "a//b.gguf", "./a.gguf"] {
        assert!(safe_path(bad).is_err(), "{bad}");
    }
}
