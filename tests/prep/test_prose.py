"""The prose part of documentation: code, tables and signatures out, sentences, headings and prose items in.

The texts are small excerpts of real manuals packaged in Debian (git-doc, postgresql-doc-15) as
nightshift.extraction writes them.
"""

from nightshift.prep.prose import prose_part, prose_share

GIT_ADD = """## SYNOPSIS

```
git add [--verbose | -v] [--dry-run | -n] [--force | -f] [--interactive | -i] [--patch | -p]
          [--] [<pathspec>…]
```

## DESCRIPTION

This command updates the index using the current content found in the working tree, to prepare the content \
staged for the next commit.

The "index" holds a snapshot of the content of the working tree, and it
is this snapshot that is taken as the contents of the next commit.  Thus
after making any changes to the working tree, you must use the `add` command to add any new or
modified files to the index.

| Note | The Git build is parallelizable. `-j#` is not included above but you can use it as you prefer. |
|---|---|

## OPTIONS

- \\<pathspec>…
- Files to add content from.  Fileglobs (e.g. `*.c`) can
        be given to add all matching files.
- -n
- --dry-run
- Don’t actually add the file(s), just show if they exist and/or will be ignored.
- *git diff* [<options>] --cached [--merge-base] [<commit>] [--] [<path>…]

## EXAMPLES

Consider the following *.gitmodules* file:

    [submodule "libfoo"]
            path = include/foo

    [submodule "libbar"]
            path = include/bar

This defines two submodules, see [gitmodules(5)](gitmodules.html) for more.
"""

GIT_ADD_PROSE = """SYNOPSIS
DESCRIPTION
This command updates the index using the current content found in the working tree, to prepare the content \
staged for the next commit.
The "index" holds a snapshot of the content of the working tree, and it is this snapshot that is taken as the \
contents of the next commit. Thus after making any changes to the working tree, you must use the add command to \
add any new or modified files to the index.
The Git build is parallelizable. -j# is not included above but you can use it as you prefer.
OPTIONS
Files to add content from. Fileglobs (e.g. *.c) can be given to add all matching files.
Don’t actually add the file(s), just show if they exist and/or will be ignored.
EXAMPLES
Consider the following .gitmodules file:
This defines two submodules, see gitmodules(5) for more."""


def test_code_tables_and_signatures_are_removed_and_prose_kept():
    assert prose_part(GIT_ADD) == GIT_ADD_PROSE


PG_FUNCTIONS = """**Table 8.2. Numeric Types**

| Name | Storage Size | Description | Range |
|---|---|---|---|
| `smallint` | 2 bytes | small-range integer | -32768 to +32767 |
| `decimal` | variable | user-specified precision, exact | up to 131072 digits before the decimal point |

| Function Description |
|---|
| `pg_column_size` ( `"any"` ) → `integer` Shows the number of bytes used to store any individual data value. |

- `bt_index_check(index regclass, heapallindexed boolean) returns void`
- `\\pset [` *`option`* [ *`value`* ] ]
- `-V`
`--version`
- `ECPG_INFORMIX_BAD_YEAR`
- Print the psql version and exit.

pg_relation_size(relid)
postgres=# SELECT pg_size_pretty(pg_database_size('postgres'));
-v, --verbose
git add [--verbose] <pathspec>...
for (i = 0; i < n; i++) {

`bt_index_check` tests that its target, a B-Tree index, respects a variety of invariants."""


def test_postgresql_signatures_prompts_and_option_lists_are_removed():
    assert prose_part(PG_FUNCTIONS).split("\n") == [
        "Table 8.2. Numeric Types",
        # a cell that is a sentence is kept whole, the function's name and signature before it too
        'pg_column_size ( "any" ) → integer Shows the number of bytes used to store any individual data value.',
        "Print the psql version and exit.",
        "bt_index_check tests that its target, a B-Tree index, respects a variety of invariants.",
    ]


def test_each_signature_rule_alone_removes_its_line():
    for line in ["foo(bar, baz)", "-v, --verbose", "git add [--verbose] <pathspec>...", "$ git add .",
                 ">>> import nightshift", "postgres=# SELECT 1;", "int main(void) {", "}"]:
        assert prose_part(line) == "", line
    assert prose_part("- A 4-byte hash function identifier (= 1 for SHA-1, 2 for SHA-256).") == (
        "A 4-byte hash function identifier (= 1 for SHA-1, 2 for SHA-256).")


def test_indented_lines_continuing_a_list_item_are_prose_not_code():
    text = "- Update the index.\n\n    This removes as well as modifies index entries to match the working tree.\n"
    assert prose_part(text) == (
        "Update the index.\nThis removes as well as modifies index entries to match the working tree.")
    assert prose_part("Run this:\n\n    make -j4 all\n\nThen install.") == "Run this:\nThen install."


def test_an_unclosed_fence_runs_to_the_end():
    assert prose_part("Build it with:\n\n```sh\nmake\n\nmake install\n") == "Build it with:"


def test_prose_share_counts_the_prose_characters():
    assert prose_share("") == 0.0
    assert prose_share("```\nSELECT 1;\n```") == 0.0
    prose = "The planner chooses the cheapest plan it can find for each query."
    assert prose_share(prose) == 1.0
    share = prose_share(f"{prose}\n\n```sql\n{'SELECT * FROM films WHERE kind = $1;' * 2}\n```")
    assert 0.4 < share < 0.6
    assert 0.6 < prose_share(GIT_ADD) < 0.8
