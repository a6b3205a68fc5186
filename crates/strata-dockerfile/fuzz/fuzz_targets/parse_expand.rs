//! Parse, check, resolve and expand arbitrary bytes. Any panic, hang or
//! runaway allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_dockerfile::{Command, Dockerfile, EnvList, IgnoreMatcher, Lexer};

fuzz_target!(|data: &[u8]| {
    if let Ok(ast) = strata_dockerfile::parse(data) {
        let _ = ast.dump();
        if let Ok(df) = Dockerfile::from_ast(ast) {
            let mut env = EnvList::new();
            env.set("A", "a b/c.d");
            if let Ok(scope) = df.global_scope(&Default::default(), &env) {
                let _ = df.graph(&scope, None);
            }
            for instr in df.stages.iter().flat_map(|s| &s.instructions) {
                let _ = df.expand(instr, &env);
                if let Command::Run(r) = &instr.command {
                    for m in &r.mounts {
                        let _ = m.resolve(&mut |v| Ok(v.to_string()));
                    }
                }
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let env = EnvList::from_entries(["A=x y", "E="]);
        let lexer = Lexer::new('\\');
        let _ = lexer.process_word(text, &env);
        let _ = lexer.raw_quotes(true).raw_escapes(true).skip_unset(true).process_words(text, &env);
        let lines: Vec<&str> = text.lines().take(16).collect();
        if let Ok(m) = IgnoreMatcher::new(&lines) {
            let _ = m.matches(text);
        }
    }
});
