"""Perturbation labels: ``"TP53"``, ``"A+B"`` (a double perturbation) and the control label.

Labels are parsed into gene tuples once, here, so every other module sees ``("A", "B")`` and never splits
strings itself. Order inside a combination carries no meaning, so ``"B+A"`` parses to the same sorted tuple.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["COMBO_SEP", "format_perturbation", "parse_perturbation", "parse_perturbations"]

COMBO_SEP = "+"
# Norman-style labels write a single perturbation as "A+ctrl"; these tokens are padding, not genes.
_PAD_TOKENS = frozenset({"ctrl", "control", "non-targeting", "nontargeting", "NT"})


def parse_perturbation(label: str, *, control_label: str, sep: str = COMBO_SEP) -> tuple[str, ...]:
    """Genes perturbed by ``label``, sorted; ``()`` for the control label.

    >>> parse_perturbation("KLF1+MAP2K6", control_label="control")
    ('KLF1', 'MAP2K6')
    >>> parse_perturbation("SGK1+ctrl", control_label="control")
    ('SGK1',)
    >>> parse_perturbation("control", control_label="control")
    ()
    """
    label = str(label).strip()
    if label == control_label:
        return ()
    parts = [p.strip() for p in label.split(sep)]
    if any(not p for p in parts):
        msg = f"malformed perturbation label {label!r}: empty gene name around {sep!r}"
        raise ValueError(msg)
    genes = sorted({p for p in parts if p not in _PAD_TOKENS and p != control_label})
    if not genes:
        msg = f"perturbation label {label!r} names no gene; if it is a control, pass control_label={label!r}"
        raise ValueError(msg)
    return tuple(genes)


def parse_perturbations(
    labels: Iterable[str], *, control_label: str, sep: str = COMBO_SEP
) -> dict[str, tuple[str, ...]]:
    """Parse each distinct label once: ``{label: genes}``."""
    return {lab: parse_perturbation(lab, control_label=control_label, sep=sep) for lab in dict.fromkeys(labels)}


def format_perturbation(genes: Iterable[str], *, sep: str = COMBO_SEP) -> str:
    """Canonical label of a gene set: sorted genes joined by ``sep``."""
    return sep.join(sorted(genes))
