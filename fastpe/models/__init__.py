"""Sequential recommenders built on fastpe's encodings: CARCA and a SASRec-style baseline.

Both share one interface: ``encode(items [B, L], context [B, L, C] | None) -> (profile, padding)``
and ``score(profile, padding, candidates [B, T, N], candidate_context [B, T, C] | None,
per_position) -> logits [B, T, N]``.
"""

from fastpe.models.blocks import EncoderBlock, ItemRepresentation, SequenceEncoder, build_encoding
from fastpe.models.carca import CARCA
from fastpe.models.sasrec import SASRec

MODELS = {"carca": CARCA, "sasrec": SASRec}


def build_model(name: str, n_items: int, **options):
    """``carca`` or ``sasrec`` with the given options (see the classes)."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}") from None
    return cls(n_items, **options)


__all__ = ["CARCA", "MODELS", "SASRec", "EncoderBlock", "ItemRepresentation", "SequenceEncoder", "build_encoding",
           "build_model"]
