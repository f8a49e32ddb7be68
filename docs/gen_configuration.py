"""Write docs/configuration.md from the config schema (the dataclasses of dblocks/config.py).

Every key's type and default come from the dataclass fields; its description is the comment on the
field's line in the source (and the comment lines right below it). Nothing is written by hand here.

    python docs/gen_configuration.py           # rewrite docs/configuration.md
    python docs/gen_configuration.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
sys.path.insert(0, str(ROOT))

from dblocks import config  # noqa: E402
from dblocks.families import FAMILIES  # noqa: E402

REGENERATE = "python docs/gen_configuration.py"


def comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line in ``cls``'s source, plus comment-only lines below it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    said = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT and not tok.string.lstrip("#").strip().startswith("noqa")
    }
    (body,) = ast.parse(source).body
    out = {}
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            parts = [said[n] for n in range(node.lineno, node.end_lineno + 1) if n in said]
            n = node.end_lineno + 1
            while n <= len(lines) and lines[n - 1].strip().startswith("#"):
                parts.append(said.get(n, ""))
                n += 1
            out[node.target.id] = " ".join(p for p in parts if p)
    return out


def type_name(tp) -> str:
    text = tp.__name__ if isinstance(tp, type) else str(tp)
    return str(text).replace("typing.", "").replace("NoneType", "None").replace(" | ", " \\| ")


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def show(value) -> str:
    if value is dataclasses.MISSING:
        return "–"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return f"`{value}`" if value else "`''`"
    return f"`{value}`"


def cell(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|").replace("\n", " ")


def table(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """One row per plain field of ``cls`` (nested dataclasses get their own section)."""
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    notes = comments(cls)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints.get(f.name)):
            continue
        rows.append(
            f"| `{prefix}{f.name}` | {type_name(hints[f.name])} | {cell(show(default_of(f)))} "
            f"| {cell(notes.get(f.name, ''))} |"
        )
    return rows


def doc(cls: type) -> str:
    """A class's docstring, unwrapped (none for dataclasses' generated signature docstring)."""
    text = inspect.getdoc(cls) or ""
    return "" if text.startswith(cls.__name__ + "(") else " ".join(text.split()).replace("``", "`")


def model_section() -> list[str]:
    base = config.ModelConfig
    lines = [
        "## `model`",
        "",
        doc(base),
        "The group `model=<family>` picks a family; every setting of its network config is an",
        "optional override of the named size (`model.size`); `null` keeps the size's value.",
        "",
        *table(base, "model."),
    ]
    for name, family in FAMILIES.items():
        cfg = family.config
        hints = typing.get_type_hints(cfg, vars(sys.modules[cfg.__module__]))
        notes = comments(cfg)
        sizes = family.sizes
        lines += [
            "",
            f"### `model={name}` ({cfg.__name__}, `{cfg.__module__.replace('.', '/')}.py`)",
            "",
            "| key | type | " + " | ".join(f"size `{s}`" for s in sizes) + " | description |",
            "|---|---|" + "---|" * len(sizes) + "---|",
        ]
        for f in dataclasses.fields(cfg):
            values = " | ".join(cell(show(getattr(sizes[s], f.name))) for s in sizes)
            lines.append(
                f"| `model.{f.name}` | {type_name(hints[f.name])} | {values} | {cell(notes.get(f.name, ''))} |"
            )
    return lines


def experiments() -> list[str]:
    rows = ["| `experiment=` | what it is |", "|---|---|"]
    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        said = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        first = []  # the first sentence of its header comment (the lines after it are examples)
        for line in (t for t in said if not t.startswith("@package")):
            first.append(line)
            if line.endswith("."):
                break
        what = " ".join(first)
        rows.append(f"| `{path.stem}` | {cell(what)} |")
    return rows


def render() -> str:
    run = config.RunConfig
    hints = typing.get_type_hints(run, vars(config))
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from dblocks/config.py; do not edit by hand. -->",
        "",
        "Every key of the main job (`python -m coordinator`, `dblocks-run`), the standalone worker and the",
        "sampler, as Hydra overrides: `python -m coordinator experiment=debug blocks.num=3 train.lr=3e-4`.",
        "The defaults are the schema's (`dblocks/config.py`); an `experiment=` preset and the root",
        "`configs/config.yaml` (`output_dir: outputs/${name}`) change some of them; `--cfg job` prints",
        "the composed config. A bad value stops the run at start in one line naming the key.",
        f"Regenerate this file with `{REGENERATE}` after changing the schema.",
        "",
        "## Experiments",
        "",
        *experiments(),
        "",
        "## Top level",
        "",
        *table(run, ""),
    ]
    for f in dataclasses.fields(run):
        cls = hints[f.name]
        if not dataclasses.is_dataclass(cls):
            continue
        if f.name == "model":
            lines += ["", *model_section()]
            continue
        lines += ["", f"## `{f.name}`", ""]
        if doc(cls):
            lines += [doc(cls), ""]
        lines += table(cls, f"{f.name}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
