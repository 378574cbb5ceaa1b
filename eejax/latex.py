"""The tables of a Markdown report as LaTeX (booktabs), to paste into a paper.

Every report eejax writes as Markdown (report.md, compare.md, certified.md,
export_report.md, the launchers' comparison.md and grid.md) gets a .tex file
beside it holding each of its tables as a `table` float: the nearest heading
above a table is its caption, `tab:<file>-<n>` its label, Markdown's column
alignment its column spec. Needs `\\usepackage{booktabs}` in the preamble.

  \\input{workdir/report.tex}     % every table

For Markdown reports written before, or any other Markdown file:

  python -m eejax.latex REPORT.md [...]     # writes REPORT.tex beside each
"""
import os
import re

from eejax import cli, workdirs
from eejax.errors import UserError

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "≤": r"$\leq$",
            "≥": r"$\geq$", "×": r"$\times$", "−": r"$-$"}
_ALIGN = {(False, True): "r", (True, True): "c", (True, False): "l", (False, False): "l"}


def escape(text: str) -> str:
  """Plain text as LaTeX: the special characters escaped, and the few symbols reports use as math."""
  return "".join(_SPECIAL.get(ch, ch) for ch in text)


def cell(text: str) -> str:
  """One Markdown cell as LaTeX: `code` as \\texttt, **bold** as \\textbf, the rest escaped."""
  parts = re.split(r"(`[^`]*`|\*\*[^*]+\*\*)", text.strip())
  out = []
  for part in parts:
    if part.startswith("`") and part.endswith("`") and len(part) > 1:
      out.append(rf"\texttt{{{escape(part[1:-1])}}}")
    elif part.startswith("**") and part.endswith("**") and len(part) > 4:
      out.append(rf"\textbf{{{escape(part[2:-2])}}}")
    else:
      out.append(escape(part))
  return "".join(out)


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_rule(line: str) -> bool:
  return bool(re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", line.strip()))


def tables(markdown: str) -> list[dict]:
  """Every table of `markdown`: {caption (the nearest heading above, or ''), align ('rrl...'), header, rows}."""
  lines = markdown.splitlines()
  found, caption, i = [], "", 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("#"):
      caption = line.lstrip("#").strip()
    if line.lstrip().startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
      header = _cells(line)
      align = "".join(_ALIGN[(c.startswith(":"), c.endswith(":"))] for c in _cells(lines[i + 1]))
      rows, i = [], i + 2
      while i < len(lines) and lines[i].lstrip().startswith("|"):
        row = _cells(lines[i])
        rows.append((row + [""] * len(header))[:len(header)])
        i += 1
      found.append({"caption": caption, "align": align, "header": header, "rows": rows})
      continue
    i += 1
  return found


def to_latex(markdown: str, name: str) -> str:
  """The tables of `markdown` (a report called `name`, e.g. 'report') as booktabs floats; '' when it has none."""
  floats = []
  for n, table in enumerate(tables(markdown), start=1):
    body = [" & ".join(cell(c) for c in table["header"]) + r" \\", r"\midrule"]
    body += [" & ".join(cell(c) for c in row) + r" \\" for row in table["rows"]]
    floats.append("\n".join([
        r"\begin{table}[t]", r"  \centering", *([rf"  \caption{{{cell(table['caption'])}}}"] if table["caption"] else []),
        rf"  \label{{tab:{re.sub(r'[^A-Za-z0-9]+', '-', name)}-{n}}}", rf"  \begin{{tabular}}{{{table['align']}}}",
        r"    \toprule", *("    " + line for line in body), r"    \bottomrule", r"  \end{tabular}",
        r"\end{table}"]))
  if not floats:
    return ""
  return (f"% The tables of {name}.md, written by eejax; needs \\usepackage{{booktabs}}.\n\n"
          + "\n\n".join(floats) + "\n")


def write_beside(md_path: str, markdown: str) -> int:
  """Writes the tables of the Markdown report at `md_path` to the same name with .tex (nothing if it has none);
  returns how many tables."""
  stem = os.path.splitext(md_path)[0]
  text = to_latex(markdown, os.path.basename(stem))
  if text:
    workdirs.write_text(stem + ".tex", text)
  return text.count(r"\begin{tabular}")


def write_markdown(md_path: str, markdown: str) -> None:
  """A Markdown report, written whole (`workdirs.write_text`), and its tables as LaTeX beside it."""
  workdirs.write_text(md_path, markdown)
  write_beside(md_path, markdown)


def main(argv) -> None:
  paths = argv[1:]
  if not paths:
    cli.fail("give one or more Markdown reports: python -m eejax.latex REPORT.md [...]", "eejax.latex")

  def job():
    for path in paths:
      if not path.endswith(".md"):
        raise UserError(f"{path}: not a Markdown file (.md)")
      try:
        with open(path, encoding="utf-8") as f:
          markdown = f.read()
      except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): give a Markdown report") from None
      count = write_beside(path, markdown)
      print(f"{path}: {count} table(s)" + (f" -> {os.path.splitext(path)[0]}.tex" if count else ", nothing written"))
  cli.guarded(job, "eejax.latex")


if __name__ == "__main__":
  import functools  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=functools.partial(cli.parse_flags, program="eejax.latex"))
