"""The Markdown reports' tables as LaTeX: exact output on a hand-written table, escaping, every report's tables."""
import os
import shutil
import subprocess

import pytest

from eejax import latex

MARKDOWN = """# joint: resnet8 on folder:/data/my_set

Some text with | no table.

| exit | accuracy (%) | note |
|---:|:---:|---|
| 1 | **88.75** | `max_prob` & 50%* |
| 2 | 90.1 ± 0.3 |

## Policy `entropy`: at a budget

| budget | accuracy |
|---|---:|
| 25 | n/a |
"""

EXPECTED = r"""% The tables of report.md, written by eejax; needs \usepackage{booktabs}.

\begin{table}[t]
  \centering
  \caption{joint: resnet8 on folder:/data/my\_set}
  \label{tab:report-1}
  \begin{tabular}{rcl}
    \toprule
    exit & accuracy (\%) & note \\
    \midrule
    1 & \textbf{88.75} & \texttt{max\_prob} \& 50\%* \\
    2 & 90.1 $\pm$ 0.3 &  \\
    \bottomrule
  \end{tabular}
\end{table}

\begin{table}[t]
  \centering
  \caption{Policy \texttt{entropy}: at a budget}
  \label{tab:report-2}
  \begin{tabular}{lr}
    \toprule
    budget & accuracy \\
    \midrule
    25 & n/a \\
    \bottomrule
  \end{tabular}
\end{table}
"""


def test_a_markdown_report_becomes_booktabs_tables():
  assert latex.to_latex(MARKDOWN, "report") == EXPECTED
  assert latex.to_latex("# no tables here\n\ntext\n", "report") == ""
  untitled = latex.to_latex("| a |\n|---|\n| 1 |\n", "x")  # no heading above: no caption, still a label
  assert r"\caption" not in untitled and r"\label{tab:x-1}" in untitled


def test_every_special_character_is_escaped():
  assert latex.escape(r"a_b&c%d$e#f{g}h~i^j\k") == (r"a\_b\&c\%d\$e\#f\{g\}h\textasciitilde{}i"
                                                     r"\textasciicircum{}j\textbackslash{}k")
  assert latex.cell("`a_b` and **c%**") == r"\texttt{a\_b} and \textbf{c\%}"


def test_a_run_writes_the_tables_of_its_report_beside_it(smoke_run):
  _, _, workdir = smoke_run
  markdown = open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
  tex = open(os.path.join(workdir, "report.tex"), encoding="utf-8").read()
  found = latex.tables(markdown)
  assert len(found) >= 5 and tex.count(r"\begin{tabular}") == len(found)
  for table in found:  # every row has as many cells as its header
    assert all(len(row) == len(table["header"]) == len(table["align"]) for row in table["rows"])
  rows_in_md = sum(len(t["rows"]) + 1 for t in found)
  assert tex.count(r" \\" + "\n") == rows_in_md


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (TeX Live)")
def test_the_tables_compile(smoke_run, tmp_path):
  _, _, workdir = smoke_run
  (tmp_path / "paper.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n"
                                      f"\\input{{{os.path.join(workdir, 'report.tex')}}}\n"
                                      f"{latex.to_latex(MARKDOWN, 'other')}\n\\end{{document}}\n")
  r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp_path,
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stdout[-3000:]
  assert (tmp_path / "paper.pdf").stat().st_size > 1000


def test_the_command_converts_reports_written_before_and_a_mistake_is_one_line(tmp_path):
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  (tmp_path / "old.md").write_text(MARKDOWN)
  run = lambda *paths: subprocess.run([sys.executable, "-m", "eejax.latex", *map(str, paths)], cwd=REPO,
                                      capture_output=True, text=True, timeout=120, check=False)
  r = run(tmp_path / "old.md")
  assert r.returncode == 0 and "2 table(s)" in r.stdout, r.stderr
  assert (tmp_path / "old.tex").read_text() == EXPECTED.replace("report", "old")
  r = run(tmp_path / "missing.md")
  assert r.returncode == 2 and r.stderr.strip().startswith("eejax.latex: error: No such file or directory")
  assert len(r.stderr.strip().splitlines()) == 1
  (tmp_path / "binary.md").write_bytes(b"| a |\n|---|\n| \xff\xfe |\n")
  r = run(tmp_path / "binary.md")
  assert r.returncode == 2 and r.stderr.strip() == f"eejax.latex: error: {tmp_path}/binary.md is not UTF-8 text " \
                                                    "(byte 14): give a Markdown report", r.stderr
