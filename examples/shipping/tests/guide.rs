//! The guide's code cannot rot: every fenced block of `docs/guide.md` that a marker line
//! `<!-- from PATH -->` introduces must be an excerpt of PATH (relative to the repository's root): the block's
//! lines appear in the file, in order and contiguous, once its leading and trailing blank lines are dropped and
//! every line's trailing whitespace is ignored. This crate's tests compile its files, so the guide's code
//! compiles too.

use std::path::{Path, PathBuf};

/// The line that introduces an excerpt, around the path of the file it comes from.
const MARKER: (&str, &str) = ("<!-- from ", " -->");

/// Fewer marked blocks than this means the markers were lost, not that the guide shows little code.
const FEWEST_EXCERPTS: usize = 5;

/// A fenced block of the guide, marked as an excerpt of `file`.
#[derive(Debug)]
struct Excerpt {
    /// The path the marker names.
    file: String,
    /// The fence's info string (`rust`, `toml`, ...).
    language: String,
    /// Line of the guide where the fence opens, from 1.
    line: usize,
    /// The block's lines, blank lines at either end dropped, trailing whitespace trimmed.
    lines: Vec<String>,
}

impl Excerpt {
    fn describe(&self) -> String {
        format!("docs/guide.md:{}: the `{}` block marked `from {}`", self.line, self.language, self.file)
    }
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every marked block of `guide`, or what is wrong with the markers (one without a block after it, a block that
/// never closes, an empty block).
fn excerpts(guide: &str) -> Result<Vec<Excerpt>, Vec<String>> {
    let lines: Vec<&str> = guide.lines().collect();
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(file) = marked_file(lines[i]) else {
            i += 1;
            continue;
        };
        let marker_line = i + 1;
        let Some(fence) = lines.get(i + 1).and_then(|l| opening_fence(l)) else {
            problems
                .push(format!("docs/guide.md:{marker_line}: marker `from {file}` is not right before a fenced block"));
            i += 1;
            continue;
        };
        let body_start = i + 2;
        let Some(close) = lines[body_start..].iter().position(|l| closes(l, &fence)).map(|n| body_start + n) else {
            problems.push(format!("docs/guide.md:{}: the block marked `from {file}` is never closed", marker_line + 1));
            break;
        };
        let excerpt = Excerpt {
            file: file.to_owned(),
            language: fence.info.clone(),
            line: marker_line + 1,
            lines: trimmed_block(&lines[body_start..close], fence.indent),
        };
        if excerpt.lines.is_empty() {
            problems.push(format!("{} is empty", excerpt.describe()));
        } else {
            found.push(excerpt);
        }
        i = close + 1;
    }
    if problems.is_empty() { Ok(found) } else { Err(problems) }
}

/// The path named by a marker line.
fn marked_file(line: &str) -> Option<&str> {
    let path = line.trim().strip_prefix(MARKER.0)?.strip_suffix(MARKER.1)?.trim();
    (!path.is_empty()).then_some(path)
}

/// An opening code fence: its indentation, its backticks and its info string.
struct Fence {
    indent: usize,
    ticks: usize,
    info: String,
}

fn opening_fence(line: &str) -> Option<Fence> {
    let rest = line.trim_start_matches(' ');
    let indent = line.len() - rest.len();
    let ticks = rest.chars().take_while(|c| *c == '`').count();
    (indent <= 3 && ticks >= 3).then(|| Fence { indent, ticks, info: rest[ticks..].trim().to_owned() })
}

fn closes(line: &str, fence: &Fence) -> bool {
    let rest = line.trim();
    rest.len() >= fence.ticks && rest.chars().all(|c| c == '`')
}

/// The block's lines as compared: the fence's indentation removed, trailing whitespace trimmed, blank lines at
/// either end dropped.
fn trimmed_block(body: &[&str], indent: usize) -> Vec<String> {
    let lines: Vec<String> = body
        .iter()
        .map(|line| {
            let spaces = line.len() - line.trim_start_matches(' ').len();
            line[spaces.min(indent)..].trim_end().to_owned()
        })
        .collect();
    let start = lines.iter().position(|l| !l.is_empty()).unwrap_or(lines.len());
    let end = lines.iter().rposition(|l| !l.is_empty()).map_or(start, |n| n + 1);
    lines[start..end].to_vec()
}

/// `None` if `excerpt`'s lines appear in `file`, in order and contiguous; otherwise what differs, from the place
/// in the file that matches the most of its first lines.
fn mismatch(excerpt: &Excerpt, file: &str) -> Option<String> {
    let file: Vec<&str> = file.lines().map(str::trim_end).collect();
    let wanted = &excerpt.lines;
    let agreeing = |start: usize| wanted.iter().zip(&file[start..]).take_while(|(w, f)| w.as_str() == **f).count();
    let best = (0..file.len()).map(|start| (agreeing(start), start)).max_by_key(|&(n, start)| (n, usize::MAX - start));
    match best {
        Some((n, _)) if n == wanted.len() => None,
        Some((n, start)) if n > 0 => Some(format!(
            "{} is not in {}: its line {} `{}` differs from the file's line {} `{}` (after {n} matching lines)",
            excerpt.describe(),
            excerpt.file,
            n + 1,
            wanted[n],
            start + n + 1,
            file.get(start + n).unwrap_or(&"<end of file>"),
        )),
        _ => Some(format!(
            "{} is not in {}: not even its first line `{}` is",
            excerpt.describe(),
            excerpt.file,
            wanted[0]
        )),
    }
}

/// What is wrong with the guide's excerpts, each problem naming its block.
fn check(guide: &str, read: impl Fn(&str) -> Result<String, String>) -> Result<Vec<Excerpt>, Vec<String>> {
    let excerpts = excerpts(guide)?;
    let problems: Vec<String> = excerpts
        .iter()
        .filter_map(|e| match read(&e.file) {
            Ok(text) => mismatch(e, &text),
            Err(why) => Some(format!("{}: cannot read {}: {why}", e.describe(), e.file)),
        })
        .collect();
    if problems.is_empty() { Ok(excerpts) } else { Err(problems) }
}

fn read_in_repository(path: &str) -> Result<String, String> {
    if Path::new(path).is_absolute() || path.split('/').any(|part| part == "..") {
        return Err("name a file by its path from the repository's root".into());
    }
    std::fs::read_to_string(repository().join(path)).map_err(|e| e.to_string())
}

fn the_guide() -> String {
    let path = repository().join("docs/guide.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn every_marked_block_of_the_guide_is_an_excerpt_of_the_file_it_names() {
    if let Err(problems) = check(&the_guide(), read_in_repository) {
        panic!(
            "the guide's code drifted from the files it quotes; copy the block again from the file:\n  {}",
            problems.join("\n  ")
        );
    }
}

#[test]
fn the_guide_quotes_the_manifest_and_the_code_of_the_example() {
    let excerpts = excerpts(&the_guide()).unwrap_or_else(|problems| panic!("{}", problems.join("\n")));
    assert!(
        excerpts.len() >= FEWEST_EXCERPTS,
        "docs/guide.md marks only {} blocks as excerpts (`<!-- from FILE -->` right before the fence)",
        excerpts.len()
    );
    let quotes = |file: &str, language: &str| excerpts.iter().any(|e| e.file == file && e.language == language);
    assert!(quotes("examples/shipping/Cargo.toml", "toml"), "the guide quotes no `toml` block of the manifest");
    for file in ["examples/shipping/src/lib.rs", "examples/shipping/src/main.rs"] {
        assert!(quotes(file, "rust"), "the guide quotes no `rust` block of {file}");
    }
}

mod the_check {
    use super::*;

    const FILE: &str = "fn main() {\n    let a = 1;   \n    let b = 2;\n    println!(\"{}\", a + b);\n}\n";

    fn guide(block: &str) -> String {
        format!("Some prose.\n\n<!-- from src/main.rs -->\n```rust\n\n{block}\n\n```\n\nMore prose.\n")
    }

    fn run(guide: &str) -> Result<Vec<Excerpt>, Vec<String>> {
        check(guide, |_| Ok(FILE.to_owned()))
    }

    #[test]
    fn an_excerpt_passes_whatever_its_trailing_whitespace_and_surrounding_blank_lines() {
        let excerpts = run(&guide("    let a = 1;\n    let b = 2;  ")).expect("an excerpt");
        assert_eq!(excerpts.len(), 1);
        assert_eq!(excerpts[0].lines, ["    let a = 1;", "    let b = 2;"]);
        assert_eq!(excerpts[0].line, 4, "the fence's line");
    }

    #[test]
    fn one_changed_line_fails_and_the_message_names_the_block_and_the_line() {
        let problems = run(&guide("    let a = 1;\n    let b = 3;")).expect_err("a drifted block");
        assert_eq!(problems.len(), 1, "{problems:?}");
        let problem = &problems[0];
        assert!(problem.contains("docs/guide.md:4: the `rust` block marked `from src/main.rs`"), "{problem}");
        assert!(
            problem.contains("`    let b = 3;`") && problem.contains("file's line 3 `    let b = 2;`"),
            "{problem}"
        );
    }

    #[test]
    fn lines_of_the_file_that_are_not_contiguous_fail() {
        assert!(run(&guide("fn main() {\n    let b = 2;")).is_err());
        assert!(run(&guide("    let b = 2;\n    let a = 1;")).is_err(), "out of order");
        assert!(run(&guide("    let c = 1;")).is_err(), "not in the file at all");
    }

    #[test]
    fn a_marker_must_introduce_a_block_and_the_block_must_close() {
        let astray = "<!-- from src/main.rs -->\n\n```rust\nfn main() {\n```\n";
        assert!(run(astray).expect_err("a marker before a blank line")[0].contains("not right before"));
        let open = "<!-- from src/main.rs -->\n```rust\nfn main() {\n";
        assert!(run(open).expect_err("an open block")[0].contains("never closed"));
        let empty = "<!-- from src/main.rs -->\n```rust\n\n```\n";
        assert!(run(empty).expect_err("an empty block")[0].contains("is empty"));
    }

    #[test]
    fn unmarked_blocks_are_not_excerpts() {
        let unmarked = "```rust\nfn something_else() {}\n```\n<!-- not a marker -->\n```sh\nls\n```\n";
        assert_eq!(run(unmarked).expect("no excerpt").len(), 0);
    }

    #[test]
    fn files_are_named_from_the_repository_root_and_inside_it() {
        assert!(read_in_repository("/etc/hostname").is_err());
        assert!(read_in_repository("../outside").is_err());
        assert!(read_in_repository("examples/shipping/Cargo.toml").is_ok());
    }
}
