"""Guides shipped inside the wheel, readable where the source tree is not.

``python -m kvbridge.docs``            lists them;
``python -m kvbridge.docs migration``  prints the guide for moving off ``kv_role: "kv_both"``
(the one kvbridge's deprecation warning names).
"""

from __future__ import annotations

import sys
from pathlib import Path

#: Guide name -> file under ``kvbridge/guides`` (a copy of ``docs/<file>`` in the source;
#: ``tests/python/test_kv_both.py`` checks they are equal).
GUIDES = {"migration": "migration-kv-both.md"}


def guide(name: str) -> str:
    """The text of guide ``name`` (see ``GUIDES``); KeyError for an unknown name."""
    return (Path(__file__).resolve().parent / "guides" / GUIDES[name]).read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in GUIDES:
        print("usage: python -m kvbridge.docs GUIDE\nguides: " + ", ".join(sorted(GUIDES)), file=sys.stderr)
        return 0 if not args else 2
    sys.stdout.write(guide(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
