"""Preparation profiles: validated per file, chosen per source, and judging documentation on its prose.

debian_pages/ holds real pages of two manuals packaged in Debian (git-doc: git-write-tree.html;
postgresql-doc-15: sql-dropview.html, functions-uuid.html), copied unchanged.
"""

import json
import random
from pathlib import Path

import pytest
import yaml

from nightshift.pipelines import ingest
from nightshift.pipelines.ingest import plan_sources, prepare_corpus
from nightshift.prep.curate import curate
from nightshift.prep.curator import DocumentCurator
from nightshift.prep.recipe import DEFAULT_RECIPE, PrepRecipe, RecipeError

PAGES = Path(__file__).parent / "debian_pages"
MANUAL = sorted(PAGES.glob("*.html"))


def recipe_dir(tmp_path, prep=None, profiles=None):
    """Return the path of a prep.yaml written with its profile files beside it, under prep/."""
    (tmp_path / "prep").mkdir(parents=True, exist_ok=True)
    for name, data in (profiles or {}).items():
        (tmp_path / "prep" / f"{name}.yaml").write_text(yaml.safe_dump(data))
    path = tmp_path / "prep.yaml"
    path.write_text(yaml.safe_dump(prep if prep is not None else {"default_profile": "docs"}))
    return path


def test_shipped_recipe_defaults_to_docs_and_offers_web():
    recipe = PrepRecipe.load(DEFAULT_RECIPE)
    assert recipe.default_profile == "docs" and {"docs", "web"} <= set(recipe.profiles)
    assert recipe.step("gopher_quality").measure == "prose"
    assert recipe.step("gopher_quality").alpha_words == "whitespace"
    web = recipe.profile("web")
    assert web.step("gopher_quality").measure == "all" and web.step("gopher_quality").alpha_words == "tokens"
    assert [s.name for s in web.steps] == [s.name for s in recipe.steps]


@pytest.mark.parametrize(
    ("profile", "says"),
    [
        ({"steps": [{"gopher_quality": {"min_doc_words": "many"}}]},
         r"^prep/team\.yaml: steps\[0\]\.gopher_quality\.min_doc_words must be an integer"),
        ({"steps": [{"c4_quality": {"measure": "code"}}]},
         r"^prep/team\.yaml: steps\[0\]\.c4_quality\.measure must be all or prose"),
        ({"steps": [{"gopher_quality": {"alpha_words": "chars"}}]},
         r"^prep/team\.yaml: steps\[0\]\.gopher_quality\.alpha_words must be tokens or whitespace"),
        ({"steps": [{"language": {"sample": "middle"}}]},
         r"^prep/team\.yaml: steps\[0\]\.language\.sample must be start or spread"),
        ({"steps": ["pii"], "dedup": {}}, r"^prep/team\.yaml: unknown sections \['dedup'\]"),
    ],
)
def test_a_profile_file_error_names_the_file_and_the_field(tmp_path, profile, says):
    with pytest.raises(RecipeError, match=says):
        PrepRecipe.load(recipe_dir(tmp_path, profiles={"docs": {"steps": ["pii"]}, "team": profile}))


def test_profiles_named_in_prep_yaml_and_a_missing_default(tmp_path):
    other = tmp_path / "elsewhere.yaml"
    other.write_text(yaml.safe_dump({"steps": [{"language": {"keep": ["de"]}}]}))
    recipe = PrepRecipe.load(recipe_dir(tmp_path, {"default_profile": "german", "profiles": {"german": str(other)}}))
    assert recipe.step("language").keep == ("de",) and set(recipe.profiles) == {"german"}
    with pytest.raises(RecipeError, match=r"prep\.yaml: default_profile 'docs' has no file prep/docs\.yaml"):
        PrepRecipe.load(recipe_dir(tmp_path / "empty"))
    with pytest.raises(RecipeError, match=r"prep\.yaml: profiles\.team: no profile file at"):
        PrepRecipe.load(recipe_dir(tmp_path, {"default_profile": "german",
                                              "profiles": {"german": str(other), "team": "prep/none.yaml"}}))


def test_a_prep_yaml_with_its_own_steps_still_loads_as_the_default_profile(tmp_path):
    recipe = PrepRecipe.load(recipe_dir(tmp_path, {"steps": [{"gopher_quality": {"min_doc_words": 7}}]},
                                        {"web": {"steps": ["pii"]}}))
    assert recipe.default_profile == "default" and recipe.step("gopher_quality").min_doc_words == 7
    assert [s.name for s in recipe.profile("web").steps] == ["pii"]


def test_the_digest_covers_every_profile_and_a_profile_digest_only_its_own(tmp_path):
    base = {"docs": {"steps": [{"gopher_quality": {}}]}, "web": {"steps": [{"gopher_quality": {}}]}}
    a = PrepRecipe.load(recipe_dir(tmp_path / "a", profiles=base))
    changed = {**base, "web": {"steps": [{"gopher_quality": {"min_doc_words": 99}}]}}
    b = PrepRecipe.load(recipe_dir(tmp_path / "b", profiles=changed))
    assert a.digest() != b.digest()
    assert a.profile("docs").digest() == b.profile("docs").digest()
    assert a.profile("web").digest() != b.profile("web").digest()
    assert PrepRecipe.from_dict(json.loads(json.dumps(a.to_dict())), folder=None).digest() == a.digest()
    with pytest.raises(RecipeError, match=r"no preparation profile 'blog'; known profiles: \['docs', 'web'\]"):
        a.profile("blog")


# Junk that no profile may keep: written here, each a kind pre-training filters exist for.
rng = random.Random(7)
GIBBERISH = [" ".join("".join(rng.choice("qwrtzpsdfghjklxcvbnm") for _ in range(rng.randint(3, 11)))
                      for _ in range(150)) for _ in range(2)] + [
    "\n".join(f"{rng.randint(0, 10**6)} {rng.randint(0, 99)}.{rng.randint(0, 99)} ## %% {rng.random():.5f} ;; ~~"
              for _ in range(60))]
BOILERPLATE = [
    "Home | Products | Pricing | Blog | About us | Careers | Contact\nLog in\nSign up\n"
    "We use cookies to improve your experience. By continuing you accept our cookie policy and privacy policy.\n"
    "Accept all\nReject all\nManage preferences\nCopyright 2024 All rights reserved.\nTerms\nPrivacy\nSitemap",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore.",
    "Page not found\nHome\nSearch\nMenu\nBack to top\nShare\nTweet\nFollow us\nNewsletter\nSubscribe",
]
SPAM = [
    "Buy cheap watches online now! " * 40,
    "\n".join(["CLICK HERE to win a free iPhone today, best deals of the year, limited offer!"] * 30),
    "casino bonus casino bonus free spins casino bonus best casino bonus online casino bonus " * 20,
]
JUNK = GIBBERISH + BOILERPLATE + SPAM


@pytest.fixture(scope="module")
def shipped():
    return PrepRecipe.load(DEFAULT_RECIPE)


def test_docs_profile_keeps_real_manual_pages_whole_that_the_web_profile_drops(shipped):
    docs, web = DocumentCurator(shipped, {"manual": "docs"}), DocumentCurator(shipped, {"manual": "web"})
    for page in MANUAL:
        content = page.read_text()
        kept = docs.process(f"manual/{page.name}", "html", content)
        assert kept.step is None, (page.name, kept.step, kept.reason)
        assert kept.language == "en"
        dropped = web.process(f"manual/{page.name}", "html", content)
        assert dropped.step is not None, page.name
    view = docs.process("manual/sql-dropview.html", "html", (PAGES / "sql-dropview.html").read_text())
    assert "DROP VIEW [ IF EXISTS ]" in view.text  # judged on prose, kept whole: the synopsis stays


@pytest.mark.parametrize("profile", ["docs", "web"])
def test_junk_is_dropped_by_every_profile(shipped, profile):
    curator = DocumentCurator(shipped, {"site": profile})
    outcomes = [curator.process(f"site/junk-{i}", "text", text) for i, text in enumerate(JUNK)]
    kept = [i for i, o in enumerate(outcomes) if o.step is None]
    assert kept == [], [(i, outcomes[i].step, outcomes[i].reason) for i in kept]


def test_a_reference_page_with_a_line_of_prose_is_kept_and_a_stub_is_not(shipped):
    curator = DocumentCurator(shipped, {"ref": "docs"})
    code = "\n".join(f"    pg_stat_reset_slru(target text) -> void  -- slot {i}, mode => {i * 3}" for i in range(20))
    reference = f"# pg_stat_reset_slru\n\nResets the statistics of one SLRU cache.\n\n```\n{code}\n```\n"
    assert curator.process("ref/slru", "text", reference).step is None
    assert curator.process("ref/stub", "text", "Contents\n\nNext page\n\n```\nx\n```").step is not None


def test_each_source_is_prepared_with_its_profile(tmp_path, shipped):
    content = (PAGES / "git-write-tree.html").read_text()
    docs = [{"id": f"{source}/git-write-tree.html", "source": "x", "format": "html", "content": content, "meta": {}}
            for source in ("manual", "blog")] + [
        {"id": f"blog/junk-{i}", "source": "x", "format": "text", "content": t, "meta": {}} for i, t in enumerate(SPAM)]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(d) + "\n" for d in docs))
    report = curate(raw, tmp_path / "corpus.jsonl", tmp_path / "work", shipped, tmp_path / "cache.sqlite",
                    sources={"manual": "docs", "blog": "web"})
    corpus = [json.loads(line)["id"] for line in (tmp_path / "corpus.jsonl").open()]
    assert corpus == ["manual/git-write-tree.html"]
    assert report.sources["manual"] == {"profile": "docs", "in": 1, "out": 1, "dropped": {}}
    assert report.sources["blog"]["profile"] == "web" and report.sources["blog"]["in"] == 4
    assert report.sources["blog"]["out"] == 0
    assert report.sources["blog"]["dropped"]["gopher_quality"]["gopher_below_alpha_threshold"] >= 1
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").open()]
    assert {d["id"].split("/")[0] for d in dropped} == {"blog"}
    # Cache keys hold the profile, not the source: with the profiles swapped, each page reuses the outcome its
    # profile decided last night (under the other source), and the spam, new to the docs profile, is decided anew.
    again = curate(raw, tmp_path / "c2.jsonl", tmp_path / "w2", shipped, tmp_path / "cache.sqlite",
                   sources={"manual": "web", "blog": "docs"})
    assert [json.loads(line)["id"] for line in (tmp_path / "c2.jsonl").open()] == ["blog/git-write-tree.html"]
    assert again.cached == 2
    with pytest.raises(ValueError, match=r"no preparation profile \['blog-posts'\]"):
        curate(raw, tmp_path / "c3.jsonl", tmp_path / "w3", shipped, None, sources={"blog": "blog-posts"})


def test_plan_refuses_a_source_naming_an_unknown_profile_and_prepare_follows_the_plan(tmp_path, shipped):
    store = tmp_path / "store"
    store.mkdir()
    (store / "page.html").write_text((PAGES / "functions-uuid.html").read_text())
    sources = tmp_path / "sources.yaml"
    sources.write_text(yaml.safe_dump({"sources": [{"name": "pg", "kind": "files", "path": str(store),
                                                    "prep": "manuals"}]}))
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match=r"source pg: no preparation profile 'manuals'; known profiles: docs, feed"):
        plan_sources(None, sources, (), run, shipped.profiles)
    sources.write_text(sources.read_text().replace("manuals", "web"))
    [spec] = plan_sources(None, sources, (), run, shipped.profiles)
    assert spec["prep"] == "web"
    raw = {"id": "pg/page.html", "source": "x", "format": "html", "content": (store / "page.html").read_text()}
    (run / ingest.RAW).write_text(json.dumps(raw) + "\n")
    (run / ingest.COLLECT_SKIPPED).write_text("[]")
    stats = prepare_corpus(run, shipped, None)
    assert stats["documents"] == 0 and "gopher_quality" in stats["dropped"]


def _page(body: str) -> str:
    return (f"<!doctype html><html><head><title>Docs</title></head><body><nav><a href='/'>Home</a></nav>"
            f"<main><h1>Docs</h1>{body}</main><footer>(c) Example</footer></body></html>")


def test_junk_dressed_as_documentation_is_not_taken_for_a_reference_page(shipped):
    # A line of description, then spam, gibberish or filler in a code block or a table, or link spam that the
    # prose splitter leaves out: what is not prose does not read as code, so the page is judged whole.
    rng = random.Random(1)
    words = ("cheap", "best", "deal", "casino", "bonus", "free", "click", "win", "offer", "now", "pills", "loan")
    spam = " ".join(rng.choice(words) for _ in range(400))
    gibberish = " ".join("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(3, 9)))
                         for _ in range(300))
    rows = "".join(f"<tr><td>{rng.choice(words)}</td><td>{' '.join(rng.choice(words) for _ in range(5))}</td></tr>"
                   for _ in range(80))
    seo = "\n".join(f"buy cheap viagra online {i} best casino bonus free spins" for i in range(200))
    links = "".join(f"<p>BUY-NOW!!! $9.99 www.cheap-pills{i}.example 50%OFF +1-800-555-{i:04d} #1 "
                    f"http://x.example/{i}</p>" for i in range(60))
    pages = {
        "spam in a code block": f"<p>Install the package.</p><pre>{spam}</pre>",
        "gibberish in a code block": f"<p>Run this command.</p><pre>{gibberish}</pre>",
        "spam in a table": f"<p>Options are below.</p><table>{rows}</table>",
        "keywords as bash": f"<p>Get started quickly.</p><pre><code class='language-bash'>{seo}</code></pre>",
        "one line repeated": "<p>Full log below.</p><pre>" + "\n".join(["buy now best deal"] * 400) + "</pre>",
        "link spam": "<p>Order your pills today.</p>" + links,
    }
    curator = DocumentCurator(shipped, {"site": "docs"})
    kept = [name for name, body in pages.items() if curator.process(f"site/{name}", "html", _page(body)).step is None]
    assert kept == []
    code = "\n".join(f"SELECT pg_stat_reset_slru('{name}');  -- resets {name}" for name in ("clog", "subtrans", "xact"))
    reference = _page(f"<p>Resets the statistics of one SLRU cache.</p><pre>{code}\n{code}\n{code.upper()}</pre>")
    assert curator.process("site/reference", "html", reference).step is None  # real code still passes
