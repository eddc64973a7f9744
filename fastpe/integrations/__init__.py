"""Adapters that put fastpe's encodings into existing codebases (nothing else in fastpe imports them).

* :mod:`fastpe.integrations.recbole`: a drop-in for RecBole's Transformer attention layer and
  ``patch(model, encoding)`` for RecBole's SASRec / BERT4Rec (RecBole itself is optional: the
  adapter never imports it).
* :mod:`fastpe.integrations.sasrec`: ``patch(model, encoding)`` for SASRec.pytorch-style models
  built on ``torch.nn.MultiheadAttention``.
* :mod:`fastpe.integrations.tisasrec`: ``patch(model)`` for TiSASRec.pytorch-style models: their
  time-interval attention without the ``[B, L, L, d]`` tensors, same weights (it leaves the
  position embeddings alone; the two above replace them as described next).

Both replace the model's absolute position embedding (an ``nn.Embedding`` called with position
ids and added to the item embeddings) by a module of :mod:`fastpe.integrations.position` that
fits the encoding. Both keep the host's Parameter objects (an optimizer built before still trains
them) and record what they did as ``model.fastpe_patch``; the parameters they add are listed by
:func:`new_parameters`, :func:`add_new_parameters` puts them into an existing optimizer, and an
optimizer that trains a patched model without them warns (:class:`NewParametersWarning`) at its
first step.
"""

from fastpe.integrations._patching import NewParametersWarning, add_new_parameters, new_parameters

__all__ = ["NewParametersWarning", "add_new_parameters", "new_parameters"]
