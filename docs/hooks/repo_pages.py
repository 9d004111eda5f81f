"""MkDocs hooks: the repository's other READMEs as pages of the site, and every link from a page
to the rest of the repository checked.

The pages under ``docs/`` link to the repository as a checkout lays it out
(``../evals/README.md``, ``../.ci/modelbuild-ci``), so they read the same in the repository and on
the site. Here:

- ``evals/README.md``, ``benchmarks/README.md`` and ``deploy/README.md`` become pages of the site
  (under ``repo/``), and links to them point there;
- a link to any other file or folder of the repository must name one that exists (else a warning,
  which fails ``mkdocs build --strict``); on the site it becomes the path in code, since the site
  does not carry the source.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.repo_pages")

PAGES = ("evals/README.md", "benchmarks/README.md", "deploy/README.md")
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _repo(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files, config):
    repo = _repo(config)
    for rel in PAGES:
        files.append(File.generated(config, f"repo/{rel}", abs_src_path=str(repo / rel)))
    return files


def on_page_markdown(markdown, page, config, files):
    repo = _repo(config)
    src = page.file.src_uri
    real = src[len("repo/"):] if src.startswith("repo/") else f"docs/{src}"
    here = posixpath.dirname(src)

    def rewrite(match: re.Match) -> str:
        text, target = match["text"], match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match[0]  # a URL, an anchor on this page, or an absolute link (mkdocs checks those)
        path, _, anchor = target.partition("#")
        in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(real), path))
        if in_repo.startswith("docs/"):
            site = in_repo[len("docs/"):]
        elif in_repo in PAGES:
            site = f"repo/{in_repo}"
        else:
            if in_repo.startswith("../") or not (repo / in_repo).exists():
                log.warning(f"Doc file '{src}' links to '{target}': no such file in the repository")
                return match[0]
            shown = in_repo + ("/" if path.endswith("/") else "")
            plain = text.strip("`")
            return f"`{shown}`" if plain in (shown, in_repo, path) else f"{text} (`{shown}`)"
        new = posixpath.relpath(site, here or ".") + (f"#{anchor}" if anchor else "")
        return f"[{text}]({new})"

    out, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        out.append(line if fenced else LINK.sub(rewrite, line))
    return "\n".join(out)
