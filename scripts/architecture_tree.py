"""Print the module tables of docs/architecture.md from each module's docstring (first sentence).

Usage: python scripts/architecture_tree.py  (paste the output under "## Modules"; tests/test_architecture_doc.py checks
that the map lists every module and nothing else).
"""

import ast
import pathlib
import re

root = pathlib.Path(__file__).resolve().parents[1]
files = sorted(
    p for d in ("mcad_cache", "pipelines", "cli") for p in (root / d).rglob("*.py") if p.name != "__init__.py"
)
groups = {}
for p in files:
    rel = p.relative_to(root).as_posix()
    doc = ast.get_docstring(ast.parse(p.read_text())) or ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.])(\s|$)", para)
    s = m.group(1) if m else para
    if len(s) > 170:
        s = s[:167].rsplit(" ", 1)[0] + " ..."
    parts = rel.split("/")
    key = "/".join(parts[:2]) if parts[0] == "mcad_cache" and len(parts) > 2 else parts[0]
    groups.setdefault(key, []).append((rel, s.replace("|", "\\|")))
order = ["mcad_cache"] + sorted(k for k in groups if k.startswith("mcad_cache/")) + ["pipelines", "cli"]
out = []
for k in order:
    if k not in groups:
        continue
    out.append(f"\n### `{k}/`\n" if k != "mcad_cache" else "\n### `mcad_cache/` (leaves and small shared modules)\n")
    out.append("| module | what it holds |\n|---|---|")
    out += [f"| `{r}` | {s} |" for r, s in groups[k]]
print("\n".join(out))
