"""Print the config reference (a Markdown table per section) from the schema.

    python -m fedsplit.tools.configdoc      # pasted into README.md; a test checks it
"""

from __future__ import annotations

from fedsplit.config import default_flat, schema_fields


def render() -> str:
    defaults = default_flat()
    out, section = [], None
    for key, f in schema_fields().items():
        sec = key.split(".")[0]
        if sec != section:
            section = sec
            out += ["", f"**{sec}**", "", "| key | default | meaning |", "|---|---|---|"]
        meta = f.metadata
        allowed = f" One of: {', '.join(map(str, meta['choices']))}." if meta.get("choices") else ""
        default = defaults[key]
        if isinstance(default, str) and default != default.strip("\n"):
            default = default.encode("unicode_escape").decode()  # "\n", not a line break
        shown = f"`{default}`" if default not in ("", []) else "—"
        out.append(f"| `{key}` | {shown} | {meta['help']}{allowed} |")
    return "\n".join(out).strip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
