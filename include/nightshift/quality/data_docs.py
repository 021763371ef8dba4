"""Great Expectations Data Docs of one validation, written to a folder of the run, readable with no internet.

GX's page templates load bootstrap, jQuery, font-awesome and the GX logo from CDNs; here every external
``<script>``, ``<link>`` and ``<img>`` is removed and a small inline stylesheet stands in for bootstrap, so a
page renders the same from disk, behind a proxy, or in an air-gapped cluster (the filter buttons and
collapsible sections, which need bootstrap's JavaScript, are dropped; every section stays open).

Data Docs show "sampled unexpected values". The suite checks metrics, never the text itself, and the
values are replaced by the offending documents' ids before rendering in any case.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SITE = "run"
_VALUE_KEYS = ("partial_unexpected_list", "partial_unexpected_counts", "unexpected_list", "unexpected_index_list",
               "partial_unexpected_index_list", "unexpected_index_query")
_EXTERNAL = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>|<link[^>]*\bhref="https?://[^"]*"[^>]*>'
                       r'|<img[^>]*\bsrc="https?://[^"]*"[^>]*>', re.IGNORECASE)
_OFFLINE_CSS = """<style>/* stands in for bootstrap 4 and font-awesome, which GX loads from CDNs */
body{font-family:system-ui,sans-serif;margin:0;color:#222} .container-fluid{padding:1rem 2rem}
.row{display:flex;flex-wrap:wrap;gap:1rem} .col-md-2{flex:0 0 14rem} .col-md-10{flex:1 1 0;min-width:0}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.25rem .5rem;vertical-align:top;text-align:left}
.text-success{color:#1a7f37} .text-danger{color:#c62828} .d-none{display:none} .d-md-block{display:block}
.fa-check-circle::before{content:"\\2714"} .fa-times::before{content:"\\2716"} i.fas{font-style:normal}
.card{border:1px solid #ddd;border-radius:4px;margin-bottom:1rem} .card-header,.card-body{padding:.5rem}
.cooltip .top,.btn-group-toggle,.card-text,a[data-toggle=collapse],.navbar,footer{display:none}
</style>"""


def add_site(context: Any, folder: Path) -> None:
    """Point an ephemeral context's Data Docs at ``folder`` (its default site writes to a deleted temp dir)."""
    try:
        context.delete_data_docs_site("local_site")
    except Exception:  # noqa: BLE001 (GX raises its own errors when the default site is absent)
        pass
    context.add_data_docs_site(SITE, {
        "class_name": "SiteBuilder", "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })


def scrub_row_values(result: Any, id_column: str = "id") -> Any:
    """Replace row values in a suite result by the offending rows' ids; in place, returns the result."""
    for r in result.results:
        res = r.result or {}
        ids = [row.get(id_column) for row in res.get("partial_unexpected_index_list") or [] if isinstance(row, dict)]
        for key in _VALUE_KEYS:
            res.pop(key, None)
        if ids:
            res["partial_unexpected_list"] = [f"{id_column}={i}" for i in ids]
        if isinstance(res.get("observed_value"), list | dict) and "column" in r.expectation_config.kwargs:
            res["observed_value"] = "(hidden)"
        if r.exception_info and r.exception_info.get("exception_message"):
            r.exception_info["exception_message"] = "(hidden)"
    return result


def build(context: Any, folder: Path) -> list[str]:
    """Render every validation result the context holds into ``folder``; return the pages, relative to it."""
    store = context.validation_results_store
    keys = list(store.list_keys())
    for key in keys:
        store.set(key, scrub_row_values(store.get(key)))
    context.build_data_docs(site_names=[SITE])
    pages = []
    for key in keys:
        url = context.get_docs_sites_urls(resource_identifier=key, site_names=[SITE])[0]["site_url"]
        pages.append(Path(url.removeprefix("file://")).resolve().relative_to(folder.resolve()).as_posix())
    make_offline(folder, pages)
    return sorted(pages)


def make_offline(folder: Path, pages: list[str]) -> None:
    """Remove every external asset from the site's pages and list the validation pages on its index."""
    # GX copies 3.4 MB of tutorial animations into every site; no page of a validation shows them.
    for animation in (folder / "static" / "images").glob("*.gif"):
        animation.unlink()
    for page in folder.rglob("*.html"):
        html = _EXTERNAL.sub("", page.read_text(encoding="utf-8"))
        html = html.replace("</head>", _OFFLINE_CSS + "</head>", 1)
        if page.parent == folder and page.name == "index.html":
            # GX fills the index's tables with JavaScript from a CDN: a plain list of links instead.
            links = "".join(f'<li><a href="{p}">{p.split("/")[1]}</a></li>' for p in pages)
            html = re.sub(r"(<body[^>]*>)", rf"\1<ul class='container-fluid'>{links}</ul>", html, count=1)
        page.write_text(html, encoding="utf-8")
