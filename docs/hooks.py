"""MkDocs hook: the site's pages that are made from other sources, so that none can drift.

- ``index.md`` (getting started) is the README, with its links into ``docs/`` made relative
  to the site and its "What it costs" section cut down to a link to ``benchmarks.md``.
- ``benchmarks.md`` is that README section itself: measured figures and the commands that
  re-run them, kept in one place.
- ``api/*.md``: one page per public module, each one mkdocstrings ``:::`` directive, and the
  nav's "API reference" entry (``api/index.md``) turned into a section listing them. Which
  modules: ``lmd4ml``, every module its ``__all__`` exports (recursively), every public module
  of ``lmd4ml.telemetry``, and the modules of the console scripts in ``pyproject.toml``. A
  new public name or module therefore appears without editing the docs.

Modules are read with griffe, statically (as mkdocstrings reads them): building the site
imports neither lmd4ml nor JAX.
"""

from __future__ import annotations

import posixpath
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

if sys.version_info >= (3, 11):
    import tomllib
else:  # the docs extra installs tomli there
    import tomli as tomllib

FENCE = re.compile(r"^\s*(```|~~~)")
# An inline link or image target: ](target) or ](target "title").
LINK = re.compile(r"(\]\()([^)\s]+)")


def sections(markdown: str, level: int = 2) -> list[tuple[str | None, str]]:
    """Split Markdown at its headings of ``level`` (outside code fences).

    Returns ``(heading title, text)`` pairs whose texts join back to ``markdown``; the text
    before the first heading has title ``None``.

    Example:
      >>> for title, text in sections("intro\\n## A\\n```\\n## code\\n```\\n## B\\n"):
      ...     print(title, repr(text))
      None 'intro\\n'
      A '## A\\n```\\n## code\\n```\\n'
      B '## B\\n'
    """
    marker = "#" * level + " "
    parts: list[tuple[str | None, str]] = [(None, "")]
    fenced = False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line):
            fenced = not fenced
        if not fenced and line.startswith(marker):
            parts.append((line[len(marker) :].strip(), ""))
        title, text = parts[-1]
        parts[-1] = (title, text + line)
    return parts


def section(markdown: str, title: str) -> str:
    """The body of the level-2 section called ``title`` (its heading line left out).

    Example:
      >>> section("# T\\n## Costs\\nfigures\\n### Detail\\nmore\\n## Next\\n", "Costs")
      'figures\\n### Detail\\nmore\\n'
      >>> section("# T\\n## Costs\\n", "Cost")
      Traceback (most recent call last):
      ...
      ValueError: the README has no section '## Cost' (its sections: ['Costs'])
    """
    found = dict((t, text) for t, text in sections(markdown) if t is not None)
    if title not in found:
        raise ValueError(f"the README has no section '## {title}' (its sections: {list(found)})")
    return found[title].split("\n", 1)[1]


def relative_links(markdown: str, docs: str = "docs/") -> tuple[str, set[str]]:
    """Make a root-level Markdown file's links work from ``docs`` (the site's root).

    Links into ``docs`` lose that prefix; any other relative link is to a file of the
    repository outside it, returned so that the site can serve it at the same path.
    External links and anchors are left alone.

    Example:
      >>> text, outside = relative_links("[a](docs/a.md#x), ![b](docs/b.png), "
      ...     "[n](notebooks/q.ipynb), [w](https://example.org/docs/w), [s](#s)")
      >>> text
      '[a](a.md#x), ![b](b.png), [n](notebooks/q.ipynb), [w](https://example.org/docs/w), [s](#s)'
      >>> outside
      {'notebooks/q.ipynb'}
    """
    outside: set[str] = set()

    def rewrite(match: re.Match) -> str:
        target = match[2]
        if re.match(r"[a-z][a-z0-9+.-]*:|[#/]", target):
            return match[0]
        if target.startswith(docs):
            return match[1] + target[len(docs) :]
        outside.add(posixpath.normpath(target.split("#", 1)[0]))
        return match[0]

    return LINK.sub(rewrite, markdown), outside


def getting_started(readme: str, costs: str, page: str) -> str:
    """The README with the body of its section ``costs`` replaced by a link to ``page``."""
    pointer = f"The measured figures and the commands that re-run them: [{costs}]({page}).\n\n"
    return "".join(
        text if title != costs else text.split("\n", 1)[0] + "\n\n" + pointer
        for title, text in sections(readme)
    )


def benchmarks(readme: str, costs: str) -> str:
    """The README's section ``costs`` as a page of its own, its subsections one level up."""
    body = section(readme, costs)
    lifted = "".join(
        text[1:] if title is not None else text for title, text in sections(body, level=3)
    )
    return f"# {costs}\n\n{lifted}"


def resolved(obj: griffe.Object | griffe.Alias) -> griffe.Object:
    """What an imported name stands for (itself, if it is defined where it is found)."""
    return obj.final_target if obj.is_alias else obj


def exported(module: griffe.Module, name: str) -> griffe.Object:
    """What ``module.name`` is at run time. Where a package imports a name from its submodule
    of that name (``from lmd4ml.supervised import supervised``), the import replaces the
    submodule as the package's attribute; griffe's members keep the submodule."""
    imported = module.imports.get(name)
    return resolved(module.modules_collection[imported] if imported else module[name])


def exported_modules(module: griffe.Module) -> list[griffe.Module]:
    """The modules ``module`` exports in its ``__all__``, and theirs, depth first."""
    found = []
    for name in module.exports or ():
        target = exported(module, name)
        if target.is_module:
            found += [target, *exported_modules(target)]
    return found


def script_modules(pyproject: Path) -> list[str]:
    """The modules of the console scripts ``pyproject`` declares (``module:function``).

    Example:
      >>> import tempfile
      >>> path = Path(tempfile.mkdtemp()) / "pyproject.toml"
      >>> _ = path.write_text('[project.scripts]\\ntool = "pkg.cli:main"\\n')
      >>> script_modules(path)
      ['pkg.cli']
    """
    scripts = tomllib.loads(pyproject.read_text())["project"].get("scripts", {})
    return [target.split(":", 1)[0] for target in scripts.values()]


def api_modules(package: griffe.Module, whole: Sequence[str], scripts: Iterable[str]) -> list[str]:
    """The dotted paths of the modules that get an API page: ``package``, what it exports,
    every public module of the subpackages ``whole``, and ``scripts``' modules."""
    paths = {package.path, *(m.path for m in exported_modules(package)), *scripts}
    for name in whole:
        sub = package[name]
        paths |= {m.path for m in sub.modules.values() if not m.name.startswith("_")}
    return [package.path, *sorted(paths - {package.path})]


def summary(obj: griffe.Object) -> str:
    """The first paragraph of an object's docstring on one line, or ``""``."""
    text = obj.docstring.value.strip().split("\n\n", 1)[0] if obj.docstring else ""
    return " ".join(text.split())


def members(module: griffe.Module) -> dict[str, griffe.Object]:
    """The public names mkdocstrings renders on ``module``'s page, with what each stands for
    (its ``__all__``, or else what it defines without a leading underscore), less modules."""
    found = {}
    for name, member in module.members.items():
        target = exported(module, name) if member.is_public else None
        if target is not None and not target.is_module:
            found[name] = target
    return found


def shadowed(module: griffe.Module) -> dict[str, griffe.Object]:
    """The public names of ``module`` that griffe takes for a submodule of that name although
    an import replaced it (``lmd4ml.stats.histogram``): their pages render them explicitly."""
    return {
        name: target for name, target in members(module).items() if module.members[name].is_module
    }


def anchors(collection: griffe.ModulesCollection, pages: Sequence[str]) -> dict[str, str]:
    """Where each object rendered on a module page is: its path -> ``page.md#anchor``."""
    found: dict[str, str] = {}
    for page in pages:
        module = collection[page]
        hidden = shadowed(module)
        for name, target in members(module).items():
            anchor = target.path if name in hidden else f"{page}.{name}"
            found.setdefault(target.path, f"{page}.md#{anchor}")
    return found


def directive(path: str, heading_level: int, **options: str) -> str:
    """One mkdocstrings ``:::`` block.

    Example:
      >>> print(directive("pkg.f", 3, heading="pkg.f"), end="")
      ::: pkg.f
          options:
            heading_level: 3
            heading: pkg.f
    """
    lines = [f"::: {path}", "    options:", f"      heading_level: {heading_level}"]
    lines += [f"      {key}: {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def package_page(package: griffe.Module, elsewhere: dict[str, str]) -> str:
    """``package``'s own page: every name of its ``__all__``, grouped by the module that
    defines it (``lmd4ml.quantities``, ``lmd4ml.step``, ...) and titled as users write it.
    A name that a module page renders (``elsewhere``: path -> link) is a link to it, so that
    each object is documented once; exported modules link to their pages."""
    groups: dict[str, list[str]] = {}
    modules = []
    for name in package.exports or ():
        target = exported(package, name)
        title = f"{package.path}.{name}"
        if target.is_module:
            modules.append(f"- [`{target.path}`]({target.path}.md): {summary(target)}")
            continue
        home = ".".join(target.path.split(".")[:2])
        if target.path in elsewhere:
            entry = f"- [`{title}`]({elsewhere[target.path]}): {summary(target)}\n"
        else:
            entry = directive(target.path, 3, heading=title, toc_label=name)
        groups.setdefault(home, []).append(entry)
    lines = [f"# `{package.path}`", "", summary(package), ""]
    for home, entries in groups.items():
        lines += [f"## `{home}`", "", summary(package.modules_collection[home]), "", *entries]
    if modules:
        lines += ["## Modules", "", *modules]
    return "\n".join(lines) + "\n"


def module_page(module: griffe.Module) -> str:
    """A module's page: mkdocstrings renders it, its docstring first, with a level-1 title;
    then the names it cannot see (:func:`shadowed`)."""
    extra = [
        directive(target.path, 2, heading=f"{module.path}.{name}", toc_label=name)
        for name, target in shadowed(module).items()
    ]
    return "\n".join([directive(module.path, 1), *extra])


def api_index(collection: griffe.ModulesCollection, paths: Sequence[str]) -> str:
    """The API reference's first page: each module's page and its one-line summary."""
    rows = [f"- [`{path}`]({path}.md): {summary(collection[path])}" for path in paths]
    return (
        "# API reference\n\nGenerated from the docstrings; one page per public module.\n\n"
        + "\n".join(rows)
        + "\n"
    )


def api_nav(nav: list, index: str, pages: Sequence[str]) -> list:
    """``nav`` with its entry for ``index`` expanded into a section: ``index``, then a page
    per module, titled by its dotted path.

    Example:
      >>> api_nav([{"Home": "index.md"}, {"API": "api/index.md"}], "api/index.md", ["m"])
      [{'Home': 'index.md'}, {'API': ['api/index.md', {'m': 'api/m.md'}]}]
    """
    folder = posixpath.dirname(index)

    def expand(item):
        if isinstance(item, dict):
            return {
                title: [index, *({p: f"{folder}/{p}.md"} for p in pages)]
                if value == index
                else expand(value)
                for title, value in item.items()
            }
        if isinstance(item, list):
            return [expand(entry) for entry in item]
        return item

    return expand(nav)


def fenced_doctests(docstring: str) -> str:
    """Fence each doctest block of a docstring (a ``>>>`` line to the next blank line) as
    ``pycon`` code: unfenced, Markdown reads its prompts as nested quotes.

    Example:
      >>> fenced_doctests("Sum:\\n\\n  >>> 1 + 1\\n  2\\n\\nDone.").split("\\n")
      ['Sum:', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'Done.']
    """
    out: list[str] = []
    indent = None  # the open block's indentation, None outside a block
    for line in docstring.split("\n"):
        stripped = line.lstrip()
        if indent is None and stripped.startswith(">>>"):
            indent = len(line) - len(stripped)
            out.append("```pycon")
        elif indent is not None and not stripped:
            out.append("```")
            indent = None
        out.append(line[indent:] if indent is not None else line)
    return "\n".join([*out, "```"] if indent is not None else out)


def plain_roles(docstring: str) -> str:
    """Write the docstrings' Sphinx roles as Markdown code: ``:func:`~pkg.mod.f``` as
    ```f```, the full path without the ``~``.

    Example:
      >>> plain_roles("See :func:`~lmd4ml.stats.histogram` and :mod:`lmd4ml.stats.ghost`.")
      'See `histogram` and `lmd4ml.stats.ghost`.'
    """

    def code(match: re.Match) -> str:
        return f"`{match[2].rsplit('.', 1)[-1] if match[1] else match[2]}`"

    return re.sub(r":(?:mod|func|class|meth|attr|data|obj|exc):`(~?)([^`]+)`", code, docstring)


class MarkdownDocstrings(griffe.Extension):
    """A griffe extension (mkdocs.yml loads it for mkdocstrings): the docstrings, written for
    doctest and Sphinx-style roles, made Markdown (:func:`fenced_doctests`,
    :func:`plain_roles`) before they are rendered."""

    def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fenced_doctests(plain_roles(obj.docstring.value))


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated pages (and the repository files the README links to) to the site;
    the nav's API section is filled here too, beside the pages it lists."""
    root = Path(config.config_file_path).parent
    readme, outside = relative_links((root / "README.md").read_text(encoding="utf-8"))
    costs, bench = "What it costs", "benchmarks.md"
    for path in sorted(outside):
        if not (root / path).is_file():
            raise ValueError(f"README.md links to {path!r}, which is not a file of the repository")
        files.append(
            File(
                path,
                src_dir=str(root),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    files.append(File.generated(config, "index.md", content=getting_started(readme, costs, bench)))
    files.append(File.generated(config, bench, content=benchmarks(readme, costs)))

    package = griffe.load("lmd4ml", search_paths=[str(root)])
    paths = api_modules(package, ["telemetry"], script_modules(root / "pyproject.toml"))
    collection = package.modules_collection
    files.append(File.generated(config, "api/index.md", content=api_index(collection, paths)))
    elsewhere = anchors(collection, paths[1:])
    files.append(
        File.generated(config, f"api/{package.path}.md", content=package_page(package, elsewhere))
    )
    for path in paths[1:]:
        files.append(
            File.generated(config, f"api/{path}.md", content=module_page(collection[path]))
        )
    config.nav = api_nav(config.nav or [], "api/index.md", paths)
    return files
