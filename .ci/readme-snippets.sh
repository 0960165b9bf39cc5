#!/usr/bin/env bash
# Builds every Rust block of README.md the way a new user pastes it: into a fresh crate made with exactly the
# README's `cargo add` lines (its ```sh blocks), axum-idem taken from this checkout since it is not published.
# A block with `fn main` becomes an example, one with a test a test file, any other a module of the library.
# Catches what doc-tests cannot: a snippet that needs a feature or a dependency the README never tells you to add.
#
#   bash .ci/readme-snippets.sh          # a few minutes; SNIPPETS_DIR to keep the crate somewhere
#
# The crate lives outside this workspace (cargo would take it for a member); it builds into this checkout's
# `target/`, so the dependencies it shares with the workspace, at the same versions and features, are not built
# twice.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
readme="$repo/README.md"
dir=${SNIPPETS_DIR:-$(mktemp -d)/readme-snippets}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
rm -rf "$dir"
mkdir -p "$dir"
cd "$dir"
cargo init --quiet --lib --name readme_snippets --vcs none

# The `cargo add` lines, comments cut. Flags apply to every crate of their line; axum-idem comes from this checkout.
awk '/^```sh/ { inside = 1; next } /^```/ { inside = 0 } inside && /^cargo add / { sub(/#.*/, ""); print }' "$readme" |
  while read -r line; do
    read -ra words <<<"${line#cargo add }"
    crates=()
    flags=()
    for ((i = 0; i < ${#words[@]}; i++)); do
      case "${words[i]}" in
        --features | -F) flags+=("${words[i]}" "${words[i + 1]}"); i=$((i + 1)) ;;
        -*) flags+=("${words[i]}") ;;
        *) crates+=("${words[i]}") ;;
      esac
    done
    for crate in "${crates[@]}"; do
      if [[ $crate == axum-idem ]]; then
        echo "cargo add --path $repo ${flags[*]}"
        cargo add --quiet --path "$repo" "${flags[@]}"
      else
        echo "cargo add $crate ${flags[*]}"
        cargo add --quiet "$crate" "${flags[@]}"
      fi
    done
  done

# The Rust blocks (not `ignore`d ones), one file each.
mkdir -p examples tests
echo '#![allow(dead_code, unused_imports)]' >src/lib.rs
awk -v out="$dir/blocks" '
  /^```rust/ { inside = ($0 !~ /ignore/); n += 1; file = sprintf("%s.%03d.rs", out, n); next }
  /^```/ { inside = 0; next }
  inside { print > file }
' "$readme"
count=0
for block in "$dir"/blocks.*.rs; do
  [[ -e $block ]] || continue
  name="snippet_$(basename "$block" .rs | cut -d. -f2)"
  if grep -q 'fn main' "$block"; then
    mv "$block" "examples/$name.rs"
  elif grep -qE '#\[(tokio::)?test|conformance_tests!' "$block"; then
    mv "$block" "tests/$name.rs"
  else
    mv "$block" "src/$name.rs"
    echo "pub mod $name;" >>src/lib.rs
  fi
  count=$((count + 1))
done
echo "building $count README blocks as a fresh crate in $dir"
cargo build --quiet --all-targets
echo "all $count README blocks build with the README's cargo add lines"
