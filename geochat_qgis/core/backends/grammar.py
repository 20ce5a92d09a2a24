"""GBNF grammars that make GeoChat's box answers always parse (llama.cpp constrained decoding).

GeoChat writes boxes as ``{<x1><y1><x2><y2>|<θ>}`` with integers 0-100 (models.md). A referring
answer is one or more boxes; a grounded description is text with ``<p>phrase</p>`` followed by
boxes. Every repetition is bounded, so a constrained answer always ends.
"""
from __future__ import annotations

from typing import Optional

_BOX_RULES = r"""
box ::= "{" coord coord coord coord angle? "}"
coord ::= "<" pct ">"
pct ::= [0-9] | [1-9] [0-9] | "100"
angle ::= "|<" "-"? ([0-9] | [1-8] [0-9] | "90") ">"
"""

REFER_GRAMMAR = r"""root ::= box (" "? box){0,7}
""" + _BOX_RULES

GROUNDING_GRAMMAR = r"""root ::= text? object (text? object){0,7} text?
object ::= "<p>" phrase "</p>" " "? box (" "? box){0,3}
phrase ::= [^<>{}]+
text ::= [^<>{}]+
""" + _BOX_RULES

_BY_TASK = {"refer": REFER_GRAMMAR, "grounding": GROUNDING_GRAMMAR}


def box_grammar(family: str, task: str) -> Optional[str]:
    """The GBNF for ``task``'s answers of ``family``, or None where answers are free text."""
    if family != "geochat":
        return None
    return _BY_TASK.get(task)
