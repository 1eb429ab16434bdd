use std::path::{Path, PathBuf};

use super::*;

fn gguf(path: &Path) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, b"GGUF\x03\x00\x00\x00rest").unwrap();
}

fn names(scan: &Scan) -> Vec<&str> {
    scan.models.iter().map(|m| m.name.as_str()).collect()
}

fn skipped_why(scan: &Scan, file: &str) -> String {
    scan.skipped
        .iter()
        .find(|s| s.path.ends_with(file))
        .map(|s| s.why.clone())
        .unwrap_or_else(|| panic!("{file} not skipped: {:?}", scan.skipped))
}

#[test]
fn a_file_is_a_model_named_after_its_lower_cased_stem() {
    let dir = tempfile::tempdir().unwrap();
    gguf(&dir.path().join("Qwen2.5-7B-Instruct-Q4_K_M.gguf"));
    gguf(&dir.path().join("tiny.GGUF"));
    let scan = scan(&[dir.path().to_path_buf()]);
    assert_eq!(names(&scan), ["qwen2.5-7b-instruct-q4_k_m", "tiny"]);
    let m = &scan.models[0];
    assert_eq!(m.files, vec![m.model.clone()]);
    assert_eq!(m.size, 12);
    assert_eq!(
        m.source,
        Source::Folder {
            dir: dir.path().to_path_buf()
        }
    );
}

#[test]
fn split_parts_are_one_model_served_once_all_are_there() {
    let dir = tempfile::tempdir().unwrap();
    for part in 1..=3 {
        gguf(&dir.path().join(format!("Big-Q8_0-{part:05}-of-00003.gguf")));
    }
    gguf(&dir.path().join("Half-00001-of-00002.gguf"));
    let scan = scan(&[dir.path().to_path_buf()]);
    assert_eq!(names(&scan), ["big-q8_0"]);
    let big = &scan.models[0];
    assert!(big.model.ends_with("Big-Q8_0-00001-of-00003.gguf"));
    assert_eq!(big.files.len(), 3);
    assert_eq!(
        skipped_why(&scan, "Half-00001-of-00002.gguf"),
        "split model incomplete: has part(s) 1 of 2"
    );
}

#[test]
fn split_suffixes_are_read_strictly() {
    assert_eq!(split_part("m-00002-of-00003"), Some(("m", 2, 3)));
    assert_eq!(split_part("m-2-of-3"), None);
    assert_eq!(split_part("m-00004-of-00003"), None);
    assert_eq!(split_part("m-00000-of-00003"), None);
    assert_eq!(split_part("-00001-of-00001"), None);
    assert_eq!(model_name("A-00001-of-00002"), "a");
}

#[test]
fn a_projector_goes_with_the_one_model_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    gguf(&dir.path().join("vision/model-Q4_K_M.gguf"));
    gguf(&dir.path().join("vision/mmproj-F16.gguf"));
    gguf(&dir.path().join("text.gguf"));
    let scan = scan(&[dir.path().to_path_buf()]);
    assert_eq!(names(&scan), ["text", "vision"]);
    let vision = &scan.models[1];
    assert!(vision
        .mmproj
        .as_ref()
        .unwrap()
        .ends_with("vision/mmproj-F16.gguf"));
    assert_eq!(scan.models[0].mmproj, None);
}

#[test]
fn a_projector_beside_several_models_is_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    gguf(&dir.path().join("a.gguf"));
    gguf(&dir.path().join("b.gguf"));
    gguf(&dir.path().join("mmproj-a.gguf"));
    let scan = scan(&[dir.path().to_path_buf()]);
    assert_eq!(names(&scan), ["a", "b"]);
    assert!(scan.models.iter().all(|m| m.mmproj.is_none()));
    assert!(skipped_why(&scan, "mmproj-a.gguf").contains("ambiguous"));
}

#[test]
fn part_files_hidden_files_and_non_gguf_are_not_served() {
    let dir = tempfile::tempdir().unwrap();
    gguf(&dir.path().join("done.gguf"));
    gguf(&dir.path().join("coming.gguf.part"));
    gguf(&dir.path().join(".hidden.gguf"));
    std::fs::write(dir.path().join("fake.gguf"), b"<html>not a model</html>").unwrap();
    std::fs::write(dir.path().join("empty.gguf"), b"").unwrap();
    let scan = scan(&[dir.path().to_path_buf()]);
    assert_eq!(names(&scan), ["done"]);
    assert!(skipped_why(&scan, "fake.gguf").starts_with("not a GGUF file"));
    assert!(skipped_why(&scan, "empty.gguf").contains("shorter than 4 bytes"));
}

#[test]
fn dangling_links_are_ignored_and_links_to_files_followed() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let real = elsewhere.path().join("real.gguf");
    gguf(&real);
    std::os::unix::fs::symlink(&real, dir.path().join("linked.gguf")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("gone.gguf")).unwrap();
    let scan = scan(&[dir.path().to_path_buf()]);
    assert_eq!(names(&scan), ["linked"]);
}

#[test]
fn a_name_in_two_folders_keeps_the_first() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    gguf(&one.path().join("m.gguf"));
    gguf(&two.path().join("M.gguf"));
    gguf(&two.path().join("other.gguf"));
    let scan = scan(&[one.path().to_path_buf(), two.path().to_path_buf()]);
    assert_eq!(names(&scan), ["m", "other"]);
    assert!(scan.models[0].model.starts_with(one.path()));
    assert!(skipped_why(&scan, "M.gguf").contains("already taken"));
}

#[test]
fn a_missing_folder_is_a_reason_not_an_error() {
    let scan = scan(&[PathBuf::from("/nonexistent/claracore-models")]);
    assert!(scan.models.is_empty());
    assert!(scan.skipped[0].why.starts_with("cannot read the folder"));
}

#[test]
fn a_pulled_file_names_what_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny-q4_k_m.gguf");
    gguf(&file);
    let from = PulledFrom {
        repo: "user/tiny-GGUF".into(),
        revision: "abc123".into(),
        file: "tiny-Q4_K_M.gguf".into(),
        sha256: "00".repeat(32),
    };
    std::fs::write(sidecar(&file), serde_json::to_vec(&from).unwrap()).unwrap();
    let scan = scan(&[dir.path().to_path_buf()]);
    assert_eq!(names(&scan), ["tiny-q4_k_m"]);
    assert_eq!(scan.models[0].source.kind(), "pulled");
    assert!(scan.models[0].source.removable());
}

#[test]
fn a_subdirectory_with_two_models_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    gguf(&dir.path().join("pair/a.gguf"));
    gguf(&dir.path().join("pair/b.gguf"));
    let scan = scan(&[dir.path().to_path_buf()]);
    assert!(scan.models.is_empty());
    assert!(skipped_why(&scan, "pair").contains("holds 2"));
}
