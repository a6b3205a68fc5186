//! No input makes the frontend panic or hang: random bytes, and random
//! mutations of real Dockerfiles (BuildKit's test files when present, plus
//! built-in seeds), go through every layer.

// Test helpers report failures by panicking and print tallies.
#![allow(
    clippy::panic,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod common;

use proptest::prelude::*;
use strata_dockerfile::{Dockerfile, EnvList, IgnoreMatcher, Lexer, parse};

const SEEDS: &[&str] = &[
    "FROM golang:1.21 AS builder\nWORKDIR /src\nCOPY go.mod ./\nRUN --mount=type=cache,target=/root/.cache go build -o /app\nFROM scratch\nCOPY --from=builder /app /app\nCMD [\"/app\"]\n",
    "# escape=`\nFROM mcr.microsoft.com/windows AS w\nRUN dir `\n  c:\\\nENV A=\"b c\" D=${A:-x}\n",
    "ARG V=1\nFROM a:${V}\nCOPY <<-EOF <<E2 /d/\n\tx $V\nEOF\ny\nE2\nRUN <<'X' bash\necho \"$Y\"\nX\nHEALTHCHECK --interval=5s CMD [\"true\"]\nONBUILD RUN make\n",
    "FROM a\nENV P=/a/b.tar.gz\nWORKDIR ${P%%.*}/${P##*/}/${P//\\//-}\nEXPOSE ${PORT:-80}/tcp\nLABEL a=b \"c d\"=e\nUSER ${U:?no}\n",
];

/// Tokens that steer mutations into the interesting corners of the syntax.
const TOKENS: &[&str] = &[
    "\\\n",
    "`\n",
    "\n",
    "<<EOF\n",
    "<<-'E'\n",
    "EOF\n",
    "${",
    "}",
    "${A:-",
    "${A/",
    "$",
    "\"",
    "'",
    "[",
    "]",
    "--",
    "--from=",
    "--mount=type=cache,",
    "# escape=`\n",
    "#",
    " ",
    "\t",
    "\r\n",
    "FROM ",
    "ONBUILD ",
    "COPY ",
    "RUN ",
    "ARG ",
    "AS ",
    "\u{feff}",
    "\u{a0}",
    "é",
    "\0",
    "\\",
    ",",
    "=",
];

fn conformance_seeds() -> &'static [Vec<u8>] {
    static SEEDS_CACHE: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS_CACHE.get_or_init(load_seeds)
}

fn load_seeds() -> Vec<Vec<u8>> {
    let dir = common::buildkit_data();
    let mut seeds: Vec<Vec<u8>> = SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    for sub in ["parser/testfiles", "parser/testfiles-negative"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(b) = std::fs::read(e.path().join("Dockerfile")) {
                seeds.push(b);
            }
        }
    }
    seeds
}

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, Vec<u8>),
    Token(usize, usize),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Flip(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(a, b)| Mutation::Insert(a, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(a, t)| Mutation::Token(a, t)),
        (any::<usize>(), 1usize..64).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (any::<usize>(), 1usize..64).prop_map(|(a, n)| Mutation::Duplicate(a, n)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Flip(a, b)),
    ]
}

fn apply(mut data: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = data.len();
        let at = |p: usize| if len == 0 { 0 } else { p % (len + 1) };
        match m {
            Mutation::Insert(p, b) => {
                let p = at(*p);
                data.splice(p..p, b.iter().copied());
            }
            Mutation::Token(p, t) => {
                let p = at(*p);
                data.splice(p..p, TOKENS[*t].bytes());
            }
            Mutation::Delete(p, n) => {
                let p = at(*p);
                let end = (p + n).min(len);
                data.drain(p..end);
            }
            Mutation::Duplicate(p, n) => {
                let p = at(*p);
                let end = (p + n).min(len);
                let chunk = data[p..end].to_vec();
                data.splice(p..p, chunk);
            }
            Mutation::Flip(p, b) => {
                if len > 0 {
                    data[p % len] ^= b;
                }
            }
        }
    }
    data
}

/// Runs every layer on `input`; only panics (the failure proptest looks
/// for) and errors without a position are wrong.
fn exercise(input: &[u8]) {
    let ast = match parse(input) {
        Ok(ast) => ast,
        Err(e) => {
            assert!(e.position().is_some(), "parse error without position: {e}");
            return;
        }
    };
    let _ = ast.dump();
    let df = match Dockerfile::from_ast(ast) {
        Ok(df) => df,
        Err(e) => {
            assert!(e.position().is_some(), "error without position: {e}");
            return;
        }
    };
    let mut env = EnvList::new();
    env.set("A", "a b/c.d");
    env.set("P", "/x/y.tar.gz");
    if let Ok(scope) = df.global_scope(&Default::default(), &env) {
        let _ = df.graph(&scope, None);
    }
    for stage in &df.stages {
        for instr in &stage.instructions {
            let _ = df.expand(instr, &env);
            if let strata_dockerfile::Command::Run(r) = &instr.command {
                for m in &r.mounts {
                    let _ = m.resolve(&mut |v| Ok(v.to_string()));
                }
            }
        }
    }
}

fn lex_all_ways(s: &str) {
    let mut env = EnvList::new();
    env.set("A", "x y");
    env.set("E", "");
    for escape in ['\\', '`'] {
        for bits in 0..16u8 {
            let lexer = Lexer::new(escape)
                .raw_quotes(bits & 1 != 0)
                .raw_escapes(bits & 2 != 0)
                .skip_unset(bits & 4 != 0)
                .skip_quotes(bits & 8 != 0);
            let _ = lexer.process_word(s, &env);
            let _ = lexer.process_words(s, &env);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        exercise(&input);
    }

    #[test]
    fn mutated_dockerfiles_never_panic(seed in any::<prop::sample::Index>(), muts in proptest::collection::vec(mutation(), 1..12)) {
        let seeds = conformance_seeds();
        let base = seeds[seed.index(seeds.len())].clone();
        exercise(&apply(base, &muts));
    }

    #[test]
    fn lexer_never_panics(s in "[\\\\`$'\"{}:?+#%/*a-c0-9 <-]{0,40}") {
        lex_all_ways(&s);
    }

    #[test]
    fn ignore_patterns_never_panic(patterns in proptest::collection::vec("[!*?/.a-b\\[\\]\\\\^-]{0,12}", 0..5), path in "[a-b/.]{0,16}") {
        if let Ok(m) = IgnoreMatcher::new(&patterns) {
            let _ = m.matches(&path);
        }
    }
}
