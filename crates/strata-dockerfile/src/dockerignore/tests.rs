use super::*;

fn m(patterns: &[&str]) -> IgnoreMatcher {
    IgnoreMatcher::new(patterns).unwrap()
}

/// (pattern, path, ignored) as Docker decides them.
const SINGLE: &[(&str, &str, bool)] = &[
    ("**", "file", true),
    ("**", "file/", true),
    ("**/", "file", true),
    ("**/", "file/", true),
    ("**", "/", true),
    ("**/", "/", true),
    ("**", "dir/file", true),
    ("**/", "dir/file", true),
    ("**", "dir/file/", true),
    ("**/", "dir/file/", true),
    ("**/**", "dir/file", true),
    ("**/**", "dir/file/", true),
    ("dir/**", "dir/file", true),
    ("dir/**", "dir/file/", true),
    ("dir/**", "dir/dir2/file", true),
    ("dir/**", "dir/dir2/file/", true),
    ("**/dir", "dir", true),
    ("**/dir", "dir/file", true),
    ("**/dir2/*", "dir/dir2/file", true),
    ("**/dir2/*", "dir/dir2/file/", true),
    ("**/dir2/**", "dir/dir2/dir3/file", true),
    ("**/dir2/**", "dir/dir2/dir3/file/", true),
    ("**file", "file", true),
    ("**file", "dir/file", true),
    ("**/file", "dir/file", true),
    ("**file", "dir/dir/file", true),
    ("**/file", "dir/dir/file", true),
    ("**/file*", "dir/dir/file", true),
    ("**/file*", "dir/dir/file.txt", true),
    ("**/file*txt", "dir/dir/file.txt", true),
    ("**/file*.txt", "dir/dir/file.txt", true),
    ("**/file*.txt*", "dir/dir/file.txt", true),
    ("**/**/*.txt", "dir/dir/file.txt", true),
    ("**/**/*.txt2", "dir/dir/file.txt", false),
    ("**/*.txt", "file.txt", true),
    ("**/**/*.txt", "file.txt", true),
    ("a**/*.txt", "a/file.txt", true),
    ("a**/*.txt", "a/dir/file.txt", true),
    ("a**/*.txt", "a/dir/dir/file.txt", true),
    ("a/*.txt", "a/dir/file.txt", false),
    ("a/*.txt", "a/file.txt", true),
    ("a/*.txt**", "a/file.txt", true),
    ("a[b-d]e", "ae", false),
    ("a[b-d]e", "ace", true),
    ("a[b-d]e", "aae", false),
    ("a[^b-d]e", "aze", true),
    (".*", ".foo", true),
    (".*", "foo", false),
    ("abc.def", "abcdef", false),
    ("abc.def", "abc.def", true),
    ("abc.def", "abcZdef", false),
    ("abc?def", "abcZdef", true),
    ("abc?def", "abcdef", false),
    ("a\\\\", "a\\", true),
    ("**/foo/bar", "foo/bar", true),
    ("**/foo/bar", "dir/foo/bar", true),
    ("**/foo/bar", "dir/dir2/foo/bar", true),
    ("abc/**", "abc", false),
    ("abc/**", "abc/def", true),
    ("abc/**", "abc/def/ghi", true),
    ("**/.foo", ".foo", true),
    ("**/.foo", "bar.foo", false),
    ("a(b)c/def", "a(b)c/def", true),
    ("a(b)c/def", "a(b)c/xyz", false),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
    (
        "dist/*.whl",
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        true,
    ),
    ("a\\*b", "a*b", true),
];

#[test]
fn single_patterns_match_like_docker() {
    for &(pattern, path, want) in SINGLE {
        assert_eq!(
            m(&[pattern]).matches(path),
            want,
            "pattern {pattern:?} path {path:?}"
        );
    }
}

#[test]
fn exceptions_reinclude() {
    assert!(!m(&["**", "!util/docker/web"]).matches("util/docker/web/foo"));
    assert!(m(&["**", "!util/docker/web", "util/docker/web/foo"]).matches("util/docker/web/foo"));
    assert!(!m(&["**", "!dist/*.whl"]).matches("dist/a.whl"));
    assert!(m(&["docs", "!docs/README.md"]).matches("docs/a.md"));
    assert!(!m(&["docs", "!docs/README.md"]).matches("docs/README.md"));
    assert!(m(&["*.md", "!README*.md", "README-secret.md"]).matches("README-secret.md"));
    assert!(!m(&["*.md", "!README*.md", "README-secret.md"]).matches("README-public.md"));
}

#[test]
fn a_matched_directory_excludes_its_contents() {
    assert!(m(&["node_modules"]).matches("node_modules/a/b.js"));
    assert!(m(&["build/"]).matches("build/out.o"));
    assert!(!m(&["build"]).matches("src/build"));
    assert!(m(&["*/build"]).matches("src/build/x"));
}

#[test]
fn patterns_are_cleaned_like_paths() {
    let pats = read_patterns(b"# comment\n /foo/../bar/ \n\n!./keep\n  # not a comment\n");
    assert_eq!(pats, ["bar", "!keep", "# not a comment"]);
    assert!(
        IgnoreMatcher::from_dockerignore(b"/a/./b\n")
            .unwrap()
            .matches("a/b")
    );
    assert_eq!(clean_path("a//b/./c/.."), "a/b");
    assert_eq!(clean_path("../../x"), "../../x");
    assert_eq!(clean_path("/../x"), "/x");
    assert_eq!(clean_path(""), ".");
    assert_eq!(clean_path("./"), ".");
}

#[test]
fn malformed_patterns_are_errors() {
    for bad in ["[", "a[]", "[a-", "a\\", "!", "[a-]"] {
        let e = IgnoreMatcher::new(&[bad]).err();
        assert!(
            e.is_some_and(|e| e.kind() == ErrorKind::Ignore),
            "{bad:?} should be rejected"
        );
    }
    assert!(IgnoreMatcher::new(&["[a-c]x", "[\\]]"]).is_ok());
}

#[test]
fn context_root_is_never_ignored() {
    assert!(!m(&["**"]).matches("."));
}

#[test]
fn descends_only_where_an_exception_names_the_directory() {
    let m = m(&["**", "!folder1/file1"]);
    assert!(m.matches("folder1") && m.may_include_below("folder1"));
    assert!(!m.matches("folder1/file1"));
    let n = IgnoreMatcher::new(&["**/subdir-e", "!**/subdir-f"]).unwrap();
    assert!(n.matches("subdir-e"));
    assert!(
        !n.may_include_below("subdir-e"),
        "`**/subdir-f` does not start with subdir-e/"
    );
}
